//! `conala push`: a folder to a Hugging Face Hub repository in one commit. A conala output goes up
//! as a dataset (its committed parts as `data/train-*.parquet`, a dataset card), a model folder as a
//! model (its files, a model card). Files the repo already has are skipped (preupload answers with
//! each file's id), LFS objects it already stores are not sent again (the batch API answers them
//! without actions), so rerunning an interrupted push sends only what is missing.

pub mod cards;
pub mod client;
pub mod dataset;
pub mod files;
mod lfs;
pub mod model;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use client::{CommitOp, HubWriter, Target};
use files::UploadFile;

use crate::error::{Error, Result};
use crate::hub::{HubConfig, RepoId};
use crate::plans::spec::PushSpec;

/// How to push (the CLI's flags, a plan's `push:`).
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// The branch (default `main`).
    pub revision: Option<String>,
    /// Create the repo private (an existing repo keeps its visibility).
    pub private: bool,
    /// The commit message (default: `Upload N files with conala`).
    pub message: Option<String>,
    /// Push an output whose shards are not all complete (its committed parts).
    pub allow_incomplete: bool,
    /// The card's license (default: the source data's, when conala knows it).
    pub license: Option<String>,
}

/// What a push did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PushReport {
    /// `hf://datasets/ID` or the model id.
    pub repo: String,
    pub url: String,
    /// The repo did not exist and was created.
    pub created: bool,
    /// `None` when the repo already had every file (nothing committed).
    pub commit: Option<String>,
    /// Files in the push, those the repo already had, LFS objects sent and bytes sent.
    pub files: usize,
    pub unchanged: usize,
    pub lfs_sent: usize,
    pub lfs_already_stored: usize,
    pub bytes_sent: u64,
    /// Stale files removed (parts of an earlier push of another layout).
    pub deleted: usize,
}

impl From<&PushSpec> for PushOptions {
    fn from(p: &PushSpec) -> PushOptions {
        PushOptions {
            revision: p.revision.clone(),
            private: p.private,
            message: p.message.clone(),
            allow_incomplete: false,
            license: p.license.clone(),
        }
    }
}

