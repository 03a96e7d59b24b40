//! Building a BART from checkpoint tensors. Checkpoints name them as `BartForConditionalGeneration`
//! does (`model.encoder.layers.0.self_attn.q_proj.weight`, `final_logits_bias`) or, saved from a bare
//! `BartModel` (older Hub uploads), without the `model.` prefix; both load. Errors name the missing
//! or misshapen tensor.

use candle_core::{DType, Tensor};

use super::config::{BartConfig, Norms, LAYER_NORM_EPS, POSITION_OFFSET};
use super::{Bart, Layer, Stack};
use crate::error::Result;
use crate::model::activation::FeedForward;
use crate::model::attention::Attention;
use crate::model::config::ModelConfig;
use crate::model::layers::{Ffn, LayerNorm, Linear};
use crate::model::weights::Weights;

/// Tensors by name under the checkpoint's own prefix.
struct Named<'a> {
    w: &'a Weights,
    prefix: &'static str,
}

impl Named<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.w.get(&format!("{}{name}", self.prefix), shape)
    }

    fn contains(&self, name: &str) -> bool {
        self.w.contains(&format!("{}{name}", self.prefix))
    }

    fn linear(&self, name: &str, out: usize, inp: usize) -> Result<Linear> {
        Ok(Linear::with_bias(
            self.get(&format!("{name}.weight"), &[out, inp])?,
            Some(self.get(&format!("{name}.bias"), &[out])?),
        ))
    }

    fn norm(&self, name: &str, d: usize) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.get(&format!("{name}.weight"), &[d])?,
            bias: self.get(&format!("{name}.bias"), &[d])?,
            eps: LAYER_NORM_EPS,
        })
    }

    fn attention(&self, name: &str, cfg: &BartConfig, decoder: bool) -> Result<Attention> {
        let d = cfg.d_model;
        let (heads, head_dim) = (cfg.heads(decoder), cfg.head_dim(decoder));
        let mut a = Attention::new(
            self.linear(&format!("{name}.q_proj"), d, d)?,
            self.linear(&format!("{name}.k_proj"), d, d)?,
            self.linear(&format!("{name}.v_proj"), d, d)?,
            self.linear(&format!("{name}.out_proj"), d, d)?,
            heads,
            head_dim,
        );
        a.scale = (head_dim as f64).powf(-0.5);
        Ok(a)
    }
}

fn stack(n: &Named, cfg: &BartConfig, decoder: bool) -> Result<Stack> {
    let (name, layers) = if decoder {
        ("decoder", cfg.decoder_layers)
    } else {
        ("encoder", cfg.encoder_layers)
    };
    let (d, f) = (cfg.d_model, cfg.ffn_dim(decoder));
    let kind = FeedForward {
        activation: cfg.activation()?,
        gated: false,
    };
    let mut out = Vec::with_capacity(layers);
    for i in 0..layers {
        let p = format!("{name}.layers.{i}");
        let cross = if decoder {
            Some((
                n.attention(&format!("{p}.encoder_attn"), cfg, true)?,
                n.norm(&format!("{p}.encoder_attn_layer_norm"), d)?,
            ))
        } else {
            None
        };
        out.push(Layer {
            self_attn: n.attention(&format!("{p}.self_attn"), cfg, decoder)?,
            self_norm: n.norm(&format!("{p}.self_attn_layer_norm"), d)?,
            cross,
            ffn: Ffn {
                kind,
                wi: n.linear(&format!("{p}.fc1"), f, d)?,
                wi_1: None,
                wo: n.linear(&format!("{p}.fc2"), d, f)?,
                gate_stacked: None,
            },
            ffn_norm: n.norm(&format!("{p}.final_layer_norm"), d)?,
        });
    }
    Ok(Stack {
        positions: n.get(
            &format!("{name}.embed_positions.weight"),
            &[cfg.max_position_embeddings + POSITION_OFFSET, d],
        )?,
        embed_norm: n.norm(&format!("{name}.layernorm_embedding"), d)?,
        layers: out,
        final_norm: match cfg.norms() {
            Norms::Pre => Some(n.norm(&format!("{name}.layer_norm"), d)?),
            Norms::Post => None,
        },
    })
}

impl Bart {
    pub fn load(cfg: &BartConfig, config: &ModelConfig, w: &Weights) -> Result<Bart> {
        let prefix = if w.names().any(|n| n.starts_with("model.")) {
            "model."
        } else {
            ""
        };
        let n = Named { w, prefix };
        let (v, d) = (cfg.vocab_size, cfg.d_model);
        let shared = match [
            "shared.weight",
            "encoder.embed_tokens.weight",
            "decoder.embed_tokens.weight",
        ]
        .into_iter()
        .find(|name| n.contains(name))
        {
            Some(name) => n.get(name, &[v, d])?,
            // Tied embeddings saved only as the output layer.
            None if cfg.tie_word_embeddings && w.contains("lm_head.weight") => {
                w.get("lm_head.weight", &[v, d])?
            }
            None => n.get("shared.weight", &[v, d])?,
        };
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(Linear::new(w.get("lm_head.weight", &[v, d])?))
        };
        // A buffer HF may leave out of a checkpoint (`_keys_to_ignore_on_load_missing`): zeros then.
        let final_logits_bias = if w.contains("final_logits_bias") {
            w.get("final_logits_bias", &[1, v])?.reshape(v)?
        } else {
            Tensor::zeros(v, w.dtype, &w.device)?
        };
        Ok(Bart {
            cfg: cfg.clone(),
            config: config.clone(),
            shared,
            encoder: stack(&n, cfg, false)?,
            decoder: stack(&n, cfg, true)?,
            lm_head,
            final_logits_bias: final_logits_bias.to_dtype(DType::F32)?,
            head_for_inference: None,
            cross_kv_all: None,
            device: w.device.clone(),
            dtype: w.dtype,
        })
    }
}
