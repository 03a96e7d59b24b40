//! `conala bench train`: LoRA training samples/s against HF transformers + PEFT, same model, same
//! batches in the same order.

use crate::cli::output::out;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use super::generate::{anchor_runs, EngineRun};
use super::{random_model, Common, Scratch, SHIPPED_TOKENIZER};
use conala::context::Context;
use conala::error::{Error, Result};
use conala::model::init::{Family, Size};
use conala::model::{DTypeChoice, DeviceChoice};
use conala::plans;

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
    #[arg(long, default_value = "flan-t5")]
    pub family: Family,
    #[arg(long, default_value = "small")]
    pub size: Size,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// The base model's dtype (the LoRA weights and optimizer state stay f32 on both sides).
    #[arg(long, default_value = "f32")]
    pub dtype: DTypeChoice,
    #[command(flatten)]
    pub common: Common,
}

/// Both sides' runs (samples in `tokens`).
#[derive(Debug, Clone, Serialize)]
pub struct TrainMeasurement {
    pub model: String,
    pub ours: EngineRun,
    pub anchor: Option<EngineRun>,
}

impl TrainMeasurement {
    pub fn print(&self) {
        out!("{}", self.model);
        let o = &self.ours;
        out!(
            "  conala:          {:.0} samples in {:.2}s = {:.1} samples/s",
            o.tokens,
            o.seconds,
            o.tokens_per_second()
        );
        match &self.anchor {
            Some(a) if a.skipped.is_none() => out!(
                "  hf+peft:         {:.0} samples in {:.2}s = {:.1} samples/s; conala / hf+peft = {:.2}x",
                a.tokens,
                a.seconds,
                a.tokens_per_second(),
                o.tokens_per_second() / a.tokens_per_second()
            ),
            Some(a) => out!(
                "  hf+peft skipped: {}",
                a.skipped.as_deref().unwrap_or("")
            ),
            None => {}
        }
    }
}

pub async fn run(args: &TrainArgs, ctx: &Context) -> Result<()> {
    measure(args, ctx).await?.print();
    Ok(())
}

/// LoRA training (r=8, alpha 32, dropout 0.05 on q and v; AdamW lr 5e-5; clip 1.0) on the shipped curated
/// train rows, inputs cut to 128 tokens and labels to 64. Both sides train the same random model on the
/// same batches in the same order: the batches our `train` operator draws are exported for the Python side.
pub async fn measure(args: &TrainArgs, ctx: &Context) -> Result<TrainMeasurement> {
    let scratch = Scratch::new(&args.common.work_dir, "train")?;
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
    let order = conala::training::batching::epoch_batches(&examples, args.batch_size, 0, 0);
    if order.len() < total {
        return Err(Error::Data(format!(
            "bench train: {} batches of {} in an epoch, fewer than the {total} steps asked for",
            order.len(),
            args.batch_size
        )));
    }
    let batches: Vec<Vec<&conala::training::batching::Example>> = order[..total]
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
model: {{ path: "{model}", dtype: {dtype}, device: "{device}" }}
steps:
  - source: {{ uri: "{data}", row_id: rid }}
  - train:
      lora: {{ r: 8, alpha: 32, dropout: 0.05 }}
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
        dtype = args.dtype,
        device = args.device,
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
    let label = format!(
        "LoRA r=8 (q, v) training, {} {} shape (d_model {}, {} layers, vocab {vocab}), batch {}, inputs <= 128, labels <= 64, {} on {}; {} steps after {} warm-up steps",
        args.family, args.size, cfg.shape.d_model, cfg.shape.encoder_layers, args.batch_size, args.dtype, args.device, args.steps, args.warmup_steps
    );
    let ours = EngineRun {
        engine: "conala".into(),
        rows: samples as f64,
        tokens: samples as f64,
        seconds: ours_secs.max(1e-9),
        skipped: None,
    };
    let anchor = (!args.common.no_python).then(|| {
        let mut cmd = Command::new(&args.common.python);
        cmd.arg("scripts/bench_train_hf.py")
            .arg(&model)
            .arg(&batches_path)
            .arg(args.warmup_steps.to_string())
            .args([
                "--device",
                &args.device.to_string(),
                "--dtype",
                &args.dtype.to_string(),
            ]);
        anchor_runs(cmd, &args.common.python)
            .into_iter()
            .next()
            .unwrap_or(EngineRun {
                engine: "hf+peft".into(),
                rows: 0.0,
                tokens: 0.0,
                seconds: 0.0,
                skipped: Some("no output".into()),
            })
    });
    Ok(TrainMeasurement {
        model: label,
        ours,
        anchor,
    })
}

/// `input_ids` / `labels` rows of a prepared parquet folder, in file order (the order `train` reads).
fn read_examples(dir: &Path) -> Result<Vec<conala::training::batching::Example>> {
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
                out.push(conala::training::batching::Example {
                    input: get(&ids, r),
                    labels: get(&labels, r),
                });
            }
        }
    }
    Ok(out)
}
