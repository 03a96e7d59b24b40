//! `train`: fine-tune the plan's model on the rows it receives (a sink). LoRA (PEFT format) or full
//! fine-tuning, AdamW with warm-up schedules, gradient accumulation and clipping, evaluation loss every
//! `eval_every` steps, generation-based BLEU / exact match at the end, checkpoints every `save_every`
//! steps that a killed run resumes from (`conala run PLAN --resume`), `metrics.jsonl` and `loss.png`.
//!
//! Output folder: `checkpoint-STEP/` (kept: the newest `save_total_limit` and the best by eval loss),
//! `adapter/` (LoRA, PEFT format), `model/` (a plain HF checkpoint: the adapter merged in, or the fully
//! trained weights), `metrics.jsonl`, `loss.png`, `eval_predictions.parquet`, `summary.json`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Tensor, Var};
use datafusion::arrow::array::{
    Array, ArrayRef, Float64Array, Int32Array, ListArray, RecordBatch, StringArray, UInt64Array,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::execution::SendableRecordBatchStream;
use futures::StreamExt;

use super::source::Source;
use super::tokenize::{ERROR, INPUT_IDS, LABELS};
use super::{require_column, require_text_column, Exec, Operator, StepError, StepResult};
use crate::context::Context;
use crate::error::{closest, from_stream_error, Error, Result};
use crate::hub::Hub;
use crate::metrics::{Scorer, Scores};
use crate::model::decoding::{generate, pad_batch, DecodeOptions};
use crate::model::layers::{Mode, TrainState};
use crate::model::lora::{attach_new, save_adapter, save_merged, AdapterConfig};
use crate::model::T5;
use crate::plans::spec::{ModelSpec, Plan, Step, TrainSpec};
use crate::progress::Progress;
use crate::rng::Rng;
use crate::training::batching::{epoch_batches, Example};
use crate::training::checkpoint::{self, TrainerState};
use crate::training::loss::token_loss_sum;
use crate::training::optimizer::{clip_grad_norm, AdamW, AdamWConfig};
use crate::training::plot::loss_plot;
use crate::training::schedule::Schedule;

/// The evaluation rows' chain: their source, the same steps as the training rows, and their schema.
pub type EvalChain = (Source, Vec<(usize, Box<dyn Operator>)>, SchemaRef);

#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainSummary {
    pub output: String,
    pub steps: u64,
    pub train_examples: usize,
    pub eval_examples: usize,
    pub train_seconds: f64,
    pub samples_per_second: f64,
    pub final_train_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    pub best_step: Option<u64>,
    pub eval_scores: Option<Scores>,
    pub baseline_scores: Option<Scores>,
    pub model_dir: String,
}

pub struct Train {
    spec: TrainSpec,
    model_spec: ModelSpec,
    hub: Arc<Hub>,
    eval: Option<EvalChain>,
    plan: Plan,
    /// Text column holding the targets (for BLEU against generations).
    target_text: Option<String>,
    schedule: Schedule,
}

/// Rows of a labelled stream: examples plus, when asked, reference and baseline texts and row ids.
#[derive(Default)]
struct Rows {
    examples: Vec<Example>,
    references: Vec<Option<String>>,
    baselines: Vec<Option<String>>,
    row_ids: Vec<u64>,
    skipped: usize,
}

fn list_u32(a: &ListArray, i: usize) -> Vec<u32> {
    let v = a.value(i);
    v.as_any()
        .downcast_ref::<Int32Array>()
        .map(|x| x.values().iter().map(|&t| t as u32).collect())
        .unwrap_or_default()
}

