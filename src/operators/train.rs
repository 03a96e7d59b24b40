//! `train`: a sink that fine-tunes the plan's model on the rows it receives. This operator checks the
//! settings, gathers the training rows and the evaluation rows (which flow through the same steps) and
//! hands them to the [`Trainer`], which runs on the compute pool.

use std::path::PathBuf;
use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::execution::SendableRecordBatchStream;
use futures::future::BoxFuture;

use super::tokenize::{INPUT_IDS, LABELS};
use super::{
    at_most, check_model, require_column, require_text_column, runtime, Exec, MemoryEstimate, Sink,
    SinkReport, StepError, StepResult, MAX_SEQUENCE_TOKENS,
};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::model::memory::{parameters_text, TrainFootprint, TrainShape};
use crate::model::{ops, DTypeChoice, ModelConfig, ModelSource};
use crate::plans::spec::{ModelSpec, TrainSpec};
use crate::training::checkpoint;
use crate::training::examples::{collect_rows, LabelledRows, TextColumns};
use crate::training::{TrainData, TrainFiles, TrainSummary, Trainer};

/// Starts the evaluation rows' stream when training needs them.
pub type StartEvalRows = Box<dyn FnOnce(&Exec) -> Result<SendableRecordBatchStream> + Send>;

/// The evaluation rows: their schema (checked when the plan is built), their row id column, and how to
/// start them.
pub struct EvalRows {
    pub schema: SchemaRef,
    pub row_id: String,
    pub start: StartEvalRows,
}

/// What `train` needs to know of the rest of its plan.
pub struct TrainContext<'a> {
    pub model: Option<&'a ModelSpec>,
    /// The text column the rows' labels were tokenized from (BLEU references).
    pub target_text: Option<String>,
    /// The longest inputs and targets `tokenize` lets through (for memory estimates).
    pub lengths: Option<(usize, usize)>,
    pub eval: Option<EvalRows>,
}

pub struct Train {
    spec: TrainSpec,
    model: ModelSource,
    /// The model on each training device (one replica each; the first is the primary).
    sources: Vec<ModelSource>,
    cfg: ModelConfig,
    lengths: Option<(usize, usize)>,
    hub: Arc<Hub>,
    eval: Option<EvalRows>,
    target_text: Option<String>,
    resume: bool,
}

