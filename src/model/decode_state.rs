//! What decoding carries from step to step for a batch of rows, for any family: every decoder
//! layer's cross-attention keys and values (computed once per sequence), the self-attention caches
//! (appended in place), the encoder rows' padding bias, and the step. Rows can be dropped (or
//! reordered, for beams) between steps.

use candle_core::{DType, Device, Tensor};

use super::attention::{padding_bias, Attention};
use super::kv_cache::{CrossKv, KvCache, KvIndex};
use super::layers::Linear;
use super::mode::Mode;
use super::ops;
use crate::error::Result;

pub struct DecodeState {
    pub(crate) cross: Vec<CrossKv>,
    /// Fused CPU path: the cross K/V above are strided views of one projection of the encoder output,
    /// read through this index (rows that finish or reorder only change the index).
    pub(crate) cross_index: Option<KvIndex>,
    pub(crate) caches: Vec<KvCache>,
    /// (rows, 1, 1, src_len) padding bias of the encoder output.
    pub(crate) cross_bias: Tensor,
    /// The decoder self-attention's position bias for every query and key position of the
    /// generation, (1, heads, max_len, max_len), one per layer that owns one (T5's relative bias;
    /// empty for families without): computed once, each step reads its row as a view.
    pub(crate) self_bias: Vec<Tensor>,
    pub(crate) step: usize,
}

impl DecodeState {
    /// The state before the first step: cross-attention keys and values of the decoder layers
    /// `attns` over the encoder output `enc` (through `stacked`, every layer's k and v weights in one
    /// matrix, where the model has it), and an empty cache of `max_len` positions per layer.
    pub fn start(
        attns: &[&Attention],
        stacked: Option<&Linear>,
        enc: &Tensor,
        enc_mask: &Tensor,
        max_len: usize,
    ) -> Result<DecodeState> {
        let (rows, dtype, device) = (enc.dims()[0], enc.dtype(), enc.device().clone());
        let (cross, cross_index) = cross_kv(attns, stacked, enc, enc_mask)?;
        let caches = attns
            .iter()
            .map(|a| KvCache::new(rows, a.heads, max_len.max(1), a.d_kv, dtype, &device))
            .collect::<Result<Vec<_>>>()?;
        Ok(DecodeState {
            cross,
            cross_index,
            caches,
            cross_bias: padding_bias(enc_mask, dtype)?,
            self_bias: vec![],
            step: 0,
        })
    }

    pub fn rows(&self) -> usize {
        self.cross_bias.dims()[0]
    }

    pub fn step(&self) -> usize {
        self.step
    }

    pub fn device(&self) -> &Device {
        self.cross_bias.device()
    }

    pub fn dtype(&self) -> DType {
        self.cross_bias.dtype()
    }

    /// Keep rows `idx` (in that order; repeats allowed, for beam search) in every cache.
    pub fn select_rows(&mut self, idx: &[u32]) -> Result<()> {
        let t = Tensor::new(idx, self.device())?;
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

/// Stack the cross-attention k and v weights (and biases) of every decoder layer into one
/// (layers x 2 x inner, d) layer, so one matmul projects the encoder output for all of them; the
/// layers keep views of it (no second copy). `None` where a layer is not stacked (an unmerged
/// adapter): decoding then projects per layer.
pub fn stack_cross_kv(attns: &mut [&mut Attention]) -> Result<Option<Linear>> {
    let parts: Option<Vec<&Linear>> = attns.iter().map(|a| a.kv.as_ref()).collect();
    let Some(parts) = parts.filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let all = Linear::stacked(&parts)?;
    let mut views: Vec<Linear> = parts.iter().map(|p| (*p).clone()).collect();
    all.unstack_into(&mut views.iter_mut().collect::<Vec<_>>())?;
    for (a, kv) in attns.iter_mut().zip(views) {
        kv.unstack_into(&mut [&mut a.k, &mut a.v])?;
        a.kv = Some(kv);
    }
    Ok(Some(all))
}

/// Cross-attention keys and values of every decoder layer for encoder output `enc`. On the CPU in
/// f32 (with the stacked weight): one matmul for all layers, handed out as strided views, no
/// per-layer copies into head-major layout, and an index over the rows. Elsewhere, per layer.
fn cross_kv(
    attns: &[&Attention],
    stacked: Option<&Linear>,
    enc: &Tensor,
    enc_mask: &Tensor,
) -> Result<(Vec<CrossKv>, Option<KvIndex>)> {
    if let Some(w) = stacked.filter(|_| ops::reads_kv_in_place(enc)) {
        let (rows, s, _) = enc.dims3()?;
        let (heads, d_kv) = (attns[0].heads, attns[0].d_kv);
        let y = w
            .forward(enc, &Mode::INFER)?
            .reshape((rows, s, attns.len() * 2 * heads, d_kv))?;
        let view =
            |i: usize| -> Result<Tensor> { Ok(y.narrow(2, i * heads, heads)?.transpose(1, 2)?) };
        let cross = (0..attns.len())
            .map(|l| {
                Ok(CrossKv {
                    k: view(2 * l)?,
                    v: view(2 * l + 1)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        return Ok((cross, Some(KvIndex::from_mask(enc_mask)?)));
    }
    let cross = attns
        .iter()
        .map(|a| a.cross_kv(enc))
        .collect::<Result<Vec<_>>>()?;
    Ok((cross, None))
}