async fn collect_rows(
    mut s: SendableRecordBatchStream,
    target: Option<&str>,
    baseline: Option<&str>,
    row_id: &str,
) -> Result<Rows> {
    let mut rows = Rows::default();
    while let Some(b) = s.next().await {
        let b = b.map_err(from_stream_error)?;
        let ids = b
            .column_by_name(INPUT_IDS)
            .and_then(|c| c.as_any().downcast_ref::<ListArray>().cloned());
        let labels = b
            .column_by_name(LABELS)
            .and_then(|c| c.as_any().downcast_ref::<ListArray>().cloned());
        let (Some(ids), Some(labels)) = (ids, labels) else {
            return Err(Error::Data(
                "train: rows lack `input_ids` / `labels`".into(),
            ));
        };
        let errors = b
            .column_by_name(ERROR)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned());
        let text = |name: Option<&str>| {
            name.and_then(|n| b.column_by_name(n))
                .and_then(|c| datafusion::arrow::compute::cast(c, &DataType::Utf8).ok())
        };
        let refs = text(target);
        let bases = text(baseline);
        let rid = b
            .column_by_name(row_id)
            .and_then(|c| c.as_any().downcast_ref::<UInt64Array>().cloned());
        for i in 0..b.num_rows() {
            let bad = ids.is_null(i)
                || labels.is_null(i)
                || errors.as_ref().is_some_and(|e| e.is_valid(i));
            if bad {
                rows.skipped += 1;
                continue;
            }
            let ex = Example {
                input: list_u32(&ids, i),
                labels: list_u32(&labels, i),
            };
            if ex.input.is_empty() || ex.labels.is_empty() {
                rows.skipped += 1;
                continue;
            }
            rows.examples.push(ex);
            let get = |a: &Option<ArrayRef>| {
                a.as_ref().and_then(|a| {
                    let s = a.as_any().downcast_ref::<StringArray>()?;
                    s.is_valid(i).then(|| s.value(i).to_string())
                })
            };
            rows.references.push(get(&refs));
            rows.baselines.push(get(&bases));
            rows.row_ids
                .push(rid.as_ref().map(|r| r.value(i)).unwrap_or(i as u64));
        }
    }
    Ok(rows)
}

/// Padded tensors for a batch: encoder ids + mask, decoder inputs (start + labels[:-1]), labels, label mask.
fn batch_tensors(
    model: &T5,
    batch: &[&Example],
) -> Result<(Tensor, Tensor, Tensor, Tensor, Tensor)> {
    let dev = &model.device;
    let inputs: Vec<&[u32]> = batch.iter().map(|e| e.input.as_slice()).collect();
    let (ids, mask) = pad_batch(&inputs, model.cfg.pad_token_id, dev)?;
    let t = batch.iter().map(|e| e.labels.len()).max().unwrap_or(1);
    let start = model.cfg.decoder_start();
    let (mut dec, mut lab, mut lmask) = (vec![], vec![], vec![]);
    for e in batch {
        for j in 0..t {
            dec.push(if j == 0 {
                start
            } else {
                e.labels
                    .get(j - 1)
                    .copied()
                    .unwrap_or(model.cfg.pad_token_id)
            });
            lab.push(e.labels.get(j).copied().unwrap_or(0));
            lmask.push(if j < e.labels.len() { 1f32 } else { 0.0 });
        }
    }
    let b = batch.len();
    Ok((
        ids,
        mask,
        Tensor::from_vec(dec, (b, t), dev)?,
        Tensor::from_vec(lab, (b, t), dev)?,
        Tensor::from_vec(lmask, (b, t), dev)?,
    ))
}

/// Weight decay applies to all but layer norms and biases (as HF's Trainer).
fn decays(name: &str) -> bool {
    !(name.contains("layer_norm") || name.ends_with(".bias"))
}

impl Train {
    pub async fn new(
        spec: &TrainSpec,
        input: SchemaRef,
        eval: Option<EvalChain>,
        plan: &Plan,
        ctx: &Context,
    ) -> StepResult<Train> {
        let Some(model) = &plan.model else {
            return Err(StepError::general(
                "`train` needs the plan's `model: { path: ... }`",
            ));
        };
        for c in [INPUT_IDS, LABELS] {
            require_column(&input, "", c).map_err(|_| {
                StepError::general(format!(
                    "`train` needs `{c}` from a `tokenize` step with a `target` column"
                ))
            })?;
        }
        if let Some((_, _, es)) = &eval {
            for c in [INPUT_IDS, LABELS] {
                if es.field_with_name(c).is_err() {
                    return Err(StepError::at(
                        "eval",
                        format!("the eval rows have no `{c}`"),
                    ));
                }
            }
        }
        let schedule = Schedule::parse(&spec.lr_scheduler).ok_or_else(|| StepError {
            key: Some("lr_scheduler".into()),
            message: format!(
                "unknown schedule `{}` ({})",
                spec.lr_scheduler,
                Schedule::NAMES.join(", ")
            ),
            suggestion: closest(&spec.lr_scheduler, Schedule::NAMES),
        })?;
        if spec.max_steps == 0 || spec.batch_size == 0 || spec.gradient_accumulation_steps == 0 {
            return Err(StepError::at(
                "max_steps",
                "max_steps, batch_size and gradient_accumulation_steps must be at least 1",
            ));
        }
        if spec.eval_num_beams == 0 {
            return Err(StepError::at("eval_num_beams", "must be at least 1"));
        }
        if !(spec.learning_rate > 0.0 && spec.learning_rate.is_finite()) {
            return Err(StepError::at("learning_rate", "must be a positive number"));
        }
        if let Some(l) = &spec.lora {
            if l.r == 0 || l.targets.is_empty() {
                return Err(StepError::at(
                    "lora",
                    "r must be at least 1 and targets non-empty",
                ));
            }
        }
        let target_text = plan.steps.iter().rev().find_map(|s| match s {
            Step::Tokenize(t) => t.target.clone(),
            _ => None,
        });
        if let Some(b) = &spec.baseline {
            require_text_column(&input, "baseline", b)?;
        }
        crate::model::load_config(model, &ctx.hub)
            .await
            .map_err(|e| StepError {
                key: None,
                message: format!("model: {e}"),
                suggestion: None,
            })?;
        Ok(Train {
            spec: spec.clone(),
            model_spec: model.clone(),
            hub: ctx.hub.clone(),
            eval,
            plan: plan.clone(),
            target_text,
            schedule,
        })
    }

