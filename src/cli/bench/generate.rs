//! `conala bench generate`: generated tokens/s on the shipped test rows, against HF transformers
//! `generate` and CTranslate2 on the same weights.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use datafusion::arrow::array::{Array, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;

use super::{last_stderr_line, random_model, Common, Scratch, SHIPPED_TOKENIZER};
use conala::context::Context;
use conala::error::{Error, Result};
use conala::model::init::{Family, Size};
use conala::plans;

#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Model families to measure (random weights made like `conala model init`, small shapes).
    #[arg(long, value_delimiter = ',', default_value = "t5,flan-t5")]
    pub families: Vec<Family>,
    #[arg(long, default_value = "small")]
    pub size: Size,
    /// New tokens per row (exactly this many unless --natural).
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    /// Stop at </s> (natural lengths) with at most --new-tokens; needs --model (a trained model).
    #[arg(long)]
    pub natural: bool,
    /// Measure this model folder instead of random ones.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Token budget of a batch (rows x padded input length) and the row cap.
    #[arg(long, default_value_t = 16384)]
    pub batch_tokens: usize,
    #[arg(long, default_value_t = 512)]
    pub max_batch_rows: usize,
    #[command(flatten)]
    pub common: Common,
}

/// The shipped test rows as the benchmark's inputs: `intent\nsnippet`, at most 128 tokens.
fn bench_inputs(tokenizer: &Path) -> Result<Vec<Vec<u32>>> {
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let p = Path::new("data/conala/curated/test/0000.parquet");
    let f = std::fs::File::open(p).map_err(|e| Error::io(p.display(), e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(|e| Error::parquet(p.display(), e))?
        .build()
        .map_err(|e| Error::parquet(p.display(), e))?;
    let mut tok = conala::tokenizer::load(tokenizer)?;
    tok.with_truncation(Some(tokenizers::TruncationParams {
        max_length: 128,
        ..Default::default()
    }))
    .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut out = vec![];
    for b in reader {
        let b = b.map_err(|e| Error::arrow(p.display(), e))?;
        let col = |n: &str| {
            cast(
                b.column_by_name(n).expect("curated column"),
                &DataType::Utf8,
            )
            .map_err(|e| Error::arrow(n, e))
        };
        let (intent, snippet) = (col("intent")?, col("snippet")?);
        let (i, s) = (
            intent.as_any().downcast_ref::<StringArray>().expect("utf8"),
            snippet
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("utf8"),
        );
        for r in 0..b.num_rows() {
            let text = format!("{}\n{}", i.value(r), s.value(r));
            let enc = tok
                .encode(text, true)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            out.push(enc.get_ids().to_vec());
        }
    }
    Ok(out)
}

pub async fn run(args: &GenerateArgs, ctx: &Context) -> Result<()> {
    if args.natural && args.model.is_none() {
        return Err(Error::Data(
            "--natural measures a trained model: give --model DIR (e.g. runs/conala-offline/model)"
                .into(),
        ));
    }
    let scratch = Scratch::new(&args.common.work_dir, "gen")?;
    let work = &scratch.path;
    let tokenizer_path = Path::new(SHIPPED_TOKENIZER);
    let models: Vec<(String, PathBuf)> = match &args.model {
        Some(m) => vec![(m.display().to_string(), m.clone())],
        None => {
            let mut v = vec![];
            for fam in &args.families {
                let dir = work.join(format!("{fam:?}-{:?}", args.size).to_lowercase());
                let cfg = random_model(*fam, args.size, &dir)?;
                v.push((
                    format!("{fam:?} {:?} (random, vocab {})", args.size, cfg.vocab_size)
                        .to_lowercase(),
                    dir,
                ));
            }
            v
        }
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "machine: {threads} threads; f32 on CPU; greedy; {} new tokens per row{}",
        args.new_tokens,
        if args.natural {
            " at most (stop at </s>)"
        } else {
            " exactly"
        }
    );
    for (label, dir) in models {
        let tok_file = dir.join("tokenizer.json");
        let inputs = bench_inputs(if tok_file.is_file() {
            &tok_file
        } else {
            tokenizer_path
        })?;
        let inputs_path = work.join("inputs.json");
        std::fs::write(
            &inputs_path,
            serde_json::to_string(&inputs).unwrap_or_default(),
        )
        .map_err(|e| Error::io(inputs_path.display(), e))?;
        let out = work.join("out");
        let min_new = if args.natural { 0 } else { args.new_tokens };
        let yaml = format!(
            r#"name: bench-generate
model: {{ path: "{model}", dtype: f32, device: cpu }}
steps:
  - source: {{ uri: data/conala, config: curated, split: test }}
  - format: {{ input: "{{intent}}\n{{snippet}}" }}
  - tokenize: {{ input: input, max_input_tokens: 128, tokenizer: "{tok}" }}
  - generate: {{ output: out, max_new_tokens: {n}, min_new_tokens: {min_new}, batch_tokens: {bt}, max_batch_rows: {br}, dedup: false }}
  - write: {{ path: "{out}", mode: overwrite }}
"#,
            model = dir.display(),
            tok = if tok_file.is_file() {
                tok_file.display().to_string()
            } else {
                tokenizer_path.display().to_string()
            },
            n = args.new_tokens,
            bt = args.batch_tokens,
            br = args.max_batch_rows,
            out = out.display()
        );
        let plan = plans::load_str(&yaml, "<bench generate>", &[])?;
        let pipeline = plans::build(&plan, ctx).await?;
        let started = Instant::now();
        let summary = pipeline.run(ctx).await?;
        let secs = started.elapsed().as_secs_f64();
        let g =
            summary.reports.generate.as_ref().ok_or_else(|| {
                Error::Data("bench generate: the plan reported no generation".into())
            })?;
        let (tokens, rows) = (g.generated_tokens as f64, g.rows as f64);
        println!("\n{label}");
        println!("  conala:          {rows:.0} rows, {tokens:.0} tokens in {secs:.2}s = {:.1} tokens/s, {:.1} rows/s (whole plan: read, tokenize, generate, write)", tokens / secs, rows / secs);
        if args.common.no_python {
            continue;
        }
        let mut cmd = Command::new(&args.common.python);
        cmd.arg("scripts/bench_generate_hf.py")
            .arg(&dir)
            .arg(&inputs_path)
            .arg(args.new_tokens.to_string());
        if args.natural {
            cmd.arg("--natural");
        }
        match cmd.output() {
            Ok(o) => {
                for line in String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| l.starts_with('{'))
                {
                    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
                    let name = v["engine"].as_str().unwrap_or("?");
                    if let Some(e) = v["error"].as_str() {
                        println!("  {name:<16} skipped: {}", e.lines().last().unwrap_or(e));
                        continue;
                    }
                    let (t, s) = (
                        v["tokens"].as_f64().unwrap_or(0.0),
                        v["seconds"].as_f64().unwrap_or(f64::INFINITY),
                    );
                    println!("  {name:<16} {:.0} rows, {t:.0} tokens in {s:.2}s = {:.1} tokens/s; conala / {name} = {:.2}x", v["rows"].as_f64().unwrap_or(0.0), t / s, (tokens / secs) / (t / s));
                }
                if !o.status.success() {
                    println!("  python anchors failed: {}", last_stderr_line(&o.stderr));
                }
            }
            Err(e) => println!("  python anchors skipped ({}: {e})", args.common.python),
        }
    }
    Ok(())
}
