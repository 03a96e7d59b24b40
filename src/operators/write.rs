//! `write`: parquet part files plus `_manifest.json`, to a local folder or an object store.
//!
//! Every part is written whole or not at all: it is encoded in memory and stored with one `put`, which
//! object stores make atomic and the local store implements as write-to-temporary-name then rename. So
//! a reader (or a resumed run) never sees half a part.
//!
//! Modes: `overwrite` replaces earlier output once this run has succeeded (on failure this run's parts
//! are removed and the old output stays); `resume` keeps earlier parts and the runner skips their row
//! ids; `error` refuses a folder that already holds output; `auto` is `resume` for plans that generate
//! (expensive work is never thrown away) and `overwrite` otherwise.

// `ParquetObjectReader` is deprecated in parquet 59 (in favour of hand-written `AsyncFileReader`s) but
// reads object stores correctly; it is what DataFusion 55's own scans use.
#![allow(deprecated)]

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use datafusion::arrow::array::{RecordBatch, UInt64Array};
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use futures::future::BoxFuture;
use futures::StreamExt;
use object_store::{ObjectStoreExt, PutPayload};
use tokio::task::JoinHandle;

use super::{require_column, runtime, Exec, Sink, SinkReport, StepError, StepResult};
use crate::context::Shard;
use crate::error::{from_stream_error, Error, Result};
use crate::manifest::{now_rfc3339, versions, Manifest, PartInfo};
use crate::plans::spec::{Compression as CompressionSetting, WriteMode, WriteSpec};
use crate::reports::RunStats;
use crate::row_ids::RowIdSet;
use crate::storage::{resolve, Location};

pub const MANIFEST: &str = "_manifest.json";

/// What `write` does with earlier output, `auto` resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Overwrite,
    Resume,
    Error,
}

/// What the manifest says produced the output.
#[derive(Debug, Clone)]
pub struct Provenance {
    pub plan_name: String,
    /// The resolved plan (after `--set` and defaults).
    pub plan: serde_json::Value,
}

pub struct Write {
    spec: WriteSpec,
    pub loc: Location,
    projection: Vec<usize>,
    schema: SchemaRef,
    mode: Mode,
    compression: Compression,
    row_id: String,
    shard: Option<Shard>,
    run_id: String,
    provenance: Provenance,
}

/// What a finished write produced.
#[derive(Debug, Clone)]
pub struct WriteSummary {
    pub location: String,
    pub rows_written: u64,
    pub rows_resumed: u64,
    pub parts: Vec<PartInfo>,
    pub seconds: f64,
}

