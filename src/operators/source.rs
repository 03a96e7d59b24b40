//! `source`: rows from local files, object stores or Hugging Face datasets, as record batches with a
//! stable row id.
//!
//! The row id is the row's ordinal in the source (files in path order, rows in file order), so it is
//! the same on every run and in every shard: outputs join back to inputs on it, resumed runs skip the
//! ids already written, and `--shard i/n` keeps the ids with `id % n == i`.

// `ParquetObjectReader` is deprecated in parquet 59 (in favour of hand-written `AsyncFileReader`s) but
// reads object stores correctly; it is what DataFusion 55's own scans use.
#![allow(deprecated)]

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, RecordBatch, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::json::reader::infer_json_schema_from_iterator;
use datafusion::arrow::json::ReaderBuilder;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::parquet::arrow::async_reader::{
    ParquetObjectReader, ParquetRecordBatchStreamBuilder,
};
use datafusion::parquet::arrow::ProjectionMask;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use object_store::ObjectStoreExt;
use tokio::sync::mpsc;

use super::{StepError, StepResult};
use crate::context::{Context, Shard};
use crate::error::{closest, Error, Result};
use crate::hub::{parse_dataset_uri, Hub, RepoId};
use crate::plans::spec::SourceSpec;
use crate::row_ids::RowIdSet;
use crate::storage::{resolve, Location};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Parquet,
    /// A JSON array of objects, or JSON lines (detected from the first byte).
    Json,
    JsonLines,
}

impl Format {
    fn from_name(name: &str) -> Option<Format> {
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".parquet") || lower.ends_with(".pq") {
            Some(Format::Parquet)
        } else if lower.ends_with(".jsonl") || lower.ends_with(".ndjson") {
            Some(Format::JsonLines)
        } else if lower.ends_with(".json") {
            Some(Format::Json)
        } else {
            None
        }
    }
}

/// One input file: already in a store, or a Hub file fetched when its turn comes.
#[derive(Debug, Clone)]
enum InputFile {
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
    fn size(&self) -> Option<u64> {
        match self {
            InputFile::Stored { size, .. } => Some(*size),
            InputFile::Hub { .. } => None,
        }
    }

