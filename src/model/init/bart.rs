//! New BART models: a config in a size's shape for a tokenizer's special tokens, and random weights
//! with transformers' BART initialisation (`_init_weights`: N(0, init_std) for linear and embedding
//! weights, the padding row of the embedding zero, biases zero, norms one), by HF names.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use super::random::normal;
use super::shapes::Size;
use crate::error::Result;
use crate::rng::Rng;

/// transformers' `init_std` for BART.
const INIT_STD: f64 = 0.02;

/// The sizes of a BART: d_model, layers per stack, heads, feed-forward width. `base` is
/// facebook/bart-base's shape.
fn dims(size: Size) -> (usize, usize, usize, usize) {
    match size {
        Size::Tiny => (64, 2, 4, 128),
        Size::Mini => (128, 3, 4, 512),
        Size::Small => (512, 6, 8, 2048),
        Size::Base => (768, 6, 12, 3072),
    }
}

/// config.json of a BART of `size` for a tokenizer of `vocab` tokens whose pad and end-of-sequence
/// ids are `pad` and `eos`: decoding starts from `</s>` and ends on it at the length limit, as BART's
/// own configs say (no `<s>` is forced: a tokenizer without one, like the shipped one, has none).
pub fn config_json(size: Size, vocab: usize, pad: u32, eos: u32) -> Value {
    let (d, layers, heads, ffn) = dims(size);
    json!({
        "architectures": ["BartForConditionalGeneration"],
        "model_type": "bart",
        "vocab_size": vocab,
        "d_model": d,
        "encoder_layers": layers,
        "decoder_layers": layers,
        "encoder_attention_heads": heads,
        "decoder_attention_heads": heads,
        "encoder_ffn_dim": ffn,
        "decoder_ffn_dim": ffn,
        "max_position_embeddings": 1024,
        "activation_function": "gelu",
        "dropout": 0.1,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "init_std": INIT_STD,
        "scale_embedding": false,
        "tie_word_embeddings": true,
        "is_encoder_decoder": true,
        "pad_token_id": pad,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "decoder_start_token_id": eos,
        "forced_eos_token_id": eos,
    })
}

/// Random weights for a BART of `config_json`, by HF names.
pub fn random_weights(config_json: &Value, seed: u64) -> Result<BTreeMap<String, Tensor>> {
    let n = |k: &str| config_json[k].as_u64().unwrap_or(0) as usize;
    let (v, d, layers, ffn) = (
        n("vocab_size"),
        n("d_model"),
        n("encoder_layers"),
        n("encoder_ffn_dim"),
    );
    let positions = n("max_position_embeddings") + 2;
    let pad = n("pad_token_id");
    let mut rng = Rng::new(seed);
    let mut out = BTreeMap::new();
    let mut put = |name: String, shape: &[usize], fill: Option<f32>, rng: &mut Rng| -> Result<()> {
        let count: usize = shape.iter().product();
        let data = match fill {
            Some(x) => vec![x; count],
            None => normal(rng, count, INIT_STD),
        };
        out.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        Ok(())
    };
    let mut shared = normal(&mut rng, v * d, INIT_STD);
    shared[pad * d..(pad + 1) * d].fill(0.0);
    for stack in ["encoder", "decoder"] {
        let p = format!("model.{stack}");
        put(
            format!("{p}.embed_positions.weight"),
            &[positions, d],
            None,
            &mut rng,
        )?;
        put(
            format!("{p}.layernorm_embedding.weight"),
            &[d],
            Some(1.0),
            &mut rng,
        )?;
        put(
            format!("{p}.layernorm_embedding.bias"),
            &[d],
            Some(0.0),
            &mut rng,
        )?;
        for i in 0..layers {
            let q = format!("{p}.layers.{i}");
            let attentions: &[&str] = if stack == "decoder" {
                &["self_attn", "encoder_attn"]
            } else {
                &["self_attn"]
            };
            for a in attentions {
                for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                    put(format!("{q}.{a}.{proj}.weight"), &[d, d], None, &mut rng)?;
                    put(format!("{q}.{a}.{proj}.bias"), &[d], Some(0.0), &mut rng)?;
                }
                let norm = if *a == "self_attn" {
                    "self_attn_layer_norm"
                } else {
                    "encoder_attn_layer_norm"
                };
                put(format!("{q}.{norm}.weight"), &[d], Some(1.0), &mut rng)?;
                put(format!("{q}.{norm}.bias"), &[d], Some(0.0), &mut rng)?;
            }
            put(format!("{q}.fc1.weight"), &[ffn, d], None, &mut rng)?;
            put(format!("{q}.fc1.bias"), &[ffn], Some(0.0), &mut rng)?;
            put(format!("{q}.fc2.weight"), &[d, ffn], None, &mut rng)?;
            put(format!("{q}.fc2.bias"), &[d], Some(0.0), &mut rng)?;
            put(
                format!("{q}.final_layer_norm.weight"),
                &[d],
                Some(1.0),
                &mut rng,
            )?;
            put(
                format!("{q}.final_layer_norm.bias"),
                &[d],
                Some(0.0),
                &mut rng,
            )?;
        }
    }
    put("final_logits_bias".into(), &[1, v], Some(0.0), &mut rng)?;
    out.insert(
        "model.shared.weight".into(),
        Tensor::from_vec(shared, (v, d), &Device::Cpu)?,
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ModelConfig;
    use crate::model::weights::{save_safetensors, Weights};

    /// A random BART loads through the seam, its parameters as HF counts them, its pad row zero.
    #[test]
    fn random_bart_loads_with_hf_names() {
        let cfg = config_json(Size::Tiny, 100, 0, 1);
        let w = random_weights(&cfg, 3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        save_safetensors(&w, &path).unwrap();
        let mc = ModelConfig::from_json(&cfg.to_string(), "bart").unwrap();
        let weights =
            Weights::open(&[path], "bart", &Device::Cpu, candle_core::DType::F32).unwrap();
        let model = mc.build(&weights).unwrap();
        assert_eq!(model.config().tokens.decoder_start, 1);
        let params: u64 = w
            .iter()
            .filter(|(n, _)| *n != "final_logits_bias")
            .map(|(_, t)| t.elem_count() as u64)
            .sum();
        assert_eq!(mc.parameter_count(), params);
        let pad_row: Vec<f32> = w["model.shared.weight"].get(0).unwrap().to_vec1().unwrap();
        assert!(pad_row.iter().all(|x| *x == 0.0));
    }
}
