//! The `conala` command line: parse, call into the library, print.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};

use conala::context::{Context, Shard};
use conala::plans::{self, Plan};
use conala::sql::OutputFormat;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

// mimalloc's C API (linked in by the `mimalloc` crate).
unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    fn mi_version() -> std::ffi::c_int;
}
/// `mi_option_purge_delay` in mimalloc v3's `mi_option_t` (v3.x: `mi_version()` 30000..40000).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// Keep freed memory instead of returning it to the OS: tensors of the same sizes are allocated every
/// decoding and training step, and memory handed back is zeroed again by the kernel on its next use
/// (a third of training time before this). Peak memory is unchanged; `MIMALLOC_PURGE_DELAY` overrides.
fn keep_freed_memory() {
    // SAFETY: plain getters/setters of mimalloc's global state, valid at any time.
    let v3 = (30000..40000).contains(&unsafe { mi_version() });
    if v3 && std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// The offline default, run by `conala run` without plan files: prepare the shipped curated split,
/// fine-tune a copy-prior base on it with LoRA, then generate for the test rows and score them.
const DEFAULT_PLANS: [(&str, &str); 3] = [
    (
        "pipelines/conala-offline.yaml",
        include_str!("../pipelines/conala-offline.yaml"),
    ),
    (
        "pipelines/conala-offline-train.yaml",
        include_str!("../pipelines/conala-offline-train.yaml"),
    ),
    (
        "pipelines/conala-offline-generate.yaml",
        include_str!("../pipelines/conala-offline-generate.yaml"),
    ),
];

#[derive(Parser)]
#[command(name = "conala", version, about = "Complete code/natural-language datasets with seq2seq models", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a plan (without PLAN: the built-in offline default).
    Run(RunArgs),
    /// Check a plan completely without running it.
    Validate(PlanArgs),
    /// Run SQL over parquet outputs.
    Sql(SqlArgs),
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Model tools.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Fold a LoRA adapter into its base model and write a plain Hugging Face checkpoint.
    Merge(MergeArgs),
    /// Benchmarks against the Python stack (each prints its ratio).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args)]
struct PlanArgs {
    /// The plan file (YAML).
    plan: PathBuf,
    /// Override a plan key: `write.path=out/x`, `source.split=test`, `model.path=DIR`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

#[derive(Args)]
struct RunArgs {
    /// Plan files (YAML), run in order; the built-in offline default when left out.
    plans: Vec<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Process only the rows with row_id % N == I (also read from SLURM_ARRAY_TASK_ID/COUNT or
    /// JOB_COMPLETION_INDEX).
    #[arg(long, value_name = "I/N")]
    shard: Option<String>,
    /// Continue training from the last checkpoint in the train output folder.
    #[arg(long)]
    resume: bool,
}

#[derive(Args)]
struct SqlArgs {
    /// The query, e.g. "select count(*) from conala_offline".
    query: String,
    /// Register parquet files as a table: NAME=PATH_OR_URL (repeatable).
    #[arg(long = "table", value_name = "NAME=PATH_OR_URL")]
    tables: Vec<String>,
    /// Register this plan's output under the plan's name.
    #[arg(long)]
    plan: Option<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// table, csv, json (lines) or parquet.
    #[arg(long, default_value = "table")]
    format: OutputFormat,
    /// Write the result here instead of stdout.
    #[arg(long)]
    output: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a T5-style Unigram tokenizer on text columns of a source.
    Train(TokenizerTrainArgs),
}

#[derive(Args)]
struct TokenizerTrainArgs {
    /// A source URI (local folder/file, object store URL or hf://datasets/...).
    #[arg(long, default_value = "data/conala")]
    input: String,
    #[arg(long)]
    config: Option<String>,
    #[arg(long)]
    split: Option<String>,
    /// Text columns to learn from.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "intent,rewritten_intent,snippet"
    )]
    columns: Vec<String>,
    #[arg(long, default_value_t = 8000)]
    vocab_size: u32,
    /// Where to write tokenizer.json.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Write a randomly initialised T5-family model as a Hugging Face folder.
    Init(ModelInitArgs),
}

#[derive(Args)]
struct ModelInitArgs {
    #[arg(long, value_enum)]
    family: conala::model::init::Family,
    #[arg(long, value_enum, default_value = "tiny")]
    size: conala::model::init::Size,
    /// tokenizer.json to ship with the model (default: train one on the shipped CoNaLa data).
    #[arg(long)]
    vocab: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Hand-set weights that copy the input (`model::copy_prior`; its own shape, replaces --size;
    /// needs --family flan-t5 or ul2) instead of a random initialisation.
    #[arg(long)]
    copy_prior: bool,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct MergeArgs {
    /// Base model: a folder or a Hub model id.
    #[arg(long)]
    base: String,
    /// PEFT-format adapter folder.
    #[arg(long)]
    adapter: String,
    /// Output folder for the merged checkpoint.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Data preparation: load + filter + format + tokenize N rows, vs HF datasets.
    Prep(conala::bench::PrepArgs),
    /// Generation: tokens/s on the shipped test rows, vs HF transformers and CTranslate2.
    Generate(conala::bench::GenerateArgs),
    /// LoRA training: samples/s on the same batches, vs HF transformers + PEFT.
    Train(conala::bench::TrainArgs),
}

fn main() {
    keep_freed_memory();
    init_logging();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(dispatch(cli)) {
        eprintln!("error: {}", error_chain(&e));
        std::process::exit(1);
    }
}

async fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(a) => run(a).await,
        Command::Validate(a) => validate(a).await,
        Command::Sql(a) => sql(a).await,
        Command::Tokenizer(TokenizerCommand::Train(a)) => tokenizer_train(a).await,
        Command::Model(ModelCommand::Init(a)) => model_init(a).await,
        Command::Merge(a) => merge(a).await,
        Command::Bench(BenchCommand::Prep(a)) => {
            Ok(conala::bench::prep(&a, &Context::from_env()?).await?)
        }
        Command::Bench(BenchCommand::Train(a)) => {
            Ok(conala::bench::train_bench(&a, &Context::from_env()?).await?)
        }
        Command::Bench(BenchCommand::Generate(a)) => {
            Ok(conala::bench::generate_bench(&a, &Context::from_env()?).await?)
        }
    }
}

/// The plans of a run, with `--set` overrides. With several plans a key may start with a plan's name
/// (`conala-offline.write.path=…`) to reach that plan only; otherwise it applies to every plan it names
/// something in, and must name something in at least one.
fn load_plans(files: &[PathBuf], sets: &[String]) -> Result<Vec<Plan>> {
    let texts: Vec<(String, String)> = if files.is_empty() {
        DEFAULT_PLANS
            .iter()
            .map(|(n, t)| (format!("{n} (built in)"), t.to_string()))
            .collect()
    } else {
        files
            .iter()
            .map(|p| {
                Ok((
                    p.display().to_string(),
                    std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?,
                ))
            })
            .collect::<Result<_>>()?
    };
    if texts.len() == 1 {
        return Ok(vec![plans::load_str(&texts[0].1, &texts[0].0, sets)?]);
    }
    let bare: Vec<Plan> = texts
        .iter()
        .map(|(n, t)| plans::load_str(t, n, &[]))
        .collect::<conala::Result<_>>()?;
    let mut per_plan: Vec<Vec<String>> = vec![vec![]; bare.len()];
    for set in sets {
        let targeted: Vec<usize> = bare
            .iter()
            .enumerate()
            .filter(|(_, p)| set.starts_with(&format!("{}.", p.name)))
            .map(|(i, _)| i)
            .collect();
        if let Some(&i) = targeted.first() {
            per_plan[i].push(set[bare[i].name.len() + 1..].to_string());
            continue;
        }
        let mut hit = false;
        for (i, (n, t)) in texts.iter().enumerate() {
            if plans::load_str(t, n, std::slice::from_ref(set)).is_ok() {
                per_plan[i].push(set.clone());
                hit = true;
            }
        }
        if !hit {
            // Report the error as the first plan sees it.
            plans::load_str(&texts[0].1, &texts[0].0, std::slice::from_ref(set))?;
        }
    }
    texts
        .iter()
        .zip(per_plan)
        .map(|((n, t), s)| Ok(plans::load_str(t, n, &s)?))
        .collect()
}

async fn run(a: RunArgs) -> Result<()> {
    let default = a.plans.is_empty();
    let plans = load_plans(&a.plans, &a.sets)?;
    let mut ctx = Context::from_env()?;
    if let Some(s) = &a.shard {
        ctx.shard = Some(Shard::parse(s)?);
    }
    // The built-in default picks up its own earlier run instead of refusing to overwrite it.
    ctx.resume = a.resume || default;
    for plan in &plans {
        run_one(plan, &ctx).await?;
    }
    Ok(())
}

async fn run_one(plan: &Plan, ctx: &Context) -> Result<()> {
    let pipeline = plans::build(plan, ctx).await?;
    let summary = pipeline.run(ctx).await?;
    let flow: Vec<String> = summary
        .rows_per_step
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!(
        "plan `{}` finished in {:.1}s",
        summary.plan_name, summary.seconds
    );
    println!("  rows out of each step: {}", flow.join(" -> "));
    if let Some(w) = &summary.write {
        println!(
            "  wrote {} rows to {} ({} part files{})",
            w.rows_written,
            w.location,
            w.parts.len(),
            if w.rows_resumed > 0 {
                format!(", {} rows kept from earlier runs", w.rows_resumed)
            } else {
                String::new()
            }
        );
        let table = summary.plan_name.replace('-', "_");
        println!(
            "  query it: conala sql --table {table}={} \"select count(*) from {table}\"",
            w.location
        );
    }
    if let Some(t) = &summary.train {
        println!(
            "  trained {} steps on {} examples in {:.1}s ({:.1} samples/s); final eval loss {}",
            t.steps,
            t.train_examples,
            t.train_seconds,
            t.samples_per_second,
            t.final_eval_loss
                .map(|l| format!("{l:.3}"))
                .unwrap_or_else(|| "-".into())
        );
        if let Some(s) = &t.eval_scores {
            println!(
                "  eval ({} rows): BLEU {:.2}, CoNaLa BLEU {:.2}, exact match {:.1}%",
                s.rows,
                s.bleu,
                s.conala_bleu,
                100.0 * s.exact_match
            );
        }
        if let Some(b) = &t.baseline_scores {
            println!(
                "  baseline (copy the `{}` column): BLEU {:.2}, CoNaLa BLEU {:.2}",
                plan_baseline(plan),
                b.bleu,
                b.conala_bleu
            );
        }
        println!(
            "  model: {} (adapter and checkpoints in {})",
            t.model_dir, t.output
        );
    }
    if let Some(g) = summary.extra.get("generate") {
        println!(
            "  generated {} rows ({} tokens) at {:.1} rows/s, {:.1} tokens/s; finish reasons {}",
            g["rows"],
            g["generated_tokens"],
            g["rows_per_second"].as_f64().unwrap_or(0.0),
            g["tokens_per_second"].as_f64().unwrap_or(0.0),
            g["finish_reason"]
        );
    }
    if let Some(e) = summary.extra.get("evaluate") {
        println!(
            "  evaluate ({} rows): BLEU {:.2}, CoNaLa BLEU {:.2}, mean sentence BLEU {:.2}, exact match {:.1}%",
            e["rows"],
            e["bleu"].as_f64().unwrap_or(0.0),
            e["conala_bleu"].as_f64().unwrap_or(0.0),
            e["sentence_bleu"].as_f64().unwrap_or(0.0),
            100.0 * e["exact_match"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}

fn plan_baseline(plan: &Plan) -> String {
    plan.steps
        .iter()
        .find_map(|s| match s {
            conala::plans::spec::Step::Train(t) => t.baseline.clone(),
            _ => None,
        })
        .unwrap_or_default()
}

async fn validate(a: PlanArgs) -> Result<()> {
    let plan = plans::load_file(&a.plan, &a.sets)?;
    let ctx = Context::from_env()?;
    let pipeline = plans::build(&plan, &ctx).await?;
    println!("{}: valid plan `{}`", a.plan.display(), plan.name);
    for (step, cols) in pipeline.describe() {
        println!(
            "  {step}: {}",
            if cols.is_empty() {
                "(sink)".to_string()
            } else {
                cols.join(", ")
            }
        );
    }
    Ok(())
}

async fn sql(a: SqlArgs) -> Result<()> {
    let ctx = Context::from_env()?;
    if let Some(p) = &a.plan {
        let plan = plans::load_file(p, &a.sets)?;
        conala::sql::register_plan_output(&ctx, &plan).await?;
    } else if !a.sets.is_empty() {
        bail!("--set needs --plan");
    }
    for t in &a.tables {
        let Some((name, uri)) = t.split_once('=') else {
            bail!("--table {t}: expected NAME=PATH_OR_URL");
        };
        conala::sql::register_table(&ctx, name, uri).await?;
    }
    let batches = conala::sql::query(&ctx, &a.query).await?;
    conala::sql::render(&batches, a.format, a.output.as_deref())?;
    Ok(())
}

async fn tokenizer_train(a: TokenizerTrainArgs) -> Result<()> {
    let ctx = Context::from_env()?;
    let texts = conala::bench::collect_texts(
        &ctx,
        &a.input,
        a.config.as_deref(),
        a.split.as_deref(),
        &a.columns,
    )
    .await
    .with_context(|| format!("reading {}", a.input))?;
    let options = conala::tokenizer::TrainOptions {
        vocab_size: a.vocab_size,
        ..Default::default()
    };
    let n = texts.len();
    let tok = tokio::task::spawn_blocking(move || conala::tokenizer::train(texts.iter(), &options))
        .await??;
    conala::tokenizer::save(&tok, &a.out)?;
    println!(
        "trained a {}-piece Unigram tokenizer on {n} texts -> {}",
        tok.get_vocab_size(true),
        a.out.display()
    );
    Ok(())
}

async fn model_init(a: ModelInitArgs) -> Result<()> {
    let ctx = Context::from_env()?;
    let tokenizer = match &a.vocab {
        Some(p) => p.clone(),
        None => {
            let texts = conala::bench::collect_texts(&ctx, "data/conala", Some("curated"), Some("train"), &["intent".into(), "rewritten_intent".into(), "snippet".into()])
                .await
                .context("training a tokenizer on data/conala (run from the repository root, or pass --vocab)")?;
            let tok = tokio::task::spawn_blocking(move || {
                conala::tokenizer::train(texts.iter(), &Default::default())
            })
            .await??;
            let p =
                std::env::temp_dir().join(format!("conala-tokenizer-{}.json", std::process::id()));
            conala::tokenizer::save(&tok, &p)?;
            p
        }
    };
    use conala::model::init::{write_new_model, Prior};
    let prior = if a.copy_prior {
        Prior::Copy
    } else {
        Prior::Random
    };
    let cfg = write_new_model(a.family, a.size, prior, &tokenizer, a.seed, &a.out)?;
    println!(
        "wrote a {} {:?} model (vocab {}, d_model {}, {} layers) to {}",
        prior.describe(a.size),
        a.family,
        cfg.vocab_size,
        cfg.d_model,
        cfg.num_layers,
        a.out.display()
    );
    Ok(())
}

async fn merge(a: MergeArgs) -> Result<()> {
    let ctx = Context::from_env()?;
    let spec = conala::plans::spec::ModelSpec {
        path: a.base.clone(),
        revision: None,
        adapter: Some(a.adapter.clone()),
        dtype: "f32".into(),
        device: "cpu".into(),
        init: None,
    };
    let mut loaded = conala::model::load(&spec, &ctx.hub).await?;
    let config_text = std::fs::read_to_string(&loaded.files.config)?;
    let config_json: serde_json::Value = serde_json::from_str(&config_text)?;
    conala::model::lora::save_merged(
        &mut loaded.model,
        &config_json,
        loaded.files.tokenizer.as_deref(),
        &a.out,
    )?;
    println!("merged {} + {} -> {}", a.base, a.adapter, a.out.display());
    Ok(())
}

/// The error and its causes, skipping causes whose text the message already contains (library errors
/// carry their cause in their own message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

/// Log lines to stderr; `CONALA_LOG=debug|info|warn|error` (default info).
fn init_logging() {
    struct Stderr(log::LevelFilter);
    impl log::Log for Stderr {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.level() <= self.0 && m.target().starts_with("conala")
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) {
                let level = match r.level() {
                    log::Level::Error => "error: ",
                    log::Level::Warn => "warning: ",
                    _ => "",
                };
                eprintln!("[conala] {level}{}", r.args());
            }
        }
        fn flush(&self) {}
    }
    let level = match std::env::var("CONALA_LOG").as_deref() {
        Ok("debug") | Ok("trace") => log::LevelFilter::Debug,
        Ok("warn") => log::LevelFilter::Warn,
        Ok("error") => log::LevelFilter::Error,
        _ => log::LevelFilter::Info,
    };
    if log::set_boxed_logger(Box::new(Stderr(level))).is_ok() {
        log::set_max_level(level);
    }
}
