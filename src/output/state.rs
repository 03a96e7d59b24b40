//! What an output folder holds, read from its manifests: which shards are complete, incomplete or
//! missing, how many rows each committed, and whether the whole output is committed (`_SUCCESS`).
//!
//! `_SUCCESS` is created with a conditional put by the worker that completes the last shard, so of
//! several workers finishing together exactly one commits. Readers (`conala sql`, a plan's source)
//! read the parts the manifests list, never a stray file, and warn when the output is incomplete.

use bytes::Bytes;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use super::manifest::{now_rfc3339, Manifest};
use crate::context::Shard;
use crate::error::{Error, Result};
use crate::storage::Location;

/// The commit marker: the output is complete (every shard of it).
pub const SUCCESS: &str = "_SUCCESS";

/// The manifest of an output written whole, or of one shard of it.
pub fn manifest_name(shard: Option<Shard>) -> String {
    match shard {
        Some(s) => format!("_manifest-{}.json", s.label()),
        None => "_manifest.json".to_string(),
    }
}

/// Where one shard (or the whole output) stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Complete,
    Incomplete,
    Missing,
}

#[derive(Debug, Clone)]
pub struct ShardStatus {
    /// `i/n`, or `all` for an output written without shards.
    pub shard: String,
    pub progress: Progress,
    pub rows: u64,
    pub parts: usize,
}

/// What the commit marker records.
#[derive(Debug, Serialize, Deserialize)]
struct Commit {
    committed_at: String,
    rows: u64,
    shards: u64,
    by_run: String,
}

/// An output folder's manifests.
#[derive(Debug)]
pub struct OutputState {
    pub manifests: Vec<(String, Manifest)>,
    /// `_SUCCESS` is there.
    pub committed: bool,
}

impl OutputState {
    /// The folder's manifests, or `None` when it has none (not a conala output, or nothing written).
    pub async fn read(folder: &Location) -> Result<Option<OutputState>> {
        let base = folder.path.as_ref().to_string();
        let mut manifests = vec![];
        let mut committed = false;
        for meta in folder.list().await? {
            let Some(name) = meta
                .location
                .as_ref()
                .strip_prefix(&base)
                .map(|n| n.trim_start_matches('/'))
            else {
                continue;
            };
            if name == SUCCESS {
                committed = true;
            } else if name.starts_with("_manifest") && name.ends_with(".json") {
                let loc = folder.child(name);
                let bytes = loc.read().await?;
                let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::json(format!("{}: not a conala manifest", loc.display), e)
                })?;
                manifests.push((name.to_string(), m));
            }
        }
        Ok((!manifests.is_empty()).then_some(OutputState {
            manifests,
            committed,
        }))
    }

    /// The shard count the manifests agree on (`None`: written without shards). Mixed layouts (a
    /// whole-output manifest next to shard manifests, or shards of different counts) are an error:
    /// their rows would overlap.
    pub fn shard_count(&self, what: &str) -> Result<Option<u64>> {
        let mut counts: Vec<Option<u64>> = self
            .manifests
            .iter()
            .map(|(_, m)| {
                m.shard
                    .as_deref()
                    .and_then(|s| Shard::parse(s).ok())
                    .map(|s| s.count)
            })
            .collect();
        counts.sort();
        counts.dedup();
        match counts.as_slice() {
            [one] => Ok(*one),
            _ => Err(Error::Data(format!(
                "{what}: holds outputs of different layouts ({}); each job needs its own folder",
                self.manifests
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// Every shard's state, in order (missing ones included).
    pub fn shards(&self, what: &str) -> Result<Vec<ShardStatus>> {
        let status = |shard: String, m: Option<&Manifest>| match m {
            Some(m) => ShardStatus {
                shard,
                progress: if m.complete {
                    Progress::Complete
                } else {
                    Progress::Incomplete
                },
                rows: m.parts.iter().map(|p| p.rows).sum(),
                parts: m.parts.len(),
            },
            None => ShardStatus {
                shard,
                progress: Progress::Missing,
                rows: 0,
                parts: 0,
            },
        };
        Ok(match self.shard_count(what)? {
            None => vec![status("all".into(), self.manifests.first().map(|(_, m)| m))],
            Some(n) => (0..n)
                .map(|i| {
                    let name = manifest_name(Some(Shard { index: i, count: n }));
                    let m = self.manifests.iter().find(|(f, _)| *f == name);
                    status(format!("{i}/{n}"), m.map(|(_, m)| m))
                })
                .collect(),
        })
    }

    /// The part files the manifests commit (relative names), sorted.
    pub fn committed_parts(&self) -> Vec<String> {
        let mut parts: Vec<String> = self
            .manifests
            .iter()
            .flat_map(|(_, m)| m.parts.iter().map(|p| p.file.clone()))
            .collect();
        parts.sort();
        parts
    }

    /// `None` when complete; else what is missing, for warnings: `shard 1/4 incomplete (300 rows),
    /// shard 3/4 missing`.
    pub fn incomplete(&self, what: &str) -> Result<Option<String>> {
        let open: Vec<String> = self
            .shards(what)?
            .into_iter()
            .filter(|s| s.progress != Progress::Complete)
            .map(|s| match s.progress {
                Progress::Missing => format!("shard {} missing", s.shard),
                _ if s.shard == "all" => format!("incomplete ({} rows so far)", s.rows),
                _ => format!("shard {} incomplete ({} rows so far)", s.shard, s.rows),
            })
            .collect();
        Ok((!open.is_empty()).then(|| open.join(", ")))
    }
}

/// Commit the output if every shard is complete: create `_SUCCESS` unless another worker did.
/// Returns whether this call committed it.
pub async fn commit_if_complete(folder: &Location, run_id: &str) -> Result<bool> {
    let Some(state) = OutputState::read(folder).await? else {
        return Ok(false);
    };
    let shards = state.shards(&folder.display)?;
    if shards.iter().any(|s| s.progress != Progress::Complete) {
        return Ok(false);
    }
    let commit = Commit {
        committed_at: now_rfc3339(),
        rows: shards.iter().map(|s| s.rows).sum(),
        shards: shards.len() as u64,
        by_run: run_id.to_string(),
    };
    let json = serde_json::to_vec_pretty(&commit).map_err(|e| Error::json("_SUCCESS", e))?;
    let marker = folder.child(SUCCESS);
    match marker
        .store
        .put_opts(
            &marker.path,
            PutPayload::from(Bytes::from(json)),
            PutOptions::from(PutMode::Create),
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
        Err(e) => Err(Error::object_store(&marker.display, e)),
    }
}

/// Remove the commit marker: the output is about to change.
pub async fn uncommit(folder: &Location) -> Result<()> {
    let marker = folder.child(SUCCESS);
    match marker.store.delete(&marker.path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(Error::object_store(&marker.display, e)),
    }
}
