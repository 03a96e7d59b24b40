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
pub async fn collect_texts(
    ctx: &Context,
    uri: &str,
    config: Option<&str>,
    split: Option<&str>,
    columns: &[String],
) -> Result<Vec<String>> {
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
    let source = Source::open(&spec, ctx)
        .await
        .map_err(|e| Error::Data(format!("{uri}: {}", e.message)))?;
    let batches: Vec<_> = source
        .execute()
        .try_collect()
        .await
        .map_err(from_stream_error)?;
    let mut out = vec![];
    for b in &batches {
        for c in columns {
            let col = cast(b.column_by_name(c).expect("projected"), &DataType::Utf8)
                .map_err(|e| Error::arrow(c, e))?;
            let s = col.as_any().downcast_ref::<StringArray>().expect("Utf8");
            out.extend(s.iter().flatten().map(str::to_string));
        }
    }
    Ok(out)
}

/// A benchmark's scratch folder: `--work-dir` when given (kept), else a temporary one removed when the
/// benchmark ends, also when it fails part-way.
struct Scratch {
    path: PathBuf,
    remove: bool,
}

impl Scratch {
    fn new(given: &Option<PathBuf>, name: &str) -> Result<Scratch> {
        let (path, remove) = match given {
            Some(d) => (d.clone(), false),
            None => (
                std::env::temp_dir().join(format!("conala-bench-{name}-{}", std::process::id())),
                true,
            ),
        };
        std::fs::create_dir_all(&path).map_err(|e| Error::io(path.display(), e))?;
        Ok(Scratch { path, remove })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The tokenizer shipped in the repo, which benchmark models are made for.
const SHIPPED_TOKENIZER: &str = "data/tokenizer/conala-unigram-8k.json";

/// A random model of `family` and `size` for the shipped tokenizer, written to `dir` as an HF folder
/// (the same weights load on both sides of a benchmark).
fn random_model(
    family: crate::model::init::Family,
    size: crate::model::init::Size,
    dir: &Path,
) -> Result<crate::model::config::T5Config> {
    let tokenizer = Path::new(SHIPPED_TOKENIZER);
    let vocab = crate::tokenizer::load(tokenizer)?.get_vocab_size(true);
    let cfg = crate::model::init::config(family, size, vocab);
    crate::model::init::write_random_model(&cfg, 0, tokenizer, dir)?;
    Ok(cfg)
}

/// The last line a failed Python anchor wrote to stderr (its exception), for the "skipped" line.
fn last_stderr_line(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .last()
        .unwrap_or("no output")
        .to_string()
}

#[derive(clap::Args, Debug, Clone)]
pub struct PrepArgs {
    /// Rows to prepare (the shipped curated rows repeated with new ids).
    #[arg(long, default_value_t = 600_000)]
    pub rows: u64,
    /// tokenizer.json used by both sides.
    #[arg(long, default_value = SHIPPED_TOKENIZER)]
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
    let scratch = Scratch::new(&args.work_dir, "prep")?;
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
    println!("input: {} rows in {}", args.rows, input.display());

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
                println!(
                    "HF datasets: {rows} rows in {secs:.2}s = {rate:.0} rows/s ({} rows out)",
                    v["rows_out"]
                );
                println!("ratio conala / HF datasets: {:.2}x", our_rate / rate);
            } else {
                println!("HF datasets anchor printed no timing: {text}");
            }
        }
        Ok(o) => println!(
            "HF datasets anchor skipped ({} failed: {})",
            script.display(),
            last_stderr_line(&o.stderr)
        ),
        Err(e) => println!("HF datasets anchor skipped ({}: {e})", args.python),
    }
    Ok(())
}

#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Model families to measure (random weights made like `conala model init`, small shapes).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "t5,flan-t5")]
    pub families: Vec<crate::model::init::Family>,
    #[arg(long, value_enum, default_value = "small")]
    pub size: crate::model::init::Size,
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
    #[arg(long, default_value = "python3")]
    pub python: String,
    #[arg(long)]
    pub no_python: bool,
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
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
    let mut tok = crate::tokenizer::load(tokenizer)?;
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

