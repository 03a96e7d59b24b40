//! The T5's weights by their HF names: every Linear (for LoRA and merging), the state dict a
//! checkpoint stores, the variables of full fine-tuning, and the parameter count.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};

use super::{T5Config, T5};
use crate::error::Result;
use crate::model::config::{LinearShape, Role};
use crate::model::layers::Linear;

/// Every Linear's HF module name and shape but the output layer's, in the order
/// [`T5::named_linears`] yields them.
pub fn linear_shapes(cfg: &T5Config) -> Vec<LinearShape> {
    let (d, inner, f) = (cfg.d_model, cfg.inner_dim(), cfg.d_ff);
    let gated = cfg.feed_forward().is_ok_and(|k| k.gated);
    let mut out = vec![];
    let mut push = |name: String, inputs: usize, outputs: usize, role: Role| {
        out.push(LinearShape {
            name,
            inputs,
            outputs,
            role,
        })
    };
    for (stack, layers, decoder) in [
        ("encoder", cfg.num_layers, false),
        ("decoder", cfg.decoder_layers(), true),
    ] {
        for i in 0..layers {
            let p = format!("{stack}.block.{i}.layer");
            for part in ["0.SelfAttention", "1.EncDecAttention"] {
                if part.starts_with('1') && !decoder {
                    continue;
                }
                for (n, inp, o, role) in [
                    ("q", d, inner, Role::Query),
                    ("k", d, inner, Role::Key),
                    ("v", d, inner, Role::Value),
                    ("o", inner, d, Role::Output),
                ] {
                    push(format!("{p}.{part}.{n}"), inp, o, role);
                }
            }
            let ff = format!("{p}.{}.DenseReluDense", if decoder { 2 } else { 1 });
            if gated {
                push(format!("{ff}.wi_0"), d, f, Role::FeedForwardIn);
                push(format!("{ff}.wi_1"), d, f, Role::FeedForwardIn);
            } else {
                push(format!("{ff}.wi"), d, f, Role::FeedForwardIn);
            }
            push(format!("{ff}.wo"), f, d, Role::FeedForwardOut);
        }
    }
    out
}

/// Parameters of a T5 of `cfg` as transformers counts them (embeddings once; the output layer when
/// untied; one position bias per stack, or per block in umT5).
pub fn parameter_count(cfg: &T5Config) -> u64 {
    let linears: u64 = linear_shapes(cfg)
        .iter()
        .map(|l| (l.inputs * l.outputs) as u64)
        .sum();
    let (d, v) = (cfg.d_model as u64, cfg.vocab_size as u64);
    let (enc, dec) = (cfg.num_layers as u64, cfg.decoder_layers() as u64);
    let bias = cfg.relative_attention_num_buckets as u64 * cfg.num_heads as u64;
    let biases = if cfg.per_layer_position_bias() {
        (enc + dec) * bias
    } else {
        2 * bias
    };
    // Norms: two per encoder block, three per decoder block, a final one per stack.
    let norms = (2 * enc + 3 * dec + 2) * d;
    let head = if cfg.tie_word_embeddings { 0 } else { v * d };
    v * d + linears + biases + norms + head
}

impl T5 {
    /// Every Linear with its HF name (without `.weight`), for LoRA and merging.
    pub(super) fn named_linears(&mut self) -> Vec<(String, &mut Linear)> {
        let names = linear_shapes(&self.cfg);
        let mut refs: Vec<&mut Linear> = vec![];
        for stack in [&mut self.encoder, &mut self.decoder] {
            for b in stack.blocks.iter_mut() {
                let a = &mut b.self_attn;
                refs.extend([&mut a.q, &mut a.k, &mut a.v, &mut a.o]);
                if let Some((c, _)) = &mut b.cross {
                    refs.extend([&mut c.q, &mut c.k, &mut c.v, &mut c.o]);
                }
                let f = &mut b.ffn;
                refs.push(&mut f.wi);
                if let Some(w1) = &mut f.wi_1 {
                    refs.push(w1);
                }
                refs.push(&mut f.wo);
            }
        }
        let mut out: Vec<(String, &mut Linear)> =
            names.into_iter().map(|l| l.name).zip(refs).collect();
        if let Some(h) = &mut self.lm_head {
            out.push(("lm_head".to_string(), h));
        }
        out
    }

    /// The norms and position biases with their HF names.
    fn named_other_weights(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out: Vec<(String, &mut Tensor)> = vec![];
        for (stack_name, stack) in [
            ("encoder", &mut self.encoder),
            ("decoder", &mut self.decoder),
        ] {
            for (i, b) in stack.biases.iter_mut().enumerate() {
                out.push((
                    format!("{stack_name}.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"),
                    &mut b.weight,
                ));
            }
            out.push((
                format!("{stack_name}.final_layer_norm.weight"),
                &mut stack.final_norm.weight,
            ));
            for (i, b) in stack.blocks.iter_mut().enumerate() {
                let p = format!("{stack_name}.block.{i}.layer");
                let ff_layer = if b.cross.is_some() { 2 } else { 1 };
                out.push((format!("{p}.0.layer_norm.weight"), &mut b.self_norm.weight));
                if let Some((_, n)) = &mut b.cross {
                    out.push((format!("{p}.1.layer_norm.weight"), &mut n.weight));
                }
                out.push((
                    format!("{p}.{ff_layer}.layer_norm.weight"),
                    &mut b.ffn_norm.weight,
                ));
            }
        }
        out
    }

    /// Every weight tensor with its HF name (LoRA folded in), as a checkpoint stores them.
    pub(super) fn weights_by_name(&mut self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for name in [
            "shared.weight",
            "encoder.embed_tokens.weight",
            "decoder.embed_tokens.weight",
        ] {
            out.insert(name.to_string(), self.shared.clone());
        }
        for (name, lin) in self.named_linears() {
            out.insert(format!("{name}.weight"), lin.merged_weight()?);
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
        wrap("shared.weight".into(), &mut self.shared)?;
        for (name, t) in self.named_other_weights() {
            wrap(name, t)?;
        }
        for (name, lin) in self.named_linears() {
            wrap(format!("{name}.weight"), &mut lin.weight)?;
        }
        Ok(vars)
    }
}
