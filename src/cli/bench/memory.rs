//! `conala bench memory`: the peak memory and time of a LoRA training step (r 8, q and v, AdamW state
//! beside it) on random weights and tokens of exact lengths, with and without gradient checkpointing,
//! against what `conala validate` estimates for the same shape. Each measurement runs in a process of
//! its own (`--one`), so memory an earlier one freed cannot hide this one's peak.

use crate::cli::output::out;
use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::rss::{peak_during, rss_anon};
use conala::error::{Error, Result};
use conala::model::init::{Family, Size};
use conala::model::lora::{attach_new, AdapterConfig, LoraSettings};
use conala::model::memory::{TrainFootprint, TrainShape};
use conala::model::mode::{Dropout, Mode, TrainState};
use conala::model::ops;
use conala::model::weights::Weights;
use conala::rng::Rng;

#[derive(clap::Args, Debug, Clone)]
pub struct MemoryArgs {
    /// Shapes to measure: FAMILY:SIZE:BATCH:INPUT:TARGET, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "flan-t5:small:8:128:64,t5:small:16:128:32,ul2:small:8:256:32,flan-t5:base:4:512:128"
    )]
    pub shapes: Vec<String>,
    /// Training steps per measurement (the peak of the last, the time of each after the first).
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
    /// Measure one shape in this process and print its JSON line (what the benchmark runs).
    #[arg(long, hide = true)]
    pub one: Option<String>,
    #[arg(long, hide = true)]
    pub checkpointing: bool,
}

/// One measured step.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Measured {
    shape: String,
    checkpointing: bool,
    /// RssAnon over the loaded model and adapter, at the step's peak (bytes).
    peak: u64,
    /// Everything the process holds at its peak (bytes), the model included.
    peak_total: u64,
    /// The peak of live allocations over the loaded model (bytes): what the step needs, without what
    /// the allocator keeps for reuse.
    live_peak: u64,
    seconds_per_step: f64,
    estimate: u64,
    estimate_total: u64,
}

fn parse_shape(s: &str) -> Result<(Family, Size, TrainShape)> {
    let p: Vec<&str> = s.split(':').collect();
    let bad = || {
        Error::Data(format!(
            "shape `{s}`: expected FAMILY:SIZE:BATCH:INPUT:TARGET"
        ))
    };
    if p.len() != 5 {
        return Err(bad());
    }
    let family: Family = p[0].parse().map_err(|_| bad())?;
    let size: Size = p[1].parse().map_err(|_| bad())?;
    let n = |i: usize| p[i].parse::<usize>().map_err(|_| bad());
    Ok((
        family,
        size,
        TrainShape {
            batch: n(2)?,
            input_len: n(3)?,
            target_len: n(4)?,
        },
    ))
}

pub fn run(args: &MemoryArgs) -> Result<()> {
    if let Some(shape) = &args.one {
        if std::env::var_os(crate::cli::memory::COUNT_ENV).is_none() {
            return Err(Error::Run(format!(
                "bench memory --one counts allocations: run it with {}=1",
                crate::cli::memory::COUNT_ENV
            )));
        }
        let m = measure_here(shape, args.checkpointing, args.steps)?;
        out!(
            "{}",
            serde_json::to_string(&m).map_err(|e| Error::json("result", e))?
        );
        return Ok(());
    }
    let exe = std::env::current_exe().map_err(|e| Error::io("this program", e))?;
    out!(
        "LoRA r=8 (q, v) training step, f32 on the CPU, random weights; memory over the loaded model:"
    );
    out!(
        "live = the peak of allocated bytes (what the step needs), RssAnon = the process's anonymous memory"
    );
    out!(
        "{:<28} {:>4} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "family:size:batch:in:out",
        "ckpt",
        "live",
        "RssAnon",
        "estimate",
        "est/live",
        "s/step"
    );
    let mut plain: Option<Measured> = None;
    for shape in &args.shapes {
        for ck in [false, true] {
            let mut cmd = Command::new(&exe);
            cmd.env(crate::cli::memory::COUNT_ENV, "1")
                .args(["bench", "memory", "--one", shape, "--steps"])
                .arg(args.steps.to_string());
            if ck {
                cmd.arg("--checkpointing");
            }
            let out = cmd
                .output()
                .map_err(|e| Error::io("conala bench memory --one", e))?;
            let line = String::from_utf8_lossy(&out.stdout)
                .lines()
                .rfind(|l| l.starts_with('{'))
                .map(str::to_string)
                .ok_or_else(|| {
                    Error::Run(format!(
                        "bench memory: {shape}: {}",
                        String::from_utf8_lossy(&out.stderr)
                            .lines()
                            .last()
                            .unwrap_or("no output")
                    ))
                })?;
            let m: Measured = serde_json::from_str(&line).map_err(|e| Error::json(&line, e))?;
            let mb = |b: u64| format!("{:.0} MB", b as f64 / 1e6);
            let saving = match (&plain, ck) {
                (Some(p), true) => format!(
                    "  checkpointing: {:.0}% less live memory ({:.0}% less RssAnon), {:.2}x the step time",
                    100.0 * (1.0 - m.live_peak as f64 / p.live_peak as f64),
                    100.0 * (1.0 - m.peak as f64 / p.peak as f64),
                    m.seconds_per_step / p.seconds_per_step
                ),
                _ => String::new(),
            };
            out!(
                "{:<28} {:>4} {:>10} {:>10} {:>10} {:>8.2} {:>8.1}{saving}",
                m.shape,
                if ck { "on" } else { "off" },
                mb(m.live_peak),
                mb(m.peak),
                mb(m.estimate),
                m.estimate as f64 / m.live_peak as f64,
                m.seconds_per_step
            );
            if !ck {
                plain = Some(m);
            }
        }
    }
    Ok(())
}

