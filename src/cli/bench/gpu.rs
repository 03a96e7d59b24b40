//! `conala bench gpu`: the one run a GPU session makes (`scripts/gpu-check.sh`), and, with `--device
//! cpu --quick`, the same steps on small shapes, as the tests run them so they cannot rot.
//!
//! 1. Parity on the device: the shipped HF fixtures' logits on the device in f32 against the CPU's,
//!    greedy tokens identical, and the device's bf16 greedy tokens against HF's f32 ones (with HF's
//!    own bf16 agreement beside them).
//! 2. Generation, bf16, on a flan-t5-base-shaped model (random weights HF loads too) over 2,000
//!    CoNaLa rows: at natural length and at exactly 32 new tokens, against HF `generate`.
//! 3. LoRA training (r 8, q and v, batch 16, bf16) against HF + PEFT on the same batches.
//!
//! Writes one JSON (`--out`) with the machine (GPU name, driver, memory), each step's numbers, the
//! peak memory (GPU memory from nvidia-smi, or this process's RssAnon on the CPU) and the projected
//! time for all of CoNaLa mined.

use crate::cli::output::out;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::json;

use super::generate::{self, GenerateArgs, Measurement, Workload};
use super::rss::rss_anon;
use super::train::{self, TrainArgs, TrainMeasurement};
use super::{Common, Scratch, SHIPPED_TOKENIZER};
use conala::context::Context;
use conala::error::{Error, Result};
use conala::model::decoding::{generate as decode, DecodeOptions};
use conala::model::init::{Family, NewModel, Prior, Size};
use conala::model::mode::Mode;
use conala::model::weights::Weights;
use conala::model::{DTypeChoice, DeviceChoice, ModelConfig, Seq2Seq};

/// Rows of CoNaLa mined, for the projection.
const MINED_ROWS: f64 = 593_891.0;

#[derive(clap::Args, Debug, Clone)]
pub struct GpuArgs {
    /// The device to check and measure (`cpu`: the same steps, as the tests run them).
    #[arg(long, default_value = "cuda:0")]
    pub device: DeviceChoice,
    /// Small shapes, few rows and steps (the CPU mode).
    #[arg(long)]
    pub quick: bool,
    /// CoNaLa rows to generate for (the shipped curated train rows).
    #[arg(long, default_value_t = 2000)]
    pub rows: usize,
    /// Where to write the JSON of results.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub common: Common,
}

/// One family's parity on the device.
#[derive(Debug, Serialize)]
struct Parity {
    family: String,
    /// Largest difference of the device's f32 logits from the CPU's.
    max_logit_diff: f32,
    /// The largest logit (the scale of the difference).
    logit_scale: f32,
    greedy_identical: bool,
    /// Rows whose device-bf16 greedy tokens equal HF's f32 ones, and HF bf16's count.
    bf16_agreement: usize,
    hf_bf16_agreement: usize,
    rows: usize,
}

