//! Building the T5 from checkpoint tensors (HF names); errors name the missing or misshapen tensor.

use super::{Block, Stack, T5Config, T5};
use crate::error::Result;
use crate::model::attention::Attention;
use crate::model::config::ModelConfig;
use crate::model::layers::{Ffn, Linear, RmsNorm};
use crate::model::position_bias::{BucketTable, PositionBias};
use crate::model::weights::Weights;

fn attention(w: &Weights, prefix: &str, cfg: &T5Config) -> Result<Attention> {
    let (d, inner) = (cfg.d_model, cfg.inner_dim());
    Ok(Attention::new(
        Linear::new(w.get(&format!("{prefix}.q.weight"), &[inner, d])?),
        Linear::new(w.get(&format!("{prefix}.k.weight"), &[inner, d])?),
        Linear::new(w.get(&format!("{prefix}.v.weight"), &[inner, d])?),
        Linear::new(w.get(&format!("{prefix}.o.weight"), &[d, inner])?),
        cfg.num_heads,
        cfg.d_kv,
    ))
}

fn norm(w: &Weights, name: &str, cfg: &T5Config) -> Result<RmsNorm> {
    Ok(RmsNorm {
        weight: w.get(name, &[cfg.d_model])?,
        eps: cfg.layer_norm_epsilon,
    })
}

fn ffn(w: &Weights, prefix: &str, cfg: &T5Config) -> Result<Ffn> {
    let kind = cfg.feed_forward()?;
    let (d, f) = (cfg.d_model, cfg.d_ff);
    let get = |n: &str, shape: &[usize]| w.get(&format!("{prefix}.{n}.weight"), shape);
    Ok(if kind.gated {
        Ffn {
            kind,
            wi: Linear::new(get("wi_0", &[f, d])?),
            wi_1: Some(Linear::new(get("wi_1", &[f, d])?)),
            wo: Linear::new(get("wo", &[d, f])?),
            gate_stacked: None,
        }
    } else {
        Ffn {
            kind,
            wi: Linear::new(get("wi", &[f, d])?),
            wi_1: None,
            wo: Linear::new(get("wo", &[d, f])?),
            gate_stacked: None,
        }
    })
}

fn stack(w: &Weights, cfg: &T5Config, decoder: bool) -> Result<Stack> {
    let (name, layers) = if decoder {
        ("decoder", cfg.decoder_layers())
    } else {
        ("encoder", cfg.num_layers)
    };
    let mut blocks = Vec::with_capacity(layers);
    for i in 0..layers {
        let p = format!("{name}.block.{i}.layer");
        let self_attn = attention(w, &format!("{p}.0.SelfAttention"), cfg)?;
        let self_norm = norm(w, &format!("{p}.0.layer_norm.weight"), cfg)?;
        let (cross, ff_layer) = if decoder {
            let a = attention(w, &format!("{p}.1.EncDecAttention"), cfg)?;
            (
                Some((a, norm(w, &format!("{p}.1.layer_norm.weight"), cfg)?)),
                2,
            )
        } else {
            (None, 1)
        };
        blocks.push(Block {
            self_attn,
            self_norm,
            cross,
            ffn: ffn(w, &format!("{p}.{ff_layer}.DenseReluDense"), cfg)?,
            ffn_norm: norm(w, &format!("{p}.{ff_layer}.layer_norm.weight"), cfg)?,
        });
    }
    // T5 and mT5 learn the bias in block 0 and share it; umT5 learns one per block.
    let owners = if cfg.per_layer_position_bias() {
        layers
    } else {
        let second = format!("{name}.block.1.layer.0.SelfAttention.relative_attention_bias.weight");
        if w.contains(&second) {
            return Err(crate::error::Error::model(format!(
                "{}: `{second}` is a position bias in a later block (umT5 has one per block), but config.json says model_type `{}`; reading only block 0's would be silently wrong",
                w.origin(),
                cfg.model_type.as_deref().unwrap_or("t5")
            )));
        }
        1
    };
    let biases = (0..owners)
        .map(|i| {
            Ok(PositionBias {
                weight: w.get(
                    &format!(
                        "{name}.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"
                    ),
                    &[cfg.relative_attention_num_buckets, cfg.num_heads],
                )?,
                table: BucketTable::new(
                    !decoder,
                    cfg.relative_attention_num_buckets,
                    cfg.relative_attention_max_distance,
                    &w.device,
                )?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Stack {
        blocks,
        final_norm: norm(w, &format!("{name}.final_layer_norm.weight"), cfg)?,
        biases,
    })
}

impl T5 {
    /// Build the model from checkpoint tensors (HF names); errors name the missing or misshapen tensor.
    pub fn load(cfg: &T5Config, config: &ModelConfig, w: &Weights) -> Result<T5> {
        let (v, d) = (cfg.vocab_size, cfg.d_model);
        let shared_name = [
            "shared.weight",
            "encoder.embed_tokens.weight",
            "decoder.embed_tokens.weight",
        ]
        .into_iter()
        .find(|n| w.contains(n))
        .unwrap_or("shared.weight");
        let shared = w.get(shared_name, &[v, d])?;
        // The checkpoint's own output layer when it has one (untied v1.1 / flan / UL2 models do; tied
        // ones either omit it or store a copy of `shared`), else the shared embedding.
        let lm_head = if w.contains("lm_head.weight") {
            Some(Linear::new(w.get("lm_head.weight", &[v, d])?))
        } else {
            None
        };
        Ok(T5 {
            cfg: cfg.clone(),
            config: config.clone(),
            shared,
            encoder: stack(w, cfg, false)?,
            decoder: stack(w, cfg, true)?,
            lm_head,
            cross_kv_all: None,
            tied_head_t: None,
            device: w.device.clone(),
            dtype: w.dtype,
        })
    }
}
