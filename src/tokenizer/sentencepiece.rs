//! SentencePiece models (`spiece.model`, as older T5 and UL2 repos ship them) turned into a
//! `tokenizers` tokenizer as transformers 5 builds its `T5Tokenizer` from one: the pieces and their
//! scores as a Unigram model (`<unk>` at id 2), 100 `<extra_id_N>` sentinels appended in reverse
//! order, the model's precompiled normalization (`Precompiled`), whitespace split with a `▁`
//! prefix (`Metaspace`, prepend "always"), and `</s>` appended to every sequence. The protobuf is
//! read by hand: the handful of fields this needs.

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// A piece's kind, as `sentencepiece_model.proto` numbers them.
const UNKNOWN: u64 = 2;
const CONTROL: u64 = 3;
const UNIGRAM: u64 = 1;

/// What the conversion reads of a `ModelProto`.
#[derive(Debug, Default)]
pub struct SpModel {
    /// (piece, score, type)
    pub pieces: Vec<(String, f32, u64)>,
    pub model_type: u64,
    pub byte_fallback: bool,
    pub precompiled_charsmap: Vec<u8>,
}

/// A protobuf reader over one message's bytes.
struct Proto<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Proto<'a> {
    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.data.get(self.pos).ok_or("truncated")?;
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("a varint longer than 10 bytes".into())
    }

    fn bytes(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or("truncated")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// The next field: (number, wire type, its value as a varint or bytes).
    fn field(&mut self) -> std::result::Result<Option<(u64, Field<'a>)>, String> {
        if self.pos >= self.data.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => Field::Bytes(self.bytes(8)?),
            2 => {
                let n = self.varint()? as usize;
                Field::Bytes(self.bytes(n)?)
            }
            5 => Field::Bytes(self.bytes(4)?),
            w => return Err(format!("unsupported wire type {w}")),
        };
        Ok(Some((key >> 3, value)))
    }
}

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

impl SpModel {
    pub fn parse(data: &[u8], origin: &str) -> Result<SpModel> {
        Self::read(data)
            .map_err(|e| Error::Tokenizer(format!("{origin}: not a SentencePiece model ({e})")))
    }

    fn read(data: &[u8]) -> std::result::Result<SpModel, String> {
        let mut m = SpModel {
            model_type: UNIGRAM,
            ..Default::default()
        };
        let mut p = Proto { data, pos: 0 };
        while let Some((n, f)) = p.field()? {
            let Field::Bytes(b) = f else { continue };
            let mut sub = Proto { data: b, pos: 0 };
            match n {
                1 => {
                    let (mut piece, mut score, mut kind) = (String::new(), 0f32, 1u64);
                    while let Some((k, v)) = sub.field()? {
                        match (k, v) {
                            (1, Field::Bytes(s)) => {
                                piece = String::from_utf8(s.to_vec())
                                    .map_err(|_| "a piece that is not UTF-8")?
                            }
                            (2, Field::Bytes(s)) if s.len() == 4 => {
                                score = f32::from_le_bytes([s[0], s[1], s[2], s[3]])
                            }
                            (3, Field::Varint(t)) => kind = t,
                            _ => {}
                        }
                    }
                    m.pieces.push((piece, score, kind));
                }
                2 => {
                    while let Some((k, v)) = sub.field()? {
                        match (k, v) {
                            (3, Field::Varint(t)) => m.model_type = t,
                            (35, Field::Varint(b)) => m.byte_fallback = b != 0,
                            _ => {}
                        }
                    }
                }
                3 => {
                    while let Some((k, v)) = sub.field()? {
                        if let (2, Field::Bytes(c)) = (k, v) {
                            m.precompiled_charsmap = c.to_vec();
                        }
                    }
                }
                _ => {}
            }
        }
        if m.pieces.is_empty() {
            return Err("no pieces".into());
        }
        Ok(m)
    }

    /// The tokenizer transformers' `T5Tokenizer` makes of this model, as tokenizer.json.
    pub fn t5_tokenizer_json(&self, extra_ids: usize, origin: &str) -> Result<Value> {
        if self.model_type != UNIGRAM {
            return Err(Error::Tokenizer(format!(
                "{origin}: a SentencePiece {} model; T5's tokenizer is Unigram",
                if self.model_type == 2 {
                    "BPE"
                } else {
                    "word/char"
                }
            )));
        }
        if self.byte_fallback {
            log::warn!("{origin}: the SentencePiece model falls back to bytes; transformers' T5Tokenizer does not (unknown characters become <unk>), and neither does conala");
        }
        let id_of = |name: &str| self.pieces.iter().position(|(p, _, _)| p == name);
        let eos = id_of("</s>").ok_or_else(|| {
            Error::Tokenizer(format!(
                "{origin}: no `</s>` piece for T5's end-of-sequence token"
            ))
        })?;
        let mut vocab: Vec<Value> = self.pieces.iter().map(|(p, s, _)| json!([p, s])).collect();
        let mut added: Vec<Value> = vec![];
        let token = |id: usize, content: &str| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        };
        for (id, (p, _, kind)) in self.pieces.iter().enumerate() {
            if *kind == CONTROL || *kind == UNKNOWN {
                added.push(token(id, p));
            }
        }
        for i in (0..extra_ids).rev() {
            let name = format!("<extra_id_{i}>");
            added.push(token(vocab.len(), &name));
            vocab.push(json!([name, 0.0]));
        }
        let normalizer = if self.precompiled_charsmap.is_empty() {
            Value::Null
        } else {
            json!({"type": "Precompiled", "precompiled_charsmap": base64(&self.precompiled_charsmap)})
        };
        let metaspace = json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "always", "split": true});
        let seq = |id: &str| json!({"Sequence": {"id": id, "type_id": 0}});
        let end = json!({"SpecialToken": {"id": "</s>", "type_id": 0}});
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, metaspace]},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [seq("A"), end],
                "pair": [seq("A"), end, seq("B"), end],
                "special_tokens": {"</s>": {"id": "</s>", "ids": [eos], "tokens": ["</s>"]}}
            },
            "decoder": metaspace,
            // transformers' T5Tokenizer fixes the unknown token at id 2.
            "model": {"type": "Unigram", "unk_id": 2, "vocab": vocab, "byte_fallback": false}
        }))
    }
}

/// Standard base64 (what tokenizer.json stores `precompiled_charsmap` as).
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            out.push(if i <= c.len() {
                A[(n >> shift) as usize & 63] as char
            } else {
                '='
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_as_rfc_4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn truncated_and_foreign_models_are_errors() {
        for bad in [&b""[..], b"\x0a\xff\x01", b"\x0b"] {
            let e = SpModel::parse(bad, "m/spiece.model")
                .unwrap_err()
                .to_string();
            assert!(e.contains("m/spiece.model"), "{e}");
        }
    }
}