impl Train {
    pub async fn new(
        spec: &TrainSpec,
        input: SchemaRef,
        plan: TrainContext<'_>,
        ctx: &Context,
    ) -> StepResult<Train> {
        let Some(model) = plan.model else {
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
        if let Some(eval) = &plan.eval {
            for c in [INPUT_IDS, LABELS] {
                if eval.schema.field_with_name(c).is_err() {
                    return Err(StepError::at(
                        "eval",
                        format!("the eval rows have no `{c}`"),
                    ));
                }
            }
        }
        if spec.max_steps == 0 || spec.batch_size == 0 || spec.gradient_accumulation_steps == 0 {
            return Err(StepError::at(
                "max_steps",
                "max_steps, batch_size and gradient_accumulation_steps must be at least 1",
            ));
        }
        if spec.eval_num_beams == 0 {
            return Err(StepError::at("eval_num_beams", "must be at least 1"));
        }
        at_most("batch_size", spec.batch_size, 1 << 20)?;
        at_most("eval_num_beams", spec.eval_num_beams, 256)?;
        at_most(
            "eval_max_new_tokens",
            spec.eval_max_new_tokens,
            MAX_SEQUENCE_TOKENS,
        )?;
        if !(spec.learning_rate > 0.0 && spec.learning_rate.is_finite()) {
            return Err(StepError::at("learning_rate", "must be a positive number"));
        }
        if let Some(l) = &spec.lora {
            if l.r == 0 || l.targets.as_ref().is_some_and(|t| t.is_empty()) {
                return Err(StepError::at(
                    "lora",
                    "r must be at least 1 and targets non-empty",
                ));
            }
        }
        if let Some(b) = &spec.baseline {
            require_text_column(&input, "baseline", b)?;
        }
        if let Some(p) = &spec.push {
            crate::hub::check_push_repo(&p.repo).map_err(|m| StepError::at("push.repo", m))?;
        }
        let mut model = model.source();
        if spec.lora.is_none() {
            model.dtype = DTypeChoice::F32; // full fine-tuning keeps f32 master weights
        }
        let (_, cfg) = check_model(&model, ctx).await?;
        if let Some(l) = &spec.lora {
            l.check_targets(&cfg)
                .map_err(|e| StepError::at("lora.targets", e))?;
        }
        if let (Some(max), Some((input, target))) = (cfg.max_positions, plan.lengths) {
            // The decoder reads the labels shifted by one: target_len positions, as the encoder
            // reads input_len.
            if input.max(target) > max {
                return Err(StepError::general(format!(
                    "the tokenized rows reach {} tokens (max_input_tokens {input}, max_target_tokens {target}), more than the model's max_position_embeddings {max}: lower them in `tokenize`",
                    input.max(target)
                )));
            }
        }
        let sources = match &spec.devices {
            None => vec![model.clone()],
            Some(d) => d
                .resolve(model.device)
                .into_iter()
                .map(|device| ModelSource {
                    device,
                    ..model.clone()
                })
                .collect(),
        };
        if sources.is_empty() {
            return Err(StepError::at("devices", "at least one device"));
        }
        if spec.batch_size < sources.len() {
            return Err(StepError::at(
                "devices",
                format!(
                    "{} devices share batches of {} rows: give each device at least one row",
                    sources.len(),
                    spec.batch_size
                ),
            ));
        }
        if !ctx.plan_only {
            for s in &sources {
                s.device
                    .resolve()
                    .map_err(|e| StepError::at("devices", e))?;
            }
        }
        Ok(Train {
            spec: spec.clone(),
            sources,
            cfg,
            lengths: plan.lengths,
            model,
            hub: ctx.hub.clone(),
            eval: plan.eval,
            target_text: plan.target_text,
            resume: ctx.resume,
        })
    }

    async fn train(
        &mut self,
        input: SendableRecordBatchStream,
        exec: &Exec,
    ) -> Result<TrainSummary> {
        let out = PathBuf::from(&self.spec.output);
        std::fs::create_dir_all(&out).map_err(|e| Error::io(out.display(), e))?;
        let existing = checkpoint::list(&out);
        if !existing.is_empty() && !self.resume {
            return Err(Error::Run(format!(
                "{}: holds checkpoints (last: step {}); run with --resume to continue, or remove the folder to start over",
                out.display(),
                existing.last().copied().unwrap_or(0)
            )));
        }
        let train = collect_rows(input, TextColumns::default()).await?;
        if train.examples.is_empty() {
            return Err(Error::Data(format!(
                "train: empty training set: no usable rows reached `train` ({} skipped for errors or missing ids); check the source and filter",
                train.skipped
            )));
        }
        let eval = match self.eval.take() {
            None => LabelledRows::default(),
            Some(e) => {
                let columns = TextColumns {
                    target: self.target_text.as_deref(),
                    baseline: self.spec.baseline.as_deref(),
                    row_id: &e.row_id,
                };
                let rows = collect_rows((e.start)(exec)?, columns).await?;
                if rows.examples.is_empty() {
                    return Err(Error::Data(
                        "train: the eval source yielded no usable rows".into(),
                    ));
                }
                rows
            }
        };
        let loaded = crate::model::load(&self.sources[0], &self.hub).await?;
        let mut models = vec![loaded.model];
        for source in &self.sources[1..] {
            models.push(crate::model::load_replica(source, &self.hub).await?);
        }
        let files = TrainFiles {
            output: out,
            base: loaded.files.clone(),
            base_name: self.model.path.clone(),
        };
        let (spec, resume, bars) = (self.spec.clone(), self.resume, exec.progress_bars);
        let tokenizer = loaded.tokenizer;
        let worker = runtime::spawn_worker(move || {
            ops::on_compute_pool(|| {
                let data = TrainData {
                    train: &train,
                    eval: &eval,
                    tokenizer: tokenizer.as_ref(),
                };
                Trainer::start(&spec, files, models, resume)?.run(&data, bars)
            })
        });
        let mut summary = runtime::join(&format!("{}: trainer", exec.step), worker).await?;
        if let Some(push) = &self.spec.push {
            let model = PathBuf::from(&summary.model_dir);
            let report = crate::publish::push_step(
                "train",
                "the trained model is kept",
                &model,
                push,
                self.hub.config(),
            )
            .await?;
            summary.pushed = Some(report);
        }
        exec.stats.report(|r| r.train = Some(summary.clone()));
        Ok(summary)
    }
}

impl Train {
    /// The model's vocabulary (its embedding rows): token ids must stay below it.
    pub fn model_vocab(&self) -> usize {
        self.cfg.vocab_size
    }
}

impl Sink for Train {
    fn name(&self) -> &'static str {
        "train"
    }

    fn memory(&self) -> Option<MemoryEstimate> {
        let (input_len, target_len) = self.lengths?;
        let dtype = self.sources[0].dtype.planned(self.sources[0].device);
        let n = self.sources.len();
        let shape = TrainShape {
            batch: self.spec.batch_size.div_ceil(n),
            input_len,
            target_len,
        };
        let lora = self.spec.lora.as_ref();
        let fused = ops::fused_training_attention(self.sources[0].device, dtype);
        let at = |ck: bool| TrainFootprint::new(&self.cfg, dtype, lora, shape, ck, fused);
        let ck = self.spec.gradient_checkpointing;
        let f = at(ck);
        let training = match lora {
            Some(l) => format!("LoRA r {} on {}", l.r, l.targets_for(&self.cfg).join(", ")),
            None => "full fine-tuning".into(),
        };
        Some(MemoryEstimate {
            dtype,
            what: format!(
                "{} ({}) in {dtype:?}, {training}; {} rows x {input_len} in / {target_len} out per device{}",
                self.model.path,
                parameters_text(&self.cfg),
                shape.batch,
                if ck { ", gradient checkpointing" } else { "" }
            ),
            parts: vec![
                ("weights", f.weights),
                ("LoRA", f.lora),
                ("AdamW", f.optimizer),
                ("gradients", f.gradients),
                ("activations", f.activations),
                ("backward", f.backward),
            ],
            peak: f.total(),
            devices: self.sources.iter().map(|s| s.device).collect(),
            alternatives: vec![(
                format!("gradient_checkpointing: {}", !ck),
                at(!ck).total(),
            )],
        })
    }

    fn run<'a>(
        &'a mut self,
        input: SendableRecordBatchStream,
        exec: &'a Exec,
    ) -> BoxFuture<'a, Result<SinkReport>> {
        Box::pin(async move { Ok(SinkReport::Train(Box::new(self.train(input, exec).await?))) })
    }
}