impl Write {
    pub fn new(
        spec: &WriteSpec,
        input: SchemaRef,
        session: &datafusion::prelude::SessionContext,
        has_generate: bool,
        row_id: &str,
        shard: Option<Shard>,
        provenance: Provenance,
    ) -> StepResult<Write> {
        let loc = resolve(session, &spec.path).map_err(|e| StepError::at("path", e))?;
        if let Some(p) = loc.local_path() {
            if p.is_file() {
                return Err(StepError::at(
                    "path",
                    format!("`{}` is a file; `write` needs a folder", spec.path),
                ));
            }
        }
        let mode = match spec.mode {
            WriteMode::Auto if has_generate => Mode::Resume,
            WriteMode::Auto | WriteMode::Overwrite => Mode::Overwrite,
            WriteMode::Resume => Mode::Resume,
            WriteMode::Error => Mode::Error,
        };
        let compression = match spec.compression {
            CompressionSetting::Zstd => {
                Compression::ZSTD(ZstdLevel::try_new(3).map_err(StepError::general)?)
            }
            CompressionSetting::Snappy => Compression::SNAPPY,
            CompressionSetting::None => Compression::UNCOMPRESSED,
        };
        if spec.rows_per_file == 0 || spec.row_group_rows == 0 {
            return Err(StepError::at(
                "rows_per_file",
                "rows_per_file and row_group_rows must be at least 1",
            ));
        }
        let mut projection: Vec<usize> = match &spec.columns {
            Some(cols) => {
                let mut v = vec![];
                for c in cols {
                    require_column(&input, "columns", c)?;
                    v.push(input.index_of(c).expect("checked"));
                }
                v
            }
            None => (0..input.fields().len()).collect(),
        };
        for d in &spec.drop {
            require_column(&input, "drop", d)?;
            let i = input.index_of(d).expect("checked");
            projection.retain(|&j| j != i);
        }
        if mode == Mode::Resume && !projection.iter().any(|&i| input.field(i).name() == row_id) {
            return Err(StepError::at(
                "columns",
                format!("resuming needs the row id column `{row_id}` in the output; keep it"),
            ));
        }
        let schema = Arc::new(input.project(&projection).map_err(StepError::general)?);
        let run_id = format!(
            "{}-{:04x}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S%3f"),
            std::process::id() & 0xffff
        );
        Ok(Write {
            spec: spec.clone(),
            loc,
            projection,
            schema,
            mode,
            compression,
            row_id: row_id.to_string(),
            shard,
            run_id,
            provenance,
        })
    }

    fn manifest_name(&self) -> String {
        match self.shard {
            Some(s) => format!("_manifest-{}.json", s.label()),
            None => MANIFEST.to_string(),
        }
    }

    fn part_prefix(&self) -> String {
        match self.shard {
            Some(s) => format!("part-{}-", s.label()),
            None => "part-".to_string(),
        }
    }

    /// Part files already in the folder (all of them, or this shard's when sharded).
    async fn existing_parts(&self) -> Result<Vec<(String, u64)>> {
        let prefix = self.part_prefix();
        let base = self.loc.path.as_ref().to_string();
        Ok(self
            .loc
            .list()
            .await?
            .into_iter()
            .filter_map(|m| {
                let rel = m
                    .location
                    .as_ref()
                    .strip_prefix(&base)?
                    .trim_start_matches('/')
                    .to_string();
                (!rel.contains('/') && rel.starts_with(&prefix) && rel.ends_with(".parquet"))
                    .then_some((rel, m.size))
            })
            .collect())
    }

    /// Check the folder before any work: `error` mode refuses existing output; `resume` collects the row
    /// ids already written (to be skipped by the source).
    async fn check_folder(&self) -> Result<Option<Arc<RowIdSet>>> {
        let existing = self.existing_parts().await?;
        match self.mode {
            Mode::Error if !existing.is_empty() => Err(Error::Data(format!(
                "{}: already holds {} part files; use `mode: overwrite` or `mode: resume`",
                self.spec.path,
                existing.len()
            ))),
            Mode::Resume if !existing.is_empty() => {
                let mut set = RowIdSet::new();
                for (name, _) in &existing {
                    for id in read_row_ids(&self.loc.child(name), &self.row_id).await? {
                        set.insert(id);
                    }
                }
                Ok(Some(Arc::new(set)))
            }
            _ => Ok(None),
        }
    }

    /// Consume the stream, writing parts as they fill, then the manifest.
    pub async fn write(
        &self,
        mut input: SendableRecordBatchStream,
        stats: &RunStats,
    ) -> Result<WriteSummary> {
        let started = Instant::now();
        let started_at = now_rfc3339();
        let before = self.existing_parts().await?;
        let mut written: Vec<PartInfo> = vec![];
        let result = self.write_parts(&mut input, &mut written).await;
        if let Err(e) = result {
            if self.mode != Mode::Resume {
                // Leave no partial output: remove what this run wrote.
                for p in &written {
                    let part = self.loc.child(&p.file);
                    if let Err(e) = part.store.delete(&part.path).await {
                        log::warn!(
                            "write: could not remove the partial part {}: {e}",
                            part.display
                        );
                    }
                }
                written.clear();
            }
            if written.is_empty() {
                return Err(e);
            }
            return Err(Error::Resumable {
                rows_kept: written.iter().map(|p| p.rows).sum(),
                source: Box::new(e),
            });
        }
        let mut parts = written.clone();
        let mut rows_resumed = 0;
        if self.mode == Mode::Overwrite {
            // A rerun within the same second can reuse a part name: never delete what this run just wrote.
            for (name, _) in before
                .iter()
                .filter(|(n, _)| !written.iter().any(|p| &p.file == n))
            {
                self.loc
                    .store
                    .delete(&self.loc.child(name).path)
                    .await
                    .map_err(|e| {
                        Error::object_store(
                            format!("{}: removing old part {name}", self.spec.path),
                            e,
                        )
                    })?;
            }
        } else {
            for (name, _) in &before {
                let rows = count_rows(&self.loc.child(name)).await?;
                rows_resumed += rows;
                parts.push(PartInfo {
                    file: name.clone(),
                    rows,
                });
            }
            parts.sort_by(|a, b| a.file.cmp(&b.file));
        }
        let rows_written: u64 = written.iter().map(|p| p.rows).sum();
        let seconds = started.elapsed().as_secs_f64();
        let manifest = Manifest {
            plan_name: self.provenance.plan_name.clone(),
            plan: self.provenance.plan.clone(),
            versions: versions(),
            started_at,
            finished_at: now_rfc3339(),
            seconds,
            shard: self.shard.map(|s| format!("{}/{}", s.index, s.count)),
            rows_per_step: stats.rows(),
            rows_written: rows_written + rows_resumed,
            rows_resumed,
            parts: parts.clone(),
            extra: stats.reports(),
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::json("manifest", e))?;
        let mpath = self.loc.child(&self.manifest_name());
        mpath
            .store
            .put(&mpath.path, PutPayload::from(Bytes::from(json)))
            .await
            .map_err(|e| Error::object_store(&mpath.display, e))?;
        Ok(WriteSummary {
            location: self.spec.path.clone(),
            rows_written,
            rows_resumed,
            parts,
            seconds,
        })
    }

    async fn write_parts(
        &self,
        input: &mut SendableRecordBatchStream,
        written: &mut Vec<PartInfo>,
    ) -> Result<()> {
        let mut buffer: Vec<RecordBatch> = vec![];
        let mut buffered = 0usize;
        let mut seq = 0usize;
        let mut in_flight: Option<JoinHandle<Result<PartInfo>>> = None;
        loop {
            let next = input.next().await;
            let end = next.is_none();
            if let Some(batch) = next {
                let batch = batch.map_err(from_stream_error)?;
                let batch = batch
                    .project(&self.projection)
                    .map_err(|e| Error::arrow("write", e))?;
                buffered += batch.num_rows();
                buffer.push(batch);
            }
            while buffered >= self.spec.rows_per_file || (end && buffered > 0) {
                let all =
                    concat_batches(&self.schema, &buffer).map_err(|e| Error::arrow("write", e))?;
                let take = all.num_rows().min(self.spec.rows_per_file);
                let part = all.slice(0, take);
                let rest = all.slice(take, all.num_rows() - take);
                buffered = rest.num_rows();
                buffer = if buffered > 0 { vec![rest] } else { vec![] };
                // One part encodes while the next fills.
                if let Some(h) = in_flight.take() {
                    written.push(runtime::join("write: part encoder", h).await?);
                }
                let name = format!("{}{}-{seq:05}.parquet", self.part_prefix(), self.run_id);
                seq += 1;
                in_flight = Some(tokio::spawn(write_part(
                    self.loc.child(&name),
                    name,
                    part,
                    self.props(),
                )));
            }
            if end {
                break;
            }
        }
        if let Some(h) = in_flight.take() {
            written.push(runtime::join("write: part encoder", h).await?);
        }
        Ok(())
    }

    fn props(&self) -> WriterProperties {
        WriterProperties::builder()
            .set_compression(self.compression)
            .set_max_row_group_row_count(Some(self.spec.row_group_rows))
            .build()
    }
}

