//! Benchmarks that compare `conala` with the Python stack on the same machine, inputs and work, in the
//! same run, and print the ratio. Timings are reported, never asserted.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use datafusion::arrow::array::{Array, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use futures::TryStreamExt;

use crate::context::Context;
use crate::error::{from_stream_error, Error, Result};
use crate::operators::source::Source;
use crate::plans::{self, spec::SourceSpec};

/// Non-null strings of `columns` from a source (for tokenizer training).
pub async fn collect_texts(ctx: &Context, uri: &str, config: Option<&str>, split: Option<&str>, columns: &[String]) -> Result<Vec<String>> {
    let spec = SourceSpec {
        uri: uri.to_string(),
        config: config.map(str::to_string),
        split: split.map(str::to_string),
        revision: None,
        format: None,
        columns: Some(columns.to_vec()),
        limit: None,
        row_id: "row_id".into(),
        batch_rows: 8192,
        repeat: 1,
    };
    let source = Source::open(&spec, ctx).await.map_err(|e| Error::Data(format!("{uri}: {}", e.message)))?;
    let batches: Vec<_> = source.execute().try_collect().await.map_err(from_stream_error)?;
    let mut out = vec![];
    for b in &batches {
        for c in columns {
            let col = cast(b.column_by_name(c).expect("projected"), &DataType::Utf8).map_err(|e| Error::arrow(c, e))?;
            let s = col.as_any().downcast_ref::<StringArray>().expect("Utf8");
            out.extend(s.iter().flatten().map(str::to_string));
        }
    }
    Ok(out)
}

#[derive(clap::Args, Debug, Clone)]
pub struct PrepArgs {
    /// Rows to prepare (the shipped curated rows repeated with new ids).
    #[arg(long, default_value_t = 600_000)]
    pub rows: u64,
    /// tokenizer.json used by both sides.
    #[arg(long, default_value = "data/tokenizer/conala-unigram-8k.json")]
    pub tokenizer: PathBuf,
    /// Python interpreter with `datasets` and `transformers` for the anchor.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Skip the Python anchor.
    #[arg(long)]
    pub no_python: bool,
    /// Scratch folder (default: a temporary one).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

/// The prep plan both sides run: filter, format, tokenize input and target, write.
fn prep_plan(input: &Path, output: &Path, tokenizer: &Path) -> String {
    format!(
        r#"name: bench-prep
steps:
  - source: {{ uri: "{input}" }}
  - filter: "intent IS NOT NULL AND rewritten_intent IS NOT NULL"
  - format: {{ input: "{{intent}}\n{{snippet}}" }}
  - tokenize: {{ input: input, target: rewritten_intent, max_input_tokens: 512, max_target_tokens: 128, tokenizer: "{tok}" }}
  - write: {{ path: "{output}", mode: overwrite }}
"#,
        input = input.display(),
        output = output.display(),
        tok = tokenizer.display()
    )
}

pub async fn prep(args: &PrepArgs, ctx: &Context) -> Result<()> {
    let tmp;
    let work = match &args.work_dir {
        Some(d) => d.clone(),
        None => {
            tmp = std::env::temp_dir().join(format!("conala-bench-prep-{}", std::process::id()));
            tmp.clone()
        }
    };
    std::fs::create_dir_all(&work).map_err(|e| Error::io(work.display(), e))?;
    let input = work.join("input");
    let output = work.join("ours");

    // 1. The input: the curated rows repeated to `rows`, one parquet folder both sides read.
    let repeat = args.rows.div_ceil(2378).max(1);
    let make_input = format!(
        "name: bench-input\nsteps:\n  - source: {{ uri: data/conala, config: curated, split: train, repeat: {repeat}, limit: {rows}, row_id: id }}\n  - write: {{ path: \"{input}\", mode: overwrite, rows_per_file: 1000000, compression: snappy }}\n",
        rows = args.rows,
        input = input.display()
    );
    let plan = plans::load_str(&make_input, "<bench input>", &[])?;
    plans::build(&plan, ctx).await?.run(ctx).await?;
    println!("input: {} rows in {}", args.rows, input.display());

    // 2. conala.
    let plan = plans::load_str(&prep_plan(&input, &output, &args.tokenizer), "<bench prep>", &[])?;
    let started = Instant::now();
    let summary = plans::build(&plan, ctx).await?.run(ctx).await?;
    let ours = started.elapsed().as_secs_f64();
    let read = summary.rows_per_step.first().map(|(_, n)| *n).unwrap_or(0);
    let written = summary.write.as_ref().map(|w| w.rows_written).unwrap_or(0);
    let our_rate = read as f64 / ours;
    println!("conala:      {read} rows in {ours:.2}s = {our_rate:.0} rows/s ({written} rows out)");

    // 3. HF datasets, same input and work.
    if args.no_python {
        return Ok(());
    }
    let script = Path::new("scripts/bench_prep_hf.py");
    let out = Command::new(&args.python)
        .arg(script)
        .arg(&input)
        .arg(&args.tokenizer)
        .arg(work.join("hf-cache"))
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let line = text.lines().rev().find(|l| l.starts_with('{')).unwrap_or("{}");
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
            let (rows, secs) = (v["rows_in"].as_f64().unwrap_or(0.0), v["seconds"].as_f64().unwrap_or(0.0));
            if secs > 0.0 {
                let rate = rows / secs;
                println!("HF datasets: {rows} rows in {secs:.2}s = {rate:.0} rows/s ({} rows out)", v["rows_out"]);
                println!("ratio conala / HF datasets: {:.2}x", our_rate / rate);
            } else {
                println!("HF datasets anchor printed no timing: {text}");
            }
        }
        Ok(o) => println!(
            "HF datasets anchor skipped ({} failed: {})",
            script.display(),
            String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
        ),
        Err(e) => println!("HF datasets anchor skipped ({}: {e})", args.python),
    }
    if args.work_dir.is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}
