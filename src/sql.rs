//! `conala sql`: DataFusion SQL over parquet outputs — a plan's `write` folder registered under the
//! plan's name, and any `NAME=PATH_OR_URL` tables.

use std::io::Write as _;
use std::path::Path;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::common::TableReference;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::prelude::ParquetReadOptions;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::output::state::OutputState;
use crate::plans::spec::{Plan, Step};
use crate::storage::resolve;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Table,
    Csv,
    Json,
    Parquet,
}

impl std::str::FromStr for OutputFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "table" => Ok(OutputFormat::Table),
            "csv" => Ok(OutputFormat::Csv),
            "json" => Ok(OutputFormat::Json),
            "parquet" => Ok(OutputFormat::Parquet),
            other => Err(format!(
                "unknown format `{other}` (table, csv, json, parquet)"
            )),
        }
    }
}

/// Register the parquet files at `uri` (a folder, a file, or an object-store URL) as table `name`. A
/// conala output folder is read through its manifests: only committed parts, with a warning when the
/// output is incomplete; any other folder is all of its `*.parquet` files.
pub async fn register_table(ctx: &Context, name: &str, uri: &str) -> Result<()> {
    let loc = resolve(&ctx.session, uri)?;
    let single = loc.head().await?.is_some();
    let state = match single {
        true => None,
        false => OutputState::read(&loc).await?,
    };
    let urls: Vec<String> = match state {
        _ if single => vec![loc.url()],
        Some(state) => {
            let parts = state.committed_parts();
            if let Some(open) = state.incomplete(uri)? {
                log::warn!(
                    "{uri}: the output is incomplete ({open}); reading the {} parts committed so far",
                    parts.len()
                );
            }
            parts.iter().map(|p| loc.child(p).url()).collect()
        }
        None => {
            let files = loc.files().await?;
            if !files
                .iter()
                .any(|f| f.location.as_ref().ends_with(".parquet"))
            {
                return Err(Error::Data(format!(
                    "table `{name}`: no parquet files at {uri}"
                )));
            }
            vec![format!("{}/", loc.url().trim_end_matches('/'))]
        }
    };
    if urls.is_empty() {
        return Err(Error::Data(format!(
            "table `{name}`: the output at {uri} has no committed parts yet"
        )));
    }
    let df = ctx
        .session
        .read_parquet(urls, ParquetReadOptions::default())
        .await
        .map_err(|e| Error::datafusion(format!("table `{name}` ({uri})"), e))?;
    let view = df.into_view();
    ctx.session
        .register_table(TableReference::bare(name), view.clone())
        .map_err(|e| Error::datafusion(format!("table `{name}`"), e))?;
    // `conala-mined` is awkward in SQL (it needs quotes); also offer `conala_mined`.
    if name.contains('-') {
        let alias = name.replace('-', "_");
        if !ctx
            .session
            .table_exist(TableReference::bare(alias.as_str()))
            .unwrap_or(false)
        {
            ctx.session
                .register_table(TableReference::bare(alias.as_str()), view)
                .map_err(|e| Error::datafusion(format!("table `{alias}`"), e))?;
        }
    }
    Ok(())
}

/// Register a plan's `write` output under the plan's name. Returns (name, path).
pub async fn register_plan_output(ctx: &Context, plan: &Plan) -> Result<(String, String)> {
    let path = plan
        .steps
        .iter()
        .find_map(|s| match s {
            Step::Write(w) => Some(w.path.clone()),
            _ => None,
        })
        .ok_or_else(|| {
            Error::Data(format!(
                "{}: the plan has no `write` step, so no output table",
                plan.file
            ))
        })?;
    register_table(ctx, &plan.name, &path)
        .await
        .map_err(|e| Error::Data(format!("{e} (has the plan `{}` been run?)", plan.file)))?;
    Ok((plan.name.clone(), path))
}

pub async fn query(ctx: &Context, sql: &str) -> Result<Vec<RecordBatch>> {
    let df = ctx
        .session
        .sql(sql)
        .await
        .map_err(|e| Error::datafusion("sql", e))?;
    df.collect().await.map_err(|e| Error::datafusion("sql", e))
}

/// Stdout that drops what is written after the reader went away (`conala sql ... | head -1`), so a
/// closed pipe ends the output quietly instead of failing the command.
struct QuietStdout(bool);

impl std::io::Write for QuietStdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.0 {
            match std::io::stdout().write_all(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => self.0 = true,
                other => other?,
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match std::io::stdout().flush() {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other,
        }
    }
}

/// Render results as a table, CSV, JSON lines or parquet, to `out` (a file) or stdout.
pub fn render(batches: &[RecordBatch], format: OutputFormat, out: Option<&Path>) -> Result<()> {
    let mut sink: Box<dyn std::io::Write + Send> = match out {
        Some(p) => Box::new(std::fs::File::create(p).map_err(|e| Error::io(p.display(), e))?),
        None if format == OutputFormat::Parquet => {
            return Err(Error::Data("--format parquet needs --output FILE".into()));
        }
        None => Box::new(QuietStdout(false)),
    };
    let name = out
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "stdout".into());
    match format {
        OutputFormat::Table => {
            let t = pretty_format_batches(batches).map_err(|e| Error::arrow("formatting", e))?;
            writeln!(sink, "{t}").map_err(|e| Error::io(&name, e))?;
        }
        OutputFormat::Csv => {
            let mut w = datafusion::arrow::csv::Writer::new(sink);
            for b in batches {
                w.write(b).map_err(|e| Error::arrow(&name, e))?;
            }
        }
        OutputFormat::Json => {
            let mut w = datafusion::arrow::json::LineDelimitedWriter::new(sink);
            for b in batches {
                w.write(b).map_err(|e| Error::arrow(&name, e))?;
            }
            w.finish().map_err(|e| Error::arrow(&name, e))?;
        }
        OutputFormat::Parquet => {
            let Some(first) = batches.first() else {
                return Err(Error::Data("the query returned no batches to write".into()));
            };
            let mut w = ArrowWriter::try_new(sink, first.schema(), None)
                .map_err(|e| Error::parquet(&name, e))?;
            for b in batches {
                w.write(b).map_err(|e| Error::parquet(&name, e))?;
            }
            w.close().map_err(|e| Error::parquet(&name, e))?;
        }
    }
    Ok(())
}