pub async fn run(args: &GpuArgs, ctx: &Context) -> Result<()> {
    let started = Instant::now();
    let scratch = Scratch::new(&args.common.work_dir, "gpu")?;
    let device = args.device.resolve()?;
    let machine = machine(&device);
    out!("{}", serde_json::to_string(&machine).unwrap_or_default());
    let memory = PeakMemory::start(&device);

    let mut parity = vec![];
    for family in ["t5", "flan-t5", "ul2"] {
        let p = check_parity(family, &device)?;
        out!(
            "parity {family}: device f32 logits within {:.2e} of the CPU's (scale {:.1}); greedy {}; bf16 greedy = HF f32 on {}/{} rows (HF bf16: {})",
            p.max_logit_diff, p.logit_scale,
            if p.greedy_identical { "identical" } else { "DIFFERENT" },
            p.bf16_agreement, p.rows, p.hf_bf16_agreement
        );
        parity.push(p);
    }
    let parity_peak = memory.take_peak();

    let size = if args.quick { Size::Tiny } else { Size::Base };
    let model = scratch.path.join(format!("flan-t5-{size}"));
    NewModel {
        family: Family::FlanT5,
        size,
        prior: Prior::Random,
        tokenizer: PathBuf::from(SHIPPED_TOKENIZER),
        seed: 0,
    }
    .write(&model)?;
    let gen_args = |natural: bool, new_tokens: usize| GenerateArgs {
        families: vec![Family::FlanT5],
        size,
        new_tokens,
        natural,
        model: Some(model.clone()),
        batch_tokens: "auto".into(),
        max_batch_rows: 512,
        device: args.device,
        dtype: DTypeChoice::Bf16,
        split: "train".into(),
        rows: Some(if args.quick {
            args.rows.min(64)
        } else {
            args.rows
        }),
        hf_batch_size: if device.is_cpu() { 32 } else { 256 },
        vocab: None,
        sampling: false,
        common: Common {
            work_dir: Some(scratch.path.join("generate")),
            ..args.common.clone()
        },
    };
    let mut generation: Vec<(&str, Measurement, u64)> = vec![];
    for (name, natural, new_tokens) in [
        ("natural length (at most 64)", true, 64),
        ("exactly 32 new tokens", false, 32),
    ] {
        let a = gen_args(natural, new_tokens);
        let work = scratch.path.join("generate");
        std::fs::create_dir_all(&work).map_err(|e| Error::io(work.display(), e))?;
        let w = Workload {
            args: &a,
            dir: &model,
            label: format!(
                "generate, {name}, flan-t5 {size} (random), bf16 on {}",
                args.device
            ),
            work: &work,
            sampling: false,
        };
        let m = generate::measure(&w, ctx).await?;
        generate::print(&m);
        generation.push((name, m, memory.take_peak()));
    }

    let t = TrainArgs {
        steps: if args.quick { 3 } else { 25 },
        warmup_steps: if args.quick { 1 } else { 5 },
        batch_size: 16,
        family: Family::FlanT5,
        size,
        device: args.device,
        dtype: DTypeChoice::Bf16,
        common: Common {
            work_dir: Some(scratch.path.join("train")),
            ..args.common.clone()
        },
    };
    let training: TrainMeasurement = train::measure(&t, ctx).await?;
    training.print();
    let train_peak = memory.take_peak();

    let natural_rows_per_second = generation[0].1.ours.rows_per_second();
    let results = json!({
        "machine": machine,
        "quick": args.quick,
        "parity": parity,
        "parity_peak_memory_mib": parity_peak,
        "generation": generation.iter().map(|(name, m, peak)| json!({
            "mode": name,
            "measurement": m,
            "conala_tokens_per_second": m.ours.tokens_per_second(),
            "conala_rows_per_second": m.ours.rows_per_second(),
            "ratios": ratios(m),
            "peak_memory_mib": peak,
        })).collect::<Vec<_>>(),
        "training": {
            "measurement": training,
            "conala_samples_per_second": training.ours.tokens_per_second(),
            "ratio_vs_hf_peft": training.anchor.as_ref().filter(|a| a.skipped.is_none())
                .map(|a| training.ours.tokens_per_second() / a.tokens_per_second()),
            "peak_memory_mib": train_peak,
        },
        "memory_peak_mib": memory.finish(),
        "mined_projection_minutes": MINED_ROWS / natural_rows_per_second / 60.0,
        "seconds": started.elapsed().as_secs_f64(),
    });
    let text = serde_json::to_string_pretty(&results).map_err(|e| Error::json("results", e))?;
    std::fs::write(&args.out, text).map_err(|e| Error::io(args.out.display(), e))?;
    out!(
        "all of CoNaLa mined at the natural-length rate ({natural_rows_per_second:.1} rows/s): {:.1} minutes; results in {}",
        MINED_ROWS / natural_rows_per_second / 60.0,
        args.out.display()
    );
    Ok(())
}