    fn name(&self) -> String {
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

/// A validated source: its files and the schema it yields.
pub struct Source {
    spec: SourceSpec,
    files: Vec<(InputFile, Format)>,
    /// File columns (after `columns` projection).
    file_schema: SchemaRef,
    /// `row_id` first, then the file columns.
    schema: SchemaRef,
    json_schema: Option<SchemaRef>,
    hub: Arc<Hub>,
    session: datafusion::prelude::SessionContext,
    shard: Option<Shard>,
    skip: Option<Arc<RowIdSet>>,
}

impl Source {
    /// List the files, read their schemas (parquet footers are checked here, so a corrupt file fails
    /// before any work) and compute the output schema.
    pub async fn open(spec: &SourceSpec, ctx: &Context) -> StepResult<Source> {
        let uri_err = |e: Error| StepError::at("uri", e);
        let files = list_inputs(spec, ctx).await?;
        if files.is_empty() {
            return Err(StepError::at(
                "uri",
                format!("{}: no parquet or JSON files found", describe(spec)),
            ));
        }
        let forced = match spec.format.as_deref() {
            None => None,
            Some("parquet") => Some(Format::Parquet),
            Some("json") => Some(Format::Json),
            Some("jsonl") | Some("ndjson") => Some(Format::JsonLines),
            Some(other) => {
                return Err(StepError {
                    key: Some("format".into()),
                    message: format!("unknown format `{other}` (parquet, json, jsonl)"),
                    suggestion: closest(other, ["parquet", "json", "jsonl"]),
                })
            }
        };
        let mut typed = Vec::with_capacity(files.len());
        for f in files {
            let name = f.name();
            let format = forced.or_else(|| Format::from_name(&name));
            match format {
                Some(fmt) => typed.push((f, fmt)),
                None if forced.is_none() && typed.is_empty() && name.ends_with('/') => {}
                None => log::debug!("source: skipping {name} (not parquet or JSON)"),
            }
        }
        if typed.is_empty() {
            return Err(StepError::at(
                "uri",
                format!("{}: no parquet or JSON files found", describe(spec)),
            ));
        }
        let kinds: std::collections::BTreeSet<bool> =
            typed.iter().map(|(_, f)| *f == Format::Parquet).collect();
        if kinds.len() > 1 {
            return Err(StepError::at(
                "uri",
                format!(
                    "{}: mixes parquet and JSON files; point at one kind",
                    describe(spec)
                ),
            ));
        }

        let mut source = Source {
            spec: spec.clone(),
            files: typed,
            file_schema: Arc::new(Schema::empty()),
            schema: Arc::new(Schema::empty()),
            json_schema: None,
            hub: ctx.hub.clone(),
            session: ctx.session.clone(),
            shard: ctx.shard,
            skip: None,
        };
        let full_schema = if source.files[0].1 == Format::Parquet {
            source.check_parquet_files().await.map_err(uri_err)?
        } else {
            let s = source.infer_json_schema().await.map_err(uri_err)?;
            source.json_schema = Some(s.clone());
            s
        };
        let file_schema = match &spec.columns {
            None => full_schema,
            Some(cols) => {
                let mut fields = vec![];
                for c in cols {
                    match full_schema.field_with_name(c) {
                        Ok(f) => fields.push(f.clone()),
                        Err(_) => {
                            let names: Vec<&str> = full_schema
                                .fields()
                                .iter()
                                .map(|f| f.name().as_str())
                                .collect();
                            return Err(StepError {
                                key: Some("columns".into()),
                                message: format!(
                                    "no column `{c}` in {} (it has: {})",
                                    describe(spec),
                                    names.join(", ")
                                ),
                                suggestion: closest(c, names.iter().copied()),
                            });
                        }
                    }
                }
                Arc::new(Schema::new(fields))
            }
        };
        if file_schema.field_with_name(&spec.row_id).is_ok() {
            return Err(StepError::at(
                "row_id",
                format!(
                    "the data already has a column `{}`; set `row_id:` to another name",
                    spec.row_id
                ),
            ));
        }
        let mut fields = vec![Arc::new(Field::new(&spec.row_id, DataType::UInt64, false))];
        fields.extend(file_schema.fields().iter().cloned());
        source.schema = Arc::new(Schema::new(fields));
        source.file_schema = file_schema;
        Ok(source)
    }

    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    pub fn row_id_column(&self) -> &str {
        &self.spec.row_id
    }

    /// Skip these row ids (already written by an earlier run).
    pub fn skip_rows(&mut self, skip: Arc<RowIdSet>) {
        self.skip = Some(skip);
    }

    pub fn describe(&self) -> String {
        describe(&self.spec)
    }

    /// Stream the rows. Files are read by a background task that stays a few batches ahead.
    pub fn execute(&self) -> SendableRecordBatchStream {
        let (tx, rx) = mpsc::channel::<Result<RecordBatch>>(4);
        let reader = Reader {
            files: self.files.clone(),
            file_schema: self.file_schema.clone(),
            schema: self.schema.clone(),
            json_schema: self.json_schema.clone(),
            batch_rows: self.spec.batch_rows.max(1),
            limit: self.spec.limit,
            repeat: self.spec.repeat.max(1),
            hub: self.hub.clone(),
            session: self.session.clone(),
            shard: self.shard,
            skip: self.skip.clone(),
        };
        tokio::spawn(async move {
            if let Err(e) = reader.run(&tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item.map_err(Into::into), rx))
        });
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), stream))
    }

    async fn check_parquet_files(&self) -> Result<SchemaRef> {
        let mut first: Option<(String, SchemaRef)> = None;
        for (i, (f, _)) in self.files.iter().enumerate() {
            // Hub files are downloaded when read; only the first is fetched now, for its schema.
            if matches!(f, InputFile::Hub { .. }) && i > 0 {
                break;
            }
            let loc = materialize(f, &self.hub, &self.session).await?;
            let builder = open_parquet(&loc, f.size()).await?;
            let schema = builder.schema().clone();
            match &first {
                None => first = Some((f.name(), schema)),
                Some((name0, s0)) => check_same_schema(name0, s0, &f.name(), &schema)?,
            }
        }
        Ok(first.expect("at least one file").1)
    }

    async fn infer_json_schema(&self) -> Result<SchemaRef> {
        let mut first: Option<(String, SchemaRef)> = None;
        for (f, fmt) in &self.files {
            let loc = materialize(f, &self.hub, &self.session).await?;
            let rows = read_json_rows(&loc, *fmt).await?;
            let schema = infer_json_schema_from_iterator(rows.iter().map(Ok))
                .map_err(|e| Error::arrow(format!("{}: inferring the schema", f.name()), e))?;
            let schema = Arc::new(schema);
            match &first {
                None => first = Some((f.name(), schema)),
                Some((name0, s0)) => check_same_schema(name0, s0, &f.name(), &schema)?,
            }
        }
        Ok(first.expect("at least one file").1)
    }
}

