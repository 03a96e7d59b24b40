//! `conala bench generate`: generated tokens/s on the shipped CoNaLa rows, against HF transformers
//! `generate` and CTranslate2 on the same weights, inputs and work (the same number of new tokens).

use crate::cli::output::out;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use datafusion::arrow::array::{Array, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use serde::Serialize;

use super::{last_stderr_line, random_model_with_vocab, Common, Scratch, SHIPPED_TOKENIZER};
use conala::context::Context;
use conala::error::{Error, Result};
use conala::model::init::{Family, Size};
use conala::model::{DTypeChoice, DeviceChoice};
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
    /// Token budget of a batch (rows x padded input length; `auto` sizes it by the device's free
    /// memory, 16384 on the CPU) and the row cap.
    #[arg(long, default_value = "auto")]
    pub batch_tokens: String,
    #[arg(long, default_value_t = 512)]
    pub max_batch_rows: usize,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    #[arg(long, default_value = "f32")]
    pub dtype: DTypeChoice,
    /// Rows of the shipped curated split to generate for (`test`: its 500 rows; `train`: up to its
    /// 2,379, see --rows).
    #[arg(long, default_value = "test")]
    pub split: String,
    /// At most this many rows.
    #[arg(long)]
    pub rows: Option<usize>,
    /// The Python anchors' batch size (rows, sorted by length).
    #[arg(long, default_value_t = 32)]
    pub hf_batch_size: usize,
    /// The random models' vocabulary, padded past the shipped tokenizer's 8,000 (T5's is 32128):
    /// what choosing the next token costs grows with it.
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Also generate with the mined plan's sampling (temperature 0.2, top_p 0.9,
    /// repetition_penalty 1.2, as pipelines/conala-mined.yaml) and print its speed against greedy's,
    /// measured in the same run on the same rows.
    #[arg(long)]
    pub sampling: bool,
    #[command(flatten)]
    pub common: Common,
}

/// One engine's run over the rows.
#[derive(Debug, Clone, Serialize)]
pub struct EngineRun {
    pub engine: String,
    pub rows: f64,
    pub tokens: f64,
    pub seconds: f64,
    /// Why the engine did not run (a missing package, a failure).
    pub skipped: Option<String>,
}

impl EngineRun {
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens / self.seconds
    }
    pub fn rows_per_second(&self) -> f64 {
        self.rows / self.seconds
    }
}

/// Our run and the anchors', on one model.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub model: String,
    pub ours: EngineRun,
    /// Loading, hashing and preparing the model (not in `ours.seconds`).
    pub load_seconds: f64,
    pub anchors: Vec<EngineRun>,
}

/// What to measure on one model folder.
pub struct Workload<'a> {
    pub args: &'a GenerateArgs,
    pub dir: &'a Path,
    pub label: String,
    pub work: &'a Path,
    /// Sample with the mined plan's settings instead of greedy (conala only: no anchors).
    pub sampling: bool,
}

/// The mined plan's sampling (pipelines/conala-mined.yaml), as `generate` keys.
pub const MINED_SAMPLING: &str = "temperature: 0.2, top_p: 0.9, repetition_penalty: 1.2";

/// The shipped rows of `split` as the benchmark's inputs: `intent\nsnippet`, at most 128 tokens, the
/// first `limit` of them.
fn bench_inputs(tokenizer: &Path, split: &str, limit: Option<usize>) -> Result<Vec<Vec<u32>>> {
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let p = PathBuf::from(format!("data/conala/curated/{split}/0000.parquet"));
    let p = p.as_path();
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
    out.truncate(limit.unwrap_or(usize::MAX));
    Ok(out)
}

/// Our whole plan (read, tokenize, generate, write) over the rows, then the Python anchors.
pub async fn measure(w: &Workload<'_>, ctx: &Context) -> Result<Measurement> {
    let args = w.args;
    let tok_file = w.dir.join("tokenizer.json");
    let tok = if tok_file.is_file() {
        tok_file
    } else {
        PathBuf::from(SHIPPED_TOKENIZER)
    };
    let inputs = bench_inputs(&tok, &args.split, args.rows)?;
    let inputs_path = w.work.join("inputs.json");
    std::fs::write(
        &inputs_path,
        serde_json::to_string(&inputs).unwrap_or_default(),
    )
    .map_err(|e| Error::io(inputs_path.display(), e))?;
    let out = w.work.join("out");
    let min_new = if args.natural { 0 } else { args.new_tokens };
    let limit = args
        .rows
        .map(|n| format!(", limit: {n}"))
        .unwrap_or_default();
    let yaml = format!(
        r#"name: bench-generate
model: {{ path: "{model}", dtype: {dtype}, device: "{device}" }}
steps:
  - source: {{ uri: data/conala, config: curated, split: {split}{limit} }}
  - format: {{ input: "{{intent}}\n{{snippet}}" }}
  - tokenize: {{ input: input, max_input_tokens: 128, tokenizer: "{tok}" }}
  - generate: {{ output: out, max_new_tokens: {n}, min_new_tokens: {min_new}, batch_tokens: {bt}, max_batch_rows: {br}, dedup: false{decode} }}
  - write: {{ path: "{out}", mode: overwrite }}
"#,
        model = w.dir.display(),
        dtype = args.dtype,
        device = args.device,
        split = args.split,
        tok = tok.display(),
        n = args.new_tokens,
        bt = args.batch_tokens,
        br = args.max_batch_rows,
        decode = if w.sampling {
            format!(", {MINED_SAMPLING}")
        } else {
            String::new()
        },
        out = out.display()
    );
    let plan = plans::load_str(&yaml, "<bench generate>", &[])?;
    let pipeline = plans::build(&plan, ctx).await?;
    let started = Instant::now();
    let summary = pipeline.run(ctx).await?;
    let seconds = started.elapsed().as_secs_f64();
    let g = summary
        .reports
        .generate
        .as_ref()
        .ok_or_else(|| Error::Data("bench generate: the plan reported no generation".into()))?;
    // The anchors time their generation loop over ids they are given, the model already loaded; ours
    // is the whole plan (reading, tokenizing and writing overlap with the model's work) less loading,
    // hashing and preparing the model.
    let ours = EngineRun {
        engine: "conala".into(),
        rows: g.rows as f64,
        tokens: g.generated_tokens as f64,
        seconds: seconds - g.load_seconds,
        skipped: None,
    };
    let load_seconds = g.load_seconds;
    let anchors = if args.common.no_python || w.sampling {
        vec![]
    } else {
        let mut cmd = Command::new(&args.common.python);
        cmd.arg("scripts/bench_generate_hf.py")
            .arg(w.dir)
            .arg(&inputs_path)
            .arg(args.new_tokens.to_string())
            .args([
                "--device",
                &args.device.to_string(),
                "--dtype",
                &args.dtype.to_string(),
            ])
            .args(["--batch-size", &args.hf_batch_size.to_string()]);
        if args.natural {
            cmd.arg("--natural");
        }
        anchor_runs(cmd, &args.common.python)
    };
    Ok(Measurement {
        model: w.label.clone(),
        ours,
        load_seconds,
        anchors,
    })
}