/// One shape's step(s) in this process.
fn measure_here(shape: &str, checkpointing: bool, steps: usize) -> Result<Measured> {
    let (family, size, s) = parse_shape(shape)?;
    // The weights go through a folder `model init` writes and load as a run loads them (mapped,
    // converted tensor by tensor), so the process holds what a run would.
    let dir = std::env::temp_dir().join(format!("conala-bench-memory-{}", std::process::id()));
    let cfg = super::random_model(family, size, &dir)?;
    let files = [dir.join("model.safetensors")];
    let w = Weights::open(&files, "bench", &Device::Cpu, DType::F32)?;
    let mut model = cfg.build(&w)?;
    drop(w);
    let _cleanup = std::fs::remove_dir_all(&dir);
    let lora = LoraSettings::default();
    let adapter = AdapterConfig::new(&lora, "bench", &cfg);
    let vars: Vec<Var> = attach_new(model.as_mut(), &adapter, 0)?
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    // AdamW's two moments per variable, as the trainer holds them.
    let moments: Vec<Tensor> = vars
        .iter()
        .map(|v| v.as_tensor().zeros_like())
        .collect::<candle_core::Result<Vec<_>>>()?
        .into_iter()
        .flat_map(|m| [m.clone(), m.copy().unwrap_or(m)])
        .collect();
    let mut rng = Rng::new(1);
    let mut ids =
        |n: usize| -> Vec<u32> { (0..n).map(|_| 3 + (rng.next_u64() % 7990) as u32).collect() };
    let dev = &Device::Cpu;
    let input = Tensor::from_vec(ids(s.batch * s.input_len), (s.batch, s.input_len), dev)?;
    let mask = Tensor::ones((s.batch, s.input_len), DType::U8, dev)?;
    let dec = Tensor::from_vec(ids(s.batch * s.target_len), (s.batch, s.target_len), dev)?;
    let labels = Tensor::from_vec(ids(s.batch * s.target_len), (s.batch, s.target_len), dev)?;
    let label_mask = Tensor::ones((s.batch, s.target_len), DType::F32, dev)?;
    let base = rss_anon();
    let live_base = crate::cli::memory::live_bytes();
    crate::cli::memory::reset_peak();
    // On the compute pool, as the trainer runs.
    let (peak, seconds) = ops::on_compute_pool(|| -> Result<(u64, Vec<f64>)> {
        let state = std::cell::RefCell::new(TrainState::new(Dropout::uniform(0.1), Rng::new(2)));
        let step = || -> Result<()> {
            let mode = Mode {
                train: Some(&state),
            };
            let (loss, grads) =
                model.gradients((&input, &mask, &dec), &mode, &vars, checkpointing, &|l| {
                    let (sum, n) = ops::cross_entropy(l, &labels, &label_mask, 0.0)?;
                    Ok((sum / n)?)
                })?;
            loss.to_scalar::<f32>()?;
            drop(grads);
            Ok(())
        };
        let (mut peak, mut seconds) = (0, vec![]);
        for _ in 0..steps.max(1) {
            let started = Instant::now();
            let (r, p) = peak_during(step);
            r?;
            seconds.push(started.elapsed().as_secs_f64());
            peak = peak.max(p);
        }
        Ok((peak, seconds))
    })?;
    let live_peak = (crate::cli::memory::peak_bytes() - live_base).max(0) as u64;
    drop(moments);
    let timed = if seconds.len() > 1 {
        &seconds[1..]
    } else {
        &seconds[..]
    };
    let f = TrainFootprint::new(
        &cfg,
        DType::F32,
        Some(&lora),
        s,
        checkpointing,
        ops::fused_training_attention(conala::model::DeviceChoice::Cpu, DType::F32),
    );
    Ok(Measured {
        shape: shape.to_string(),
        checkpointing,
        peak: peak.saturating_sub(base),
        peak_total: peak,
        live_peak,
        seconds_per_step: timed.iter().sum::<f64>() / timed.len() as f64,
        estimate: f.step(),
        estimate_total: f.total(),
    })
}
