//! The YAML schema of a plan: what each key means, its type and its default.
//!
//! A plan is `name`, an optional `model` block and an ordered list of `steps`, each a one-key mapping
//! from an operator name to its settings. Unknown keys are errors (see `plans::load`).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// The operators a step may name, in the order they usually appear.
pub const OPERATORS: &[&str] = &[
    "source", "filter", "format", "tokenize", "generate", "evaluate", "train", "write",
];

/// Top-level keys of a plan file.
pub const PLAN_KEYS: &[&str] = &["name", "description", "model", "steps"];

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSpec>,
    pub steps: Vec<Step>,
    /// The file the plan came from (for error messages); `<embedded>` for built-in plans.
    #[serde(skip)]
    pub file: String,
}

impl Plan {
    pub fn steps_named<'a>(&'a self, op: &'a str) -> impl Iterator<Item = (usize, &'a Step)> + 'a {
        self.steps
            .iter()
            .enumerate()
            .filter(move |(_, s)| s.operator() == op)
    }
    pub fn has_generate(&self) -> bool {
        self.steps.iter().any(|s| matches!(s, Step::Generate(_)))
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    Source(SourceSpec),
    Filter(FilterSpec),
    Format(FormatSpec),
    Tokenize(TokenizeSpec),
    Generate(GenerateSpec),
    Evaluate(EvaluateSpec),
    Train(Box<TrainSpec>),
    Write(WriteSpec),
}

impl Step {
    pub fn operator(&self) -> &'static str {
        match self {
            Step::Source(_) => "source",
            Step::Filter(_) => "filter",
            Step::Format(_) => "format",
            Step::Tokenize(_) => "tokenize",
            Step::Generate(_) => "generate",
            Step::Evaluate(_) => "evaluate",
            Step::Train(_) => "train",
            Step::Write(_) => "write",
        }
    }
}

/// `model:` — a local folder or a Hub model id, optionally with a LoRA adapter.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Local folder with config.json + safetensors + tokenizer.json, or a Hub model id (`owner/name`).
    pub path: String,
    /// Hub revision (branch, tag or commit) when `path` is a Hub id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// PEFT-format LoRA adapter folder (or Hub id) applied on top of the base model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// `auto` (f32 on CPU, bf16 on CUDA), `f32`, `bf16` or `f16` (T5 overflows in f16: warned).
    #[serde(default = "default_auto")]
    pub dtype: String,
    /// `auto` (first GPU if built with one, else CPU), `cpu`, `cuda`, `cuda:N` or `metal`.
    #[serde(default = "default_auto")]
    pub device: String,
    /// Create a randomly initialised model at `path` when the folder does not exist yet (for training
    /// from scratch, offline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitSpec>,
}

/// `model.init:` — what `conala model init` would make.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InitSpec {
    /// `t5`, `flan-t5` or `ul2`.
    pub family: String,
    /// `tiny`, `mini`, `small` or `base`.
    #[serde(default = "default_init_size")]
    pub size: String,
    /// tokenizer.json the model is made for (its vocabulary size).
    pub tokenizer: String,
    #[serde(default)]
    pub seed: u64,
    /// `random` (transformers' initialisation) or `copy` (hand-set weights that copy the input, in
    /// the copy prior's own shape, which replaces `size`: see `model::copy_prior`).
    #[serde(default = "default_init_prior")]
    pub prior: String,
}

fn default_init_prior() -> String {
    "random".to_string()
}

fn default_init_size() -> String {
    "tiny".to_string()
}

fn default_auto() -> String {
    "auto".to_string()
}

/// `source:` — where rows come from.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// A local file or folder, an object-store URL (`file://`, `s3://`, `gs://`, `az://`, `memory://`)
    /// or a Hugging Face dataset `hf://datasets/OWNER/NAME`.
    pub uri: String,
    /// Dataset configuration (Hub datasets, or folders in the Hub's `CONFIG/SPLIT/` layout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// Hub revision to read parquet files from (default `main`, then `refs/convert/parquet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// `parquet`, `json` or `jsonl`; by default taken from each file's extension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Read only these columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
    /// Stop after this many rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Name of the stable row id column added to every row (its ordinal in the source).
    #[serde(default = "default_row_id")]
    pub row_id: String,
    /// Rows per record batch.
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
    /// Repeat the source this many times, with new row ids each time (benchmarks, stress tests).
    #[serde(default = "one_u64")]
    pub repeat: u64,
}

pub fn default_row_id() -> String {
    "row_id".to_string()
}
fn default_batch_rows() -> usize {
    8192
}
fn one_u64() -> u64 {
    1
}