/// conala's rate over each anchor's that ran.
fn ratios(m: &Measurement) -> HashMap<String, f64> {
    m.anchors
        .iter()
        .filter(|a| a.skipped.is_none())
        .map(|a| {
            (
                a.engine.clone(),
                m.ours.tokens_per_second() / a.tokens_per_second(),
            )
        })
        .collect()
}

/// The machine: the GPU (name, driver, memory) from nvidia-smi, or the CPU's threads.
fn machine(device: &Device) -> serde_json::Value {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if device.is_cpu() {
        return json!({ "device": "cpu", "threads": threads });
    }
    let smi = Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,driver_version,memory.total",
            "--format=csv,noheader",
        ])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let f: Vec<&str> = smi.split(", ").collect();
    json!({
        "device": format!("{device:?}"),
        "gpu": f.first(),
        "driver": f.get(1),
        "memory": f.get(2),
        "cpu_threads": threads,
    })
}

/// A fixture model on `device` in `dtype`.
fn fixture_model(family: &str, device: &Device, dtype: DType) -> Result<Box<dyn Seq2Seq>> {
    let dir = Path::new("tests/fixtures/parity").join(family);
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(cfg_path.display(), e))?;
    let cfg = ModelConfig::from_json(&text, family)?;
    let w = Weights::open(&[dir.join("model.safetensors")], family, device, dtype)?;
    cfg.build(&w)
}

fn load_fixture(family: &str, file: &str) -> Result<HashMap<String, Tensor>> {
    let p = Path::new("tests/fixtures/parity").join(family).join(file);
    candle_core::safetensors::load(&p, &Device::Cpu).map_err(|e| Error::tensors(p.display(), e))
}

/// Each row's kept tokens (mask 1), from right-padded ids.
fn unpadded(ids: &Tensor, mask: &Tensor) -> Result<Vec<Vec<u32>>> {
    let ids: Vec<Vec<i64>> = ids.to_dtype(DType::I64)?.to_vec2()?;
    let mask: Vec<Vec<i64>> = mask.to_dtype(DType::I64)?.to_vec2()?;
    Ok(ids
        .iter()
        .zip(&mask)
        .map(|(r, m)| {
            r.iter()
                .zip(m)
                .filter(|(_, k)| **k == 1)
                .map(|(t, _)| *t as u32)
                .collect()
        })
        .collect())
}

/// HF sequences (start token, tokens, padding) as ours (tokens up to and including `</s>`).
fn hf_tokens(t: &Tensor) -> Result<Vec<Vec<u32>>> {
    let v: Vec<Vec<i64>> = t.to_dtype(DType::I64)?.to_vec2()?;
    Ok(v.iter()
        .map(|r| {
            let mut out: Vec<u32> = vec![];
            for &t in &r[1..] {
                out.push(t as u32);
                if t == 1 {
                    break;
                }
            }
            while out.last() == Some(&0) {
                out.pop();
            }
            out
        })
        .collect())
}

fn greedy(model: &dyn Seq2Seq, rows: &[Vec<u32>], new_tokens: usize) -> Result<Vec<Vec<u32>>> {
    let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let o = DecodeOptions {
        max_new_tokens: new_tokens,
        ..Default::default()
    };
    Ok(decode(model, &refs, &vec![0; refs.len()], &o)?
        .into_iter()
        .map(|g| g.tokens)
        .collect())
}

