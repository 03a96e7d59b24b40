//! The shapes of new models: a family's feed-forward and embeddings at a size, as HF config.json.

use serde::{Deserialize, Serialize};

use crate::model::T5Config;

/// A family of new models: T5's by their feed-forward and output layer, and BART.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    /// Original T5: ReLU feed-forward, tied embeddings.
    #[serde(rename = "t5")]
    T5,
    /// T5 v1.1 / Flan-T5: gated-GELU, untied output layer.
    #[serde(rename = "flan-t5", alias = "flan_t5", alias = "t5-v1.1")]
    FlanT5,
    /// UL2-style: gated-SiLU, untied output layer.
    #[serde(rename = "ul2")]
    Ul2,
    /// BART (facebook/bart-base's layout; random only, see `init/bart.rs`).
    #[serde(rename = "bart")]
    Bart,
}
crate::named_setting!(Family);

/// How big a new model is (hand-picked shapes; `small` and `base` follow the published models).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    /// 64-wide, 2 layers: tests and benchmarks of the machinery.
    Tiny,
    /// 128-wide, 3 layers: trainable from scratch in minutes on a CPU.
    Mini,
    Small,
    Base,
}
crate::named_setting!(Size);

/// The config of a T5 family at a size, with the vocabulary size of its tokenizer (BART's is
/// `init/bart.rs`'s `config_json`; asked here, it gets flan-t5's).
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
        Family::FlanT5 | Family::Bart => ("gated-gelu", false),
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
}