/// `filter:` — a SQL predicate; rows where it is false or null are dropped.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FilterSpec {
    pub predicate: String,
}

impl<'de> Deserialize<'de> for FilterSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            predicate: String,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Short(String),
            Full(Full),
        }
        match Either::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a SQL predicate string or { predicate: ... }")
        })? {
            Either::Short(predicate) => Ok(FilterSpec { predicate }),
            Either::Full(f) => Ok(FilterSpec {
                predicate: f.predicate,
            }),
        }
    }
}

/// What `format` does when a template refers to a null field.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnNull {
    /// The output is null (downstream steps skip or record the row).
    #[default]
    Null,
    /// The null field is formatted as an empty string.
    Empty,
    /// The run stops with an error naming the row and column.
    Error,
}

/// `format:` — `OUTPUT_COLUMN: "template with {column} references"`, plus the reserved key `on_null`.
#[derive(Debug, Clone, PartialEq)]
pub struct FormatSpec {
    pub columns: BTreeMap<String, String>,
    /// The plan's order of output columns.
    pub order: Vec<String>,
    pub on_null: OnNull,
}

impl FormatSpec {
    /// (output column, template) in plan order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.order
            .iter()
            .map(|k| (k.as_str(), self.columns[k].as_str()))
    }
}

/// Written back flat, as in the plan (`OUTPUT: template`, `on_null`).
impl Serialize for FormatSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.order.len() + 1))?;
        for (k, v) in self.entries() {
            m.serialize_entry(k, v)?;
        }
        m.serialize_entry("on_null", &self.on_null)?;
        m.end()
    }
}

impl<'de> Deserialize<'de> for FormatSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let map = serde_yaml::Mapping::deserialize(d)?;
        let mut spec = FormatSpec {
            columns: BTreeMap::new(),
            order: vec![],
            on_null: OnNull::Null,
        };
        for (k, v) in map {
            let key = k
                .as_str()
                .ok_or_else(|| D::Error::custom("format keys must be column names"))?;
            if key == "on_null" {
                spec.on_null = serde_yaml::from_value(v)
                    .map_err(|_| D::Error::custom("`on_null` must be one of null, empty, error"))?;
                continue;
            }
            let template = v.as_str().ok_or_else(|| {
                D::Error::custom(format!(
                    "`{key}`: expected a template string like \"{{intent}}\""
                ))
            })?;
            spec.order.push(key.to_string());
            spec.columns.insert(key.to_string(), template.to_string());
        }
        if spec.columns.is_empty() {
            return Err(D::Error::custom(
                "format needs at least one `OUTPUT: \"template\"` entry",
            ));
        }
        Ok(spec)
    }
}

/// `tokenize:` — token ids as `list<int32>` columns.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenizeSpec {
    /// Text column to encode into `input_ids` / `n_input_tokens`.
    pub input: String,
    /// Optional target text column to encode into `labels` / `n_label_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default = "default_max_input")]
    pub max_input_tokens: usize,
    #[serde(default = "default_max_target")]
    pub max_target_tokens: usize,
    /// `tokenizer.json` path, a folder holding one, or a Hub model id; default: the plan's model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// Cut long inputs to the maximum (keeping the final `</s>`). When false, a longer row is recorded
    /// as an error and skipped downstream.
    #[serde(default = "yes")]
    pub truncation: bool,
}

fn default_max_input() -> usize {
    512
}
fn default_max_target() -> usize {
    128
}
pub fn yes() -> bool {
    true
}

/// `generate:` — decode a text column from `input_ids` with the plan's model.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GenerateSpec {
    /// Name of the generated text column.
    pub output: String,
    /// Input token ids column (from `tokenize`).
    #[serde(default = "default_input_ids")]
    pub input: String,
    #[serde(default = "default_max_new")]
    pub max_new_tokens: usize,
    #[serde(default)]
    pub min_new_tokens: usize,
    /// Sample instead of greedy/beam decoding. Unset: sample when temperature, top_p or top_k is given
    /// (unlike HF, which then ignores them and decodes greedily; set `do_sample: false` for HF's behaviour).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub do_sample: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// Base seed; each row's sampler is seeded from (seed, row id), so a row's output does not depend on
    /// the batch it lands in.
    #[serde(default)]
    pub seed: u64,
    /// HF semantics: logits of tokens already in the decoder sequence are divided (if > 0) or multiplied
    /// (if < 0) by this value.
    #[serde(default = "one_f64")]
    pub repetition_penalty: f64,
    #[serde(default)]
    pub no_repeat_ngram_size: usize,
    #[serde(default = "one_usize")]
    pub num_beams: usize,
    #[serde(default = "one_f64")]
    pub length_penalty: f64,
    #[serde(default)]
    pub early_stopping: bool,
    /// Token budget of a batch (rows x padded input length): bounds the memory of the encoder output
    /// and its cross-attention keys/values while the batch decodes.
    #[serde(default = "default_batch_tokens")]
    pub batch_tokens: usize,
    /// Upper bound on rows decoded together (more rows per step use the hardware better).
    #[serde(default = "default_max_batch_rows")]
    pub max_batch_rows: usize,
    /// The encoder runs on chunks of about this many padded tokens within a batch.
    #[serde(default = "default_encoder_batch_tokens")]
    pub encoder_batch_tokens: usize,
    /// Rows read ahead and sorted by length before batching.
    #[serde(default = "default_window_rows")]
    pub window_rows: usize,
    /// Generate identical inputs once.
    #[serde(default = "yes")]
    pub dedup: bool,
    /// Emit rows in input order (costs buffering); default emits them as they finish.
    #[serde(default)]
    pub keep_order: bool,
}

