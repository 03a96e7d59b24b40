//! `source`: rows from local files, object stores or Hugging Face datasets, as record batches with a
//! stable row id.
//!
//! The row id is the row's ordinal in the source (files in path order, rows in file order), so it is
//! the same on every run and in every shard: outputs join back to inputs on it, resumed runs skip the
//! ids already written, and `--shard i/n` keeps the ids with `id % n == i`.

mod files;
mod reader;
mod texts;

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::json::reader::infer_json_schema_from_iterator;
use datafusion::execution::SendableRecordBatchStream;

use self::files::{
    format_from_name, list_inputs, materialize, open_parquet, read_json_rows, InputFile,
};
use self::reader::Reader;
use super::{runtime, Exec, StepError, StepResult};
use crate::context::{Context, Shard};
use crate::error::{closest, Error, Result};
use crate::hub::Hub;
use crate::plans::spec::{FileFormat, SourceSpec};
use crate::row_ids::RowIdSet;

pub use texts::collect_texts;

/// A validated source: its files and the schema it yields.
pub struct Source {
    spec: SourceSpec,
    files: Vec<(InputFile, FileFormat)>,
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
        let forced = spec.format;
        let mut typed = Vec::with_capacity(files.len());
        for f in files {
            let name = f.name();
            let format = forced.or_else(|| format_from_name(&name));
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
        let kinds: std::collections::BTreeSet<bool> = typed
            .iter()
            .map(|(_, f)| *f == FileFormat::Parquet)
            .collect();
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
        let full_schema = if source.files[0].1 == FileFormat::Parquet {
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

    /// Stream the rows. Files are read by a background task that stays a few batches ahead; its
    /// errors and panics end the stream (see [`runtime`]).
    pub fn execute(&self, exec: &Exec) -> SendableRecordBatchStream {
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
        runtime::spawn_stage(&exec.step, self.schema.clone(), 4, |out| async move {
            reader.run(&out).await
        })
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
