//! A conala output folder as a Hub dataset: the parts its manifests commit (nothing else), laid out
//! as `data/train-00000-of-0000N.parquet`, and a card made from what the manifests record.

use std::path::Path;

use datafusion::prelude::SessionContext;

use super::cards::{self, DatasetFacts};
use super::files::UploadFile;
use super::PushOptions;
use crate::error::{Error, Result};
use crate::output::state::OutputState;
use crate::reports::FinishCounts;

/// Does `folder` hold a conala output (a manifest)?
pub fn is_output(folder: &Path) -> bool {
    std::fs::read_dir(folder)
        .map(|rd| {
            rd.flatten().any(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                n.starts_with("_manifest") && n.ends_with(".json")
            })
        })
        .unwrap_or(false)
}

/// The repo path of part `i` of `n`.
pub fn part_path(i: usize, n: usize) -> String {
    format!("data/train-{i:05}-of-{n:05}.parquet")
}

/// The files of the dataset repo: the parts and README.md, the card made from the manifests.
pub async fn dataset_files(
    folder: &Path,
    repo_id: &str,
    opts: &PushOptions,
) -> Result<Vec<UploadFile>> {
    let shown = folder.display().to_string();
    let loc = crate::storage::resolve(&SessionContext::new(), &shown)?;
    let Some(state) = OutputState::read(&loc).await? else {
        return Err(Error::Data(format!(
            "{shown}: not a conala output (no _manifest.json): push a model folder as a model repo, or run the plan first"
        )));
    };
    let open = state.incomplete(&shown)?;
    if let Some(open) = &open {
        if !opts.allow_incomplete {
            return Err(Error::Data(format!(
                "{shown}: the output is incomplete ({open}); rerun the plan to finish it, or push what is committed with --allow-incomplete"
            )));
        }
        log::warn!("push: {shown} is incomplete ({open}); pushing its committed parts");
    }
    let parts = state.committed_parts();
    if parts.is_empty() {
        return Err(Error::Data(format!(
            "{shown}: the manifests commit no part files: nothing to push"
        )));
    }
    let n = parts.len();
    let mut files = Vec::with_capacity(n + 1);
    for (i, p) in parts.iter().enumerate() {
        let path = folder.join(p);
        if !path.is_file() {
            return Err(Error::Data(format!(
                "{shown}: the manifest commits `{p}` but the file is missing"
            )));
        }
        files.push(UploadFile::from_disk(part_path(i, n), &path)?);
    }
    let facts = facts(&state, repo_id, n, open.is_none(), opts);
    files.push(UploadFile::from_bytes(
        "README.md",
        cards::dataset_card(&facts).into_bytes(),
    ));
    Ok(files)
}

/// What the manifests say about the output, summed over shards.
fn facts(
    state: &OutputState,
    repo_id: &str,
    parts: usize,
    complete: bool,
    opts: &PushOptions,
) -> DatasetFacts {
    let ms: Vec<_> = state.manifests.iter().map(|(_, m)| m).collect();
    let first = ms[0];
    let mut finish = FinishCounts::default();
    let mut model = None;
    let mut generated_tokens = 0;
    for m in &ms {
        if let Some(g) = &m.extra.generate {
            finish.eos += g.finish_reason.eos;
            finish.length += g.finish_reason.length;
            finish.error += g.finish_reason.error;
            generated_tokens += g.generated_tokens;
            model.get_or_insert_with(|| (g.model.clone(), g.model_hash.clone()));
        }
    }
    let sources = cards::source_datasets(&first.plan);
    DatasetFacts {
        repo_id: repo_id.to_string(),
        rows: ms.iter().flat_map(|m| &m.parts).map(|p| p.rows).sum(),
        parts,
        shards: ms.len(),
        columns: first.columns.clone(),
        plan_name: first.plan_name.clone(),
        plan: first.plan.clone(),
        model,
        finish: ms
            .iter()
            .any(|m| m.extra.generate.is_some())
            .then_some(finish),
        generated_tokens,
        scores: ms.iter().find_map(|m| m.extra.evaluate.clone()),
        license: opts
            .license
            .clone()
            .or_else(|| cards::known_license(&sources)),
        sources,
        finished_at: ms.iter().map(|m| m.finished_at.clone()).max(),
        conala_version: first
            .versions
            .get("conala")
            .cloned()
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string()),
        complete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_named_as_the_hub_names_splits() {
        assert_eq!(part_path(0, 3), "data/train-00000-of-00003.parquet");
        assert_eq!(part_path(12, 100), "data/train-00012-of-00100.parquet");
    }
}