    pub async fn run(
        &mut self,
        input: SendableRecordBatchStream,
        exec: &Exec,
        ctx: &Context,
    ) -> Result<TrainSummary> {
        let out = PathBuf::from(&self.spec.output);
        std::fs::create_dir_all(&out).map_err(|e| Error::io(out.display(), e))?;
        let existing = checkpoint::list(&out);
        if !existing.is_empty() && !ctx.resume {
            return Err(Error::Run(format!(
                "{}: holds checkpoints (last: step {}); run with --resume to continue, or remove the folder to start over",
                out.display(),
                existing.last().copied().unwrap_or(0)
            )));
        }
        let row_id = "row_id";
        let train_rows = collect_rows(input, None, None, row_id).await?;
        if train_rows.examples.is_empty() {
            return Err(Error::Data(format!(
                "train: empty training set: no usable rows reached `train` ({} skipped for errors or missing ids); check the source and filter",
                train_rows.skipped
            )));
        }
        let eval_rows = match self.eval.take() {
            None => Rows::default(),
            Some((src, ops, _)) => {
                let stream =
                    crate::plans::runner::counted(src.execute(), &exec.stats, "eval 1:source");
                let stream = crate::plans::runner::chain(stream, &ops, &self.plan, exec, "eval ")?;
                let rows = collect_rows(
                    stream,
                    self.target_text.as_deref(),
                    self.spec.baseline.as_deref(),
                    src.row_id_column(),
                )
                .await?;
                if rows.examples.is_empty() {
                    return Err(Error::Data(
                        "train: the eval source yielded no usable rows".into(),
                    ));
                }
                rows
            }
        };
        let mut model_spec = self.model_spec.clone();
        if self.spec.lora.is_none() {
            model_spec.dtype = "f32".into(); // full fine-tuning keeps f32 master weights
        }
        let loaded = crate::model::load(&model_spec, &self.hub).await?;
        let job = TrainJob {
            spec: self.spec.clone(),
            schedule: self.schedule,
            out: out.clone(),
            config_path: loaded.files.config.clone(),
            tokenizer_path: loaded.files.tokenizer.clone(),
            base_name: self.model_spec.path.clone(),
            resume: ctx.resume,
            progress_bars: exec.progress_bars,
        };
        let tokenizer = loaded.tokenizer.clone();
        let mut model = loaded.model;
        let summary = tokio::task::spawn_blocking(move || {
            crate::model::on_compute_pool(|| {
                job.run(&mut model, tokenizer.as_ref(), &train_rows, &eval_rows)
            })
        })
        .await
        .map_err(|e| Error::Run(format!("training thread: {e}")))??;
        exec.stats
            .set_extra("train", serde_json::to_value(&summary).unwrap_or_default());
        Ok(summary)
    }
}

/// Everything the training thread needs.
struct TrainJob {
    spec: TrainSpec,
    schedule: Schedule,
    out: PathBuf,
    config_path: PathBuf,
    tokenizer_path: Option<PathBuf>,
    base_name: String,
    resume: bool,
    progress_bars: bool,
}