impl Sink for Write {
    fn name(&self) -> &'static str {
        "write"
    }

    fn schema(&self) -> Option<SchemaRef> {
        Some(self.schema.clone())
    }

    fn prepare(&self) -> BoxFuture<'_, Result<Option<Arc<RowIdSet>>>> {
        Box::pin(async move {
            let done = self.check_folder().await?;
            if let Some(d) = &done {
                log::info!("resuming: {} rows already in {}", d.len(), self.loc.display);
            }
            Ok(done)
        })
    }

    fn run<'a>(
        &'a mut self,
        input: SendableRecordBatchStream,
        exec: &'a Exec,
    ) -> BoxFuture<'a, Result<SinkReport>> {
        Box::pin(async move { Ok(SinkReport::Write(self.write(input, &exec.stats).await?)) })
    }
}

async fn write_part(
    loc: Location,
    name: String,
    batch: RecordBatch,
    props: WriterProperties,
) -> Result<PartInfo> {
    let rows = batch.num_rows() as u64;
    let display = loc.display.clone();
    let encoder = runtime::spawn_worker(move || -> Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(batch.get_array_memory_size() / 2);
        let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props))
            .map_err(|e| Error::parquet(&display, e))?;
        w.write(&batch).map_err(|e| Error::parquet(&display, e))?;
        w.close().map_err(|e| Error::parquet(&display, e))?;
        Ok(buf)
    });
    let bytes = runtime::join("write: parquet encoder", encoder).await?;
    loc.store
        .put(&loc.path, PutPayload::from(Bytes::from(bytes)))
        .await
        .map_err(|e| Error::object_store(&loc.display, e))?;
    Ok(PartInfo { file: name, rows })
}