/// Push `folder` to `repo_id`: as a dataset when it is a conala output, else as a model.
pub async fn push(
    folder: &Path,
    repo_id: &str,
    opts: &PushOptions,
    hub: &HubConfig,
    progress_bars: bool,
) -> Result<PushReport> {
    crate::hub::check_push_repo(repo_id).map_err(Error::Data)?;
    if !folder.is_dir() {
        return Err(Error::Data(format!(
            "{}: no such folder (conala pushes local folders)",
            folder.display()
        )));
    }
    let as_dataset = dataset::is_output(folder);
    let (files, repo) = if as_dataset {
        let files = dataset::dataset_files(folder, repo_id, opts).await?;
        (files, RepoId::dataset(repo_id))
    } else {
        let dir = model::model_folder(folder)?;
        (
            model::model_files(&dir, repo_id, opts)?,
            RepoId::model(repo_id),
        )
    };
    let target = Target {
        repo,
        revision: opts.revision.clone().unwrap_or_else(|| "main".into()),
    };
    let writer = HubWriter::new(hub)?;
    let created = writer.create_repo(&target, opts.private).await?;
    if created {
        log::info!("push: created {}", target.display());
    }
    let answers = writer.preupload(&target, &files).await?;

    // What changed: a file the repo has with the same id is skipped.
    let (mut lfs, mut regular, mut unchanged) = (vec![], vec![], 0);
    for f in &files {
        let Some(a) = answers.iter().find(|a| a.path == f.path_in_repo) else {
            continue; // preupload checked that every file is answered
        };
        if a.should_ignore {
            log::warn!(
                "push: `{}` is ignored by the repo's .gitignore; left out",
                f.path_in_repo
            );
            continue;
        }
        let is_lfs = a.upload_mode == "lfs" && f.size > 0;
        let local_id = if is_lfs {
            f.sha256.clone()
        } else {
            f.git_blob_id()?
        };
        if a.oid.as_deref() == Some(local_id.as_str()) {
            unchanged += 1;
        } else if is_lfs {
            lfs.push(f);
        } else {
            regular.push(f);
        }
    }
    // A dataset's files under data/ that this push does not have would be read as rows too.
    let ours: Vec<&str> = files.iter().map(|f| f.path_in_repo.as_str()).collect();
    let stale: Vec<String> = if as_dataset {
        writer
            .list_files(&target)
            .await?
            .into_iter()
            .filter(|p| p.starts_with("data/") && !ours.contains(&p.as_str()))
            .collect()
    } else {
        vec![]
    };

    let total: u64 = lfs.iter().map(|f| f.size).sum();
    let sent = Arc::new(AtomicU64::new(0));
    let progress = (!lfs.is_empty()).then(|| {
        let counter = sent.clone();
        crate::progress::Progress::start(
            &format!("push {}", target.display()),
            crate::progress::BYTES,
            progress_bars,
            Some(total),
            move || (counter.load(Ordering::Relaxed), None),
        )
    });
    let uploaded = writer.upload_lfs(&target, &lfs, &sent).await;
    if let Some(p) = progress {
        p.finish();
    }
    let (lfs_sent, bytes_sent) = uploaded?;

    let mut report = PushReport {
        repo: target.display(),
        url: crate::secrets::redact(&writer.repo_url(&target)),
        created,
        commit: None,
        files: files.len(),
        unchanged,
        lfs_sent,
        lfs_already_stored: lfs.len() - lfs_sent,
        bytes_sent,
        deleted: stale.len(),
    };
    if lfs.is_empty() && regular.is_empty() && stale.is_empty() {
        log::info!(
            "push: {} already has all {} files; nothing to commit",
            target.display(),
            files.len()
        );
        return Ok(report);
    }
    let mut ops: Vec<CommitOp> = vec![];
    ops.extend(regular.iter().map(|f| CommitOp::Regular(f)));
    ops.extend(lfs.iter().map(|f| CommitOp::Lfs(f)));
    ops.extend(stale.into_iter().map(CommitOp::Delete));
    let changed = lfs.len() + regular.len();
    let message = opts
        .message
        .clone()
        .unwrap_or_else(|| format!("Upload {changed} files with conala"));
    let description = describe(&files, changed, unchanged, report.deleted);
    let info = writer.commit(&target, &message, &description, &ops).await?;
    log::info!(
        "push: committed {changed} file(s) to {} ({})",
        target.display(),
        info.oid
    );
    report.commit = Some(info.oid);
    Ok(report)
}

/// A plan step's `push:` (`write` pushes its output, `train` its merged model): the push, its error
/// saying what was kept and the command that finishes the job by hand.
pub async fn push_step(
    step: &str,
    kept: &str,
    folder: &Path,
    spec: &PushSpec,
    hub: &HubConfig,
) -> Result<PushReport> {
    push(folder, &spec.repo, &spec.into(), hub, false)
        .await
        .map_err(|e| {
            Error::Run(format!(
                "{step}.push to {}: {e} ({kept}; push it with `conala push {} {}`)",
                spec.repo,
                folder.display(),
                spec.repo
            ))
        })
}

/// `write.push`: the committed output, which must be a local folder, as a dataset, once `complete`
/// (a shard that leaves others to finish pushes nothing: the worker that completes it does).
pub async fn push_output(
    loc: &crate::storage::Location,
    spec: &PushSpec,
    complete: bool,
    hub: &HubConfig,
) -> Result<Option<PushReport>> {
    if !complete {
        log::info!(
            "write {}: the output is not complete yet; the worker that completes it pushes it",
            loc.display
        );
        return Ok(None);
    }
    let folder = loc.local_path().ok_or_else(|| {
        Error::Run(format!(
            "write.push: {} is not a local folder; conala pushes local outputs (copy it here and run `conala push`)",
            loc.display
        ))
    })?;
    let kept = "the output is committed and kept";
    push_step("write", kept, &folder, spec, hub).await.map(Some)
}

fn describe(files: &[UploadFile], changed: usize, unchanged: usize, deleted: usize) -> String {
    let bytes: u64 = files.iter().map(|f| f.size).sum();
    format!(
        "conala {}: {changed} of {} files changed ({unchanged} unchanged, {deleted} removed), {} in all.",
        env!("CARGO_PKG_VERSION"),
        files.len(),
        crate::progress::human_bytes(bytes)
    )
}
