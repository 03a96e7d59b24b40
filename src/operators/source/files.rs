//! The input files of a source: listing them (local folders, object stores, Hub datasets), fetching
//! Hub files into the cache when their turn comes, and opening parquet and JSON.

// `ParquetObjectReader` is deprecated in parquet 59 (in favour of hand-written `AsyncFileReader`s) but
// reads object stores correctly; it is what DataFusion 55's own scans use.
#![allow(deprecated)]

use std::panic::AssertUnwindSafe;

use datafusion::parquet::arrow::async_reader::{
    ParquetObjectReader, ParquetRecordBatchStreamBuilder,
};
use futures::FutureExt;
use object_store::ObjectStoreExt;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::hub::{parse_dataset_uri, Hub, RepoId};
use crate::operators::{StepError, StepResult};
use crate::output::state::OutputState;
use crate::plans::spec::{FileFormat, SourceSpec};
use crate::storage::{resolve, Location};

/// The format a file's name says it holds.
pub(super) fn format_from_name(name: &str) -> Option<FileFormat> {
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".parquet") || lower.ends_with(".pq") {
        Some(FileFormat::Parquet)
    } else if lower.ends_with(".jsonl") || lower.ends_with(".ndjson") {
        Some(FileFormat::Jsonl)
    } else if lower.ends_with(".json") {
        Some(FileFormat::Json)
    } else {
        None
    }
}

/// One input file: already in a store, or a Hub file fetched when its turn comes.
#[derive(Debug, Clone)]
pub(super) enum InputFile {
    Stored {
        loc: Location,
        size: u64,
    },
    Hub {
        dataset: String,
        revision: String,
        file: String,
    },
}

impl InputFile {
    pub(super) fn size(&self) -> Option<u64> {
        match self {
            InputFile::Stored { size, .. } => Some(*size),
            InputFile::Hub { .. } => None,
        }
    }

    pub(super) fn name(&self) -> String {
        match self {
            InputFile::Stored { loc, .. } => loc.display.clone(),
            InputFile::Hub {
                dataset,
                revision,
                file,
            } => format!("hf://datasets/{dataset}@{revision}/{file}"),
        }
    }
}

/// The files a source spec names.
pub(super) async fn list_inputs(spec: &SourceSpec, ctx: &Context) -> StepResult<Vec<InputFile>> {
    let split = spec.split.as_deref().unwrap_or("train");
    if spec.uri.starts_with("hf://") {
        let dataset = parse_dataset_uri(&spec.uri).ok_or_else(|| {
            StepError::at(
                "uri",
                format!("`{}`: expected hf://datasets/OWNER/NAME", spec.uri),
            )
        })?;
        let (revision, files) = ctx
            .hub
            .dataset_split_files(
                &dataset,
                spec.config.as_deref(),
                split,
                spec.revision.as_deref(),
            )
            .await
            .map_err(|e| StepError::at("uri", e))?;
        return Ok(files
            .into_iter()
            .map(|file| InputFile::Hub {
                dataset: dataset.clone(),
                revision: revision.clone(),
                file,
            })
            .collect());
    }
    if spec.revision.is_some() {
        return Err(StepError::at(
            "revision",
            "only Hugging Face sources (hf://datasets/...) have revisions",
        ));
    }
    let loc = resolve(&ctx.session, &spec.uri).map_err(|e| StepError::at("uri", e))?;
    let metas = loc.files().await.map_err(|e| StepError::at("uri", e))?;
    if metas.is_empty() {
        return Err(StepError::at(
            "uri",
            format!("`{}`: no such file or folder", spec.uri),
        ));
    }
    let base = loc.path.as_ref().to_string();
    let rel_of = |p: &str| {
        p.strip_prefix(&base)
            .unwrap_or(p)
            .trim_start_matches('/')
            .to_string()
    };
    let mut chosen: Vec<_> = metas
        .into_iter()
        .filter(|m| !is_hidden(&rel_of(m.location.as_ref())))
        .collect();
    // Another plan's output: the parts its manifests commit, not strays of an interrupted run.
    if let Some(state) = OutputState::read(&loc)
        .await
        .map_err(|e| StepError::at("uri", e))?
    {
        if let Some(open) = state
            .incomplete(&spec.uri)
            .map_err(|e| StepError::at("uri", e))?
        {
            log::warn!(
                "{}: the output is incomplete ({open}); reading its committed parts",
                spec.uri
            );
        }
        let parts = state.committed_parts();
        chosen.retain(|m| parts.contains(&rel_of(m.location.as_ref())));
    }
    // A folder in the Hub's layout: pick CONFIG/SPLIT like a Hub dataset.
    if spec.config.is_some() || spec.split.is_some() {
        let rels: Vec<String> = chosen.iter().map(|m| rel_of(m.location.as_ref())).collect();
        let keep = crate::hub::select_split_files(&rels, spec.config.as_deref(), split)
            .map_err(|m| StepError::at("config", format!("{}: {m}", spec.uri)))?;
        if keep.is_empty() {
            return Err(StepError::at(
                if spec.config.is_some() {
                    "config"
                } else {
                    "split"
                },
                format!(
                    "{}: no parquet files for config `{}` split `{split}`",
                    spec.uri,
                    spec.config.as_deref().unwrap_or("default")
                ),
            ));
        }
        chosen.retain(|m| keep.contains(&rel_of(m.location.as_ref())));
    }
    Ok(chosen
        .into_iter()
        .map(|m| {
            let rel = rel_of(m.location.as_ref());
            let mut l = loc.clone();
            l.path = m.location.clone();
            l.display = if rel.is_empty() {
                loc.display.clone()
            } else {
                format!("{}/{rel}", loc.display.trim_end_matches('/'))
            };
            InputFile::Stored {
                loc: l,
                size: m.size,
            }
        })
        .collect())
}