fn describe(spec: &SourceSpec) -> String {
    let mut s = spec.uri.clone();
    if let Some(c) = &spec.config {
        s.push_str(&format!(" (config {c}"));
        s.push_str(&format!(
            ", split {})",
            spec.split.as_deref().unwrap_or("train")
        ));
    } else if let Some(sp) = &spec.split {
        s.push_str(&format!(" (split {sp})"));
    }
    s
}

fn check_same_schema(name0: &str, s0: &Schema, name: &str, s: &Schema) -> Result<()> {
    let cols = |s: &Schema| {
        s.fields()
            .iter()
            .map(|f| format!("{}: {}", f.name(), f.data_type()))
            .collect::<Vec<_>>()
    };
    let (a, b) = (cols(s0), cols(s));
    if a != b {
        return Err(Error::Data(format!(
            "{name}: its columns ({}) differ from those of {name0} ({}); one source reads files of one schema",
            b.join(", "),
            a.join(", ")
        )));
    }
    Ok(())
}

/// The files a source spec names.
async fn list_inputs(spec: &SourceSpec, ctx: &Context) -> StepResult<Vec<InputFile>> {
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
async fn materialize(
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
async fn open_parquet(
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
    ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(|e| Error::parquet(format!("{}: not a readable parquet file", loc.display), e))
}

async fn read_json_rows(loc: &Location, fmt: Format) -> Result<Vec<serde_json::Value>> {
    let bytes = loc
        .store
        .get(&loc.path)
        .await
        .map_err(|e| Error::object_store(&loc.display, e))?
        .bytes()
        .await
        .map_err(|e| Error::object_store(&loc.display, e))?;
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace()).copied();
    if fmt == Format::Json && first == Some(b'[') {
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

/// The background reader behind [`Source::execute`].
struct Reader {
    files: Vec<(InputFile, Format)>,
    file_schema: SchemaRef,
    schema: SchemaRef,
    json_schema: Option<SchemaRef>,
    batch_rows: usize,
    limit: Option<u64>,
    repeat: u64,
    hub: Arc<Hub>,
    session: datafusion::prelude::SessionContext,
    shard: Option<Shard>,
    skip: Option<Arc<RowIdSet>>,
}

impl Reader {
    async fn run(&self, tx: &mpsc::Sender<Result<RecordBatch>>) -> Result<()> {
        let mut next_id: u64 = 0;
        for _ in 0..self.repeat {
            for (f, fmt) in &self.files {
                if self.limit.is_some_and(|l| next_id >= l) {
                    return Ok(());
                }
                let loc = materialize(f, &self.hub, &self.session).await?;
                match fmt {
                    Format::Parquet => {
                        let builder = open_parquet(&loc, f.size()).await?;
                        let file_schema = builder.schema().clone();
                        self.check_projection(&file_schema, &loc.display)?;
                        let indices: Vec<usize> = self
                            .file_schema
                            .fields()
                            .iter()
                            .map(|fld| file_schema.index_of(fld.name()).expect("checked above"))
                            .collect();
                        let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
                        let mut stream = builder
                            .with_projection(mask)
                            .with_batch_size(self.batch_rows)
                            .build()
                            .map_err(|e| Error::parquet(&loc.display, e))?;
                        while let Some(batch) = stream.next().await {
                            let batch = batch.map_err(|e| {
                                Error::parquet(format!("{}: reading row group", loc.display), e)
                            })?;
                            if !self.emit(batch, &mut next_id, tx).await? {
                                return Ok(());
                            }
                        }
                    }
                    Format::Json | Format::JsonLines => {
                        let rows = read_json_rows(&loc, *fmt).await?;
                        let schema = self
                            .json_schema
                            .clone()
                            .expect("json schema inferred at open");
                        for chunk in rows.chunks(self.batch_rows) {
                            let mut decoder = ReaderBuilder::new(schema.clone())
                                .with_batch_size(self.batch_rows)
                                .build_decoder()
                                .map_err(|e| Error::arrow(&loc.display, e))?;
                            decoder.serialize(chunk).map_err(|e| {
                                Error::arrow(format!("{}: converting rows", loc.display), e)
                            })?;
                            let Some(batch) =
                                decoder.flush().map_err(|e| Error::arrow(&loc.display, e))?
                            else {
                                continue;
                            };
                            let batch = batch
                                .project(
                                    &self
                                        .file_schema
                                        .fields()
                                        .iter()
                                        .map(|fld| {
                                            schema
                                                .index_of(fld.name())
                                                .expect("projection checked at open")
                                        })
                                        .collect::<Vec<_>>(),
                                )
                                .map_err(|e| Error::arrow(&loc.display, e))?;
                            if !self.emit(batch, &mut next_id, tx).await? {
                                return Ok(());
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Later files need only the projected columns with the same types.
    fn check_projection(&self, file_schema: &Schema, name: &str) -> Result<()> {
        for f in self.file_schema.fields() {
            match file_schema.field_with_name(f.name()) {
                Ok(g) if g.data_type() == f.data_type() => {}
                Ok(g) => {
                    return Err(Error::Data(format!(
                        "{name}: column `{}` is {} here but {} in the first file",
                        f.name(),
                        g.data_type(),
                        f.data_type()
                    )))
                }
                Err(_) => {
                    return Err(Error::Data(format!(
                        "{name}: no column `{}` (the first file has it)",
                        f.name()
                    )))
                }
            }
        }
        Ok(())
    }

    /// Add row ids, apply limit / shard / skip, send. Returns false when the limit is reached or the
    /// consumer is gone.
    async fn emit(
        &self,
        batch: RecordBatch,
        next_id: &mut u64,
        tx: &mpsc::Sender<Result<RecordBatch>>,
    ) -> Result<bool> {
        let mut n = batch.num_rows() as u64;
        let mut batch = batch;
        let mut done = false;
        if let Some(limit) = self.limit {
            if *next_id + n >= limit {
                n = limit - *next_id;
                batch = batch.slice(0, n as usize);
                done = true;
            }
        }
        let ids: ArrayRef = Arc::new(UInt64Array::from_iter_values(*next_id..*next_id + n));
        *next_id += n;
        let mut cols = vec![ids];
        cols.extend(batch.columns().iter().cloned());
        let mut out = RecordBatch::try_new(self.schema.clone(), cols)
            .map_err(|e| Error::arrow("source: adding row ids", e))?;
        if self.shard.is_some() || self.skip.is_some() {
            let ids = out
                .column(0)
                .as_any()
                .downcast_ref::<UInt64Array>()
                .expect("row id column");
            let keep: datafusion::arrow::array::BooleanArray = ids
                .values()
                .iter()
                .map(|id| {
                    Some(
                        self.shard.is_none_or(|s| s.owns(*id))
                            && self.skip.as_ref().is_none_or(|s| !s.contains(*id)),
                    )
                })
                .collect();
            out = datafusion::arrow::compute::filter_record_batch(&out, &keep)
                .map_err(|e| Error::arrow("source", e))?;
        }
        if out.num_rows() > 0 && tx.send(Ok(out)).await.is_err() {
            return Ok(false);
        }
        Ok(!done)
    }
}
