//! Which family reads which `model_type`. A new family is its folder under `src/model/` and one line
//! in [`FAMILIES`]; a `model_type` not listed is refused by name, never run as something close.

use serde_json::Value;

use super::config::ModelConfig;
use super::seq2seq::Seq2Seq;
use super::weights::Weights;
use super::{bart, t5};
use crate::error::{Error, Result};

/// A family's reader of its `config.json`.
type Parse = fn(&Value, &str) -> Result<ModelConfig>;
/// A family's network from checkpoint tensors, for a config its reader made.
type Build = fn(&ModelConfig, &Weights) -> Result<Box<dyn Seq2Seq>>;

/// `model_type` -> the family that implements it.
const FAMILIES: &[(&str, Parse, Build)] = &[
    ("t5", t5::parse_config, t5::build),
    ("mt5", t5::parse_config, t5::build),
    ("umt5", t5::parse_config, t5::build),
    ("bart", bart::parse_config, bart::build),
    ("mbart", bart::parse_config, bart::build),
    ("plbart", bart::parse_config, bart::build),
];

impl ModelConfig {
    /// Parse a `config.json` with the family its `model_type` names.
    pub fn from_json(text: &str, origin: &str) -> Result<ModelConfig> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::model(format!("{origin}: not a JSON config: {e}")))?;
        parse(&v, origin)
    }

    /// The network of this config, from checkpoint tensors.
    pub fn build(&self, w: &Weights) -> Result<Box<dyn Seq2Seq>> {
        match FAMILIES.iter().find(|(t, _, _)| *t == self.model_type) {
            Some((_, _, build)) => build(self, w),
            None => Err(Error::model(format!(
                "model_type `{}` is not supported; conala runs {}",
                self.model_type,
                supported()
            ))),
        }
    }
}

/// Families people try that conala knows and does not run, with the reason.
const REFUSED: &[(&str, &str)] = &[
    (
        "longt5",
        "LongT5's local and transient-global attention is not implemented (running it as a T5 would be silently wrong)",
    ),
    (
        "switch_transformers",
        "its mixture-of-experts feed-forward layers are not implemented",
    ),
];

/// The supported `model_type`s, for messages.
pub fn supported() -> String {
    FAMILIES
        .iter()
        .map(|(t, _, _)| *t)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The family config of a parsed `config.json`.
pub fn parse(v: &Value, origin: &str) -> Result<ModelConfig> {
    let model_type = match v.get("model_type").and_then(Value::as_str) {
        Some(t) => t.to_string(),
        // Configs written before `model_type` existed: T5's are recognisable by their keys.
        None if v.get("d_kv").is_some() && v.get("num_heads").is_some() => "t5".to_string(),
        None => {
            return Err(Error::model(format!(
                "{origin}: no `model_type`; conala runs {}",
                supported()
            )))
        }
    };
    if let Some((_, why)) = REFUSED.iter().find(|(t, _)| *t == model_type) {
        return Err(Error::model(format!(
            "{origin}: model_type `{model_type}` is not supported: {why}; conala runs {}",
            supported()
        )));
    }
    match FAMILIES.iter().find(|(t, _, _)| *t == model_type) {
        Some((_, parse, _)) => parse(v, origin),
        None => Err(Error::model(format!(
            "{origin}: model_type `{model_type}` is not supported (an encoder-decoder family conala does not implement, or not a seq2seq model); conala runs {}",
            supported()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_refused_families_are_named_with_the_supported_ones() {
        for (json, want) in [
            (
                r#"{"model_type": "gpt2"}"#,
                "model_type `gpt2` is not supported",
            ),
            (r#"{"model_type": "longt5", "d_kv": 64}"#, "LongT5's local"),
            (r#"{"vocab_size": 10}"#, "no `model_type`"),
        ] {
            let e = ModelConfig::from_json(json, "m/config.json")
                .unwrap_err()
                .to_string();
            assert!(e.contains("m/config.json") && e.contains(want), "{e}");
            assert!(e.contains("t5, mt5, umt5, bart, mbart, plbart"), "{e}");
        }
    }
}
