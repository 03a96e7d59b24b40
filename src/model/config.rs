//! What conala needs to know of any model, whatever its family: the special tokens decoding and
//! training use, the sizes memory estimates use, the dropout rates, and the family's own config
//! (behind [`Architecture`]), from which the family builds the network. Parsed from a Hugging Face
//! `config.json` by the family the registry names for its `model_type` (`ModelConfig::from_json`
//! and `ModelConfig::build` live there), with `generation_config.json` on top.

use std::fmt;
use std::sync::Arc;

use serde_json::Value;

use super::mode::Dropout;
use crate::error::{Error, Result};

/// A family's own config: what only that family's code reads. It answers the questions plans ask
/// before any weight is loaded; the family's builder (in the registry) reads it back through
/// [`Architecture::as_any`].
pub trait Architecture: Send + Sync {
    /// This config, for its family's builder to downcast.
    fn as_any(&self) -> &dyn std::any::Any;
    /// Parameters as transformers' `num_parameters()` counts them (tied weights once).
    fn parameter_count(&self) -> u64;
    /// Every linear layer by its HF module name, with its shape, but the output layer: what LoRA
    /// can target.
    fn linears(&self) -> Vec<LinearShape>;
}

/// A linear layer's HF module name (`encoder.block.0.layer.0.SelfAttention.q`), shape and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearShape {
    pub name: String,
    pub inputs: usize,
    pub outputs: usize,
    pub role: Role,
}

/// What a linear layer does in its block, whatever the family calls it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Query,
    Key,
    Value,
    /// Attention's output projection.
    Output,
    /// The feed-forward's input projection(s).
    FeedForwardIn,
    FeedForwardOut,
}

/// The sizes memory estimates use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub d_model: usize,
    pub heads: usize,
    /// Width of one head.
    pub d_kv: usize,
    pub d_ff: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    /// A gated feed-forward (two input projections).
    pub gated: bool,
    /// Attention biases are position-dependent tensors (T5's relative positions), not just masks.
    pub position_bias: bool,
}

impl Shape {
    /// Inner width of attention (heads x d_kv).
    pub fn inner_dim(&self) -> usize {
        self.heads * self.d_kv
    }
}

/// The special tokens of generation and training, as HF's `generate` resolves them:
/// `generation_config.json` over `config.json`, the decoder start falling back to `bos_token_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tokens {
    pub pad: u32,
    pub eos: u32,
    pub decoder_start: u32,
    /// Forced as the first generated token (BART's `<s>`, mBART-50's target language code).
    pub forced_bos: Option<u32>,
    /// Forced as the last token when the length limit is reached (BART).
    pub forced_eos: Option<u32>,
}

/// How training turns labels into decoder inputs (HF's `shift_tokens_right` of the family).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderInputs {
    /// `[decoder_start] + labels[..-1]` (T5, BART).
    StartToken,
    /// `[last label] + labels[..-1]`: the last label (mBART's and PLBART's language code) starts the
    /// decoder.
    WrapLastLabel,
}

/// A model's config, family-independent.
#[derive(Clone)]
pub struct ModelConfig {
    /// `model_type` as config.json says it (t5, mt5, umt5, bart, mbart, plbart).
    pub model_type: String,
    pub vocab_size: usize,
    pub shape: Shape,
    pub tokens: Tokens,
    /// The checkpoint's dropout rates (a plan's `train.dropout` replaces all three).
    pub dropout: Dropout,
    pub decoder_inputs: DecoderInputs,
    /// The longest sequence the model has positions for (BART's learned positions); `None`: any
    /// length (T5's relative positions).
    pub max_positions: Option<usize>,
    /// PEFT's default LoRA targets for the family (T5: q, v; BART: q_proj, v_proj).
    pub lora_targets: &'static [&'static str],
    /// Every module name LoRA can target, for messages (`q, k, v, o, wi, wo`).
    pub lora_modules: &'static str,
    pub arch: Arc<dyn Architecture>,
}

