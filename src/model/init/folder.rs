//! A model folder as HF writes one: config.json, model.safetensors, tokenizer.json and the
//! tokenizer_config.json that makes `AutoTokenizer` read tokenizer.json as it is.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;

use super::shapes::config_json;
use crate::error::{Error, Result};
use crate::model::weights::{save_safetensors, CONFIG, SAFETENSORS, TOKENIZER};
use crate::model::T5Config;

/// Write a T5 model folder from weights with HF names: config.json, model.safetensors,
/// tokenizer.json.
pub fn write_model(
    cfg: &T5Config,
    weights: &BTreeMap<String, Tensor>,
    tokenizer_json: &Path,
    out: &Path,
) -> Result<()> {
    write_folder(&config_json(cfg), weights, tokenizer_json, out)
}

/// Write a model folder of any family: its config.json as given, the weights, the tokenizer.
pub fn write_folder(
    config_json: &serde_json::Value,
    weights: &BTreeMap<String, Tensor>,
    tokenizer_json: &Path,
    out: &Path,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out.display(), e))?;
    save_safetensors(weights, &out.join(SAFETENSORS))?;
    let text =
        serde_json::to_string_pretty(config_json).map_err(|e| Error::model(e.to_string()))?;
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
