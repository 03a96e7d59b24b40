//! T5 attention: no 1/sqrt(d) scaling, learned relative position bias (bidirectional buckets in the
//! encoder, unidirectional in the decoder), per-row padding masks, and caches for decoding.

use candle_core::{DType, Device, Tensor};

use super::cpu_attention::KvIndex;
use super::layers::{model_dropout, softmax_last_dim, Linear, Mode};
use crate::error::{Error, Result};

/// Added to scores at masked positions. Large enough that exp() is exactly 0 in f32 and bf16, small
/// enough that adding two of them (padding + causal) stays finite.
pub const MASKED: f64 = -1e9;

/// HF's `_relative_position_bucket` for one relative position (memory - query), with the same f32
/// arithmetic, so buckets match transformers exactly (checked against it in the parity fixtures).
pub fn bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> u32 {
    let mut nb = num_buckets as i64;
    let mut ret = 0i64;
    let mut rel = relative_position;
    if bidirectional {
        nb /= 2;
        if rel > 0 {
            ret += nb;
        }
        rel = rel.abs();
    } else {
        rel = -rel.min(0);
    }
    let max_exact = nb / 2;
    if rel < max_exact {
        return (ret + rel) as u32;
    }
    let log_ratio = ((rel as f32) / (max_exact as f32)).ln();
    let denom = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
    let large = max_exact + ((log_ratio / denom) * ((nb - max_exact) as f32)) as i64;
    (ret + large.min(nb - 1)) as u32
}

/// The bucket of every clamped relative position, uploaded once, so a forward pass computes its bucket
/// matrix with a gather on the device.
#[derive(Clone)]
pub struct BucketTable {
    /// `table[r + max_distance]` = bucket of relative position r, for r in [-max_distance, max_distance].
    table: Tensor,
    max_distance: usize,
}

impl BucketTable {
    pub fn new(
        bidirectional: bool,
        num_buckets: usize,
        max_distance: usize,
        device: &Device,
    ) -> Result<Self> {
        let md = max_distance as i64;
        let values: Vec<u32> = (-md..=md)
            .map(|r| bucket(r, bidirectional, num_buckets, max_distance))
            .collect();
        Ok(BucketTable {
            table: Tensor::new(values, device)?,
            max_distance,
        })
    }

