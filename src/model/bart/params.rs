//! BART's weights by their HF names (as `BartForConditionalGeneration` has them, `model.` prefix
//! included, which PEFT's adapter keys follow): every Linear, the state dict a checkpoint stores, the
//! variables of full fine-tuning, and the parameter count.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};

use super::config::{BartConfig, Norms};
use super::Bart;
use crate::error::Result;
use crate::model::config::{Architecture, LinearShape, Role};
use crate::model::layers::Linear;

/// Every Linear's HF module name and shape but the output layer's, in the order
/// [`Bart::named_linears`] yields them.
pub fn linear_shapes(cfg: &BartConfig) -> Vec<LinearShape> {
    let d = cfg.d_model;
    let mut out = vec![];
    for (stack, layers, decoder) in [
        ("encoder", cfg.encoder_layers, false),
        ("decoder", cfg.decoder_layers, true),
    ] {
        let f = cfg.ffn_dim(decoder);
        for i in 0..layers {
            let p = format!("model.{stack}.layers.{i}");
            let attentions: &[&str] = if decoder {
                &["self_attn", "encoder_attn"]
            } else {
                &["self_attn"]
            };
            for a in attentions {
                for (n, role) in [
                    ("q_proj", Role::Query),
                    ("k_proj", Role::Key),
                    ("v_proj", Role::Value),
                    ("out_proj", Role::Output),
                ] {
                    out.push(LinearShape {
                        name: format!("{p}.{a}.{n}"),
                        inputs: d,
                        outputs: d,
                        role,
                    });
                }
            }
            out.push(LinearShape {
                name: format!("{p}.fc1"),
                inputs: d,
                outputs: f,
                role: Role::FeedForwardIn,
            });
            out.push(LinearShape {
                name: format!("{p}.fc2"),
                inputs: f,
                outputs: d,
                role: Role::FeedForwardOut,
            });
        }
    }
    out
}

/// Parameters as transformers counts them: the shared embedding once, positions, every projection
/// with its bias, every norm (weight and bias); `final_logits_bias` is a buffer, not a parameter.
pub fn parameter_count(cfg: &BartConfig) -> u64 {
    let linears: u64 = linear_shapes(cfg)
        .iter()
        .map(|l| (l.inputs * l.outputs + l.outputs) as u64)
        .sum();
    let (d, v) = (cfg.d_model as u64, cfg.vocab_size as u64);
    let (enc, dec) = (cfg.encoder_layers as u64, cfg.decoder_layers as u64);
    let positions = 2 * (cfg.max_position_embeddings as u64 + 2) * d;
    // Two norms per encoder layer, three per decoder layer, the embedding norms, mBART's final ones.
    let finals = if cfg.norms() == Norms::Pre { 2 } else { 0 };
    let norms = (2 * enc + 3 * dec + 2 + finals) * 2 * d;
    let head = if cfg.tie_word_embeddings { 0 } else { v * d };
    v * d + positions + linears + norms + head
}

impl Bart {
    /// Every Linear with its HF name (without `.weight`), for LoRA and merging.
    pub(super) fn named_linears(&mut self) -> Vec<(String, &mut Linear)> {
        let names = linear_shapes(&self.cfg);
        let mut refs: Vec<&mut Linear> = vec![];
        for stack in [&mut self.encoder, &mut self.decoder] {
            for l in stack.layers.iter_mut() {
                let a = &mut l.self_attn;
                refs.extend([&mut a.q, &mut a.k, &mut a.v, &mut a.o]);
                if let Some((c, _)) = &mut l.cross {
                    refs.extend([&mut c.q, &mut c.k, &mut c.v, &mut c.o]);
                }
                refs.push(&mut l.ffn.wi);
                refs.push(&mut l.ffn.wo);
            }
        }
        let mut out: Vec<(String, &mut Linear)> =
            names.into_iter().map(|l| l.name).zip(refs).collect();
        if let Some(h) = &mut self.lm_head {
            out.push(("lm_head".to_string(), h));
        }
        out
    }

    /// The weights besides the linear layers' (positions, norms), with their HF names.
    fn named_other_weights(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out: Vec<(String, &mut Tensor)> = vec![];
        for (name, stack) in [
            ("encoder", &mut self.encoder),
            ("decoder", &mut self.decoder),
        ] {
            let p = format!("model.{name}");
            out.push((format!("{p}.embed_positions.weight"), &mut stack.positions));
            let n = &mut stack.embed_norm;
            out.push((format!("{p}.layernorm_embedding.weight"), &mut n.weight));
            out.push((format!("{p}.layernorm_embedding.bias"), &mut n.bias));
            if let Some(n) = &mut stack.final_norm {
                out.push((format!("{p}.layer_norm.weight"), &mut n.weight));
                out.push((format!("{p}.layer_norm.bias"), &mut n.bias));
            }
            for (i, l) in stack.layers.iter_mut().enumerate() {
                let q = format!("{p}.layers.{i}");
                out.push((
                    format!("{q}.self_attn_layer_norm.weight"),
                    &mut l.self_norm.weight,
                ));
                out.push((
                    format!("{q}.self_attn_layer_norm.bias"),
                    &mut l.self_norm.bias,
                ));
                if let Some((_, n)) = &mut l.cross {
                    out.push((format!("{q}.encoder_attn_layer_norm.weight"), &mut n.weight));
                    out.push((format!("{q}.encoder_attn_layer_norm.bias"), &mut n.bias));
                }
                out.push((
                    format!("{q}.final_layer_norm.weight"),
                    &mut l.ffn_norm.weight,
                ));
                out.push((format!("{q}.final_layer_norm.bias"), &mut l.ffn_norm.bias));
            }
        }
        out
    }

    /// Every weight with its HF name (LoRA folded in), as `BartForConditionalGeneration` saves them.
    pub(super) fn weights_by_name(&mut self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for name in [
            "model.shared.weight",
            "model.encoder.embed_tokens.weight",
            "model.decoder.embed_tokens.weight",
        ] {
            out.insert(name.to_string(), self.shared.clone());
        }
        out.insert(
            "final_logits_bias".to_string(),
            self.final_logits_bias.to_dtype(self.dtype)?.unsqueeze(0)?,
        );
        for (name, lin) in self.named_linears() {
            out.insert(format!("{name}.weight"), lin.merged_weight()?);
            if let Some(b) = &lin.bias {
                out.insert(format!("{name}.bias"), b.clone());
            }
        }
        for (name, t) in self.named_other_weights() {
            out.insert(name, t.clone());
        }
        Ok(out)
    }

    /// Make every weight trainable (full fine-tuning); returns the variables by name.
    pub(super) fn trainable_weights(&mut self) -> Result<Vec<(String, Var)>> {
        let mut vars = vec![];
        let mut wrap = |name: String, t: &mut Tensor| -> Result<()> {
            let v = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
            *t = v.as_tensor().clone();
            vars.push((name, v));
            Ok(())
        };
        wrap("model.shared.weight".into(), &mut self.shared)?;
        for (name, t) in self.named_other_weights() {
            wrap(name, t)?;
        }
        for (name, lin) in self.named_linears() {
            wrap(format!("{name}.weight"), &mut lin.weight)?;
            if let Some(b) = &mut lin.bias {
                wrap(format!("{name}.bias"), b)?;
            }
        }
        Ok(vars)
    }
}

impl Architecture for BartConfig {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn parameter_count(&self) -> u64 {
        parameter_count(self)
    }

    fn linears(&self) -> Vec<LinearShape> {
        linear_shapes(self)
    }
}
