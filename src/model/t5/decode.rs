//! Step-by-step decoding: cross-attention keys and values computed once per sequence, the
//! self-attention cache appended in place, rows that can be dropped (or reordered, for beams).

use candle_core::Tensor;

use super::T5;
use crate::error::{Error, Result};
use crate::model::attention::padding_bias;
use crate::model::kv_cache::{CrossKv, KvCache, KvIndex};
use crate::model::layers::Linear;
use crate::model::mode::Mode;
use crate::model::ops;

/// Everything decoding needs to carry from step to step for a batch of rows.
pub struct DecodeState {
    cross: Vec<CrossKv>,
    /// Fused CPU path: the cross K/V above are strided views of one projection of the encoder output,
    /// read through this index (rows that finish or reorder only change the index).
    cross_index: Option<KvIndex>,
    caches: Vec<KvCache>,
    /// (rows, 1, 1, src_len) padding bias of the encoder output.
    cross_bias: Tensor,
    step: usize,
}

impl DecodeState {
    pub fn rows(&self) -> usize {
        self.cross_bias.dims()[0]
    }

    pub fn step(&self) -> usize {
        self.step
    }

    /// Keep rows `idx` (in that order; repeats allowed, for beam search) in every cache.
    pub fn select_rows(&mut self, idx: &[u32]) -> Result<()> {
        let dev = self.cross_bias.device().clone();
        let t = Tensor::new(idx, &dev)?;
        match &mut self.cross_index {
            Some(ix) => ix.select(idx),
            None => {
                for c in &mut self.cross {
                    c.select_rows(&t)?;
                }
            }
        }
        for c in &mut self.caches {
            c.select(&t)?;
        }
        self.cross_bias = self.cross_bias.index_select(&t, 0)?;
        Ok(())
    }
}

impl T5 {
    /// Prepare to decode up to `max_len` tokens for encoded rows: cross-attention K/V of every layer
    /// are computed here, once.
    pub fn start_decoding(
        &self,
        enc: &Tensor,
        enc_mask: &Tensor,
        max_len: usize,
    ) -> Result<DecodeState> {
        let rows = enc.dims()[0];
        let (cross, cross_index) = self.cross_kv(enc, enc_mask)?;
        let caches = (0..self.decoder.blocks.len())
            .map(|_| {
                KvCache::new(
                    rows,
                    self.cfg.num_heads,
                    max_len.max(1),
                    self.cfg.d_kv,
                    self.dtype,
                    &self.device,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DecodeState {
            cross,
            cross_index,
            caches,
            cross_bias: padding_bias(enc_mask, self.dtype)?,
            step: 0,
        })
    }

    /// Cross-attention keys and values of every decoder layer for encoder output `enc`. On the CPU
    /// in f32 (with the stacked weight): one matmul for all layers, handed out as strided views, no
    /// per-layer copies into head-major layout, and an index over the rows. Elsewhere, per layer.
    fn cross_kv(&self, enc: &Tensor, enc_mask: &Tensor) -> Result<(Vec<CrossKv>, Option<KvIndex>)> {
        let layers = self.decoder.blocks.len();
        let (heads, d_kv) = (self.cfg.num_heads, self.cfg.d_kv);
        if let Some(w) = self
            .cross_kv_all
            .as_ref()
            .filter(|_| ops::reads_kv_in_place(enc))
        {
            let (rows, s, _) = enc.dims3()?;
            let y = Linear::new(w.clone())
                .forward(enc, &Mode::INFER)?
                .reshape((rows, s, layers * 2 * heads, d_kv))?;
            let view = |i: usize| -> Result<Tensor> {
                Ok(y.narrow(2, i * heads, heads)?.transpose(1, 2)?)
            };
            let cross = (0..layers)
                .map(|l| {
                    Ok(CrossKv {
                        k: view(2 * l)?,
                        v: view(2 * l + 1)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            return Ok((cross, Some(KvIndex::from_mask(enc_mask)?)));
        }
        let cross = self
            .decoder
            .blocks
            .iter()
            .map(|b| {
                let (ca, _) = b
                    .cross
                    .as_ref()
                    .expect("decoder blocks have cross-attention");
                ca.cross_kv(enc)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((cross, None))
    }

    /// One decoding step: `tokens` (rows,) are the newest tokens; returns next-token logits (rows, vocab).
    pub fn decode_step(&self, st: &mut DecodeState, tokens: &Tensor) -> Result<Tensor> {
        let rows = tokens.dims1()?;
        if rows != st.rows() {
            return Err(Error::model(format!(
                "decode_step: {rows} tokens for {} rows",
                st.rows()
            )));
        }
        let mut x = self.embed(&tokens.reshape((rows, 1))?)?;
        let pos = st.step;
        let self_bias = self
            .decoder
            .bias
            .forward(1, pos + 1, pos)?
            .to_dtype(self.dtype)?;
        for (i, b) in self.decoder.blocks.iter().enumerate() {
            let h = b.self_attn.forward_cached(
                &b.self_norm.forward(&x)?,
                &mut st.caches[i],
                &self_bias,
            )?;
            x = (x + h)?;
            let (ca, cn) = b
                .cross
                .as_ref()
                .expect("decoder blocks have cross-attention");
            let h = ca.forward_cross(
                &cn.forward(&x)?,
                &st.cross[i],
                &st.cross_bias,
                st.cross_index.as_ref(),
            )?;
            x = (x + h)?;
            let h = b.ffn.forward(&b.ffn_norm.forward(&x)?, &Mode::INFER)?;
            x = (x + h)?;
        }
        st.step += 1;
        let h = self.decoder.final_norm.forward(&x)?;
        Ok(self.logits(&h, &Mode::INFER)?.squeeze(1)?)
    }
}
