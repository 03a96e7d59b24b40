//! `conala bench prep`: load, filter, format and tokenize N rows, against HF `datasets` `map`.

use crate::cli::output::out;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::{last_stderr_line, Common, Scratch, SHIPPED_TOKENIZER};
use conala::context::Context;
use conala::error::Result;
use conala::plans;

#[derive(clap::Args, Debug, Clone)]
pub struct PrepArgs {
    /// Rows to prepare (the shipped curated rows repeated with new ids).
    #[arg(long, default_value_t = 600_000)]
    pub rows: u64,
    /// tokenizer.json used by both sides.
    #[arg(long, default_value = SHIPPED_TOKENIZER)]
    pub tokenizer: PathBuf,
    #[command(flatten)]
    pub common: Common,
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

pub async fn run(args: &PrepArgs, ctx: &Context) -> Result<()> {
    let scratch = Scratch::new(&args.common.work_dir, "prep")?;
    let work = &scratch.path;
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
    out!("input: {} rows in {}", args.rows, input.display());

    // 2. conala.
    let plan = plans::load_str(
        &prep_plan(&input, &output, &args.tokenizer),
        "<bench prep>",
        &[],
    )?;
    let started = Instant::now();
    let summary = plans::build(&plan, ctx).await?.run(ctx).await?;
    let ours = started.elapsed().as_secs_f64();
    let read = summary.rows_per_step.first().map(|(_, n)| *n).unwrap_or(0);
    let written = summary.write.as_ref().map(|w| w.rows_written).unwrap_or(0);
    let our_rate = read as f64 / ours;
    out!("conala:      {read} rows in {ours:.2}s = {our_rate:.0} rows/s ({written} rows out)");

    // 3. HF datasets, same input and work.
    if args.common.no_python {
        return Ok(());
    }
    let script = Path::new("scripts/bench_prep_hf.py");
    let out = Command::new(&args.common.python)
        .arg(script)
        .arg(&input)
        .arg(&args.tokenizer)
        .arg(work.join("hf-cache"))
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let line = text
                .lines()
                .rev()
                .find(|l| l.starts_with('{'))
                .unwrap_or("{}");
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
            let (rows, secs) = (
                v["rows_in"].as_f64().unwrap_or(0.0),
                v["seconds"].as_f64().unwrap_or(0.0),
            );
            if secs > 0.0 {
                let rate = rows / secs;
                out!(
                    "HF datasets: {rows} rows in {secs:.2}s = {rate:.0} rows/s ({} rows out)",
                    v["rows_out"]
                );
                out!("ratio conala / HF datasets: {:.2}x", our_rate / rate);
            } else {
                out!("HF datasets anchor printed no timing: {text}");
            }
        }
        Ok(o) => out!(
            "HF datasets anchor skipped ({} failed: {})",
            script.display(),
            last_stderr_line(&o.stderr)
        ),
        Err(e) => out!("HF datasets anchor skipped ({}: {e})", args.common.python),
    }
    Ok(())
}