pub async fn generate_bench(args: &GenerateArgs, ctx: &Context) -> Result<()> {
    if args.natural && args.model.is_none() {
        return Err(Error::Data(
            "--natural measures a trained model: give --model DIR (e.g. runs/conala-offline/model)"
                .into(),
        ));
    }
    let scratch = Scratch::new(&args.work_dir, "gen")?;
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
        let g = &summary.extra["generate"];
        let tokens = g["generated_tokens"].as_f64().unwrap_or(0.0);
        let rows = g["rows"].as_f64().unwrap_or(0.0);
        println!("\n{label}");
        println!("  conala:          {rows:.0} rows, {tokens:.0} tokens in {secs:.2}s = {:.1} tokens/s, {:.1} rows/s (whole plan: read, tokenize, generate, write)", tokens / secs, rows / secs);
        if args.no_python {
            continue;
        }
        let mut cmd = Command::new(&args.python);
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
            Err(e) => println!("  python anchors skipped ({}: {e})", args.python),
        }
    }
    Ok(())
}

#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// Optimizer steps measured on each side (after --warmup-steps unmeasured ones).
    #[arg(long, default_value_t = 25)]
    pub steps: u64,
    /// Steps run first and left out of the timing on both sides.
    #[arg(long, default_value_t = 5)]
    pub warmup_steps: u64,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, value_enum, default_value = "flan-t5")]
    pub family: crate::model::init::Family,
    #[arg(long, value_enum, default_value = "small")]
    pub size: crate::model::init::Size,
    /// Python interpreter with `torch`, `transformers` and `peft` for the anchor.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Skip the Python anchor.
    #[arg(long)]
    pub no_python: bool,
    /// Scratch folder (default: a temporary one, removed at the end).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

/// LoRA training (r=8, alpha 32, dropout 0.05 on q and v; AdamW lr 5e-5; clip 1.0) on the shipped curated
/// train rows, inputs cut to 128 tokens and labels to 64. Both sides train the same random model on the
/// same batches in the same order: the batches our `train` operator draws are exported for the Python side.
pub async fn train_bench(args: &TrainArgs, ctx: &Context) -> Result<()> {
    let scratch = Scratch::new(&args.work_dir, "train")?;
    let work = &scratch.path;
    let tokenizer_path = Path::new(SHIPPED_TOKENIZER);
    let model = work.join("model");
    let cfg = random_model(args.family, args.size, &model)?;
    let vocab = cfg.vocab_size;
    let data = work.join("data");
    let prep = format!(
        r#"name: bench-train-data
steps:
  - source: {{ uri: data/conala, config: curated, split: train }}
  - filter: "intent IS NOT NULL AND rewritten_intent IS NOT NULL"
  - format: {{ input: "{{intent}}\n{{snippet}}" }}
  - tokenize: {{ input: input, target: rewritten_intent, max_input_tokens: 128, max_target_tokens: 64, tokenizer: "{tok}" }}
  - write: {{ path: "{data}", mode: overwrite, columns: [row_id, input_ids, labels] }}
"#,
        tok = tokenizer_path.display(),
        data = data.display()
    );
    let plan = plans::load_str(&prep, "<bench train data>", &[])?;
    plans::build(&plan, ctx).await?.run(ctx).await?;

    // The batches the train operator will draw (epoch 0, seed 0), for the Python side.
    let examples = read_examples(&data)?;
    let total = (args.steps + args.warmup_steps) as usize;
    let order = crate::training::batching::epoch_batches(&examples, args.batch_size, 0, 0);
    if order.len() < total {
        return Err(Error::Data(format!(
            "bench train: {} batches of {} in an epoch, fewer than the {total} steps asked for",
            order.len(),
            args.batch_size
        )));
    }
    let batches: Vec<Vec<&crate::training::batching::Example>> = order[..total]
        .iter()
        .map(|b| b.iter().map(|&i| &examples[i]).collect())
        .collect();
    let batches_json: Vec<serde_json::Value> = batches
        .iter()
        .map(|b| {
            serde_json::json!({
                "input_ids": b.iter().map(|e| &e.input).collect::<Vec<_>>(),
                "labels": b.iter().map(|e| &e.labels).collect::<Vec<_>>(),
            })
        })
        .collect();
    let batches_path = work.join("batches.json");
    std::fs::write(
        &batches_path,
        serde_json::to_string(&batches_json).unwrap_or_default(),
    )
    .map_err(|e| Error::io(batches_path.display(), e))?;
    let samples: usize = batches[args.warmup_steps as usize..]
        .iter()
        .map(Vec::len)
        .sum();

    // conala: the train operator; warm-up and measured steps are two logging windows.
    let out = work.join("run");
    let _ = std::fs::remove_dir_all(&out);
    let yaml = format!(
        r#"name: bench-train
model: {{ path: "{model}", dtype: f32, device: cpu }}
steps:
  - source: {{ uri: "{data}", row_id: rid }}
  - train:
      lora: {{ r: 8, alpha: 32, dropout: 0.05, targets: [q, v] }}
      max_steps: {total}
      batch_size: {bs}
      learning_rate: 5.0e-5
      lr_scheduler: constant
      warmup_steps: 0
      max_grad_norm: 1.0
      log_every: {warm}
      save_every: 1000000
      seed: 0
      output: "{out}"
"#,
        model = model.display(),
        data = data.display(),
        bs = args.batch_size,
        warm = args.warmup_steps.max(1),
        out = out.display()
    );
    let plan = plans::load_str(&yaml, "<bench train>", &[])?;
    let pipeline = plans::build(&plan, ctx).await?;
    pipeline.run(ctx).await?;
    // Seconds of the measured steps, from the per-window rates in metrics.jsonl.
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl"))
        .map_err(|e| Error::io(out.join("metrics.jsonl").display(), e))?;
    let mut ours_secs = 0.0;
    let mut step_before = 0u64;
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        let (Some(step), Some(sps)) = (v["step"].as_u64(), v["samples_per_second"].as_f64()) else {
            continue;
        };
        if step > args.warmup_steps {
            let n: usize = batches[step_before as usize..step as usize]
                .iter()
                .map(Vec::len)
                .sum();
            ours_secs += n as f64 / sps;
        }
        step_before = step;
    }
    let ours = samples as f64 / ours_secs.max(1e-9);
    println!(
        "LoRA r=8 (q, v) training, {:?} {:?} shape (d_model {}, {} layers, vocab {vocab}), batch {}, inputs <= 128, labels <= 64, f32 on CPU",
        args.family, args.size, cfg.d_model, cfg.num_layers, args.batch_size
    );
    println!(
        "  conala:          {samples} samples in {ours_secs:.2}s = {ours:.1} samples/s ({} steps after {} warm-up steps)",
        args.steps, args.warmup_steps
    );
    if !args.no_python {
        let mut cmd = Command::new(&args.python);
        cmd.arg("scripts/bench_train_hf.py")
            .arg(&model)
            .arg(&batches_path)
            .arg(args.warmup_steps.to_string());
        match cmd.output() {
            Ok(o) => {
                let line = String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .rfind(|l| l.starts_with('{'))
                    .map(str::to_string);
                match line.and_then(|l| serde_json::from_str::<serde_json::Value>(&l).ok()) {
                    Some(v) if v["seconds"].is_number() => {
                        let (n, s) = (
                            v["samples"].as_f64().unwrap_or(0.0),
                            v["seconds"].as_f64().unwrap_or(f64::INFINITY),
                        );
                        println!("  hf+peft:         {n:.0} samples in {s:.2}s = {:.1} samples/s; conala / hf+peft = {:.2}x", n / s, ours / (n / s));
                    }
                    _ => println!("  hf+peft skipped: {}", last_stderr_line(&o.stderr)),
                }
            }
            Err(e) => println!("  hf+peft skipped ({}: {e})", args.python),
        }
    }
    Ok(())
}