impl fmt::Debug for ModelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelConfig")
            .field("model_type", &self.model_type)
            .field("vocab_size", &self.vocab_size)
            .field("shape", &self.shape)
            .field("tokens", &self.tokens)
            .field("dropout", &self.dropout)
            .field("decoder_inputs", &self.decoder_inputs)
            .finish_non_exhaustive()
    }
}

impl ModelConfig {
    /// Apply a `generation_config.json`: the token ids it sets replace config.json's, as HF's
    /// `generate` reads them (an explicit null switches a forced token off). Decoding settings in it
    /// (`num_beams`, `no_repeat_ngram_size`, ...) are left to the plan.
    pub fn with_generation_config(mut self, text: &str, origin: &str) -> Result<ModelConfig> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::model(format!("{origin}: not a JSON generation config: {e}")))?;
        let t = &mut self.tokens;
        if let Some(x) = token(&v, "pad_token_id", origin)? {
            t.pad = x;
        }
        if let Some(x) = token(&v, "eos_token_id", origin)? {
            t.eos = x;
        }
        if let Some(x) = token(&v, "decoder_start_token_id", origin)? {
            t.decoder_start = x;
        }
        if v.get("forced_bos_token_id").is_some() {
            t.forced_bos = token(&v, "forced_bos_token_id", origin)?;
        }
        if v.get("forced_eos_token_id").is_some() {
            t.forced_eos = token(&v, "forced_eos_token_id", origin)?;
        }
        Ok(self)
    }

    pub fn parameter_count(&self) -> u64 {
        self.arch.parameter_count()
    }

    pub fn linears(&self) -> Vec<LinearShape> {
        self.arch.linears()
    }

    /// The decoder inputs for `labels` (teacher forcing): see [`DecoderInputs`].
    pub fn decoder_inputs(&self, labels: &[u32], len: usize) -> Vec<u32> {
        let first = match self.decoder_inputs {
            DecoderInputs::StartToken => self.tokens.decoder_start,
            DecoderInputs::WrapLastLabel => {
                labels.last().copied().unwrap_or(self.tokens.decoder_start)
            }
        };
        (0..len)
            .map(|j| match j {
                0 => first,
                j => labels.get(j - 1).copied().unwrap_or(self.tokens.pad),
            })
            .collect()
    }
}

/// A token id key: an integer, a one-element list (HF allows lists of EOS ids), or null (`None`).
/// Several EOS ids are refused by name: decoding stops on one.
pub fn token(v: &Value, key: &str, origin: &str) -> Result<Option<u32>> {
    let bad = |why: &str| Error::model(format!("{origin}: `{key}` {why}"));
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| bad("must be a token id (a non-negative integer)")),
        Some(Value::Array(a)) if a.len() == 1 => {
            token(&serde_json::json!({ key: a[0] }), key, origin)
        }
        Some(Value::Array(a)) if a.is_empty() => Ok(None),
        Some(Value::Array(_)) => Err(bad(
            "lists several token ids; conala stops decoding on one end-of-sequence id",
        )),
        Some(_) => Err(bad("must be a token id")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_are_integers_or_one_element_lists() {
        let v = serde_json::json!({"a": 2, "b": [3], "c": null, "d": [1, 2], "e": -1, "f": "x"});
        assert_eq!(token(&v, "a", "c.json").unwrap(), Some(2));
        assert_eq!(token(&v, "b", "c.json").unwrap(), Some(3));
        assert_eq!(token(&v, "c", "c.json").unwrap(), None);
        assert_eq!(token(&v, "missing", "c.json").unwrap(), None);
        for k in ["d", "e", "f"] {
            let e = token(&v, k, "m/c.json").unwrap_err().to_string();
            assert!(
                e.contains("m/c.json") && e.contains(&format!("`{k}`")),
                "{e}"
            );
        }
    }
}
