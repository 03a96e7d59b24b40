//! The copy prior: a T5 whose weights are set by hand so that, before any training, greedy decoding
//! copies its input. The offline default fine-tunes from it.
//!
//! Why: a rewritten intent is mostly the intent's own words plus names copied from the snippet.
//! A T5 trained from scratch on 2,379 rows for a few CPU minutes never learns to copy (cross-attention
//! has no positions, so copying needs a multi-layer circuit that takes far more data and steps to
//! form); it stays below the copy-the-intent baseline. Pretrained checkpoints, which know how to copy,
//! cannot be downloaded offline. So the copy circuit is written into the weights directly, the way a
//! pretrained model would carry it, and training only has to learn what to copy, where to stop and
//! what to change. Everything else (spare heads, the second layer of each stack, the feed-forwards)
//! starts random with zero output projections, so it adds nothing until training gives it a use.
//!
//! The circuit (d_model 256 = four 64-wide subspaces S0..S3; each token has a random unit direction
//! `u` scaled to norm 8 in S0, a constant 1 in S3 and, for `</s>` only, a flag in S3):
//! - encoder layer 0, heads 0 and 1, attend only by relative position (bias +20 at -1 and at -2) and
//!   write the previous and the one-before tokens' `u` into S1 and S2. At the first positions, where
//!   no such token exists, a weaker content score (+10 on the `</s>` flag) makes them read `</s>`,
//!   which therefore marks the start of the input;
//! - decoder layer 0, self-attention head 0 (bias +20 at -1), writes the previous output token into
//!   S1; the start token `<pad>` has the same `u` as `</s>`, so decoding starts "after `</s>`";
//! - decoder layer 0, cross-attention head 0, scores each input position by how well its two
//!   preceding tokens (encoder S1, S2) match the last two output tokens (decoder S0, S1): +40 per
//!   matching token. It reads that position's own token into S2;
//! - the output layer reads S2, so the next token is the input token after the matched bigram; the
//!   input's `</s>` is copied as `</s>`, which ends generation.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};

use super::random::{normal, random_weights};
use super::shapes::{config as family_config, Family, Size};
use crate::error::{Error, Result};
use crate::model::position_bias::bucket;
use crate::model::T5Config;
use crate::rng::Rng;

/// Width of one subspace; d_model is four of them.
const E: usize = 64;
const D: usize = 4 * E;
const HEADS: usize = 4;
const D_KV: usize = 128;
/// Slots in S3.
const CONST: usize = 3 * E;
const EOS_FLAG: usize = 3 * E + 1;
/// Norm of every token direction `u`.
const U_NORM: f64 = 8.0;
/// Relative-position bias that makes a head attend to one offset.
const POSITION_BIAS: f64 = 20.0;
/// Score of `</s>` for the position heads when their offset does not exist.
const START_SCORE: f64 = 10.0;
/// Cross-attention score per matching context token.
const MATCH_SCORE: f64 = 40.0;
/// Logit of the copied token (others: at most about half of it). Enough for greedy decoding to copy,
/// low enough that training can move probability elsewhere: at 20 the loss on the first batches is
/// so large that their gradients wreck the circuit (the README has the measurements).
const COPY_LOGIT: f64 = 8.0;

/// The copy prior's shape: `family`'s feed-forward, 256 wide, 2 layers per stack, 4 heads of 128.
/// Needs an untied output layer (the output reads a different subspace than the embeddings fill).
pub fn config(family: Family, vocab_size: usize) -> Result<T5Config> {
    if family == Family::T5 {
        return Err(Error::model(
            "model.init.prior copy needs an untied output layer: use family flan-t5 or ul2",
        ));
    }
    let mut cfg = family_config(family, Size::Mini, vocab_size);
    cfg.d_model = D;
    cfg.d_kv = D_KV;
    cfg.num_heads = HEADS;
    cfg.d_ff = 512;
    cfg.num_layers = 2;
    cfg.num_decoder_layers = Some(2);
    Ok(cfg)
}

