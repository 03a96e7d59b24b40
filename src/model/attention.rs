//! Multi-head attention shared by every family: an additive bias (T5's relative positions from
//! [`super::position_bias`], per-row padding masks, the causal mask), a score scale (T5: none; BART:
//! 1/sqrt(head dim)), projections stacked for inference, and the cached forms decoding uses.

use candle_core::{DType, Device, Tensor};

use super::kv_cache::{CrossKv, KvCache, KvIndex};
use super::layers::Linear;
use super::mode::Mode;
use super::ops;
use crate::error::Result;

/// Added to scores at masked positions. Large enough that exp() is exactly 0 in f32 and bf16, small
/// enough that adding two of them (padding + causal) stays finite.
pub const MASKED: f64 = -1e9;

#[derive(Clone)]
pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub heads: usize,
    pub d_kv: usize,
    /// Scores are `scale * q·k` (T5 folds the scale into its weights: 1).
    pub scale: f64,
    /// Inference only: q, k and v stacked (3 x inner, d) so one matmul projects all three; q, k, v
    /// then hold views of it.
    pub qkv: Option<Linear>,
    /// Inference only: k and v stacked, for projecting the encoder output in cross-attention.
    pub kv: Option<Linear>,
}

impl Attention {
    pub fn new(q: Linear, k: Linear, v: Linear, o: Linear, heads: usize, d_kv: usize) -> Self {
        Attention {
            q,
            k,
            v,
            o,
            heads,
            d_kv,
            scale: 1.0,
            qkv: None,
            kv: None,
        }
    }

    /// Stack the projections for inference (adapters must be merged first), with the score scale
    /// folded into q. `self_attention` stacks q, k, v; otherwise k, v (cross-attention projects
    /// queries and memory separately).
    pub fn fuse(&mut self, self_attention: bool) -> Result<()> {
        if self.q.lora.is_some() || self.k.lora.is_some() || self.v.lora.is_some() {
            return Ok(());
        }
        // The score scale folded into the query projection: (s W) x + s b is s (W x + b), and every
        // attention call saves a pass over its queries.
        if self.scale != 1.0 {
            self.q.weight = (&self.q.weight * self.scale)?;
            if let Some(b) = &self.q.bias {
                self.q.bias = Some((b * self.scale)?);
            }
            self.scale = 1.0;
        }
        if self_attention {
            let w = Linear::stacked(&[&self.q, &self.k, &self.v])?;
            w.unstack_into(&mut [&mut self.q, &mut self.k, &mut self.v])?;
            self.qkv = Some(w);
        } else {
            let w = Linear::stacked(&[&self.k, &self.v])?;
            w.unstack_into(&mut [&mut self.k, &mut self.v])?;
            self.kv = Some(w);
        }
        Ok(())
    }

    /// Project with a stacked weight and split the result into `n` (b, heads, t, d_kv) tensors.
    fn project_stacked(&self, x: &Tensor, w: &Linear, n: usize) -> Result<Vec<Tensor>> {
        let y = w.forward(x, &Mode::INFER)?;
        let inner = self.heads * self.d_kv;
        (0..n)
            .map(|i| self.split_heads(&y.narrow(2, i * inner, inner)?))
            .collect()
    }

