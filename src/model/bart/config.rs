//! BART-family configuration (bart, mbart, plbart), read from a Hugging Face `config.json` as it is,
//! with HF's defaults for the keys a checkpoint leaves out.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::Bart;
use crate::error::{Error, Result};
use crate::model::activation::Activation;
use crate::model::config::{token, DecoderInputs, ModelConfig, Shape, Tokens};
use crate::model::mode::Dropout;
use crate::model::seq2seq::Seq2Seq;
use crate::model::weights::Weights;

/// Where each block normalizes: after its residual (BART, PLBART) or before its sublayer, with a
/// final norm after each stack (mBART).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norms {
    Post,
    Pre,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BartConfig {
    #[serde(default = "vocab")]
    pub vocab_size: usize,
    #[serde(default = "max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "layers")]
    pub encoder_layers: usize,
    #[serde(default = "layers")]
    pub decoder_layers: usize,
    #[serde(default = "ffn")]
    pub encoder_ffn_dim: usize,
    #[serde(default = "ffn")]
    pub decoder_ffn_dim: usize,
    #[serde(default = "heads")]
    pub encoder_attention_heads: usize,
    #[serde(default = "heads")]
    pub decoder_attention_heads: usize,
    #[serde(default = "d_model")]
    pub d_model: usize,
    #[serde(default)]
    pub encoder_layerdrop: f64,
    #[serde(default)]
    pub decoder_layerdrop: f64,
    #[serde(default = "gelu")]
    pub activation_function: String,
    #[serde(default = "dropout")]
    pub dropout: f64,
    #[serde(default)]
    pub attention_dropout: f64,
    #[serde(default)]
    pub activation_dropout: f64,
    #[serde(default)]
    pub scale_embedding: bool,
    #[serde(default = "tie")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub model_type: Option<String>,
    /// Resolved from config.json by [`parse_config`] (they may be lists or null there).
    #[serde(skip)]
    pub tokens: Option<Tokens>,
}

fn vocab() -> usize {
    50265
}
fn max_positions() -> usize {
    1024
}
fn layers() -> usize {
    12
}
fn ffn() -> usize {
    4096
}
fn heads() -> usize {
    16
}
fn d_model() -> usize {
    1024
}
fn gelu() -> String {
    "gelu".into()
}
fn dropout() -> f64 {
    0.1
}
fn tie() -> bool {
    true
}

/// HF's layer norm epsilon for BART (`nn.LayerNorm`'s default).
pub const LAYER_NORM_EPS: f64 = 1e-5;

/// BART's learned positions start at index 2 (fairseq's padding offset).
pub const POSITION_OFFSET: usize = 2;

impl BartConfig {
    pub fn norms(&self) -> Norms {
        match self.model_type.as_deref() {
            Some("mbart") => Norms::Pre,
            _ => Norms::Post,
        }
    }

    pub fn activation(&self) -> Result<Activation> {
        Activation::from_hf_name(&self.activation_function)
    }

    pub fn embed_scale(&self) -> f64 {
        if self.scale_embedding {
            (self.d_model as f64).sqrt()
        } else {
            1.0
        }
    }

    pub fn head_dim(&self, decoder: bool) -> usize {
        self.d_model / self.heads(decoder)
    }

    pub fn heads(&self, decoder: bool) -> usize {
        if decoder {
            self.decoder_attention_heads
        } else {
            self.encoder_attention_heads
        }
    }

    pub fn ffn_dim(&self, decoder: bool) -> usize {
        if decoder {
            self.decoder_ffn_dim
        } else {
            self.encoder_ffn_dim
        }
    }

