//! The command line's arguments (clap).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use super::bench::{GenerateArgs, GpuArgs, LoadArgs, MemoryArgs, PrepArgs, TrainArgs};
use conala::model::init::{Family, Size};
use conala::sql::OutputFormat;

#[derive(Parser)]
#[command(name = "conala", version, about = "Complete code/natural-language datasets with seq2seq models", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run a plan (without PLAN: the built-in offline default).
    Run(RunArgs),
    /// Check a plan completely without running it.
    Validate(ValidateArgs),
    /// Run SQL over parquet outputs.
    Sql(SqlArgs),
    /// Is an output complete? Its shards (complete, incomplete, missing) with row counts, and whether
    /// it is committed (`_SUCCESS`). Exits 0 only when complete.
    Status(StatusArgs),
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Model tools.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Fold a LoRA adapter into its base model and write a plain Hugging Face checkpoint.
    Merge(MergeArgs),
    /// Upload a folder to the Hugging Face Hub in one commit: a conala output as a dataset (its
    /// committed parts as data/train-*.parquet, a dataset card), a model folder as a model (a model
    /// card unless it has a README.md). Rerunning an interrupted push sends only what is missing.
    Push(PushArgs),
    /// Benchmarks against the Python stack (each prints its ratio).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args)]
pub struct ValidateArgs {
    /// The plan file (YAML).
    pub plan: PathBuf,
    /// Override a plan key: `write.path=out/x`, `source.split=test`, `model.path=DIR`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Memory of each device the plan's models run on (`80GiB`, `141GB`, `512MiB`); default: read
    /// from the device (a GPU's total, the machine's RAM for the CPU).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub device_memory: Option<u64>,
}

/// Bytes from `80GiB`, `80GB`, `80G` (binary: GiB), `512MiB`, `2TiB` or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}`: expected a size such as 80GiB or 512MiB"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "kb" => 1000,
        "m" | "mib" => 1 << 20,
        "mb" => 1_000_000,
        "g" | "gib" => 1 << 30,
        "gb" => 1_000_000_000,
        "t" | "tib" => 1 << 40,
        "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "`{s}`: unknown unit `{other}` (use B, KiB, MiB, GiB, TiB, or KB, MB, GB, TB)"
            ))
        }
    };
    Ok((n * scale as f64) as u64)
}

#[derive(Args)]
pub struct RunArgs {
    /// Plan files (YAML), run in order; the built-in offline default when left out.
    pub plans: Vec<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Process only the rows with row_id % N == I (also read from SLURM_ARRAY_TASK_ID/COUNT or
    /// JOB_COMPLETION_INDEX).
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    /// Continue training from the last checkpoint in the train output folder.
    #[arg(long)]
    pub resume: bool,
}

#[derive(Args)]
pub struct PushArgs {
    /// The folder: a plan's `write.path` (a dataset), a model folder or a train output (its model/).
    pub path: PathBuf,
    /// The repository, OWNER/NAME (created if missing).
    pub repo_id: String,
    /// Create the repository private (an existing one keeps its visibility).
    #[arg(long)]
    pub private: bool,
    /// The branch to commit to.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// The commit message.
    #[arg(long, short = 'm')]
    pub message: Option<String>,
    /// Push an output whose shards are not all complete (the parts its manifests commit).
    #[arg(long)]
    pub allow_incomplete: bool,
    /// The card's license (default: the source data's when known, CoNaLa: cc-by-sa-4.0).
    #[arg(long)]
    pub license: Option<String>,
}

#[derive(Args)]
pub struct StatusArgs {
    /// The output folder or URL (a plan's `write.path`).
    pub output: String,
}

#[derive(Args)]
pub struct SqlArgs {
    /// The query, e.g. "select count(*) from conala_offline".
    pub query: String,
    /// Register parquet files as a table: NAME=PATH_OR_URL (repeatable).
    #[arg(long = "table", value_name = "NAME=PATH_OR_URL")]
    pub tables: Vec<String>,
    /// Register this plan's output under the plan's name.
    #[arg(long)]
    pub plan: Option<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// table, csv, json (lines) or parquet.
    #[arg(long, default_value = "table")]
    pub format: OutputFormat,
    /// Write the result here instead of stdout.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Train a T5-style Unigram tokenizer on text columns of a source.
    Train(TokenizerTrainArgs),
}

#[derive(Args)]
pub struct TokenizerTrainArgs {
    /// A source URI (local folder/file, object store URL or hf://datasets/...).
    #[arg(long, default_value = "data/conala")]
    pub input: String,
    #[arg(long)]
    pub config: Option<String>,
    #[arg(long)]
    pub split: Option<String>,
    /// Text columns to learn from.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "intent,rewritten_intent,snippet"
    )]
    pub columns: Vec<String>,
    #[arg(long, default_value_t = 8000)]
    pub vocab_size: u32,
    /// Where to write tokenizer.json.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Write a randomly initialised model (T5 family or BART) as a Hugging Face folder.
    Init(ModelInitArgs),
}

#[derive(Args)]
pub struct ModelInitArgs {
    /// t5, flan-t5, ul2 or bart.
    #[arg(long)]
    pub family: Family,
    /// tiny, mini, small or base.
    #[arg(long, default_value = "tiny")]
    pub size: Size,
    /// tokenizer.json to ship with the model (default: train one on the shipped CoNaLa data).
    #[arg(long)]
    pub vocab: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Hand-set weights that copy the input (`model::copy_prior`; its own shape, replaces --size;
    /// needs --family flan-t5 or ul2) instead of a random initialisation.
    #[arg(long)]
    pub copy_prior: bool,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct MergeArgs {
    /// Base model: a folder or a Hub model id.
    #[arg(long)]
    pub base: String,
    /// PEFT-format adapter folder.
    #[arg(long)]
    pub adapter: String,
    /// Output folder for the merged checkpoint.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Data preparation: load + filter + format + tokenize N rows, vs HF datasets.
    Prep(PrepArgs),
    /// Generation: tokens/s on the shipped test rows, vs HF transformers and CTranslate2.
    Generate(GenerateArgs),
    /// LoRA training: samples/s on the same batches, vs HF transformers + PEFT.
    Train(TrainArgs),
    /// Peak host memory while a checkpoint loads in a dtype, against the size of its weights.
    Load(LoadArgs),
    /// The device run: parity on the GPU, generation and LoRA training against HF, one JSON.
    Gpu(GpuArgs),
    /// A LoRA training step's peak memory and time, with and without checkpointing, against the
    /// estimate.
    Memory(MemoryArgs),
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_in_binary_and_decimal_units() {
        assert_eq!(parse_size("80GiB"), Ok(80 << 30));
        assert_eq!(parse_size("80G"), Ok(80 << 30));
        assert_eq!(parse_size("141GB"), Ok(141_000_000_000));
        assert_eq!(parse_size("1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("80 gallons")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_size("GiB").is_err());
    }
}