    /// (q_len, k_len) buckets for queries at positions offset..offset+q_len over keys 0..k_len.
    pub fn buckets(&self, q_len: usize, k_len: usize, offset: usize) -> Result<Tensor> {
        let dev = self.table.device();
        let md = self.max_distance as f64;
        let mem = Tensor::arange(0u32, k_len as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((1, k_len))?;
        let ctx = Tensor::arange(offset as u32, (offset + q_len) as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((q_len, 1))?;
        let idx = mem
            .broadcast_sub(&ctx)?
            .clamp(-md, md)?
            .affine(1.0, md)?
            .to_dtype(DType::U32)?;
        Ok(self
            .table
            .index_select(&idx.flatten_all()?, 0)?
            .reshape((q_len, k_len))?)
    }
}

/// Learned relative position bias, (1, heads, q_len, k_len); computed once per forward and shared by
/// every layer of the stack.
#[derive(Clone)]
pub struct PositionBias {
    /// (num_buckets, heads)
    pub weight: Tensor,
    pub table: BucketTable,
}

impl PositionBias {
    pub fn forward(&self, q_len: usize, k_len: usize, offset: usize) -> Result<Tensor> {
        let b = self.table.buckets(q_len, k_len, offset)?;
        let heads = self.weight.dims()[1];
        let bias = self.weight.index_select(&b.flatten_all()?, 0)?; // (q*k, heads)
        Ok(bias
            .reshape((q_len, k_len, heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?)
    }
}

/// Self-attention keys and values of the decoder, preallocated for the whole generation and written
/// in place step by step.
#[derive(Clone)]
pub struct KvCache {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl KvCache {
    pub fn new(
        rows: usize,
        heads: usize,
        max_len: usize,
        d_kv: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (rows, heads, max_len, d_kv);
        let (k, v) = (uninit(shape, dtype, device)?, uninit(shape, dtype, device)?);
        Ok(KvCache { k, v, len: 0 })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append (rows, heads, t, d_kv) and return views of everything cached so far.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dims()[2];
        let cap = self.k.dims()[2];
        if self.len + t > cap {
            // Grow (rarely: only when a caller decodes past the length it planned for).
            let new_cap = (self.len + t).max(cap * 2);
            self.k = refill(&self.k, self.len, new_cap, None)?;
            self.v = refill(&self.v, self.len, new_cap, None)?;
        }
        self.k.slice_set(&k.contiguous()?, 2, self.len)?;
        self.v.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len += t;
        Ok((
            self.k.narrow(2, 0, self.len)?,
            self.v.narrow(2, 0, self.len)?,
        ))
    }

    /// Keep rows `idx` (in that order; repeats allowed, for beams), copying only the filled prefix of
    /// each into a fresh cache of the same capacity.
    pub fn select(&mut self, idx: &Tensor) -> Result<()> {
        let cap = self.k.dims()[2];
        self.k = refill(&self.k, self.len, cap, Some(idx))?;
        self.v = refill(&self.v, self.len, cap, Some(idx))?;
        Ok(())
    }
}

/// An uninitialized cache tensor.
fn uninit(shape: (usize, usize, usize, usize), dtype: DType, device: &Device) -> Result<Tensor> {
    // SAFETY: a cache's positions at and past its `len` are never read (views stop at `len`, and
    // `refill` copies only the filled prefix), so it need not be zeroed: zeroing cost a pass over
    // memory the size of the whole cache before the first step.
    Ok(unsafe { Tensor::empty(shape, dtype, device)? })
}

/// A cache tensor of capacity `cap` holding the first `len` positions of `x` (of its rows `idx`, when
/// given); the rest uninitialized.
fn refill(x: &Tensor, len: usize, cap: usize, idx: Option<&Tensor>) -> Result<Tensor> {
    let (rows, h, _, d) = x.dims4()?;
    let rows = match idx {
        Some(i) => i.dims1()?,
        None => rows,
    };
    let out = uninit((rows, h, cap, d), x.dtype(), x.device())?;
    if len > 0 {
        let filled = x.narrow(2, 0, len)?.contiguous()?;
        let filled = match idx {
            Some(i) => filled.index_select(i, 0)?,
            None => filled,
        };
        out.slice_set(&filled, 2, 0)?;
    }
    Ok(out)
}

/// Cross-attention keys and values over the encoder output, computed once per sequence.
#[derive(Clone)]
pub struct CrossKv {
    pub k: Tensor,
    pub v: Tensor,
}

impl CrossKv {
    pub fn select_rows(&mut self, idx: &Tensor) -> Result<()> {
        self.k = self.k.index_select(idx, 0)?;
        self.v = self.v.index_select(idx, 0)?;
        Ok(())
    }
}

#[derive(Clone)]
pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub heads: usize,
    pub d_kv: usize,
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
            qkv: None,
            kv: None,
        }
    }

    /// Stack the projections for inference (adapters must be merged first). `self_attention` stacks
    /// q, k, v; otherwise k, v (cross-attention projects queries and memory separately).
    pub fn fuse(&mut self, self_attention: bool) -> Result<()> {
        if self.q.lora.is_some() || self.k.lora.is_some() || self.v.lora.is_some() {
            return Ok(());
        }
        let inner = self.q.out_dim();
        if self_attention {
            let w = Tensor::cat(&[&self.q.weight, &self.k.weight, &self.v.weight], 0)?;
            self.q.weight = w.narrow(0, 0, inner)?;
            self.k.weight = w.narrow(0, inner, inner)?;
            self.v.weight = w.narrow(0, 2 * inner, inner)?;
            self.qkv = Some(Linear::new(w));
        } else {
            let w = Tensor::cat(&[&self.k.weight, &self.v.weight], 0)?;
            self.k.weight = w.narrow(0, 0, inner)?;
            self.v.weight = w.narrow(0, inner, inner)?;
            self.kv = Some(Linear::new(w));
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
                let inner = self.q.out_dim();
                self.q.weight = w.weight.narrow(0, 0, inner)?;
                self.k.weight = w.weight.narrow(0, inner, inner)?;
                self.v.weight = w.weight.narrow(0, 2 * inner, inner)?;
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

    /// Attention of `x` over keys/values `k`, `v` (b, heads, s, d_kv) with additive `bias`
    /// (broadcastable to (b, heads, t, s)).
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
        mode: &Mode,
        index: Option<&KvIndex>,
    ) -> Result<Tensor> {
        // One query per row (a decoding step): the fused kernel. Longer queries (the encoder) are
        // faster as batched matmuls.
        if mode.train.is_none() && q.dims()[2] == 1 && super::cpu_attention::applies(q) {
            let (b, h, t, d) = q.dims4()?;
            let out = super::cpu_attention::attention(q, k, v, bias, index)?;
            return self
                .o
                .forward(&out.transpose(1, 2)?.reshape((b, t, h * d))?, mode);
        }
        if index.is_some() {
            return Err(Error::model(
                "indexed keys and values need the fused CPU attention (one f32 query per row)",
            ));
        }
        let scores = q.matmul(&k.t()?)?;
        let scores = scores.broadcast_add(bias)?;
        let w = softmax_last_dim(&scores, mode.train.is_some())?;
        let w = model_dropout(&w, mode)?;
        let out = w.matmul(&v.contiguous()?)?; // (b, h, t, d)
        let (b, h, t, d) = out.dims4()?;
        let out = out.transpose(1, 2)?.reshape((b, t, h * d))?;
        self.o.forward(&out, mode)
    }

    /// Full (uncached) attention: self-attention when `memory` is None.
    pub fn forward(
        &self,
        x: &Tensor,
        memory: Option<&Tensor>,
        bias: &Tensor,
        mode: &Mode,
    ) -> Result<Tensor> {
        if let (None, Some(w), None) = (memory, &self.qkv, mode.train) {
            let qkv = self.project_stacked(x, w, 3)?;
            return self.attend(&qkv[0], &qkv[1], &qkv[2], bias, mode, None);
        }
        let src = memory.unwrap_or(x);
        let q = self.split_heads(&self.q.forward(x, mode)?)?;
        let k = self.split_heads(&self.k.forward(src, mode)?)?;
        let v = self.split_heads(&self.v.forward(src, mode)?)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_hf_rules() {
        // Bidirectional, 32 buckets, max distance 128: exact for |r| < 8, sign split at 16.
        assert_eq!(bucket(0, true, 32, 128), 0);
        assert_eq!(bucket(-3, true, 32, 128), 3);
        assert_eq!(bucket(3, true, 32, 128), 19);
        assert_eq!(bucket(-1000, true, 32, 128), 15);
        assert_eq!(bucket(1000, true, 32, 128), 31);
        // Unidirectional: future positions (r > 0) all share bucket 0.
        assert_eq!(bucket(5, false, 32, 128), 0);
        assert_eq!(bucket(-5, false, 32, 128), 5);
        assert_eq!(bucket(-1000, false, 32, 128), 31);
        // Monotone in distance.
        let b: Vec<u32> = (0..300).map(|r| bucket(-r, false, 32, 128)).collect();
        assert!(b.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn device_bucket_matrix_matches_scalar_rule() {
        let t = BucketTable::new(true, 32, 128, &Device::Cpu).unwrap();
        let m: Vec<Vec<u32>> = t.buckets(5, 300, 2).unwrap().to_vec2().unwrap();
        for (i, row) in m.iter().enumerate() {
            for (j, b) in row.iter().enumerate() {
                assert_eq!(
                    *b,
                    bucket(j as i64 - (i as i64 + 2), true, 32, 128),
                    "q {i} k {j}"
                );
            }
        }
    }

    #[test]
    fn kv_cache_appends_in_place_grows_and_selects_rows() {
        let dev = Device::Cpu;
        let mut c = KvCache::new(2, 1, 2, 3, DType::F32, &dev).unwrap();
        // Row r at step s holds 10 * s + r.
        let step_kv = |s: usize, rows: &[usize]| {
            let vals: Vec<f32> = rows
                .iter()
                .flat_map(|&r| [(10 * s + r) as f32; 3])
                .collect();
            Tensor::from_vec(vals, (rows.len(), 1, 1, 3), &dev).unwrap()
        };
        for step in 0..3 {
            let k = step_kv(step, &[0, 1]);
            let (kk, _) = c.append(&k, &k).unwrap();
            assert_eq!(kk.dims(), &[2, 1, step + 1, 3]);
        }
        let firsts = |c: &KvCache| -> Vec<Vec<f32>> {
            let k = c.k.narrow(2, 0, c.len()).unwrap().contiguous().unwrap();
            (0..k.dims()[0])
                .map(|r| {
                    k.get(r)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                        .chunks(3)
                        .map(|c| c[0])
                        .collect()
                })
                .collect()
        };
        assert_eq!(firsts(&c), vec![vec![0., 10., 20.], vec![1., 11., 21.]]);
        // Keep row 1 twice (beams); the filled prefix moves, appending goes on.
        c.select(&Tensor::new(&[1u32, 1], &dev).unwrap()).unwrap();
        let k = step_kv(3, &[5, 6]);
        c.append(&k, &k).unwrap();
        assert_eq!(
            firsts(&c),
            vec![vec![1., 11., 21., 35.], vec![1., 11., 21., 36.]]
        );
    }
}