async fn read_parquet_column(loc: &Location, column: Option<&str>) -> Result<Vec<RecordBatch>> {
    use datafusion::parquet::arrow::async_reader::{
        ParquetObjectReader, ParquetRecordBatchStreamBuilder,
    };
    use datafusion::parquet::arrow::ProjectionMask;
    let size = loc
        .store
        .head(&loc.path)
        .await
        .map_err(|e| Error::object_store(&loc.display, e))?
        .size;
    let reader = ParquetObjectReader::new(loc.store.clone(), loc.path.clone()).with_file_size(size);
    let builder = ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(|e| Error::parquet(format!("{}: not a readable parquet file", loc.display), e))?;
    let parquet_schema = builder.parquet_schema().clone();
    let builder = match column {
        Some(c) => {
            let i = builder.schema().index_of(c).map_err(|_| {
                Error::Data(format!(
                    "{}: has no column `{c}`; it was not written by this plan",
                    loc.display
                ))
            })?;
            builder.with_projection(ProjectionMask::roots(&parquet_schema, [i]))
        }
        None => builder.with_projection(ProjectionMask::roots(&parquet_schema, [])),
    };
    let stream = builder
        .build()
        .map_err(|e| Error::parquet(&loc.display, e))?;
    stream
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::parquet(&loc.display, e))
}

async fn read_row_ids(loc: &Location, row_id: &str) -> Result<Vec<u64>> {
    let mut out = vec![];
    for b in read_parquet_column(loc, Some(row_id)).await? {
        let ids = b
            .column(0)
            .as_any()
            .downcast_ref::<UInt64Array>()
            .ok_or_else(|| {
                Error::Data(format!(
                    "{}: `{row_id}` is not a uint64 row id column",
                    loc.display
                ))
            })?;
        out.extend(ids.values().iter().copied());
    }
    Ok(out)
}

async fn count_rows(loc: &Location) -> Result<u64> {
    Ok(read_parquet_column(loc, None)
        .await?
        .iter()
        .map(|b| b.num_rows() as u64)
        .sum())
}
