//! Byte-level BPE from `vocab.json` + `merges.txt` (CodeT5, BART and RoBERTa repos without a
//! tokenizer.json), built as transformers 5's `RobertaTokenizer` (which `BartTokenizer` is) builds it:
//! the BPE model with no unknown token, byte-level pre-tokenization and decoding, `<s> … </s>` around
//! every sequence (`RobertaProcessing`), the special tokens as added tokens, plus `added_tokens.json`.
//! `tokenizer_config.json` / `special_tokens_map.json` may rename the special tokens and set
//! `add_prefix_space`.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Error, Result};

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path.display(), e))
}

fn bad(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{}: {why}", path.display()))
}

/// A token setting: `"<s>"` or `{"content": "<s>", ...}` (as tokenizer_config.json writes them).
fn token_name(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// The tokenizer.json of a byte-level BPE folder. `config` is tokenizer_config.json and
/// special_tokens_map.json merged (the map's names win).
pub fn roberta_tokenizer_json(
    vocab_path: &Path,
    merges_path: &Path,
    added_path: Option<&Path>,
    config: &Value,
) -> Result<Value> {
    let vocab: BTreeMap<String, u32> = serde_json::from_str(&read(vocab_path)?).map_err(|e| {
        bad(
            vocab_path,
            format!("not a BPE vocabulary (token -> id): {e}"),
        )
    })?;
    let merges: Vec<Value> = read(merges_path)?
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .map(|l| {
            let mut parts = l.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => Ok(json!([a, b])),
                _ => Err(bad(merges_path, format!("not a merge (two tokens): `{l}`"))),
            }
        })
        .collect::<Result<_>>()?;
    let mut added_extra: BTreeMap<String, u32> = BTreeMap::new();
    if let Some(p) = added_path {
        added_extra = serde_json::from_str(&read(p)?)
            .map_err(|e| bad(p, format!("not a map of added tokens to ids: {e}")))?;
    }
    let name = |key: &str, default: &str| {
        config
            .get(key)
            .and_then(token_name)
            .unwrap_or_else(|| default.to_string())
    };
    let id = |token: &str| -> Result<u32> {
        vocab
            .get(token)
            .or_else(|| added_extra.get(token))
            .copied()
            .ok_or_else(|| bad(vocab_path, format!("no id for the special token `{token}`")))
    };
    let (bos, eos, sep, cls, unk, pad, mask) = (
        name("bos_token", "<s>"),
        name("eos_token", "</s>"),
        name("sep_token", "</s>"),
        name("cls_token", "<s>"),
        name("unk_token", "<unk>"),
        name("pad_token", "<pad>"),
        name("mask_token", "<mask>"),
    );
    let prefix = config
        .get("add_prefix_space")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let trim = config
        .get("trim_offsets")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    // The special tokens (those the vocabulary has), then added_tokens.json's, by id.
    let mut added: BTreeMap<u32, Value> = BTreeMap::new();
    for t in [&bos, &eos, &sep, &cls, &unk, &pad, &mask] {
        if let Ok(i) = id(t) {
            added.insert(
                i,
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true}),
            );
        }
    }
    for (t, &i) in &added_extra {
        added.entry(i).or_insert_with(|| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": true, "special": false})
        });
    }
    let byte_level = |space: bool| json!({"type": "ByteLevel", "add_prefix_space": space, "trim_offsets": true, "use_regex": true});
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added.into_values().collect::<Vec<_>>(),
        "normalizer": null,
        "pre_tokenizer": byte_level(prefix),
        "post_processor": {
            "type": "RobertaProcessing",
            "sep": [sep, id(&sep)?],
            "cls": [cls, id(&cls)?],
            "trim_offsets": trim,
            "add_prefix_space": prefix
        },
        "decoder": byte_level(true),
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    }))
}