    /// (b, t, heads*d_kv) -> (b, heads, t, d_kv)
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        Ok(x.reshape((b, t, self.heads, self.d_kv))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// Store the projections that decoding runs on a few rows at a time transposed (CPU, f32; see
    /// [`Linear::transpose_for_inference`]): the stacked self-attention projection or q, and o.
    pub fn transpose_for_decoding(&mut self) -> Result<()> {
        match &mut self.qkv {
            Some(w) => {
                w.transpose_for_inference()?;
                // q, k and v view the stacked weight: point them at its new storage.
                w.unstack_into(&mut [&mut self.q, &mut self.k, &mut self.v])?;
            }
            None => self.q.transpose_for_inference()?,
        }
        self.o.transpose_for_inference()
    }

    /// Project keys and values of `memory` (for cross-attention, once per sequence).
    pub fn cross_kv(&self, memory: &Tensor) -> Result<CrossKv> {
        if let Some(w) = &self.kv {
            let mut kv = self.project_stacked(memory, w, 2)?;
            let v = kv.pop().expect("two");
            let k = kv.pop().expect("two");
            return Ok(CrossKv { k, v });
        }
        Ok(CrossKv {
            k: self.split_heads(&self.k.forward(memory, &Mode::INFER)?)?,
            v: self.split_heads(&self.v.forward(memory, &Mode::INFER)?)?,
        })
    }

    /// Attention of `q` over keys/values `k`, `v` (b, heads, s, d_kv) with additive `bias`
    /// (broadcastable to (b, heads, t, s)), then the output projection.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
        mode: &Mode,
        index: Option<&KvIndex>,
    ) -> Result<Tensor> {
        let out = ops::attention(q, k, v, bias, self.scale, index, mode)?; // (b, h, t, d)
        let (b, h, t, d) = out.dims4()?;
        self.o
            .forward(&out.transpose(1, 2)?.reshape((b, t, h * d))?, mode)
    }

    /// Full (uncached) attention: self-attention when `memory` is None.
    pub fn forward(
        &self,
        x: &Tensor,
        memory: Option<&Tensor>,
        bias: &Tensor,
        mode: &Mode,
    ) -> Result<Tensor> {
        if let (None, Some(w), false) = (memory, &self.qkv, mode.is_training()) {
            let qkv = self.project_stacked(x, w, 3)?;
            return self.attend(&qkv[0], &qkv[1], &qkv[2], bias, mode, None);
        }
        let src = memory.unwrap_or(x);
        // The fused training kernel reads heads in place; other paths want contiguous copies.
        let split = |y: Tensor| -> Result<Tensor> {
            if ops::reads_heads_in_place(&y, mode) {
                let (b, t, _) = y.dims3()?;
                Ok(y.reshape((b, t, self.heads, self.d_kv))?.transpose(1, 2)?)
            } else {
                self.split_heads(&y)
            }
        };
        let q = split(self.q.forward(x, mode)?)?;
        let k = split(self.k.forward(src, mode)?)?;
        let v = split(self.v.forward(src, mode)?)?;
        self.attend(&q, &k, &v, bias, mode, None)
    }

    /// Decoder self-attention for new positions, appending their keys/values to `cache`.
    pub fn forward_cached(&self, x: &Tensor, cache: &mut KvCache, bias: &Tensor) -> Result<Tensor> {
        let (q, k, v) = match &self.qkv {
            Some(w) => {
                let mut p = self.project_stacked(x, w, 3)?;
                let v = p.pop().expect("three");
                let k = p.pop().expect("three");
                (p.pop().expect("three"), k, v)
            }
            None => (
                self.split_heads(&self.q.forward(x, &Mode::INFER)?)?,
                self.split_heads(&self.k.forward(x, &Mode::INFER)?)?,
                self.split_heads(&self.v.forward(x, &Mode::INFER)?)?,
            ),
        };
        let (k, v) = cache.append(&k, &v)?;
        self.attend(&q, &k, &v, bias, &Mode::INFER, None)
    }

    /// Cross-attention over precomputed keys/values (read through `index` when given).
    pub fn forward_cross(
        &self,
        x: &Tensor,
        kv: &CrossKv,
        bias: &Tensor,
        index: Option<&KvIndex>,
    ) -> Result<Tensor> {
        let q = self.split_heads(&self.q.forward(x, &Mode::INFER)?)?;
        self.attend(&q, &kv.k, &kv.v, bias, &Mode::INFER, index)
    }
}

/// Additive padding bias (b, 1, 1, s) from a 0/1 mask (b, s).
pub fn padding_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, s) = mask.dims2()?;
    let m = mask.to_dtype(DType::F32)?;
    let bias = ((m - 1.0)? * -MASKED)?; // 0 where kept, MASKED where padded
    Ok(bias.reshape((b, 1, 1, s))?.to_dtype(dtype)?)
}

/// Additive causal bias (1, 1, t, t).
pub fn causal_bias(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { MASKED as f32 } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(v, (1, 1, t, t), device)?.to_dtype(dtype)?)
}
