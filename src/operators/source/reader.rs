//! The background reader behind a source's stream: files in order, rows numbered as they are read,
//! the `limit`, this process's shard, and the row ids an earlier run already wrote, skipped.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, BooleanArray, RecordBatch, UInt64Array};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::arrow::json::ReaderBuilder;
use datafusion::parquet::arrow::ProjectionMask;
use futures::{FutureExt, StreamExt};

use super::files::{materialize, open_parquet, read_json_rows, InputFile};
use crate::context::Shard;
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::operators::runtime::Emitter;
use crate::plans::spec::FileFormat;
use crate::row_ids::RowIdSet;

/// What the reader needs of its [`super::Source`].
pub(super) struct Reader {
    pub(super) files: Vec<(InputFile, FileFormat)>,
    pub(super) file_schema: SchemaRef,
    pub(super) schema: SchemaRef,
    pub(super) json_schema: Option<SchemaRef>,
    pub(super) batch_rows: usize,
    pub(super) limit: Option<u64>,
    pub(super) repeat: u64,
    pub(super) hub: Arc<Hub>,
    pub(super) session: datafusion::prelude::SessionContext,
    pub(super) shard: Option<Shard>,
    pub(super) skip: Option<Arc<RowIdSet>>,
}

impl Reader {
    pub(super) async fn run(&self, out: &Emitter) -> Result<()> {
        let mut next_id: u64 = 0;
        for _ in 0..self.repeat {
            for (f, fmt) in &self.files {
                if self.limit.is_some_and(|l| next_id >= l) {
                    return Ok(());
                }
                let loc = materialize(f, &self.hub, &self.session).await?;
                match fmt {
                    FileFormat::Parquet => {
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
                        loop {
                            let next = AssertUnwindSafe(stream.next())
                                .catch_unwind()
                                .await
                                .map_err(|p| {
                                    Error::reader_crash(&loc.display, "parquet", p.as_ref())
                                })?;
                            let Some(batch) = next else { break };
                            let batch = batch.map_err(|e| {
                                Error::parquet(format!("{}: reading row group", loc.display), e)
                            })?;
                            if !self.emit(batch, &mut next_id, out).await? {
                                return Ok(());
                            }
                        }
                    }
                    FileFormat::Json | FileFormat::Jsonl => {
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
                            if !self.emit(batch, &mut next_id, out).await? {
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
    async fn emit(&self, batch: RecordBatch, next_id: &mut u64, emitter: &Emitter) -> Result<bool> {
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
            let keep: BooleanArray = ids
                .values()
                .iter()
                .map(|id| {
                    Some(
                        self.shard.is_none_or(|s| s.owns(*id))
                            && self.skip.as_ref().is_none_or(|s| !s.contains(*id)),
                    )
                })
                .collect();
            out = filter_record_batch(&out, &keep).map_err(|e| Error::arrow("source", e))?;
        }
        if out.num_rows() > 0 && !emitter.send(out).await {
            return Ok(false);
        }
        crate::faults::panic_if_injected("source");
        Ok(!done)
    }
}