/// A dense (rows, cols) matrix being filled in.
struct Matrix {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl Matrix {
    fn from(t: &Tensor) -> Result<Matrix> {
        let (rows, cols) = t.dims2()?;
        Ok(Matrix {
            rows,
            cols,
            data: t.flatten_all()?.to_vec1()?,
        })
    }

    fn set(&mut self, r: usize, c: usize, v: f64) {
        self.data[r * self.cols + c] = v as f32;
    }

    fn zero_rows(&mut self, rows: std::ops::Range<usize>) {
        self.data[rows.start * self.cols..rows.end * self.cols].fill(0.0);
    }

    fn zero(&mut self) {
        self.data.fill(0.0);
    }

    /// Row `r`, cols `c0..c0+E` = scale * `dir`.
    fn set_direction(&mut self, r: usize, c0: usize, dir: &[f64], scale: f64) {
        for (i, x) in dir.iter().enumerate() {
            self.set(r, c0 + i, x * scale);
        }
    }

    /// rows `r0..r0+E` x cols `c0..c0+E` = scale * identity.
    fn identity(&mut self, r0: usize, c0: usize, scale: f64) {
        for i in 0..E {
            self.set(r0 + i, c0 + i, scale);
        }
    }

    fn tensor(self) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.data,
            (self.rows, self.cols),
            &Device::Cpu,
        )?)
    }
}

/// One attention sublayer's projections (and its position bias, if it has one) taken out of the
/// weight map to be edited, then put back.
struct AttentionEdit {
    prefix: &'static str,
    q: Matrix,
    k: Matrix,
    v: Matrix,
    o: Matrix,
    bias: Option<Matrix>,
}

impl AttentionEdit {
    fn take(w: &BTreeMap<String, Tensor>, prefix: &'static str) -> Result<AttentionEdit> {
        let get = |n: &str| -> Result<Option<Matrix>> {
            w.get(&format!("{prefix}.{n}.weight"))
                .map(Matrix::from)
                .transpose()
        };
        let need = |n: &str| -> Result<Matrix> {
            get(n)?.ok_or_else(|| Error::model(format!("copy prior: missing {prefix}.{n}.weight")))
        };
        Ok(AttentionEdit {
            prefix,
            q: need("q")?,
            k: need("k")?,
            v: need("v")?,
            o: need("o")?,
            bias: get("relative_attention_bias")?,
        })
    }

    /// Zero head `h`'s rows of q, k and v (the head then attends by position bias only, reading
    /// nothing, until its entries are set).
    fn clear_head(&mut self, h: usize) {
        for m in [&mut self.q, &mut self.k, &mut self.v] {
            m.zero_rows(h * D_KV..(h + 1) * D_KV);
        }
    }

    /// Head `h` attends to relative position `offset` (`bidirectional`: the encoder's buckets).
    fn attend_at(
        &mut self,
        cfg: &T5Config,
        h: usize,
        offset: i64,
        bidirectional: bool,
    ) -> Result<()> {
        let b = bucket(
            offset,
            bidirectional,
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance,
        );
        self.bias
            .as_mut()
            .ok_or_else(|| {
                Error::model(format!("copy prior: {} has no position bias", self.prefix))
            })?
            .set(b as usize, h, POSITION_BIAS);
        Ok(())
    }

    fn put(self, w: &mut BTreeMap<String, Tensor>) -> Result<()> {
        let p = self.prefix;
        for (n, m) in [("q", self.q), ("k", self.k), ("v", self.v), ("o", self.o)] {
            w.insert(format!("{p}.{n}.weight"), m.tensor()?);
        }
        if let Some(b) = self.bias {
            w.insert(format!("{p}.relative_attention_bias.weight"), b.tensor()?);
        }
        Ok(())
    }
}