/// The JSON lines a Python anchor script prints, one per engine.
pub fn anchor_runs(mut cmd: Command, python: &str) -> Vec<EngineRun> {
    let skipped = |engine: &str, why: String| EngineRun {
        engine: engine.into(),
        rows: 0.0,
        tokens: 0.0,
        seconds: 0.0,
        skipped: Some(why),
    };
    let o = match cmd.output() {
        Ok(o) => o,
        Err(e) => return vec![skipped("python", format!("{python}: {e}"))],
    };
    let mut runs: Vec<EngineRun> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
            let name = v["engine"].as_str().unwrap_or("?");
            match v["error"].as_str() {
                Some(e) => skipped(name, e.lines().last().unwrap_or(e).to_string()),
                None => EngineRun {
                    engine: name.into(),
                    rows: v["rows"].as_f64().unwrap_or(0.0),
                    tokens: v["tokens"]
                        .as_f64()
                        .or_else(|| v["samples"].as_f64())
                        .unwrap_or(0.0),
                    seconds: v["seconds"].as_f64().unwrap_or(f64::INFINITY),
                    skipped: None,
                },
            }
        })
        .collect();
    if !o.status.success() {
        runs.push(skipped("python", last_stderr_line(&o.stderr)));
    }
    runs
}

/// The lines `conala bench generate` prints for a measurement.
pub fn print(m: &Measurement) {
    let o = &m.ours;
    out!("\n{}", m.model);
    out!(
        "  conala:          {:.0} rows, {:.0} tokens in {:.2}s = {:.1} tokens/s, {:.1} rows/s (the plan: read, tokenize, generate, write; besides {:.2}s loading the model, as the anchors' time leaves theirs out)",
        o.rows, o.tokens, o.seconds, o.tokens_per_second(), o.rows_per_second(), m.load_seconds
    );
    for a in &m.anchors {
        match &a.skipped {
            Some(why) => out!("  {:<16} skipped: {why}", a.engine),
            None => out!(
                "  {:<16} {:.0} rows, {:.0} tokens in {:.2}s = {:.1} tokens/s; conala / {} = {:.2}x",
                a.engine,
                a.rows,
                a.tokens,
                a.seconds,
                a.tokens_per_second(),
                a.engine,
                o.tokens_per_second() / a.tokens_per_second()
            ),
        }
    }
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
    let models: Vec<(String, PathBuf)> = match &args.model {
        Some(m) => vec![(m.display().to_string(), m.clone())],
        None => {
            let mut v = vec![];
            for fam in &args.families {
                let dir = work.join(format!("{fam}-{}", args.size));
                let vocab = random_model_with_vocab(*fam, args.size, args.vocab, &dir)?;
                v.push((format!("{fam} {} (random, vocab {vocab})", args.size), dir));
            }
            v
        }
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    out!(
        "machine: {threads} threads; {} on {}; greedy; {} new tokens per row{}",
        args.dtype,
        args.device,
        args.new_tokens,
        if args.natural {
            " at most (stop at </s>)"
        } else {
            " exactly"
        }
    );
    for (label, dir) in models {
        let mut w = Workload {
            args,
            dir: &dir,
            label,
            work,
            sampling: false,
        };
        let greedy = measure(&w, ctx).await?;
        print(&greedy);
        if args.sampling {
            w.sampling = true;
            let sampled = measure(&w, ctx).await?.ours;
            out!(
                "  conala sampling: {:.0} rows, {:.0} tokens in {:.2}s = {:.1} tokens/s ({MINED_SAMPLING}); sampling / greedy = {:.2}x",
                sampled.rows,
                sampled.tokens,
                sampled.seconds,
                sampled.tokens_per_second(),
                sampled.tokens_per_second() / greedy.ours.tokens_per_second()
            );
        }
    }
    Ok(())
}