impl TrainJob {
    fn metrics_line(&self, v: serde_json::Value) -> Result<()> {
        let p = self.out.join("metrics.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(|e| Error::io(p.display(), e))?;
        writeln!(f, "{v}").map_err(|e| Error::io(p.display(), e))
    }

    fn run(
        &self,
        model: &mut T5,
        tokenizer: Option<&tokenizers::Tokenizer>,
        train: &Rows,
        eval: &Rows,
    ) -> Result<TrainSummary> {
        let spec = &self.spec;
        let adapter_cfg = spec
            .lora
            .as_ref()
            .map(|l| AdapterConfig::from_spec(l, &self.base_name));
        // Trainable variables: new (or loaded) LoRA adapters, or every weight.
        let vars: Vec<(String, Var)> = match &adapter_cfg {
            Some(cfg) => {
                let existing = lora_vars(model);
                if existing.is_empty() {
                    attach_new(model, cfg, spec.seed)?
                } else {
                    existing
                }
            }
            None => model.make_all_trainable()?,
        };
        let mut opt = AdamW::new(
            vars.clone(),
            AdamWConfig {
                beta1: spec.adam_beta1,
                beta2: spec.adam_beta2,
                eps: spec.adam_epsilon,
                weight_decay: spec.weight_decay,
            },
            decays,
        )?;
        let dropout = spec.dropout.unwrap_or(model.cfg.dropout_rate);
        let mut state = TrainerState {
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            rng: Rng::derive(spec.seed, 0xD0),
            best_eval_loss: None,
            best_step: None,
            train_seconds: 0.0,
        };
        if self.resume {
            if let Some(ck) = checkpoint::load_latest(&self.out, &model.device)? {
                for (name, var) in &vars {
                    let t = ck.trainable.get(name).ok_or_else(|| {
                        Error::Run(format!(
                            "{}: no `{name}`; the checkpoint is from a different setup (another model or lora), remove {} to start over",
                            ck.dir.display(),
                            self.out.display()
                        ))
                    })?;
                    var.set(&t.to_dtype(var.dtype())?)?;
                }
                opt.load_state(&ck.optimizer, ck.state.step)?;
                log::info!(
                    "resuming from {} (step {})",
                    ck.dir.display(),
                    ck.state.step
                );
                state = ck.state;
                truncate_metrics(&self.out.join("metrics.jsonl"), state.step)?;
            }
        } else {
            let _ = std::fs::remove_file(self.out.join("metrics.jsonl"));
        }

        let train_state = std::cell::RefCell::new(TrainState {
            dropout,
            rng: state.rng.clone(),
        });
        let mut batches = epoch_batches(&train.examples, spec.batch_size, spec.seed, state.epoch);
        let step_counter = Arc::new(AtomicU64::new(state.step));
        let sc = step_counter.clone();
        let progress = Progress::start(
            "train",
            "steps",
            self.progress_bars,
            Some(spec.max_steps),
            move || (sc.load(Ordering::Relaxed), None),
        );
        let started = Instant::now();
        let seconds_before = state.train_seconds;
        let (mut log_loss, mut log_n, mut log_samples) = (0.0f64, 0usize, 0usize);
        let mut log_clock = Instant::now();
        let mut last_train_loss = None;
        let mut last_eval_loss = state.best_eval_loss;
        let mut train_curve: Vec<(u64, f64)> = vec![];
        let mut eval_curve: Vec<(u64, f64)> = vec![];
        let mut evals_done = 0u64;
        let mut samples_total = 0usize;
        let result = (|| -> Result<()> {
            while state.step < spec.max_steps {
                // One optimizer step over `gradient_accumulation_steps` batches.
                let mut micro: Vec<Vec<usize>> = vec![];
                for _ in 0..spec.gradient_accumulation_steps {
                    if state.batch_in_epoch >= batches.len() {
                        state.epoch += 1;
                        state.batch_in_epoch = 0;
                        batches =
                            epoch_batches(&train.examples, spec.batch_size, spec.seed, state.epoch);
                    }
                    micro.push(batches[state.batch_in_epoch].clone());
                    state.batch_in_epoch += 1;
                }
                let total_tokens: usize = micro
                    .iter()
                    .flatten()
                    .map(|&i| train.examples[i].labels.len())
                    .sum();
                let mut grads: Option<Vec<Tensor>> = None;
                let mut loss_sum = 0f64;
                // Where a step's time goes (CONALA_LOG=debug).
                let (mut forward_time, mut backward_time) = (Duration::ZERO, Duration::ZERO);
                for idx in &micro {
                    let clock = Instant::now();
                    let batch: Vec<&Example> = idx.iter().map(|&i| &train.examples[i]).collect();
                    let (ids, mask, dec, lab, lmask) = batch_tensors(model, &batch)?;
                    let mode = Mode {
                        train: Some(&train_state),
                    };
                    let logits = model.forward(&ids, &mask, &dec, &mode)?;
                    let (sum, _) = token_loss_sum(&logits, &lab, &lmask, spec.label_smoothing)?;
                    let loss = (sum / total_tokens as f64)?;
                    let l = loss.to_scalar::<f32>()? as f64;
                    loss_sum += l;
                    forward_time += clock.elapsed();
                    let clock = Instant::now();
                    let g = loss.backward()?;
                    let gs: Vec<Tensor> = vars
                        .iter()
                        .map(|(_, v)| {
                            g.get(v.as_tensor())
                                .cloned()
                                .map_or_else(|| v.as_tensor().zeros_like(), Ok)
                        })
                        .collect::<candle_core::Result<_>>()?;
                    grads = Some(match grads {
                        None => gs,
                        Some(acc) => acc
                            .iter()
                            .zip(gs)
                            .map(|(a, b)| a + b)
                            .collect::<candle_core::Result<_>>()?,
                    });
                    samples_total += batch.len();
                    log_samples += batch.len();
                    backward_time += clock.elapsed();
                }
                if !loss_sum.is_finite() {
                    let last = checkpoint::list(&self.out)
                        .last()
                        .map(|s| checkpoint::dir_for(&self.out, *s).display().to_string());
                    return Err(Error::Run(format!(
                        "train: the loss became {loss_sum} at step {}; stopping. {} (try a lower learning_rate)",
                        state.step + 1,
                        match last {
                            Some(d) => format!("The last good checkpoint is {d}."),
                            None => "No checkpoint was saved before it.".to_string(),
                        }
                    )));
                }
                let clock = Instant::now();
                let mut grads = grads.expect("at least one micro-batch");
                let grad_norm = clip_grad_norm(&mut grads, spec.max_grad_norm)?;
                let lr = self.schedule.lr(
                    spec.learning_rate,
                    state.step,
                    spec.warmup_steps,
                    spec.max_steps,
                );
                opt.apply(&grads, lr)?;
                log::debug!(
                    "train: step {}: forward {} ms, backward {} ms, clip + optimizer {} ms",
                    state.step + 1,
                    forward_time.as_millis(),
                    backward_time.as_millis(),
                    clock.elapsed().as_millis()
                );
                state.step += 1;
                step_counter.store(state.step, Ordering::Relaxed);
                log_loss += loss_sum;
                log_n += 1;
                last_train_loss = Some(loss_sum);

                if state.step % spec.log_every.max(1) == 0 || state.step == spec.max_steps {
                    let avg = log_loss / log_n.max(1) as f64;
                    let sps = log_samples as f64 / log_clock.elapsed().as_secs_f64().max(1e-9);
                    train_curve.push((state.step, avg));
                    self.metrics_line(serde_json::json!({
                        "step": state.step, "epoch": state.epoch, "loss": avg, "lr": lr, "grad_norm": grad_norm, "samples_per_second": sps
                    }))?;
                    if !self.progress_bars {
                        log::info!("train: step {} loss {avg:.4} lr {lr:.3e} grad_norm {grad_norm:.3} {sps:.1} samples/s", state.step);
                    }
                    (log_loss, log_n, log_samples) = (0.0, 0, 0);
                    log_clock = Instant::now();
                }
                if !eval.examples.is_empty()
                    && (state.step % spec.eval_every.max(1) == 0 || state.step == spec.max_steps)
                {
                    let el = eval_loss(model, &eval.examples)?;
                    evals_done += 1;
                    last_eval_loss = Some(el);
                    eval_curve.push((state.step, el));
                    let mut line = serde_json::json!({ "step": state.step, "eval_loss": el });
                    if spec.generate_every_evals > 0
                        && evals_done % spec.generate_every_evals == 0
                        && state.step != spec.max_steps
                    {
                        if let Some(tok) = tokenizer {
                            let (s, _) = score_generations(model, tok, eval, spec)?;
                            line["eval_bleu"] = s.bleu.into();
                            line["eval_conala_bleu"] = s.conala_bleu.into();
                            line["eval_exact_match"] = s.exact_match.into();
                        }
                    }
                    self.metrics_line(line)?;
                    if !self.progress_bars {
                        log::info!("train: step {} eval_loss {el:.4}", state.step);
                    }
                }
                if state.step % spec.save_every.max(1) == 0 || state.step == spec.max_steps {
                    if let Some(el) = last_eval_loss {
                        if state.best_eval_loss.is_none_or(|b| el < b) {
                            state.best_eval_loss = Some(el);
                            state.best_step = Some(state.step);
                        }
                    }
                    state.rng = train_state.borrow().rng.clone();
                    state.train_seconds = seconds_before + started.elapsed().as_secs_f64();
                    let trainable: BTreeMap<String, Tensor> = vars
                        .iter()
                        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                        .collect();
                    let cfg_json = read_json(&self.config_path)?;
                    checkpoint::save(&self.out, &state, &trainable, &opt.state(), |dir| {
                        match &adapter_cfg {
                            Some(cfg) => save_adapter(model, cfg, dir),
                            None => {
                                save_merged(model, &cfg_json, self.tokenizer_path.as_deref(), dir)
                            }
                        }
                    })?;
                    checkpoint::prune(&self.out, spec.save_total_limit, state.best_step)?;
                }
            }
            Ok(())
        })();
        let loop_seconds = started.elapsed().as_secs_f64();
        progress.finish();
        if !train_curve.is_empty() || !eval_curve.is_empty() {
            let _ = loss_plot(
                &read_curve(&self.out, "loss"),
                &read_curve(&self.out, "eval_loss"),
                &self.out.join("loss.png"),
            );
        }
        result?;
        let train_seconds = seconds_before + started.elapsed().as_secs_f64();

        // Final artefacts: the adapter (LoRA) and a plain HF checkpoint.
        let cfg_json = read_json(&self.config_path)?;
        if let Some(cfg) = &adapter_cfg {
            save_adapter(model, cfg, &self.out.join("adapter"))?;
        }
        let model_dir = self.out.join("model");
        save_merged(model, &cfg_json, self.tokenizer_path.as_deref(), &model_dir)?;

        // Generation-based evaluation on the eval rows.
        let (mut eval_scores, mut baseline_scores) = (None, None);
        if !eval.examples.is_empty() {
            if let Some(tok) = tokenizer {
                let (scores, predictions) = score_generations(model, tok, eval, spec)?;
                write_predictions(
                    &self.out.join("eval_predictions.parquet"),
                    eval,
                    &predictions,
                )?;
                self.metrics_line(serde_json::json!({
                    "step": state.step, "eval_bleu": scores.bleu, "eval_conala_bleu": scores.conala_bleu,
                    "eval_sentence_bleu": scores.sentence_bleu, "eval_exact_match": scores.exact_match
                }))?;
                eval_scores = Some(scores);
            }
            if spec.baseline.is_some() {
                let mut sc = Scorer::default();
                for (b, r) in eval.baselines.iter().zip(&eval.references) {
                    if let (Some(b), Some(r)) = (b, r) {
                        sc.add(b, r);
                    }
                }
                baseline_scores = Some(sc.scores());
            }
        }
        let summary = TrainSummary {
            output: self.out.display().to_string(),
            steps: state.step,
            train_examples: train.examples.len(),
            eval_examples: eval.examples.len(),
            train_seconds,
            samples_per_second: samples_total as f64 / loop_seconds.max(1e-9),
            final_train_loss: last_train_loss,
            final_eval_loss: last_eval_loss,
            best_step: state.best_step,
            eval_scores,
            baseline_scores,
            model_dir: model_dir.display().to_string(),
        };
        let p = self.out.join("summary.json");
        std::fs::write(
            &p,
            serde_json::to_string_pretty(&summary).unwrap_or_default(),
        )
        .map_err(|e| Error::io(p.display(), e))?;
        Ok(summary)
    }
}

fn lora_vars(model: &mut T5) -> Vec<(String, Var)> {
    let mut out = vec![];
    for (name, lin) in model.linears_mut() {
        if let Some(l) = &lin.lora {
            out.push((
                format!("base_model.model.{name}.lora_A.weight"),
                l.a.clone(),
            ));
            out.push((
                format!("base_model.model.{name}.lora_B.weight"),
                l.b.clone(),
            ));
        }
    }
    out
}

fn read_json(p: &Path) -> Result<serde_json::Value> {
    let t = std::fs::read_to_string(p).map_err(|e| Error::io(p.display(), e))?;
    serde_json::from_str(&t).map_err(|e| Error::model(format!("{}: {e}", p.display())))
}

/// Drop metrics lines after `step` (a resumed run writes them again).
fn truncate_metrics(p: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(p) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .collect();
    std::fs::write(p, kept.join("\n") + if kept.is_empty() { "" } else { "\n" })
        .map_err(|e| Error::io(p.display(), e))
}

fn read_curve(out: &Path, key: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_u64()?, v[key].as_f64()?)))
        .collect()
}

