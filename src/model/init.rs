//! `conala model init`: a randomly initialised T5-family model written as a Hugging Face folder
//! (config.json, model.safetensors, tokenizer.json) that transformers loads as it is. Used by tests,
//! benchmarks and the offline default run.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::config::T5Config;
use super::weights::{save_safetensors, CONFIG, SAFETENSORS, TOKENIZER};
use crate::error::{Error, Result};
use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Family {
    /// Original T5: ReLU feed-forward, tied embeddings.
    T5,
    /// T5 v1.1 / Flan-T5: gated-GELU, untied output layer.
    FlanT5,
    /// UL2-style: gated-SiLU, untied output layer.
    Ul2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Size {
    /// 64-wide, 2 layers: tests and benchmarks of the machinery.
    Tiny,
    /// 128-wide, 3 layers: the offline default, trainable from scratch in minutes on a CPU.
    Mini,
    Small,
    Base,
}

impl Family {
    pub fn parse(s: &str) -> Option<Family> {
        match s {
            "t5" => Some(Family::T5),
            "flan-t5" | "flan_t5" | "t5-v1.1" => Some(Family::FlanT5),
            "ul2" => Some(Family::Ul2),
            _ => None,
        }
    }
}

impl Size {
    pub fn parse(s: &str) -> Option<Size> {
        match s {
            "tiny" => Some(Size::Tiny),
            "mini" => Some(Size::Mini),
            "small" => Some(Size::Small),
            "base" => Some(Size::Base),
            _ => None,
        }
    }
}

/// Create the model a plan's `model.init` describes at `path`, unless it exists.
pub fn materialize(path: &Path, init: &crate::plans::spec::InitSpec) -> Result<()> {
    if path.join(CONFIG).is_file() {
        return Ok(());
    }
    let family = Family::parse(&init.family).ok_or_else(|| {
        Error::model(format!(
            "model.init.family `{}`: expected t5, flan-t5 or ul2",
            init.family
        ))
    })?;
    let size = Size::parse(&init.size).ok_or_else(|| {
        Error::model(format!(
            "model.init.size `{}`: expected tiny, mini, small or base",
            init.size
        ))
    })?;
    let prior = Prior::parse(&init.prior).ok_or_else(|| {
        Error::model(format!(
            "model.init.prior `{}`: expected random or copy",
            init.prior
        ))
    })?;
    log::info!(
        "creating a {} {} model at {}",
        init.family,
        prior.describe(size),
        path.display()
    );
    write_new_model(
        family,
        size,
        prior,
        Path::new(&init.tokenizer),
        init.seed,
        path,
    )?;
    Ok(())
}

/// How a new model's weights start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prior {
    /// transformers' T5 initialisation, in the family's shape at the given size.
    Random,
    /// Hand-set weights that copy the input ([`super::copy_prior`]), in the prior's own shape.
    Copy,
}

impl Prior {
    pub fn parse(s: &str) -> Option<Prior> {
        match s {
            "random" => Some(Prior::Random),
            "copy" => Some(Prior::Copy),
            _ => None,
        }
    }

    /// For messages: `random Mini`, `copy-prior`.
    pub fn describe(self, size: Size) -> String {
        match self {
            Prior::Random => format!("random {size:?}"),
            Prior::Copy => "copy-prior".to_string(),
        }
    }
}

/// Write a new model folder (`size` applies to the random prior only) with the vocabulary of
/// `tokenizer_json`; returns its config. What `model.init` and `conala model init` make.
pub fn write_new_model(
    family: Family,
    size: Size,
    prior: Prior,
    tokenizer_json: &Path,
    seed: u64,
    out: &Path,
) -> Result<T5Config> {
    let vocab = crate::tokenizer::load(tokenizer_json)?.get_vocab_size(true);
    let (cfg, weights) = match prior {
        Prior::Random => {
            let cfg = config(family, size, vocab);
            let w = random_weights(&cfg, seed)?;
            (cfg, w)
        }
        Prior::Copy => {
            let cfg = super::copy_prior::config(family, vocab)?;
            let w = super::copy_prior::weights(&cfg, seed)?;
            (cfg, w)
        }
    };
    write_model(&cfg, &weights, tokenizer_json, out)?;
    Ok(cfg)
}

