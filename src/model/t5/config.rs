//! T5-family configuration (t5, t5 v1.1 / flan-t5, UL2, mT5, umT5), read from a Hugging Face
//! `config.json` as it is.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::T5;
use crate::error::{Error, Result};
use crate::model::activation::FeedForward;
use crate::model::config::{Architecture, DecoderInputs, LinearShape, ModelConfig, Shape, Tokens};
use crate::model::mode::Dropout;
use crate::model::seq2seq::Seq2Seq;
use crate::model::weights::Weights;

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

    /// umT5 learns a relative position bias in every layer; T5 and mT5 in the first only.
    pub fn per_layer_position_bias(&self) -> bool {
        self.model_type.as_deref() == Some("umt5")
    }

    /// The family-independent config of this T5.
    pub fn model_config(&self) -> ModelConfig {
        let gated = self.feed_forward().map(|f| f.gated).unwrap_or(false);
        ModelConfig {
            model_type: self.model_type.clone().unwrap_or_else(|| "t5".into()),
            vocab_size: self.vocab_size,
            shape: Shape {
                d_model: self.d_model,
                heads: self.num_heads,
                d_kv: self.d_kv,
                d_ff: self.d_ff,
                encoder_layers: self.num_layers,
                decoder_layers: self.decoder_layers(),
                gated,
                position_bias: true,
            },
            tokens: Tokens {
                pad: self.pad_token_id,
                eos: self.eos_token_id,
                decoder_start: self.decoder_start(),
                forced_bos: None,
                forced_eos: None,
            },
            dropout: Dropout::uniform(self.dropout_rate),
            decoder_inputs: DecoderInputs::StartToken,
            max_positions: None,
            lora_targets: &["q", "v"],
            lora_modules: if gated {
                "q, k, v, o, wi_0, wi_1, wo"
            } else {
                "q, k, v, o, wi, wo"
            },
            arch: Arc::new(self.clone()),
        }
    }
}

/// The registry's builder of T5-family networks.
pub fn build(cfg: &ModelConfig, w: &Weights) -> Result<Box<dyn Seq2Seq>> {
    let t5 = cfg
        .arch
        .as_any()
        .downcast_ref::<T5Config>()
        .ok_or_else(|| Error::model(format!("model_type `{}`: not a T5 config", cfg.model_type)))?;
    Ok(Box::new(T5::load(t5, cfg, w)?))
}

impl Architecture for T5Config {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn parameter_count(&self) -> u64 {
        super::params::parameter_count(self)
    }

    fn linears(&self) -> Vec<LinearShape> {
        super::params::linear_shapes(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::activation::Activation;

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