/// `input_ids` / `labels` rows of a prepared parquet folder, in file order (the order `train` reads).
fn read_examples(dir: &Path) -> Result<Vec<crate::training::batching::Example>> {
    use datafusion::arrow::array::{Int32Array, ListArray};
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir.display(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    files.sort();
    let mut out = vec![];
    for f in files {
        let file = std::fs::File::open(&f).map_err(|e| Error::io(f.display(), e))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .and_then(|b| b.build())
            .map_err(|e| Error::Data(format!("{}: {e}", f.display())))?;
        for b in reader {
            let b = b.map_err(|e| Error::arrow(f.display(), e))?;
            let col = |n: &str| {
                b.column_by_name(n)
                    .and_then(|c| c.as_any().downcast_ref::<ListArray>().cloned())
            };
            let (Some(ids), Some(labels)) = (col("input_ids"), col("labels")) else {
                return Err(Error::Data(format!(
                    "{}: expected list columns input_ids, labels",
                    f.display()
                )));
            };
            let get = |a: &ListArray, r: usize| -> Vec<u32> {
                let v = a.value(r);
                v.as_any()
                    .downcast_ref::<Int32Array>()
                    .map(|x| x.values().iter().map(|&t| t as u32).collect())
                    .unwrap_or_default()
            };
            for r in 0..b.num_rows() {
                out.push(crate::training::batching::Example {
                    input: get(&ids, r),
                    labels: get(&labels, r),
                });
            }
        }
    }
    Ok(out)
}