/// Mean token loss over examples (no dropout), in length-sorted batches.
fn eval_loss(model: &T5, examples: &[Example]) -> Result<f64> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| examples[i].input.len());
    let (mut sum, mut n) = (0f64, 0f64);
    for chunk in order.chunks(32) {
        let batch: Vec<&Example> = chunk.iter().map(|&i| &examples[i]).collect();
        let (ids, mask, dec, lab, lmask) = batch_tensors(model, &batch)?;
        let logits = model.forward(&ids, &mask, &dec, &Mode::INFER)?.detach();
        let (s, k) = token_loss_sum(&logits, &lab, &lmask, 0.0)?;
        sum += s.to_scalar::<f32>()? as f64;
        n += k;
    }
    Ok(sum / n.max(1.0))
}

/// Generations for the eval rows (greedy, or the spec's beams), scored against their references.
fn score_generations(
    model: &T5,
    tok: &tokenizers::Tokenizer,
    eval: &Rows,
    spec: &TrainSpec,
) -> Result<(Scores, Vec<String>)> {
    let n = if spec.eval_generate_rows > 0 {
        spec.eval_generate_rows.min(eval.examples.len())
    } else {
        eval.examples.len()
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(eval.examples[i].input.len()));
    let opts = DecodeOptions {
        max_new_tokens: spec.eval_max_new_tokens,
        num_beams: spec.eval_num_beams,
        no_repeat_ngram_size: spec.eval_no_repeat_ngram_size,
        ..Default::default()
    };
    let mut predictions = vec![String::new(); n];
    for chunk in order.chunks(32) {
        let rows: Vec<&[u32]> = chunk
            .iter()
            .map(|&i| eval.examples[i].input.as_slice())
            .collect();
        let seeds = vec![0u64; rows.len()];
        let out = generate(model, &rows, &seeds, &opts)?;
        for (&i, g) in chunk.iter().zip(out) {
            predictions[i] = tok
                .decode(&g.tokens, true)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
        }
    }
    let mut sc = Scorer::default();
    for (p, r) in predictions.iter().zip(&eval.references) {
        if let Some(r) = r {
            sc.add(p, r);
        }
    }
    Ok((sc.scores(), predictions))
}

