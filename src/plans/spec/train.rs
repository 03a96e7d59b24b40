//! `train:` — fine-tuning settings (HF Trainer's and PEFT's names and defaults where they exist).

use serde::{Deserialize, Deserializer, Serialize};

use super::source::SourceSpec;
use crate::model::lora::LoraSettings;
use crate::model::DeviceChoice;
use crate::training::schedule::Schedule;

/// `train:` — fine-tune the plan's model on the rows it receives (a sink).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// Output folder: checkpoints, adapters, metrics.jsonl, loss plot.
    pub output: String,
    /// Push the merged model (`OUTPUT/model`) to the Hub when training ends (off by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<super::PushSpec>,
    /// Evaluation rows: another source that flows through the same steps as the training rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalSpec>,
    /// LoRA settings; `lora: null` trains all weights (full fine-tuning).
    #[serde(default = "default_lora", deserialize_with = "nullable")]
    pub lora: Option<LoraSettings>,
    #[serde(default = "default_max_steps")]
    pub max_steps: u64,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default = "super::one_usize")]
    pub gradient_accumulation_steps: usize,
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    /// `linear`, `cosine` or `constant` (each after `warmup_steps` of linear warm-up).
    #[serde(default)]
    pub lr_scheduler: Schedule,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "default_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "default_adam_eps")]
    pub adam_epsilon: f64,
    /// Clip the global gradient norm to this (0 turns clipping off).
    #[serde(default = "super::one_f64")]
    pub max_grad_norm: f64,
    #[serde(default)]
    pub label_smoothing: f64,
    /// Keep only each block's input in the forward pass and recompute its activations in the
    /// backward pass: the same gradients for much less memory, for about one more forward pass.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Data parallelism in one process: a list of devices (`[cuda:0, cuda:1]`) or a count (that many
    /// of the model's kind of device), one model replica each. Every batch of `batch_size` rows is
    /// split across them and their LoRA gradients summed before the optimizer step. Default: the
    /// model's device alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Devices>,
    /// Dropout inside the model while training (None: the model config's `dropout_rate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropout: Option<f64>,
    #[serde(default = "default_every")]
    pub log_every: u64,
    #[serde(default = "default_every")]
    pub eval_every: u64,
    #[serde(default = "default_save_every")]
    pub save_every: u64,
    #[serde(default = "default_save_total_limit")]
    pub save_total_limit: usize,
    /// Generate on the eval split and report BLEU every N evaluations (0: only at the end).
    #[serde(default)]
    pub generate_every_evals: u64,
    /// Decoding settings for the BLEU evaluation (greedy unless `eval_num_beams` > 1).
    #[serde(default = "default_eval_max_new")]
    pub eval_max_new_tokens: usize,
    #[serde(default = "default_eval_beams")]
    pub eval_num_beams: usize,
    /// Block repeating any n-gram of this size in eval generations (0: off), as `generate` does.
    #[serde(default)]
    pub eval_no_repeat_ngram_size: usize,
    /// Cap on eval rows used for generation-based metrics (0: all).
    #[serde(default)]
    pub eval_generate_rows: usize,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// A text column scored against the target like the predictions, as a baseline (e.g. `intent`:
    /// how far copying the input would get).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
}

fn default_eval_beams() -> usize {
    1
}
fn default_lora() -> Option<LoraSettings> {
    Some(LoraSettings::default())
}
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    Option::<T>::deserialize(d)
}
fn default_max_steps() -> u64 {
    1000
}
fn default_batch_size() -> usize {
    16
}
fn default_lr() -> f64 {
    5e-5
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_adam_eps() -> f64 {
    1e-8
}
fn default_every() -> u64 {
    100
}
fn default_save_every() -> u64 {
    500
}
fn default_save_total_limit() -> usize {
    2
}
fn default_eval_max_new() -> usize {
    64
}
fn default_seed() -> u64 {
    42
}

/// `train.eval:` — the evaluation rows.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    pub source: SourceSpec,
}

/// `train.devices`: the devices, or how many.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Devices {
    Count(usize),
    List(Vec<DeviceChoice>),
}

impl Devices {
    /// The replicas' devices, the model's being `model`: a count means GPUs 0..n when the model runs
    /// on a GPU (`auto` with CUDA present included), else n replicas on the CPU.
    pub fn resolve(&self, model: DeviceChoice) -> Vec<DeviceChoice> {
        match self {
            Devices::List(l) => l.clone(),
            Devices::Count(n) => {
                let gpus = match model {
                    DeviceChoice::Cuda(_) => true,
                    DeviceChoice::Auto => candle_core::utils::cuda_is_available(),
                    _ => false,
                };
                (0..*n)
                    .map(|i| match (gpus, model) {
                        (true, _) => DeviceChoice::Cuda(i),
                        (false, DeviceChoice::Auto) => DeviceChoice::Cpu,
                        (false, other) => other,
                    })
                    .collect()
            }
        }
    }
}