/// The config of a family at a size, with the vocabulary size of its tokenizer.
pub fn config(family: Family, size: Size, vocab_size: usize) -> T5Config {
    // (d_model, d_kv, d_ff, layers, heads)
    let (d_model, d_kv, d_ff, layers, heads) = match (family, size) {
        (_, Size::Tiny) => (64, 16, 128, 2, 4),
        (_, Size::Mini) => (128, 32, 512, 3, 4),
        (Family::T5, Size::Small) => (512, 64, 2048, 6, 8),
        (Family::T5, Size::Base) => (768, 64, 3072, 12, 12),
        (_, Size::Small) => (512, 64, 1024, 8, 6),
        (_, Size::Base) => (768, 64, 2048, 12, 12),
    };
    let (ff, tied) = match family {
        Family::T5 => ("relu", true),
        Family::FlanT5 => ("gated-gelu", false),
        Family::Ul2 => ("gated-silu", false),
    };
    T5Config {
        vocab_size,
        d_model,
        d_kv,
        d_ff,
        num_layers: layers,
        num_decoder_layers: Some(layers),
        num_heads: heads,
        relative_attention_num_buckets: 32,
        relative_attention_max_distance: 128,
        dropout_rate: 0.1,
        layer_norm_epsilon: 1e-6,
        initializer_factor: 1.0,
        feed_forward_proj: ff.to_string(),
        tie_word_embeddings: tied,
        pad_token_id: 0,
        eos_token_id: 1,
        decoder_start_token_id: Some(0),
        model_type: Some("t5".to_string()),
        scale_decoder_outputs: None,
    }
}

/// config.json as transformers writes it for T5ForConditionalGeneration.
pub fn config_json(cfg: &T5Config) -> serde_json::Value {
    let mut v = serde_json::to_value(cfg).unwrap_or_default();
    let m = v.as_object_mut().expect("object");
    let gated = cfg.feed_forward_proj.starts_with("gated-");
    let act = cfg.feed_forward_proj.trim_start_matches("gated-");
    m.insert(
        "architectures".into(),
        serde_json::json!(["T5ForConditionalGeneration"]),
    );
    m.insert("is_encoder_decoder".into(), true.into());
    m.insert("is_gated_act".into(), gated.into());
    m.insert(
        "dense_act_fn".into(),
        (if cfg.feed_forward_proj == "gated-gelu" {
            "gelu_new"
        } else {
            act
        })
        .into(),
    );
    m.insert("use_cache".into(), true.into());
    m.insert("n_positions".into(), 512.into());
    v
}

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

/// Write a model folder from weights with HF names: config.json, model.safetensors, tokenizer.json.
pub fn write_model(
    cfg: &T5Config,
    weights: &BTreeMap<String, Tensor>,
    tokenizer_json: &Path,
    out: &Path,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out.display(), e))?;
    save_safetensors(weights, &out.join(SAFETENSORS))?;
    let text =
        serde_json::to_string_pretty(&config_json(cfg)).map_err(|e| Error::model(e.to_string()))?;
    std::fs::write(out.join(CONFIG), text).map_err(|e| Error::io(out.join(CONFIG).display(), e))?;
    std::fs::copy(tokenizer_json, out.join(TOKENIZER))
        .map_err(|e| Error::io(tokenizer_json.display(), e))?;
    write_tokenizer_config(out)
}

/// tokenizer_config.json so `AutoTokenizer` loads tokenizer.json as it is (a plain fast tokenizer;
/// T5's own class would add 100 `<extra_id_*>` tokens the model does not have).
pub fn write_tokenizer_config(out: &Path) -> Result<()> {
    let cfg = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<pad>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 512
    });
    let p = out.join("tokenizer_config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).unwrap_or_default())
        .map_err(|e| Error::io(p.display(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_per_family() {
        let t5 = config(Family::T5, Size::Small, 8000);
        assert!(t5.tie_word_embeddings && t5.feed_forward_proj == "relu" && t5.num_layers == 6);
        let flan = config(Family::FlanT5, Size::Small, 8000);
        assert!(
            !flan.tie_word_embeddings
                && flan.feed_forward_proj == "gated-gelu"
                && flan.d_ff == 1024
        );
        assert_eq!(
            config(Family::Ul2, Size::Tiny, 100).feed_forward_proj,
            "gated-silu"
        );
        let j = config_json(&flan);
        assert_eq!(j["dense_act_fn"], "gelu_new");
        assert_eq!(j["is_gated_act"], true);
        assert_eq!(j["tie_word_embeddings"], false);
    }

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