fn write_predictions(path: &Path, eval: &Rows, predictions: &[String]) -> Result<()> {
    let n = predictions.len();
    let schema = Arc::new(Schema::new(vec![
        Field::new("row_id", DataType::UInt64, false),
        Field::new("prediction", DataType::Utf8, false),
        Field::new("reference", DataType::Utf8, true),
        Field::new("sentence_bleu", DataType::Float64, true),
    ]));
    let bleu: Vec<Option<f64>> = predictions
        .iter()
        .zip(&eval.references)
        .map(|(p, r)| {
            r.as_ref()
                .map(|r| 100.0 * crate::metrics::sentence_bleu(p, r))
        })
        .collect();
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(UInt64Array::from(eval.row_ids[..n].to_vec())),
            Arc::new(StringArray::from(predictions.to_vec())),
            Arc::new(StringArray::from(eval.references[..n].to_vec())),
            Arc::new(Float64Array::from(bleu)),
        ],
    )
    .map_err(|e| Error::arrow("eval predictions", e))?;
    let f = std::fs::File::create(path).map_err(|e| Error::io(path.display(), e))?;
    let mut w = datafusion::parquet::arrow::ArrowWriter::try_new(f, schema, None)
        .map_err(|e| Error::parquet(path.display(), e))?;
    w.write(&batch)
        .map_err(|e| Error::parquet(path.display(), e))?;
    w.close().map_err(|e| Error::parquet(path.display(), e))?;
    Ok(())
}
