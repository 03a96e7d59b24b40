//! The training loop: LoRA (PEFT format) or full fine-tuning, AdamW with warm-up schedules, gradient
//! accumulation and clipping, evaluation loss every `eval_every` steps (and BLEU every
//! `generate_every_evals` evaluations), checkpoints every `save_every` steps that a killed run resumes
//! from, `metrics.jsonl` and `loss.png`, then the final artefacts.
//!
//! Output folder: `checkpoint-STEP/` (kept: the newest `save_total_limit` and the best by eval loss),
//! `adapter/` (LoRA, PEFT format), `model/` (a plain HF checkpoint: the adapter merged in, or the fully
//! trained weights), `metrics.jsonl`, `loss.png`, `eval_predictions.parquet`, `summary.json`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::batching::{epoch_batches, Example};
use super::checkpoint::{self, TrainerState};
use super::evaluation::{baseline_scores, eval_loss, score_generations, write_predictions};
use super::examples::LabelledRows;
use super::metrics_log::MetricsLog;
use super::optimizer::{clip_grad_norm, AdamW, AdamWConfig};
use super::plot::loss_plot;
use super::replicas::{Replica, Replicas, StepLoss};
use crate::error::{Error, Result};
use crate::metrics::Scores;
use crate::model::decoding::DecodeOptions;
use crate::model::lora::{attach_new, save_adapter, save_merged, AdapterConfig};
use crate::model::mode::{Dropout, TrainState};
use crate::model::weights::ModelFiles;
use crate::model::Seq2Seq;
use crate::plans::spec::TrainSpec;
use crate::progress::Progress;
use crate::rng::Rng;

/// What a training run did.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// The base model as the plan named it (a Hub id or a folder): the model card's `base_model`.
    #[serde(default)]
    pub base_model: String,
    /// The train step's settings as the plan resolved them (the model card's training table).
    #[serde(default)]
    pub settings: serde_json::Value,
    /// What `train.push` did (the merged model went to the Hub).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed: Option<crate::publish::PushReport>,
}

/// The files a training run reads besides its rows, and where it writes.
#[derive(Debug, Clone)]
pub struct TrainFiles {
    /// The output folder.
    pub output: PathBuf,
    /// The base model's files (its config, generation config and tokenizer are copied into `model/`
    /// and checkpoints of full fine-tuning).
    pub base: ModelFiles,
    /// The base model's name, recorded in the adapter config.
    pub base_name: String,
}

/// The rows a run trains and evaluates on, and the tokenizer its BLEU evaluation decodes with.
pub struct TrainData<'a> {
    pub train: &'a LabelledRows,
    pub eval: &'a LabelledRows,
    pub tokenizer: Option<&'a tokenizers::Tokenizer>,
}

/// A training run in progress over one model (one replica per device).
pub struct Trainer<'a> {
    spec: &'a TrainSpec,
    files: TrainFiles,
    /// The model on each device; the first (the primary) is saved and evaluated.
    replicas: Replicas,
    adapter: Option<AdapterConfig>,
    /// The primary's trainable variables by name (LoRA's A and B, or every weight).
    vars: Vec<(String, Var)>,
    opt: AdamW,
    state: TrainerState,
    /// This epoch's batches (indices into the training examples).
    batches: Vec<Vec<usize>>,
    metrics: MetricsLog,
    window: LogWindow,
    last_train_loss: Option<f64>,
    last_eval_loss: Option<f64>,
    evals_done: u64,
    samples_total: usize,
    /// Whether this run logged anything (the loss plot is drawn then).
    logged: bool,
    started: Instant,
    seconds_before: f64,
}

/// Losses and samples since the last log line.
struct LogWindow {
    loss: f64,
    steps: usize,
    samples: usize,
    /// The last step's gradient norm (before clipping).
    grad_norm: f64,
    clock: Instant,
}

impl LogWindow {
    fn new() -> LogWindow {
        LogWindow {
            loss: 0.0,
            steps: 0,
            samples: 0,
            grad_norm: 0.0,
            clock: Instant::now(),
        }
    }
}

