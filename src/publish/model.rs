//! A model folder (a merged checkpoint, a train output's `model/`) as a Hub model repo: its files
//! as they are, and a model card made from the training run next to it unless the folder has one.

use std::path::{Path, PathBuf};

use super::cards::{self, ModelFacts};
use super::files::{walk, UploadFile};
use super::PushOptions;
use crate::error::{Error, Result};
use crate::training::TrainSummary;

/// The folder to push: `folder`, or its `model/` when `folder` is a train output.
pub fn model_folder(folder: &Path) -> Result<PathBuf> {
    if folder.join("config.json").is_file() {
        return Ok(folder.to_path_buf());
    }
    let inner = folder.join("model");
    if folder.join("summary.json").is_file() && inner.join("config.json").is_file() {
        log::info!(
            "push: {} is a train output; pushing its merged model, {}",
            folder.display(),
            inner.display()
        );
        return Ok(inner);
    }
    Err(Error::Data(format!(
        "{}: neither a model folder (no config.json) nor a conala output (no _manifest.json)",
        folder.display()
    )))
}

/// The files of the model repo: the folder's, and a model card made from the training run unless
/// the folder has its own README.md.
pub fn model_files(folder: &Path, repo_id: &str, opts: &PushOptions) -> Result<Vec<UploadFile>> {
    let mut files = vec![];
    for (rel, path) in walk(folder)? {
        files.push(UploadFile::from_disk(rel, &path)?);
    }
    if !files.iter().any(|f| f.path_in_repo == "README.md") {
        let facts = facts(folder, repo_id, opts)?;
        files.push(UploadFile::from_bytes(
            "README.md",
            cards::model_card(&facts).into_bytes(),
        ));
    }
    Ok(files)
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path.display(), e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::json(path.display(), e))
}

/// What the folder, its train output (`../summary.json`, `../adapter/`) and the options say.
fn facts(folder: &Path, repo_id: &str, opts: &PushOptions) -> Result<ModelFacts> {
    let config = read_json(&folder.join("config.json"))?;
    let parent = folder.parent().unwrap_or(folder);
    let summary: Option<TrainSummary> = match [folder, parent]
        .iter()
        .map(|d| d.join("summary.json"))
        .find(|p| p.is_file())
    {
        Some(p) => {
            let text = std::fs::read_to_string(&p).map_err(|e| Error::io(p.display(), e))?;
            Some(serde_json::from_str(&text).map_err(|e| Error::json(p.display(), e))?)
        }
        None => None,
    };
    let adapter = read_json(&parent.join("adapter").join("adapter_config.json"))?;
    let base_model = summary
        .as_ref()
        .map(|s| s.base_model.clone())
        .filter(|b| !b.is_empty())
        .or_else(|| {
            adapter
                .as_ref()
                .and_then(|a| a["base_model_name_or_path"].as_str().map(str::to_string))
        });
    let datasets = summary
        .as_ref()
        .map(|s| cards::source_datasets(&s.settings))
        .unwrap_or_default();
    let lora = adapter.as_ref().map(|a| {
        format!(
            "r={}, alpha={}, targets {}",
            a["r"], a["lora_alpha"], a["target_modules"]
        )
    });
    Ok(ModelFacts {
        repo_id: repo_id.to_string(),
        model_type: config
            .as_ref()
            .and_then(|c| c["model_type"].as_str().map(str::to_string)),
        license: opts
            .license
            .clone()
            .or_else(|| cards::known_license(&datasets)),
        base_model,
        datasets,
        steps: summary.as_ref().map(|s| s.steps),
        train_examples: summary.as_ref().map(|s| s.train_examples),
        final_eval_loss: summary.as_ref().and_then(|s| s.final_eval_loss),
        scores: summary.as_ref().and_then(|s| s.eval_scores.clone()),
        settings: summary.map(|s| s.settings).filter(|v| !v.is_null()),
        lora,
    })
}