/// `_manifest.json`, `.part-…tmp` and dot-files are not data.
fn is_hidden(rel: &str) -> bool {
    rel.split('/')
        .any(|c| c.starts_with('.') || c.starts_with('_'))
}

/// A readable location for the file (downloading Hub files into the cache).
pub(super) async fn materialize(
    f: &InputFile,
    hub: &Hub,
    session: &datafusion::prelude::SessionContext,
) -> Result<Location> {
    match f {
        InputFile::Stored { loc, .. } => Ok(loc.clone()),
        InputFile::Hub {
            dataset,
            revision,
            file,
        } => {
            let path = hub.fetch(&RepoId::dataset(dataset), revision, file).await?;
            let mut loc = resolve(session, &path.to_string_lossy())?;
            loc.display = f.name();
            Ok(loc)
        }
    }
}

/// `size` saves a HEAD request when the listing already told it.
pub(super) async fn open_parquet(
    loc: &Location,
    size: Option<u64>,
) -> Result<ParquetRecordBatchStreamBuilder<ParquetObjectReader>> {
    let size = match size {
        Some(s) => s,
        None => {
            loc.store
                .head(&loc.path)
                .await
                .map_err(|e| Error::object_store(&loc.display, e))?
                .size
        }
    };
    let reader = ParquetObjectReader::new(loc.store.clone(), loc.path.clone()).with_file_size(size);
    AssertUnwindSafe(ParquetRecordBatchStreamBuilder::new(reader))
        .catch_unwind()
        .await
        .map_err(|p| Error::reader_crash(&loc.display, "parquet", p.as_ref()))?
        .map_err(|e| Error::parquet(format!("{}: not a readable parquet file", loc.display), e))
}

pub(super) async fn read_json_rows(
    loc: &Location,
    fmt: FileFormat,
) -> Result<Vec<serde_json::Value>> {
    let bytes = loc.read().await?;
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace()).copied();
    if fmt == FileFormat::Json && first == Some(b'[') {
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Data(format!("{}: invalid JSON: {e}", loc.display)))?;
        for (i, r) in rows.iter().enumerate() {
            if !r.is_object() {
                return Err(Error::Data(format!(
                    "{}: element {} of the array is not an object",
                    loc.display, i
                )));
            }
        }
        return Ok(rows);
    }
    let mut rows = vec![];
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(line).map_err(|e| {
            Error::Data(format!(
                "{}: line {}: invalid JSON: {e}",
                loc.display,
                i + 1
            ))
        })?;
        if !v.is_object() {
            return Err(Error::Data(format!(
                "{}: line {}: expected a JSON object",
                loc.display,
                i + 1
            )));
        }
        rows.push(v);
    }
    Ok(rows)
}