fn check_parity(family: &str, device: &Device) -> Result<Parity> {
    let io = load_fixture(family, "io.safetensors")?;
    let bf = load_fixture(family, "bf16.safetensors")?;
    let on = |t: &Tensor, d: &Device, dt: DType| t.to_dtype(dt).and_then(|t| t.to_device(d));
    let logits = |m: &dyn Seq2Seq, d: &Device| -> Result<Tensor> {
        let l = m.forward(
            &on(&io["input_ids"], d, DType::U32)?,
            &on(&io["attention_mask"], d, DType::U8)?,
            &on(&io["decoder_input_ids"], d, DType::U32)?,
            &Mode::INFER,
        )?;
        Ok(l.to_device(&Device::Cpu)?)
    };
    let (mut cpu, mut dev) = (
        fixture_model(family, &Device::Cpu, DType::F32)?,
        fixture_model(family, device, DType::F32)?,
    );
    let (lc, ld) = (
        logits(cpu.as_ref(), &Device::Cpu)?,
        logits(dev.as_ref(), device)?,
    );
    let max_logit_diff = (&lc - &ld)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let logit_scale = lc.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    cpu.prepare_for_inference()?;
    dev.prepare_for_inference()?;
    let rows = unpadded(&io["input_ids"], &io["attention_mask"])?;
    let greedy_identical = greedy(cpu.as_ref(), &rows, 32)? == greedy(dev.as_ref(), &rows, 32)?;
    let mut bf16 = fixture_model(family, device, DType::BF16)?;
    bf16.prepare_for_inference()?;
    let bf_rows = unpadded(&bf["rows_input_ids"], &bf["rows_mask"])?;
    let ours = greedy(bf16.as_ref(), &bf_rows, 16)?;
    let (hf_f32, hf_bf16) = (
        hf_tokens(&bf["greedy_f32"])?,
        hf_tokens(&bf["greedy_bf16"])?,
    );
    let agree = |x: &[Vec<u32>]| x.iter().zip(&hf_f32).filter(|(a, b)| a == b).count();
    Ok(Parity {
        family: family.to_string(),
        max_logit_diff,
        logit_scale,
        greedy_identical,
        bf16_agreement: agree(&ours),
        hf_bf16_agreement: agree(&hf_bf16),
        rows: bf_rows.len(),
    })
}

/// The most memory in use since the last look: the GPU's (nvidia-smi, sampled every 100 ms, in MiB)
/// or, on the CPU, this process's RssAnon (MiB).
struct PeakMemory {
    peak: Arc<AtomicU64>,
    overall: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
    smi: Option<std::process::Child>,
}

impl PeakMemory {
    fn start(device: &Device) -> PeakMemory {
        let (peak, overall) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let record = {
            let (peak, overall) = (peak.clone(), overall.clone());
            move |mib: u64| {
                peak.fetch_max(mib, Ordering::Relaxed);
                overall.fetch_max(mib, Ordering::Relaxed);
            }
        };
        let mut smi = None;
        let sampler = if device.is_cpu() {
            let stop = stop.clone();
            Some(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    record(rss_anon() >> 20);
                    std::thread::sleep(Duration::from_millis(5));
                }
            }))
        } else {
            let child = Command::new("nvidia-smi")
                .args([
                    "--query-gpu=memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "100",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn();
            match child {
                Ok(mut c) => {
                    let out = c.stdout.take();
                    smi = Some(c);
                    out.map(|out| {
                        std::thread::spawn(move || {
                            for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
                                if let Ok(mib) = line.trim().parse::<u64>() {
                                    record(mib);
                                }
                            }
                        })
                    })
                }
                Err(e) => {
                    log::warn!("bench gpu: nvidia-smi: {e}; GPU memory is not recorded");
                    None
                }
            }
        };
        PeakMemory {
            peak,
            overall,
            stop,
            sampler,
            smi,
        }
    }

    /// The peak since the last call (MiB), and start over.
    fn take_peak(&self) -> u64 {
        self.peak.swap(0, Ordering::Relaxed)
    }

    /// The peak over the whole run (MiB).
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(mut c) = self.smi.take() {
            if let Err(e) = c.kill() {
                log::warn!("bench gpu: stopping nvidia-smi: {e}");
            }
            let _reaped = c.wait();
        }
        if let Some(s) = self.sampler.take() {
            if s.join().is_err() {
                log::warn!("bench gpu: the memory sampler stopped with a panic");
            }
        }
        self.overall.load(Ordering::Relaxed)
    }
}
