//! The model's weights by their HF names: every Linear (for LoRA and merging), the state dict a
//! checkpoint stores, and the variables of full fine-tuning.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};

use super::T5;
use crate::error::Result;
use crate::model::layers::Linear;

impl T5 {
    /// Every Linear with its HF name (without `.weight`), for LoRA and merging.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out: Vec<(String, &mut Linear)> = vec![];
        for (stack_name, stack) in [
            ("encoder", &mut self.encoder),
            ("decoder", &mut self.decoder),
        ] {
            for (i, b) in stack.blocks.iter_mut().enumerate() {
                let p = format!("{stack_name}.block.{i}.layer");
                let ff_layer = if b.cross.is_some() { 2 } else { 1 };
                let a = &mut b.self_attn;
                out.push((format!("{p}.0.SelfAttention.q"), &mut a.q));
                out.push((format!("{p}.0.SelfAttention.k"), &mut a.k));
                out.push((format!("{p}.0.SelfAttention.v"), &mut a.v));
                out.push((format!("{p}.0.SelfAttention.o"), &mut a.o));
                if let Some((c, _)) = &mut b.cross {
                    out.push((format!("{p}.1.EncDecAttention.q"), &mut c.q));
                    out.push((format!("{p}.1.EncDecAttention.k"), &mut c.k));
                    out.push((format!("{p}.1.EncDecAttention.v"), &mut c.v));
                    out.push((format!("{p}.1.EncDecAttention.o"), &mut c.o));
                }
                let f = &mut b.ffn;
                let gated = f.wi_1.is_some();
                out.push((
                    format!(
                        "{p}.{ff_layer}.DenseReluDense.{}",
                        if gated { "wi_0" } else { "wi" }
                    ),
                    &mut f.wi,
                ));
                if let Some(w1) = &mut f.wi_1 {
                    out.push((format!("{p}.{ff_layer}.DenseReluDense.wi_1"), w1));
                }
                out.push((format!("{p}.{ff_layer}.DenseReluDense.wo"), &mut f.wo));
            }
        }
        if let Some(h) = &mut self.lm_head {
            out.push(("lm_head".to_string(), h));
        }
        out
    }

    /// Every weight tensor with its HF name (LoRA folded in), as a checkpoint stores them.
    pub fn state_dict(&mut self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        out.insert("shared.weight".to_string(), self.shared.clone());
        out.insert(
            "encoder.embed_tokens.weight".to_string(),
            self.shared.clone(),
        );
        out.insert(
            "decoder.embed_tokens.weight".to_string(),
            self.shared.clone(),
        );
        for (name, lin) in self.linears_mut() {
            out.insert(format!("{name}.weight"), lin.merged_weight()?);
        }
        for (stack_name, stack) in [("encoder", &self.encoder), ("decoder", &self.decoder)] {
            for (i, b) in stack.blocks.iter().enumerate() {
                let p = format!("{stack_name}.block.{i}.layer");
                let ff_layer = if b.cross.is_some() { 2 } else { 1 };
                out.insert(
                    format!("{p}.0.layer_norm.weight"),
                    b.self_norm.weight.clone(),
                );
                if let Some((_, n)) = &b.cross {
                    out.insert(format!("{p}.1.layer_norm.weight"), n.weight.clone());
                }
                out.insert(
                    format!("{p}.{ff_layer}.layer_norm.weight"),
                    b.ffn_norm.weight.clone(),
                );
            }
            out.insert(
                format!("{stack_name}.final_layer_norm.weight"),
                stack.final_norm.weight.clone(),
            );
            out.insert(
                format!(
                    "{stack_name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
                ),
                stack.bias.weight.clone(),
            );
        }
        Ok(out)
    }

    /// Make every weight trainable (full fine-tuning); returns the variables by name.
    pub fn make_all_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        let mut vars = vec![];
        let mut wrap = |name: String, t: &mut Tensor| -> Result<()> {
            let v = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
            *t = v.as_tensor().clone();
            vars.push((name, v));
            Ok(())
        };
        wrap("shared.weight".into(), &mut self.shared)?;
        for (stack_name, stack) in [
            ("encoder", &mut self.encoder),
            ("decoder", &mut self.decoder),
        ] {
            wrap(
                format!(
                    "{stack_name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
                ),
                &mut stack.bias.weight,
            )?;
            wrap(
                format!("{stack_name}.final_layer_norm.weight"),
                &mut stack.final_norm.weight,
            )?;
            for (i, b) in stack.blocks.iter_mut().enumerate() {
                let p = format!("{stack_name}.block.{i}.layer");
                let ff_layer = if b.cross.is_some() { 2 } else { 1 };
                wrap(format!("{p}.0.layer_norm.weight"), &mut b.self_norm.weight)?;
                if let Some((_, n)) = &mut b.cross {
                    wrap(format!("{p}.1.layer_norm.weight"), &mut n.weight)?;
                }
                wrap(
                    format!("{p}.{ff_layer}.layer_norm.weight"),
                    &mut b.ffn_norm.weight,
                )?;
            }
        }
        for (name, lin) in self.linears_mut() {
            wrap(format!("{name}.weight"), &mut lin.weight)?;
        }
        Ok(vars)
    }
}