fn default_input_ids() -> String {
    "input_ids".to_string()
}
fn default_max_new() -> usize {
    64
}
fn one_f64() -> f64 {
    1.0
}
fn one_usize() -> usize {
    1
}
fn default_batch_tokens() -> usize {
    16384
}
fn default_max_batch_rows() -> usize {
    512
}
fn default_encoder_batch_tokens() -> usize {
    4096
}
fn default_window_rows() -> usize {
    4096
}

/// `evaluate:` — score a prediction column against a reference column (BLEU, exact match).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvaluateSpec {
    pub prediction: String,
    pub reference: String,
    /// Per-row smoothed sentence BLEU-4 column name.
    #[serde(default = "default_bleu_column")]
    pub column: String,
}

fn default_bleu_column() -> String {
    "bleu".to_string()
}

/// `train:` — fine-tune the plan's model on the rows it receives (a sink).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// Output folder: checkpoints, adapters, metrics.jsonl, loss plot.
    pub output: String,
    /// Evaluation rows: another source that flows through the same steps as the training rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalSpec>,
    /// LoRA settings; `lora: null` trains all weights (full fine-tuning).
    #[serde(default = "default_lora", deserialize_with = "nullable")]
    pub lora: Option<LoraSpec>,
    #[serde(default = "default_max_steps")]
    pub max_steps: u64,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default = "one_usize")]
    pub gradient_accumulation_steps: usize,
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    /// `linear`, `cosine` or `constant` (each after `warmup_steps` of linear warm-up).
    #[serde(default = "default_scheduler")]
    pub lr_scheduler: String,
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
    #[serde(default = "one_f64")]
    pub max_grad_norm: f64,
    #[serde(default)]
    pub label_smoothing: f64,
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
fn default_lora() -> Option<LoraSpec> {
    Some(LoraSpec::default())
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
fn default_scheduler() -> String {
    "linear".to_string()
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

/// `train.lora:` — LoRA hyper-parameters (PEFT's names and defaults for T5).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    /// Target module names (the last component of a Linear's path: q, k, v, o, wi, wi_0, wi_1, wo).
    #[serde(default = "default_targets")]
    pub targets: Vec<String>,
    /// rsLoRA: scale alpha / sqrt(r) instead of alpha / r.
    #[serde(default)]
    pub rslora: bool,
}

impl Default for LoraSpec {
    fn default() -> Self {
        LoraSpec {
            r: default_r(),
            alpha: default_alpha(),
            dropout: 0.0,
            targets: default_targets(),
            rslora: false,
        }
    }
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_targets() -> Vec<String> {
    vec!["q".to_string(), "v".to_string()]
}

/// `write:` — parquet part files plus `_manifest.json`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WriteSpec {
    /// Output folder: a local path or an object-store URL.
    pub path: String,
    /// Rows per part file; a part is written (atomically) each time this many rows are buffered.
    #[serde(default = "default_rows_per_file")]
    pub rows_per_file: usize,
    /// Rows per parquet row group.
    #[serde(default = "default_row_group_rows")]
    pub row_group_rows: usize,
    /// `zstd` (default), `snappy` or `none`.
    #[serde(default = "default_compression")]
    pub compression: String,
    /// Write only these columns (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
    /// Columns to leave out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drop: Vec<String>,
    /// `auto` (resume when the plan generates, else overwrite), `overwrite`, `resume` or `error`
    /// (fail if the folder already holds output).
    #[serde(default = "default_auto")]
    pub mode: String,
}

fn default_rows_per_file() -> usize {
    100_000
}
fn default_row_group_rows() -> usize {
    20_000
}
fn default_compression() -> String {
    "zstd".to_string()
}
