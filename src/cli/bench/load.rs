//! `conala bench load`: peak host memory while a checkpoint loads in a given dtype, against the size of
//! its weights in that dtype. Checkpoints are read tensor by tensor from the mapped file and converted
//! as they are read, so an f32 checkpoint loaded as bf16 should cost little more than the bf16
//! weights themselves.

use crate::cli::output::out;
use std::path::PathBuf;
use std::process::Command;

use super::rss::{peak_during, rss_anon};
use super::{Scratch, SHIPPED_TOKENIZER};
use conala::context::Context;
use conala::error::{Error, Result};
use conala::model::{DTypeChoice, DeviceChoice, ModelSource};

#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// The checkpoint, safetensors or PyTorch `.bin` (default: a random f32 flan-t5-base-shaped
    /// one, made first by `conala model init` in another process so its memory does not count here).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value = "bf16")]
    pub dtype: DTypeChoice,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Scratch folder for the default checkpoint (default: a temporary one).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

const MB: f64 = 1e6;

pub async fn run(args: &LoadArgs, ctx: &Context) -> Result<()> {
    let scratch = Scratch::new(&args.work_dir, "load")?;
    let dir = match &args.model {
        Some(m) => m.clone(),
        None => {
            let dir = scratch.path.join("flan-t5-base");
            if !dir.join("config.json").is_file() {
                let exe = std::env::current_exe().map_err(|e| Error::io("this program", e))?;
                let status = Command::new(exe)
                    .args(["model", "init", "--family", "flan-t5", "--size", "base"])
                    .args(["--vocab", SHIPPED_TOKENIZER, "--out"])
                    .arg(&dir)
                    .status()
                    .map_err(|e| Error::io("conala model init", e))?;
                if !status.success() {
                    return Err(Error::Run(
                        "bench load: making the checkpoint failed".into(),
                    ));
                }
            }
            dir
        }
    };
    let files: u64 = std::fs::read_dir(&dir)
        .map_err(|e| Error::io(dir.display(), e))?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.ends_with(".safetensors") || name.ends_with(".bin")
        })
        .filter_map(|e| e.metadata().ok().map(|m| m.len()))
        .sum();
    let source = ModelSource::at(&dir.display().to_string(), args.device, args.dtype);
    let base = rss_anon();
    let runtime = tokio::runtime::Handle::current();
    let (loaded, peak) = tokio::task::block_in_place(|| {
        peak_during(|| runtime.block_on(conala::model::load(&source, &ctx.hub)))
    });
    let loaded = loaded?;
    let after = rss_anon();
    let weights: u64 = loaded
        .model
        .clone()
        .state_dict()?
        .into_iter()
        .filter(|(n, _)| !n.ends_with("embed_tokens.weight"))
        .map(|(_, t)| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
        .sum();
    out!(
        "{}: {:.0} MB of checkpoint files (.safetensors, .bin) on disk, loaded as {:?} on {}",
        dir.display(),
        files as f64 / MB,
        loaded.model.dtype(),
        args.device
    );
    out!(
        "  weights in {:?}: {:.0} MB; RssAnon before {:.0} MB, peak {:.0} MB, after {:.0} MB",
        loaded.model.dtype(),
        weights as f64 / MB,
        base as f64 / MB,
        peak as f64 / MB,
        after as f64 / MB
    );
    out!(
        "  peak over the weights: (peak - before) / weights = {:.2}x",
        (peak.saturating_sub(base)) as f64 / weights as f64
    );
    Ok(())
}
