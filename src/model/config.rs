//! T5-family configuration, read from a Hugging Face `config.json` as it is.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The feed-forward block's activation and whether it is gated (`wi_0` * `wi_1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Relu,
    /// HF `gelu` (erf form).
    Gelu,
    /// HF `gelu_new` (tanh approximation) — what `gated-gelu` uses.
    GeluNew,
    Silu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedForward {
    pub activation: Activation,
    pub gated: bool,
}

impl FeedForward {
    /// Parse HF's `feed_forward_proj`: `relu`, `gelu`, `gated-gelu` (gelu_new), `gated-silu`, …
    pub fn parse(s: &str) -> Result<FeedForward> {
        let (gated, act) = match s.split_once('-') {
            Some(("gated", act)) => (true, act),
            None => (false, s),
            Some(_) => {
                return Err(Error::model(format!(
                    "unknown feed_forward_proj `{s}` (expected ACT or gated-ACT)"
                )))
            }
        };
        let activation = match (act, gated) {
            ("gelu", true) => Activation::GeluNew,
            ("gelu", false) => Activation::Gelu,
            ("gelu_new", _) => Activation::GeluNew,
            ("relu", _) => Activation::Relu,
            ("silu", _) | ("swish", _) => Activation::Silu,
            _ => {
                return Err(Error::model(format!(
                    "unknown feed_forward_proj `{s}` (supported: relu, gelu, gelu_new, silu, and gated-* of them)"
                )))
            }
        };
        Ok(FeedForward { activation, gated })
    }
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".to_string()
}
fn default_true() -> bool {
    true
}
fn default_dropout() -> f64 {
    0.1
}
fn default_init() -> f64 {
    1.0
}
fn default_eos() -> u32 {
    1
}

/// The keys of a T5 `config.json` this project reads (others are kept as they are when saving).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_dropout")]
    pub dropout_rate: f64,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_init")]
    pub initializer_factor: f64,
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub pad_token_id: u32,
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
    #[serde(default)]
    pub decoder_start_token_id: Option<u32>,
    #[serde(default)]
    pub model_type: Option<String>,
    /// transformers >= 5 forces `tie_word_embeddings` to true and records the d_model^-0.5 output
    /// scaling here instead; when present it decides the scaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_decoder_outputs: Option<bool>,
}

impl T5Config {
    pub fn from_json(text: &str, origin: &str) -> Result<T5Config> {
        let cfg: T5Config = serde_json::from_str(text)
            .map_err(|e| Error::model(format!("{origin}: not a T5 config.json: {e}")))?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    pub fn validate(&self, origin: &str) -> Result<()> {
        self.feed_forward()
            .map_err(|e| Error::model(format!("{origin}: {e}")))?;
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_decoder_layers", self.decoder_layers()),
            ("num_heads", self.num_heads),
            (
                "relative_attention_num_buckets",
                self.relative_attention_num_buckets,
            ),
        ] {
            if v == 0 {
                return Err(Error::model(format!("{origin}: `{name}` must be positive")));
            }
        }
        if let Some(t) = &self.model_type {
            if !matches!(t.as_str(), "t5" | "mt5" | "umt5" | "longt5") && !t.is_empty() {
                log::warn!(
                    "{origin}: model_type `{t}` is not t5; loading it as a T5 encoder-decoder"
                );
            }
        }
        Ok(())
    }

    pub fn feed_forward(&self) -> Result<FeedForward> {
        FeedForward::parse(&self.feed_forward_proj)
    }

    /// Whether logits are computed from decoder outputs scaled by d_model^-0.5 (original T5, tied).
    pub fn scales_logits(&self) -> bool {
        self.scale_decoder_outputs
            .unwrap_or(self.tie_word_embeddings)
    }

    pub fn decoder_layers(&self) -> usize {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }

    pub fn decoder_start(&self) -> u32 {
        self.decoder_start_token_id.unwrap_or(self.pad_token_id)
    }

    /// Inner width of attention (heads x d_kv).
    pub fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feed_forward_variants() {
        assert_eq!(
            FeedForward::parse("relu").unwrap(),
            FeedForward {
                activation: Activation::Relu,
                gated: false
            }
        );
        assert_eq!(
            FeedForward::parse("gated-gelu").unwrap(),
            FeedForward {
                activation: Activation::GeluNew,
                gated: true
            }
        );
        assert_eq!(
            FeedForward::parse("gated-silu").unwrap(),
            FeedForward {
                activation: Activation::Silu,
                gated: true
            }
        );
        assert_eq!(
            FeedForward::parse("gelu").unwrap().activation,
            Activation::Gelu
        );
        assert!(FeedForward::parse("gated-tanhh").is_err());
        assert!(FeedForward::parse("fancy-relu").is_err());
    }

    #[test]
    fn reads_flan_config_and_rejects_unknown_activation() {
        let json = r#"{"vocab_size": 32128, "d_model": 768, "d_kv": 64, "d_ff": 2048, "num_layers": 12,
            "num_heads": 12, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": false,
            "decoder_start_token_id": 0, "model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}"#;
        let c = T5Config::from_json(json, "config.json").unwrap();
        assert_eq!(c.decoder_layers(), 12);
        assert!(!c.tie_word_embeddings);
        let bad = json.replace("gated-gelu", "gated-mish");
        let e = T5Config::from_json(&bad, "m/config.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m/config.json") && e.contains("gated-mish"),
            "{e}"
        );
    }
}