/// Weight decay applies to all but layer norms and biases (as HF's Trainer).
fn decays(name: &str) -> bool {
    !(name.contains("layer_norm") || name.ends_with(".bias"))
}

/// Trainable variables by name (PEFT keys for LoRA, HF names for full fine-tuning).
type NamedVars = Vec<(String, Var)>;

/// The model's LoRA variables by PEFT key (an adapter loaded with the model keeps training).
fn lora_vars(model: &mut dyn Seq2Seq) -> Vec<(String, Var)> {
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

impl<'a> Trainer<'a> {
    /// Set up the trainable variables and the optimizer, and resume from the output's last
    /// checkpoint when `resume`.
    pub fn start(
        spec: &'a TrainSpec,
        files: TrainFiles,
        models: Vec<Box<dyn Seq2Seq>>,
        resume: bool,
    ) -> Result<Trainer<'a>> {
        let model_config = models
            .first()
            .map(|m| m.config().clone())
            .ok_or_else(|| Error::model("train: no model"))?;
        let adapter = spec
            .lora
            .as_ref()
            .map(|l| AdapterConfig::new(l, &files.base_name, &model_config));
        // Trainable variables on every replica: new (or loaded) LoRA adapters, or every weight.
        let mut per_model: Vec<(Box<dyn Seq2Seq>, NamedVars)> = vec![];
        for mut model in models {
            let vars = match &adapter {
                Some(cfg) => {
                    let existing = lora_vars(model.as_mut());
                    if existing.is_empty() {
                        attach_new(model.as_mut(), cfg, spec.seed)?
                    } else {
                        existing
                    }
                }
                None => model.make_all_trainable()?,
            };
            per_model.push((model, vars));
        }
        let vars = per_model
            .first()
            .map(|(_, v)| v.clone())
            .ok_or_else(|| Error::model("train: no model"))?;
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
        let metrics = MetricsLog::new(&files.output);
        let mut state = TrainerState {
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            rng: Rng::derive(spec.seed, 0xD0),
            best_eval_loss: None,
            best_step: None,
            train_seconds: 0.0,
            replica_rngs: vec![],
        };
        let device = per_model[0].0.device().clone();
        let latest = if resume {
            checkpoint::load_latest(&files.output, &device)?
        } else {
            None
        };
        match latest {
            Some(ck) => {
                for (name, var) in &vars {
                    let t = ck.trainable.get(name).ok_or_else(|| {
                        Error::Run(format!(
                            "{}: no `{name}`; the checkpoint is from a different setup (another model or lora), remove {} to start over",
                            ck.dir.display(),
                            files.output.display()
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
                metrics.truncate_after(state.step)?;
            }
            None if !resume => metrics.clear()?,
            None => {}
        }
        // The plan's rate replaces every one of the checkpoint's (BART has three).
        let rates = spec.dropout.map_or(model_config.dropout, Dropout::uniform);
        let list = per_model
            .into_iter()
            .enumerate()
            .map(|(i, (model, vars))| {
                let rng = match i {
                    0 => state.rng.clone(),
                    _ => state
                        .replica_rngs
                        .get(i - 1)
                        .cloned()
                        .unwrap_or_else(|| Rng::derive(spec.seed, 0xD0 + i as u64)),
                };
                Replica {
                    model,
                    vars: vars.into_iter().map(|(_, v)| v).collect(),
                    dropout: RefCell::new(TrainState::new(rates, rng)),
                }
            })
            .collect();
        let replicas = Replicas::new(list);
        // Every replica starts from the primary's values (new adapters, or the checkpoint's).
        replicas.broadcast()?;
        Ok(Trainer {
            spec,
            files,
            replicas,
            adapter,
            vars,
            opt,
            last_eval_loss: state.best_eval_loss,
            seconds_before: state.train_seconds,
            state,
            batches: vec![],
            metrics,
            window: LogWindow::new(),
            last_train_loss: None,
            evals_done: 0,
            samples_total: 0,
            logged: false,
            started: Instant::now(),
        })
    }

    /// Train to `max_steps`, then save the adapter and the merged model, score generations on the
    /// eval rows and write the summary.
    pub fn run(mut self, data: &TrainData, progress_bars: bool) -> Result<TrainSummary> {
        let spec = self.spec;
        self.batches = epoch_batches(
            &data.train.examples,
            spec.batch_size,
            spec.seed,
            self.state.epoch,
        );
        let steps = Arc::new(AtomicU64::new(self.state.step));
        let sc = steps.clone();
        let progress = Progress::start(
            "train",
            "steps",
            progress_bars,
            Some(spec.max_steps),
            move || (sc.load(Ordering::Relaxed), None),
        );
        let first_step = self.state.step;
        let result = (|| -> Result<()> {
            while self.state.step < spec.max_steps {
                if let Some(signal) = crate::interrupt::requested() {
                    return Err(self.interrupted(signal, first_step));
                }
                let lr = self.step(&data.train.examples)?;
                steps.store(self.state.step, Ordering::Relaxed);
                let last = self.state.step == spec.max_steps;
                if self.state.step % spec.log_every.max(1) == 0 || last {
                    self.log(lr, progress_bars)?;
                }
                if !data.eval.examples.is_empty()
                    && (self.state.step % spec.eval_every.max(1) == 0 || last)
                {
                    self.evaluate(data, progress_bars)?;
                }
                if self.state.step % spec.save_every.max(1) == 0 || last {
                    self.checkpoint()?;
                }
            }
            Ok(())
        })();
        let loop_seconds = self.started.elapsed().as_secs_f64();
        progress.finish();
        if self.logged {
            // The plot is a picture of metrics.jsonl; failing to draw it loses nothing.
            if let Err(e) = loss_plot(
                &self.metrics.curve("loss"),
                &self.metrics.curve("eval_loss"),
                &self.files.output.join("loss.png"),
            ) {
                log::warn!("train: loss plot: {e}");
            }
        }
        result?;
        self.finish(data, loop_seconds)
    }

    /// The next `gradient_accumulation_steps` batches of the epoch (starting the next epoch when
    /// this one is used up).
    fn next_micro_batches(&mut self, examples: &[Example]) -> Vec<Vec<usize>> {
        let spec = self.spec;
        let mut micro = vec![];
        for _ in 0..spec.gradient_accumulation_steps {
            if self.state.batch_in_epoch >= self.batches.len() {
                self.state.epoch += 1;
                self.state.batch_in_epoch = 0;
                self.batches =
                    epoch_batches(examples, spec.batch_size, spec.seed, self.state.epoch);
            }
            micro.push(self.batches[self.state.batch_in_epoch].clone());
            self.state.batch_in_epoch += 1;
        }
        micro
    }

    /// One optimizer step over `gradient_accumulation_steps` batches; returns its learning rate.
    fn step(&mut self, examples: &[Example]) -> Result<f64> {
        let spec = self.spec;
        let micro = self.next_micro_batches(examples);
        let total_tokens: usize = micro
            .iter()
            .flatten()
            .map(|&i| examples[i].labels.len())
            .sum();
        let mut grads: Option<Vec<Tensor>> = None;
        let mut loss_sum = 0f64;
        // Where a step's time goes (CONALA_LOG=debug).
        let (mut passes_time, mut sums_time) = (Duration::ZERO, Duration::ZERO);
        let loss = StepLoss {
            labels_smoothing: spec.label_smoothing,
            total_tokens,
            checkpointing: spec.gradient_checkpointing,
            examples,
        };
        for idx in &micro {
            let clock = Instant::now();
            let (l, gs) = self.replicas.gradients(idx, &loss)?;
            loss_sum += l;
            passes_time += clock.elapsed();
            let clock = Instant::now();
            grads = Some(match grads {
                None => gs,
                Some(acc) => acc
                    .iter()
                    .zip(gs)
                    .map(|(a, b)| a + b)
                    .collect::<candle_core::Result<_>>()?,
            });
            self.samples_total += idx.len();
            self.window.samples += idx.len();
            sums_time += clock.elapsed();
        }
        if !loss_sum.is_finite() {
            let last = checkpoint::list(&self.files.output).last().map(|s| {
                checkpoint::dir_for(&self.files.output, *s)
                    .display()
                    .to_string()
            });
            return Err(Error::Run(format!(
                "train: the loss became {loss_sum} at step {}; stopping. {} (try a lower learning_rate)",
                self.state.step + 1,
                match last {
                    Some(d) => format!("The last good checkpoint is {d}."),
                    None => "No checkpoint was saved before it.".to_string(),
                }
            )));
        }
        let clock = Instant::now();
        let mut grads = grads.expect("at least one micro-batch");
        let grad_norm = clip_grad_norm(&mut grads, spec.max_grad_norm)?;
        let lr = spec.lr_scheduler.lr(
            spec.learning_rate,
            self.state.step,
            spec.warmup_steps,
            spec.max_steps,
        );
        self.opt.apply(&grads, lr)?;
        self.replicas.broadcast()?;
        log::debug!(
            "train: step {}: forward + backward {} ms, gradient sums {} ms, clip + optimizer {} ms",
            self.state.step + 1,
            passes_time.as_millis(),
            sums_time.as_millis(),
            clock.elapsed().as_millis()
        );
        self.state.step += 1;
        self.window.loss += loss_sum;
        self.window.steps += 1;
        self.window.grad_norm = grad_norm;
        self.last_train_loss = Some(loss_sum);
        Ok(lr)
    }

    /// A metrics line for the steps since the last one.
    fn log(&mut self, lr: f64, progress_bars: bool) -> Result<()> {
        let w = &self.window;
        let avg = w.loss / w.steps.max(1) as f64;
        let sps = w.samples as f64 / w.clock.elapsed().as_secs_f64().max(1e-9);
        let (step, grad_norm) = (self.state.step, w.grad_norm);
        self.metrics.append(serde_json::json!({
            "step": step, "epoch": self.state.epoch, "loss": avg, "lr": lr, "grad_norm": grad_norm, "samples_per_second": sps
        }))?;
        self.logged = true;
        if !progress_bars {
            log::info!("train: step {step} loss {avg:.4} lr {lr:.3e} grad_norm {grad_norm:.3} {sps:.1} samples/s");
        }
        self.window = LogWindow::new();
        Ok(())
    }

    /// The eval loss, and BLEU every `generate_every_evals` evaluations (but the last, which
    /// `finish` scores).
    fn evaluate(&mut self, data: &TrainData, progress_bars: bool) -> Result<()> {
        let spec = self.spec;
        let el = eval_loss(self.replicas.primary().model.as_ref(), &data.eval.examples)?;
        self.evals_done += 1;
        self.last_eval_loss = Some(el);
        let mut line = serde_json::json!({ "step": self.state.step, "eval_loss": el });
        if spec.generate_every_evals > 0
            && self.evals_done % spec.generate_every_evals == 0
            && self.state.step != spec.max_steps
        {
            if let Some(tok) = data.tokenizer {
                let (s, _) = score_generations(
                    self.replicas.primary().model.as_ref(),
                    tok,
                    data.eval,
                    spec.eval_generate_rows,
                    &self.eval_decoding(),
                )?;
                line["eval_bleu"] = s.bleu.into();
                line["eval_conala_bleu"] = s.conala_bleu.into();
                line["eval_exact_match"] = s.exact_match.into();
            }
        }
        self.metrics.append(line)?;
        self.logged = true;
        if !progress_bars {
            log::info!("train: step {} eval_loss {el:.4}", self.state.step);
        }
        Ok(())
    }

    /// How the BLEU evaluation decodes (greedy unless `eval_num_beams` > 1).
    fn eval_decoding(&self) -> DecodeOptions {
        DecodeOptions {
            max_new_tokens: self.spec.eval_max_new_tokens,
            num_beams: self.spec.eval_num_beams,
            no_repeat_ngram_size: self.spec.eval_no_repeat_ngram_size,
            ..Default::default()
        }
    }

    /// A signal stopped training between steps: save a checkpoint of the steps this run made (none
    /// before its first: the rows may not all have been read) and say how to resume.
    fn interrupted(&mut self, signal: crate::interrupt::Signal, first_step: u64) -> Error {
        let saved = if self.state.step > first_step {
            match self.checkpoint() {
                Ok(()) => format!("a checkpoint of step {} is saved", self.state.step),
                Err(e) => format!("saving a checkpoint failed ({e})"),
            }
        } else {
            "no step was made by this run".to_string()
        };
        Error::Interrupted {
            signal,
            message: format!(
                "train: stopped by {} at step {} of {}: {saved}; run the same command with \
                 --resume to continue from the last checkpoint",
                signal.name(),
                self.state.step,
                self.spec.max_steps
            ),
        }
    }

    /// Save a checkpoint (tracking the best by eval loss) and prune old ones.
    fn checkpoint(&mut self) -> Result<()> {
        if let Some(el) = self.last_eval_loss {
            if self.state.best_eval_loss.is_none_or(|b| el < b) {
                self.state.best_eval_loss = Some(el);
                self.state.best_step = Some(self.state.step);
            }
        }
        let mut rngs = self.replicas.rngs();
        self.state.rng = rngs.remove(0);
        self.state.replica_rngs = rngs;
        self.state.train_seconds = self.seconds_before + self.started.elapsed().as_secs_f64();
        let trainable: BTreeMap<String, Tensor> = self
            .vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let (model, adapter, base) = (
            &mut self.replicas.primary_mut().model,
            &self.adapter,
            &self.files.base,
        );
        checkpoint::save(
            &self.files.output,
            &self.state,
            &trainable,
            &self.opt.state(),
            |dir| match adapter {
                Some(cfg) => save_adapter(model.as_mut(), cfg, dir),
                None => save_merged(model.as_mut(), base, dir),
            },
        )?;
        checkpoint::prune(
            &self.files.output,
            self.spec.save_total_limit,
            self.state.best_step,
        )
    }

    /// The adapter (LoRA) and a plain HF checkpoint, the BLEU evaluation, `summary.json`.
    fn finish(mut self, data: &TrainData, loop_seconds: f64) -> Result<TrainSummary> {
        let out = &self.files.output;
        let train_seconds = self.seconds_before + self.started.elapsed().as_secs_f64();
        let model = self.replicas.primary_mut().model.as_mut();
        if let Some(cfg) = &self.adapter {
            save_adapter(model, cfg, &out.join("adapter"))?;
        }
        let model_dir = out.join("model");
        save_merged(model, &self.files.base, &model_dir)?;
        let (mut eval_scores, mut baseline) = (None, None);
        if !data.eval.examples.is_empty() {
            if let Some(tok) = data.tokenizer {
                let (scores, predictions) = score_generations(
                    self.replicas.primary().model.as_ref(),
                    tok,
                    data.eval,
                    self.spec.eval_generate_rows,
                    &self.eval_decoding(),
                )?;
                write_predictions(
                    &out.join("eval_predictions.parquet"),
                    data.eval,
                    &predictions,
                )?;
                self.metrics.append(serde_json::json!({
                    "step": self.state.step, "eval_bleu": scores.bleu, "eval_conala_bleu": scores.conala_bleu,
                    "eval_sentence_bleu": scores.sentence_bleu, "eval_exact_match": scores.exact_match
                }))?;
                eval_scores = Some(scores);
            }
            if self.spec.baseline.is_some() {
                baseline = Some(baseline_scores(data.eval));
            }
        }
        let summary = TrainSummary {
            output: out.display().to_string(),
            steps: self.state.step,
            train_examples: data.train.examples.len(),
            eval_examples: data.eval.examples.len(),
            train_seconds,
            samples_per_second: self.samples_total as f64 / loop_seconds.max(1e-9),
            final_train_loss: self.last_train_loss,
            final_eval_loss: self.last_eval_loss,
            best_step: self.state.best_step,
            eval_scores,
            baseline_scores: baseline,
            model_dir: model_dir.display().to_string(),
            base_model: self.files.base_name.clone(),
            settings: serde_json::to_value(self.spec).unwrap_or_default(),
            pushed: None,
        };
        let p = out.join("summary.json");
        let json =
            serde_json::to_string_pretty(&summary).map_err(|e| Error::json(p.display(), e))?;
        std::fs::write(&p, json).map_err(|e| Error::io(p.display(), e))?;
        Ok(summary)
    }
}