    fn validate(&self, origin: &str) -> Result<()> {
        self.activation()
            .map_err(|e| Error::model(format!("{origin}: {e}")))?;
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("encoder_layers", self.encoder_layers),
            ("decoder_layers", self.decoder_layers),
            ("encoder_ffn_dim", self.encoder_ffn_dim),
            ("decoder_ffn_dim", self.decoder_ffn_dim),
            ("encoder_attention_heads", self.encoder_attention_heads),
            ("decoder_attention_heads", self.decoder_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(Error::model(format!("{origin}: `{name}` must be positive")));
            }
        }
        for decoder in [false, true] {
            if self.d_model % self.heads(decoder) != 0 {
                return Err(Error::model(format!(
                    "{origin}: d_model {} is not a multiple of {} attention heads",
                    self.d_model,
                    self.heads(decoder)
                )));
            }
        }
        for (name, p) in [
            ("encoder_layerdrop", self.encoder_layerdrop),
            ("decoder_layerdrop", self.decoder_layerdrop),
        ] {
            if p > 0.0 {
                log::warn!(
                    "{origin}: {name} {p}: conala trains every layer (LayerDrop is not implemented); generation is unaffected"
                );
            }
        }
        Ok(())
    }

    /// The family-independent config of this BART.
    pub fn model_config(&self) -> ModelConfig {
        let tokens = self.tokens.unwrap_or(Tokens {
            pad: 1,
            eos: 2,
            decoder_start: 2,
            forced_bos: None,
            forced_eos: Some(2),
        });
        ModelConfig {
            model_type: self.model_type.clone().unwrap_or_else(|| "bart".into()),
            vocab_size: self.vocab_size,
            shape: Shape {
                d_model: self.d_model,
                heads: self
                    .encoder_attention_heads
                    .max(self.decoder_attention_heads),
                d_kv: self.head_dim(false).max(self.head_dim(true)),
                d_ff: self.encoder_ffn_dim.max(self.decoder_ffn_dim),
                encoder_layers: self.encoder_layers,
                decoder_layers: self.decoder_layers,
                gated: false,
                position_bias: false,
            },
            tokens,
            dropout: Dropout {
                hidden: self.dropout,
                attention: self.attention_dropout,
                activation: self.activation_dropout,
            },
            // mBART and PLBART start the decoder with the target's language code, the last label.
            decoder_inputs: match self.model_type.as_deref() {
                Some("mbart") | Some("plbart") => DecoderInputs::WrapLastLabel,
                _ => DecoderInputs::StartToken,
            },
            max_positions: Some(self.max_position_embeddings),
            lora_targets: &["q_proj", "v_proj"],
            lora_modules: "q_proj, k_proj, v_proj, out_proj, fc1, fc2",
            arch: Arc::new(self.clone()),
        }
    }
}

/// The registry's reader of BART-family configs (bart, mbart, plbart).
pub fn parse_config(v: &Value, origin: &str) -> Result<ModelConfig> {
    let mut cfg: BartConfig = serde_json::from_value(v.clone())
        .map_err(|e| Error::model(format!("{origin}: not a BART config.json: {e}")))?;
    cfg.validate(origin)?;
    // HF's defaults: pad 1, bos 0, eos 2; BART starts the decoder with eos (2), mBART (whose class
    // sets no start token) falls back to bos as `generate` does; forced_eos 2 unless set.
    let get = |key: &str, default: Option<u32>| -> Result<Option<u32>> {
        Ok(match v.get(key) {
            None => default,
            Some(_) => token(v, key, origin)?,
        })
    };
    let mbart = cfg.model_type.as_deref() == Some("mbart");
    let bos = get("bos_token_id", Some(0))?;
    let start = get("decoder_start_token_id", if mbart { None } else { Some(2) })?.or(bos);
    cfg.tokens = Some(Tokens {
        pad: get("pad_token_id", Some(1))?.unwrap_or(1),
        eos: get("eos_token_id", Some(2))?
            .ok_or_else(|| Error::model(format!("{origin}: `eos_token_id` is null")))?,
        decoder_start: start.ok_or_else(|| {
            Error::model(format!(
                "{origin}: neither `decoder_start_token_id` nor `bos_token_id` is set"
            ))
        })?,
        forced_bos: get("forced_bos_token_id", None)?,
        forced_eos: get("forced_eos_token_id", Some(2))?,
    });
    Ok(cfg.model_config())
}

/// The registry's builder of BART-family networks.
pub fn build(cfg: &ModelConfig, w: &Weights) -> Result<Box<dyn Seq2Seq>> {
    let bart = cfg
        .arch
        .as_any()
        .downcast_ref::<BartConfig>()
        .ok_or_else(|| {
            Error::model(format!(
                "model_type `{}`: not a BART config",
                cfg.model_type
            ))
        })?;
    Ok(Box::new(Bart::load(bart, cfg, w)?))
}
