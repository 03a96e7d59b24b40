//! `generate:` — decoding settings and the batching that makes them fast.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

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
    #[serde(default = "super::one_f64")]
    pub repetition_penalty: f64,
    #[serde(default)]
    pub no_repeat_ngram_size: usize,
    #[serde(default = "super::one_usize")]
    pub num_beams: usize,
    #[serde(default = "super::one_f64")]
    pub length_penalty: f64,
    #[serde(default)]
    pub early_stopping: bool,
    /// Token budget of a batch (rows x padded input length): bounds the memory of the encoder output
    /// and its cross-attention keys/values while the batch decodes. `auto` (the default): from the
    /// device's free memory and the model's shape on a GPU, 16384 on the CPU.
    #[serde(default)]
    pub batch_tokens: BatchTokens,
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
    #[serde(default = "super::yes")]
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
fn default_max_batch_rows() -> usize {
    512
}
fn default_encoder_batch_tokens() -> usize {
    4096
}
fn default_window_rows() -> usize {
    4096
}

/// `batch_tokens`: a number of tokens, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BatchTokens {
    #[default]
    Auto,
    Fixed(usize),
}

impl Serialize for BatchTokens {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BatchTokens::Auto => s.serialize_str("auto"),
            BatchTokens::Fixed(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for BatchTokens {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Tokens(usize),
            Name(String),
        }
        match Either::deserialize(d) {
            Ok(Either::Tokens(n)) => Ok(BatchTokens::Fixed(n)),
            Ok(Either::Name(s)) if s == "auto" => Ok(BatchTokens::Auto),
            _ => Err(serde::de::Error::custom(
                "expected a number of tokens or `auto`",
            )),
        }
    }
}
