//! Benchmarks that compare `conala` with the Python stack on the same machine, inputs and work, in the
//! same run, and print the ratio (`conala bench prep | generate | train`), and what loading a
//! checkpoint costs in memory (`conala bench load`); `conala bench gpu` is the device run. Timings are reported, never
//! asserted. The Python anchors are scripts in `scripts/`, skipped when their packages are missing.

pub mod generate;
pub mod gpu;
pub mod load;
pub mod memory;
pub mod prep;
pub mod rss;
pub mod train;

use std::path::{Path, PathBuf};

use conala::error::{Error, Result};
use conala::model::init::{Family, NewModel, Prior, Size};
use conala::model::ModelConfig;

pub use generate::GenerateArgs;
pub use gpu::GpuArgs;
pub use load::LoadArgs;
pub use memory::MemoryArgs;
pub use prep::PrepArgs;
pub use train::TrainArgs;

/// Options every benchmark takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// Python interpreter for the anchor (with the packages its script imports).
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Skip the Python anchor.
    #[arg(long)]
    pub no_python: bool,
    /// Scratch folder (default: a temporary one, removed at the end).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

/// A benchmark's scratch folder: `--work-dir` when given (kept), else a temporary one removed when the
/// benchmark ends, also when it fails part-way.
pub struct Scratch {
    pub path: PathBuf,
    remove: bool,
}

impl Scratch {
    pub fn new(given: &Option<PathBuf>, name: &str) -> Result<Scratch> {
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
pub const SHIPPED_TOKENIZER: &str = "data/tokenizer/conala-unigram-8k.json";

/// A random model of `family` and `size` for the shipped tokenizer, written to `dir` as an HF folder
/// (the same weights load on both sides of a benchmark).
pub fn random_model(family: Family, size: Size, dir: &Path) -> Result<ModelConfig> {
    NewModel {
        family,
        size,
        prior: Prior::Random,
        tokenizer: PathBuf::from(SHIPPED_TOKENIZER),
        seed: 0,
    }
    .write(dir)
}

/// [`random_model`] with its vocabulary padded to `vocab` (T5 families; T5's own is 32128 for
/// 32100 tokens); the vocabulary size.
pub fn random_model_with_vocab(
    family: Family,
    size: Size,
    vocab: Option<usize>,
    dir: &Path,
) -> Result<usize> {
    let Some(v) = vocab else {
        return Ok(random_model(family, size, dir)?.vocab_size);
    };
    if family == Family::Bart {
        return Err(Error::Data(
            "--vocab pads T5-family models; BART's vocabulary is its tokenizer's".into(),
        ));
    }
    let shipped = Path::new(SHIPPED_TOKENIZER);
    let tokens = conala::tokenizer::load(shipped)?.get_vocab_size(true);
    if v < tokens {
        return Err(Error::Data(format!(
            "--vocab {v}: the shipped tokenizer has {tokens} tokens; give at least that"
        )));
    }
    conala::model::init::write_random_model(
        &conala::model::init::config(family, size, v),
        0,
        shipped,
        dir,
    )?;
    Ok(v)
}

/// The last line a failed Python anchor wrote to stderr (its exception), for the "skipped" line.
pub fn last_stderr_line(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .last()
        .unwrap_or("no output")
        .to_string()
}
