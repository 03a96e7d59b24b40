//! Random weights with transformers' T5 initialisation (`_init_weights`), by HF names.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::folder::write_model;
use crate::error::Result;
use crate::model::T5Config;
use crate::rng::Rng;

pub(crate) fn normal(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        // Box-Muller
        let u1 = rng.next_f64().max(1e-300);
        let u2 = rng.next_f64();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        out.push((r * t.cos() * std) as f32);
        if out.len() < n {
            out.push((r * t.sin() * std) as f32);
        }
    }
    out
}

struct Init {
    rng: Rng,
    factor: f64,
    out: BTreeMap<String, Tensor>,
}

impl Init {
    /// A tensor drawn from N(0, factor * scale), or filled with `factor` when `scale` is None (norms).
    fn put(&mut self, name: String, shape: &[usize], scale: Option<f64>) -> Result<()> {
        let n: usize = shape.iter().product();
        let data = match scale {
            Some(s) => normal(&mut self.rng, n, self.factor * s),
            None => vec![self.factor as f32; n],
        };
        self.out
            .insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        Ok(())
    }

    fn attention(&mut self, prefix: &str, cfg: &T5Config, with_bias: bool) -> Result<()> {
        let (d, dkv, h) = (cfg.d_model, cfg.d_kv, cfg.num_heads);
        let inner = h * dkv;
        self.put(
            format!("{prefix}.q.weight"),
            &[inner, d],
            Some(((d * dkv) as f64).powf(-0.5)),
        )?;
        self.put(
            format!("{prefix}.k.weight"),
            &[inner, d],
            Some((d as f64).powf(-0.5)),
        )?;
        self.put(
            format!("{prefix}.v.weight"),
            &[inner, d],
            Some((d as f64).powf(-0.5)),
        )?;
        self.put(
            format!("{prefix}.o.weight"),
            &[d, inner],
            Some((inner as f64).powf(-0.5)),
        )?;
        if with_bias {
            self.put(
                format!("{prefix}.relative_attention_bias.weight"),
                &[cfg.relative_attention_num_buckets, h],
                Some((d as f64).powf(-0.5)),
            )?;
        }
        Ok(())
    }
}

/// Random weights with transformers' T5 initialisation (`_init_weights`), HF names.
pub fn random_weights(cfg: &T5Config, seed: u64) -> Result<BTreeMap<String, Tensor>> {
    let (d, dff, v) = (cfg.d_model, cfg.d_ff, cfg.vocab_size);
    let gated = cfg.feed_forward()?.gated;
    let mut w = Init {
        rng: Rng::new(seed),
        factor: cfg.initializer_factor,
        out: BTreeMap::new(),
    };
    w.put("shared.weight".into(), &[v, d], Some(1.0))?;
    if !cfg.tie_word_embeddings {
        w.put("lm_head.weight".into(), &[v, d], Some(1.0))?;
    }
    for (stack, layers) in [
        ("encoder", cfg.num_layers),
        ("decoder", cfg.decoder_layers()),
    ] {
        for i in 0..layers {
            let p = format!("{stack}.block.{i}.layer");
            w.attention(&format!("{p}.0.SelfAttention"), cfg, i == 0)?;
            w.put(format!("{p}.0.layer_norm.weight"), &[d], None)?;
            let ff_layer = if stack == "decoder" {
                w.attention(&format!("{p}.1.EncDecAttention"), cfg, false)?;
                w.put(format!("{p}.1.layer_norm.weight"), &[d], None)?;
                2
            } else {
                1
            };
            let fp = format!("{p}.{ff_layer}.DenseReluDense");
            let d_scale = Some((d as f64).powf(-0.5));
            if gated {
                w.put(format!("{fp}.wi_0.weight"), &[dff, d], d_scale)?;
                w.put(format!("{fp}.wi_1.weight"), &[dff, d], d_scale)?;
            } else {
                w.put(format!("{fp}.wi.weight"), &[dff, d], d_scale)?;
            }
            w.put(
                format!("{fp}.wo.weight"),
                &[d, dff],
                Some((dff as f64).powf(-0.5)),
            )?;
            w.put(format!("{p}.{ff_layer}.layer_norm.weight"), &[d], None)?;
        }
        w.put(format!("{stack}.final_layer_norm.weight"), &[d], None)?;
    }
    Ok(w.out)
}

/// Write a random model folder: config.json, model.safetensors and the given tokenizer.json.
pub fn write_random_model(
    cfg: &T5Config,
    seed: u64,
    tokenizer_json: &Path,
    out: &Path,
) -> Result<()> {
    write_model(cfg, &random_weights(cfg, seed)?, tokenizer_json, out)
}

#[cfg(test)]
mod tests {
    use super::super::shapes::{config, Family, Size};
    use super::*;

    #[test]
    fn random_weights_have_hf_names_and_init_scale() {
        let cfg = config(Family::FlanT5, Size::Tiny, 50);
        let w = random_weights(&cfg, 1).unwrap();
        assert!(w.contains_key("lm_head.weight"));
        assert!(w.contains_key("decoder.block.1.layer.2.DenseReluDense.wi_1.weight"));
        assert!(
            w.contains_key("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        );
        assert!(
            !w.contains_key("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight")
        );
        let s: Vec<f32> = w["shared.weight"].flatten_all().unwrap().to_vec1().unwrap();
        let var = s.iter().map(|x| (x * x) as f64).sum::<f64>() / s.len() as f64;
        assert!((var - 1.0).abs() < 0.15, "{var}");
        let again = random_weights(&cfg, 1).unwrap();
        let a: Vec<f32> = again["shared.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(s, a);
    }
}