/// Factor by which RMS norm (weight 1) scales a vector of Euclidean norm sqrt(`sq_norm`) in D dims.
fn rms_gain(sq_norm: f64) -> f64 {
    (D as f64 / sq_norm).sqrt()
}

/// Random unit directions scaled to `U_NORM`, one per token; `<pad>` (the decoder start) gets `</s>`'s.
fn token_directions(cfg: &T5Config, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = Rng::derive(seed, 0xC09E);
    let mut u: Vec<Vec<f64>> = (0..cfg.vocab_size)
        .map(|_| {
            let v: Vec<f64> = normal(&mut rng, E, 1.0)
                .into_iter()
                .map(f64::from)
                .collect();
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            v.into_iter().map(|x| x * U_NORM / n).collect()
        })
        .collect();
    let (pad, eos) = (cfg.pad_token_id as usize, cfg.eos_token_id as usize);
    u[pad] = u[eos].clone();
    u
}

/// The copy prior's weights (HF names), for a config made by [`config`].
pub fn weights(cfg: &T5Config, seed: u64) -> Result<BTreeMap<String, Tensor>> {
    if cfg.d_model != D || cfg.num_heads != HEADS || cfg.d_kv != D_KV || cfg.tie_word_embeddings {
        return Err(Error::model(
            "the copy prior needs the shape from copy_prior::config",
        ));
    }
    let vocab = cfg.vocab_size;
    let (pad, eos) = (cfg.pad_token_id as usize, cfg.eos_token_id as usize);
    if pad >= vocab || eos >= vocab {
        return Err(Error::model(format!(
            "pad ({pad}) or eos ({eos}) token outside the vocabulary of {vocab}"
        )));
    }
    let mut w = random_weights(cfg, seed)?;
    // Start from: every output projection zero (each sublayer adds nothing), no position biases.
    for (name, t) in w.iter_mut() {
        let silent = name.ends_with(".o.weight")
            || name.ends_with(".wo.weight")
            || name.ends_with("relative_attention_bias.weight");
        if silent {
            *t = t.zeros_like()?;
        }
    }
    let u = token_directions(cfg, seed);
    let s0 = 0;
    let (s1, s2) = (E, 2 * E);

    let mut emb = Matrix::from(&w["shared.weight"])?;
    emb.zero();
    for (t, dir) in u.iter().enumerate() {
        emb.set_direction(t, s0, dir, 1.0);
        emb.set(t, CONST, 1.0);
    }
    emb.set(eos, EOS_FLAG, 1.0);
    w.insert("shared.weight".into(), emb.tensor()?);

    let u2 = U_NORM * U_NORM;
    // Gains of the pre-attention RMS norms: an embedding (S0 + const), the decoder stream after its
    // self-attention (S0 + S1 + const), and a stream holding S0, S1, S2 + const (the encoder's output,
    // and the decoder's output before the output layer).
    let g_emb = rms_gain(u2 + 1.0);
    let g_dec = rms_gain(2.0 * u2 + 1.0);
    let g_full = rms_gain(3.0 * u2 + 1.0);

    // Encoder layer 0: heads 0 and 1 read the tokens at -1 and -2 (or `</s>` at the start).
    let mut a = AttentionEdit::take(&w, "encoder.block.0.layer.0.SelfAttention")?;
    for (h, offset, dst) in [(0, -1i64, s1), (1, -2, s2)] {
        let r = h * D_KV;
        a.clear_head(h);
        a.q.set(r, CONST, START_SCORE / (g_emb * g_emb));
        a.k.set(r, EOS_FLAG, 1.0);
        a.v.identity(r, s0, 1.0 / g_emb);
        a.o.identity(dst, r, 1.0);
        a.attend_at(cfg, h, offset, true)?;
    }
    a.put(&mut w)?;

    // Decoder layer 0 self-attention: head 0 reads the previous output token into S1.
    let mut a = AttentionEdit::take(&w, "decoder.block.0.layer.0.SelfAttention")?;
    a.clear_head(0);
    a.v.identity(0, s0, 1.0 / g_emb);
    a.o.identity(s1, 0, 1.0);
    a.attend_at(cfg, 0, -1, false)?;
    a.put(&mut w)?;

    // Decoder layer 0 cross-attention: head 0 matches (last, one-before) output tokens against each
    // input position's (-1, -2) tokens and reads the position's own token into S2.
    let mut a = AttentionEdit::take(&w, "decoder.block.0.layer.1.EncDecAttention")?;
    a.clear_head(0);
    let per_match = MATCH_SCORE / u2 / (g_dec * g_full);
    a.q.identity(0, s0, per_match);
    a.q.identity(E, s1, per_match);
    a.k.identity(0, s1, 1.0);
    a.k.identity(E, s2, 1.0);
    a.v.identity(0, s0, 1.0 / g_full);
    a.o.identity(s2, 0, 1.0);
    a.put(&mut w)?;

    // Output layer: reads S2; `<pad>` is never produced.
    let mut lm = Matrix::from(&w["lm_head.weight"])?;
    lm.zero();
    for (t, dir) in u.iter().enumerate().filter(|(t, _)| *t != pad) {
        lm.set_direction(t, s2, dir, COPY_LOGIT / u2 / g_full);
    }
    w.insert("lm_head.weight".into(), lm.tensor()?);
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::decoding::{generate, DecodeOptions};
    use crate::model::init::write_model;
    use crate::model::t5::T5;
    use crate::model::weights::{Weights, SAFETENSORS};

    const TOKENIZER: &str = "data/tokenizer/conala-unigram-8k.json";

    /// Greedy output of a freshly made copy prior for each input text.
    fn copy_prior_outputs(texts: &[&str]) -> Vec<String> {
        let tok = crate::tokenizer::load(std::path::Path::new(TOKENIZER)).unwrap();
        let cfg = config(Family::FlanT5, tok.get_vocab_size(true)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        write_model(
            &cfg,
            &weights(&cfg, 0).unwrap(),
            std::path::Path::new(TOKENIZER),
            dir.path(),
        )
        .unwrap();
        let w = Weights::open(
            &[dir.path().join(SAFETENSORS)],
            "copy prior",
            &Device::Cpu,
            candle_core::DType::F32,
        )
        .unwrap();
        let model = T5::load(&cfg, &cfg.model_config(), &w).unwrap();
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| tok.encode(*t, true).unwrap().get_ids().to_vec())
            .collect();
        let rows: Vec<&[u32]> = ids.iter().map(|r| r.as_slice()).collect();
        let o = DecodeOptions {
            max_new_tokens: 80,
            ..Default::default()
        };
        let out = generate(&model, &rows, &vec![0; rows.len()], &o).unwrap();
        out.iter()
            .map(|g| {
                assert_eq!(g.tokens.last(), Some(&cfg.eos_token_id), "stops on </s>");
                tok.decode(&g.tokens, true).unwrap()
            })
            .collect()
    }

    #[test]
    fn untrained_copy_prior_copies_its_input() {
        let texts = [
            "check if all elements in a list are identical",
            "Decode Hex String in Python 3\nbytes.fromhex('4a4b4c').decode('utf-8')",
            "sort a list of dictionaries by a value of the dictionary",
        ];
        let out = copy_prior_outputs(&texts);
        assert_eq!(out[0], texts[0]);
        assert_eq!(out[1], texts[1].replace('\n', " "));
        assert_eq!(out[2], texts[2]);
    }

    #[test]
    fn copy_prior_needs_an_untied_output_layer() {
        let e = config(Family::T5, 100).unwrap_err().to_string();
        assert!(e.contains("untied"), "{e}");
        let cfg = config(Family::Ul2, 100).unwrap();
        assert_eq!((cfg.d_model, cfg.num_heads, cfg.d_kv), (256, 4, 128));
        assert!(weights(&family_config(Family::FlanT5, Size::Tiny, 100), 0).is_err());
    }
}
