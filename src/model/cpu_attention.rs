//! Fused CPU kernels for inference: attention and T5's RMS norm in one pass each.
//!
//! Composed from tensor ops these cost many passes over memory and, for attention, one small gemm
//! call per (row, head) — candle loops over the batch dimension of a matmul — plus a materialized
//! score tensor. In decoding, with tens of ops per layer and step, that overhead is larger than the
//! arithmetic. Here each (row, head, query) is a dot-product loop, a softmax and a weighted sum over
//! the keys and values (which may be strided views of the KV cache), spread over threads; the norm is
//! one pass per row. Inference only (no backward pass); GPUs and training keep the composed ops.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;

struct FusedAttention<'a> {
    /// Additive bias, broadcast over (rows, heads, queries): `bias` has dims `bias_dims` where each of
    /// the first three is 1 or the full size, and the last is the key length.
    bias: Vec<f32>,
    bias_dims: [usize; 4],
    /// Optional per-query-row indirection into the keys and values (see [`KvIndex`]).
    index: Option<&'a KvIndex>,
}

/// Which key/value row each query row reads, and how many of its leading keys count.
///
/// Cross-attention keys and values are computed once per batch; when rows finish (or beams reorder)
/// only this small map changes instead of copying every layer's keys and values. Keys past a row's
/// length are padding: their softmax weight is exactly zero (a bias of -1e9), so skipping them gives
/// the same result with less memory traffic.
#[derive(Clone, Debug, PartialEq)]
pub struct KvIndex {
    /// Key/value row of each query row.
    pub rows: Vec<u32>,
    /// Keys that count for each query row (0: all of them).
    pub lens: Vec<u32>,
}

impl KvIndex {
    /// Identity map for `rows` rows of the 0/1 `mask` (rows, len): each row's length is the position
    /// after its last kept token.
    pub fn from_mask(mask: &Tensor) -> Result<KvIndex> {
        let m: Vec<Vec<u8>> = mask.to_dtype(DType::U8)?.to_vec2()?;
        Ok(KvIndex {
            rows: (0..m.len() as u32).collect(),
            lens: m
                .iter()
                .map(|r| r.iter().rposition(|&x| x != 0).map_or(0, |p| p as u32 + 1))
                .collect(),
        })
    }

    /// Keep query rows `idx` (in that order; repeats allowed).
    pub fn select(&mut self, idx: &[u32]) {
        self.rows = idx.iter().map(|&i| self.rows[i as usize]).collect();
        self.lens = idx.iter().map(|&i| self.lens[i as usize]).collect();
    }
}

/// Sum of `a[i] * b[i]` in 16 independent lanes, so the compiler can keep it in SIMD registers (a
/// single running f32 sum cannot be vectorized without reassociation). The order of operations is
/// fixed, so every instruction set gives the same bits.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// One query against `scores.len()` keys: keys (and values) start at `k[0]` (`v[0]`) and are
/// `ks` (`vs`) elements apart.
struct OneQuery<'a> {
    q: &'a [f32],
    k: &'a [f32],
    ks: usize,
    v: &'a [f32],
    vs: usize,
    bias: &'a [f32],
}

/// softmax(q·k + bias) · v into `out` (zeroed), with `scores` as scratch.
#[inline(always)]
fn attend_one(j: &OneQuery, scores: &mut [f32], out: &mut [f32]) {
    let d = j.q.len();
    let mut max = f32::NEG_INFINITY;
    for (i, s) in scores.iter_mut().enumerate() {
        *s = dot(j.q, &j.k[i * j.ks..][..d]) + j.bias[i];
        max = max.max(*s);
    }
    let mut total = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        total += *s;
    }
    let inv = 1.0 / total;
    for (i, s) in scores.iter().enumerate() {
        let w = s * inv;
        for (o, x) in out.iter_mut().zip(&j.v[i * j.vs..][..d]) {
            *o += w * x;
        }
    }
}

/// The same loop compiled for wider vectors (chosen at run time): the kernel is bound by memory and
/// by the width of its dot products, and the crate is built for the baseline x86-64.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_one_avx512(j: &OneQuery, scores: &mut [f32], out: &mut [f32]) {
    attend_one(j, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_one_avx2(j: &OneQuery, scores: &mut [f32], out: &mut [f32]) {
    attend_one(j, scores, out)
}

/// 2: AVX-512, 1: AVX2, 0: baseline.
fn simd_level() -> u8 {
    static LEVEL: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return 2;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return 1;
            }
        }
        0
    })
}

fn attend_one_dispatch(j: &OneQuery, scores: &mut [f32], out: &mut [f32]) {
    match simd_level() {
        // SAFETY: the features were detected on this CPU.
        #[cfg(target_arch = "x86_64")]
        2 => unsafe { attend_one_avx512(j, scores, out) },
        #[cfg(target_arch = "x86_64")]
        1 => unsafe { attend_one_avx2(j, scores, out) },
        _ => attend_one(j, scores, out),
    }
}

/// One query row against `n` keys for every head at once, for keys whose heads sit side by side in
/// memory (the stacked cross-attention projection): each key is then one contiguous read of
/// heads x d values instead of one short read per head far apart, which the prefetcher follows.
/// Per head, the arithmetic is `attend_one`'s in the same order: the same bits.
struct AllHeads<'a> {
    /// heads x d, contiguous.
    q: &'a [f32],
    k: &'a [f32],
    ks: usize,
    v: &'a [f32],
    vs: usize,
    heads: usize,
    n: usize,
    bias: &'a [f32],
    /// Offset in `bias` of each head's `n` biases.
    bias_at: &'a [usize],
}

/// Scratch: scores (heads x n) and per-head inverse totals.
#[inline(always)]
fn attend_heads(j: &AllHeads, scores: &mut [f32], inv: &mut [f32], out: &mut [f32]) {
    let (heads, n) = (j.heads, j.n);
    let d = j.q.len() / heads;
    for i in 0..n {
        let krow = &j.k[i * j.ks..][..heads * d];
        for h in 0..heads {
            scores[h * n + i] =
                dot(&j.q[h * d..][..d], &krow[h * d..][..d]) + j.bias[j.bias_at[h] + i];
        }
    }
    for h in 0..heads {
        let s = &mut scores[h * n..][..n];
        let mut max = f32::NEG_INFINITY;
        for x in s.iter() {
            max = max.max(*x);
        }
        let mut total = 0f32;
        for x in s.iter_mut() {
            *x = (*x - max).exp();
            total += *x;
        }
        inv[h] = 1.0 / total;
    }
    for i in 0..n {
        let vrow = &j.v[i * j.vs..][..heads * d];
        for h in 0..heads {
            let w = scores[h * n + i] * inv[h];
            for (o, x) in out[h * d..][..d].iter_mut().zip(&vrow[h * d..][..d]) {
                *o += w * x;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_heads_avx512(j: &AllHeads, scores: &mut [f32], inv: &mut [f32], out: &mut [f32]) {
    attend_heads(j, scores, inv, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_heads_avx2(j: &AllHeads, scores: &mut [f32], inv: &mut [f32], out: &mut [f32]) {
    attend_heads(j, scores, inv, out)
}

fn attend_heads_dispatch(j: &AllHeads, scores: &mut [f32], inv: &mut [f32], out: &mut [f32]) {
    match simd_level() {
        // SAFETY: the features were detected on this CPU.
        #[cfg(target_arch = "x86_64")]
        2 => unsafe { attend_heads_avx512(j, scores, inv, out) },
        #[cfg(target_arch = "x86_64")]
        1 => unsafe { attend_heads_avx2(j, scores, inv, out) },
        _ => attend_heads(j, scores, inv, out),
    }
}

/// Element offset of (b, h, t, 0) in a 4-d layout.
fn at(l: &Layout, b: usize, h: usize, t: usize) -> usize {
    let s = l.stride();
    l.start_offset() + b * s[0] + h * s[1] + t * s[2]
}

impl CustomOp3 for FusedAttention<'_> {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            qs.as_slice::<f32>()?,
            ks.as_slice::<f32>()?,
            vs.as_slice::<f32>()?,
        );
        let (rows, heads, queries, d) = ql.shape().dims4()?;
        let (kv_rows, len) = (kl.dims()[0], kl.dims()[2]);
        if kl.stride()[3] != 1 || vl.stride()[3] != 1 || ql.stride()[3] != 1 {
            candle_core::bail!("fused-attention: the last dimension must be contiguous");
        }
        let [rb, hb, tb, bl] = self.bias_dims;
        if bl != len {
            candle_core::bail!("fused-attention: bias covers {bl} keys, there are {len}");
        }
        if let Some(ix) = self.index {
            if ix.rows.len() != rows || ix.lens.len() != rows {
                candle_core::bail!(
                    "fused-attention: index covers {} rows, not {rows}",
                    ix.rows.len()
                );
            }
            if ix.rows.iter().any(|&r| r as usize >= kv_rows) {
                candle_core::bail!("fused-attention: index past the {kv_rows} key rows");
            }
        }
        let mut out = vec![0f32; rows * heads * queries * d];
        let row_of = |r: usize| -> (usize, usize) {
            match self.index {
                Some(ix) => (
                    ix.rows[r] as usize,
                    match ix.lens[r] as usize {
                        0 => len,
                        n => n.min(len),
                    },
                ),
                None => (r, len),
            }
        };
        if queries == 1 && kl.stride()[1] == d && vl.stride()[1] == d && ql.is_contiguous() {
            out.par_chunks_mut(heads * d).enumerate().for_each_init(
                || {
                    (
                        vec![0f32; heads * len],
                        vec![0f32; heads],
                        vec![0usize; heads],
                    )
                },
                |(scores, inv, bias_at), (r, o)| {
                    let (kr, n) = row_of(r);
                    for (h, b) in bias_at.iter_mut().enumerate() {
                        *b = ((r % rb) * hb + (h % hb)) * tb * len;
                    }
                    let job = AllHeads {
                        q: &q[at(ql, r, 0, 0)..][..heads * d],
                        k: &k[at(kl, kr, 0, 0)..],
                        ks: kl.stride()[2],
                        v: &v[at(vl, kr, 0, 0)..],
                        vs: vl.stride()[2],
                        heads,
                        n,
                        bias: &self.bias,
                        bias_at,
                    };
                    attend_heads_dispatch(&job, &mut scores[..heads * n], inv, o);
                },
            );
            return Ok((CpuStorage::F32(out), Shape::from((rows, heads, queries, d))));
        }
        out.par_chunks_mut(d).enumerate().for_each_init(
            || vec![0f32; len],
            |scores, (i, o)| {
                let (r, h, t) = (i / (heads * queries), (i / queries) % heads, i % queries);
                let (kr, n) = row_of(r);
                let bi = (((r % rb) * hb + (h % hb)) * tb + (t % tb)) * len;
                let job = OneQuery {
                    q: &q[at(ql, r, h, t)..][..d],
                    k: &k[at(kl, kr, h, 0)..],
                    ks: kl.stride()[2],
                    v: &v[at(vl, kr, h, 0)..],
                    vs: vl.stride()[2],
                    bias: &self.bias[bi..][..n],
                };
                attend_one_dispatch(&job, &mut scores[..n], o);
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((rows, heads, queries, d))))
    }
}

static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turn the fused kernels off (to compare against the composed ops in benchmarks).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the fused kernels apply: f32 tensors on the CPU.
pub fn applies(x: &Tensor) -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed)
        && x.device().is_cpu()
        && x.dtype() == DType::F32
}

/// softmax(q k^T + bias) v for q (rows, heads, queries, d), k and v (kv_rows, heads, len, d) (strided
/// views allowed), and a bias broadcastable to (rows, heads, queries, len). Without an `index`, query
/// row r reads key row r.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    index: Option<&KvIndex>,
) -> Result<Tensor> {
    let (b0, b1, b2, b3) = bias.dims4()?;
    let bias_vec: Vec<f32> = bias
        .to_dtype(DType::F32)?
        .contiguous()?
        .flatten_all()?
        .to_vec1()?;
    let op = FusedAttention {
        bias: bias_vec,
        bias_dims: [b0, b1, b2, b3],
        index,
    };
    Ok(q.contiguous()?.apply_op3_no_bwd(k, v, &op)?)
}

struct FusedRmsNorm {
    eps: f32,
}

impl CustomOp2 for FusedRmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = *xl.dims().last().unwrap_or(&1);
        let (x, w) = (
            super::contiguous_f32(xs, xl, self.name())?,
            super::contiguous_f32(ws, wl, self.name())?,
        );
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, row)| {
                let ms: f32 = dot(row, row) / d as f32;
                let scale = 1.0 / (ms + self.eps).sqrt();
                for ((o, v), g) in o.iter_mut().zip(row).zip(w) {
                    *o = v * scale * g;
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// T5's RMS norm `x * rsqrt(mean(x^2) + eps) * weight` over the last dimension, in one pass.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op2_no_bwd(&weight.contiguous()?, &FusedRmsNorm { eps: eps as f32 })?)
}

/// `act(a) * b` where each row of the input is `[a | b]` (the stacked `wi_0`, `wi_1` projections of a
/// gated feed-forward block): one parallel pass instead of a single-threaded activation, a multiply
/// and their temporaries. The activation formulas are `fused_activation::value` (candle's, with a fast tanh).
struct FusedGatedAct {
    act: super::config::Activation,
}

impl FusedGatedAct {
    #[inline(always)]
    fn act(&self, v: f32) -> f32 {
        super::fused_activation::value(self.act, v)
    }
}

impl candle_core::CustomOp1 for FusedGatedAct {
    fn name(&self) -> &'static str {
        "fused-gated-act"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = super::contiguous_f32(s, l, self.name())?;
        let dims = l.dims();
        let width = dims[dims.len() - 1];
        let f = width / 2;
        let rows = data.len() / width.max(1);
        let mut out = vec![0f32; rows * f];
        out.par_chunks_mut(f.max(1))
            .zip(data.par_chunks(width.max(1)))
            .with_min_len(16)
            .for_each(|(o, row)| {
                let (a, b) = row.split_at(f);
                for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                    *o = self.act(a) * b;
                }
            });
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank >= 1") = f;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// `act(y[.., :f]) * y[.., f:]` for `y` = the stacked gate projections (inference, CPU, f32).
pub fn gated_act(y: &Tensor, act: super::config::Activation) -> Result<Tensor> {
    Ok(y.contiguous()?.apply_op1_no_bwd(&FusedGatedAct { act })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Tensor {
        let scores = q
            .matmul(&k.t().unwrap())
            .unwrap()
            .broadcast_add(bias)
            .unwrap();
        candle_nn::ops::softmax_last_dim(&scores)
            .unwrap()
            .matmul(&v.contiguous().unwrap())
            .unwrap()
    }

    use crate::model::max_abs_diff as max_diff;

    #[test]
    fn gated_activation_matches_composed_ops() {
        use crate::model::config::Activation;
        use crate::model::layers::activate;
        let dev = Device::Cpu;
        let y = Tensor::randn(0f32, 2.0, (3, 5, 2 * 7), &dev).unwrap();
        for act in [Activation::GeluNew, Activation::Silu, Activation::Relu] {
            let composed = (activate(&y.narrow(2, 0, 7).unwrap(), act).unwrap()
                * y.narrow(2, 7, 7).unwrap())
            .unwrap();
            let fused = gated_act(&y, act).unwrap();
            assert_eq!(fused.dims(), &[3, 5, 7]);
            // Bit-identical but for GELU, whose tanh is the fast rational approximation (within 1e-6
            // relative of libm's): its error scales with |a| * |b|.
            let tol = if act == Activation::GeluNew {
                1e-6
            } else {
                0.0
            };
            let scale = ((y.narrow(2, 0, 7).unwrap().abs().unwrap() + 1.0).unwrap()
                * (y.narrow(2, 7, 7).unwrap().abs().unwrap() + 1.0).unwrap())
            .unwrap();
            let diff = crate::model::max_scaled_diff(&composed, &fused, &scale);
            assert!(diff <= tol, "{act:?}: {diff}");
        }
    }

    #[test]
    fn matches_composed_attention_on_strided_caches() {
        let dev = Device::Cpu;
        let (rows, heads, len, d, cap) = (3, 2, 5, 4, 9);
        let q = Tensor::randn(0f32, 1.0, (rows, heads, 1, d), &dev).unwrap();
        // Keys and values as views into larger caches (as the KV cache hands them out).
        let kc = Tensor::randn(0f32, 1.0, (rows, heads, cap, d), &dev).unwrap();
        let vc = Tensor::randn(0f32, 1.0, (rows, heads, cap, d), &dev).unwrap();
        let (k, v) = (kc.narrow(2, 0, len).unwrap(), vc.narrow(2, 0, len).unwrap());
        let bias = Tensor::randn(0f32, 1.0, (1, heads, 1, len), &dev).unwrap();
        assert!(
            max_diff(
                &attention(&q, &k, &v, &bias, None).unwrap(),
                &reference(&q, &k, &v, &bias)
            ) < 1e-5
        );
        // A per-row padding bias broadcast over heads.
        let pad = Tensor::new(&[0f32, 0., -1e9, -1e9, 0.], &dev)
            .unwrap()
            .reshape((1, 1, 1, len))
            .unwrap()
            .repeat((rows, 1, 1, 1))
            .unwrap();
        assert!(
            max_diff(
                &attention(&q, &k, &v, &pad, None).unwrap(),
                &reference(&q, &k, &v, &pad)
            ) < 1e-5
        );
        // Several queries (the encoder): bias over (heads, queries, keys) plus padding.
        let q = Tensor::randn(0f32, 1.0, (rows, heads, len, d), &dev).unwrap();
        let full = Tensor::randn(0f32, 1.0, (1, heads, len, len), &dev)
            .unwrap()
            .broadcast_add(&pad)
            .unwrap();
        assert!(
            max_diff(
                &attention(&q, &k, &v, &full, None).unwrap(),
                &reference(&q, &k, &v, &full)
            ) < 1e-5
        );
    }

    #[test]
    fn index_maps_rows_and_skips_padding_exactly() {
        let dev = Device::Cpu;
        let (kv_rows, heads, len, d) = (3, 2, 6, 20);
        let k = Tensor::randn(0f32, 1.0, (kv_rows, heads, len, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (kv_rows, heads, len, d), &dev).unwrap();
        let mask = Tensor::new(
            &[[1u8, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]],
            &dev,
        )
        .unwrap();
        let mut index = KvIndex::from_mask(&mask).unwrap();
        assert_eq!(index.lens, vec![6, 2, 4]);
        // Rows finish and beams repeat: query rows read key rows 2, 1, 1.
        index.select(&[2, 1, 1]);
        assert_eq!(
            (index.rows.clone(), index.lens.clone()),
            (vec![2, 1, 1], vec![4, 2, 2])
        );
        let pick = Tensor::new(&[2u32, 1, 1], &dev).unwrap();
        let bias = crate::model::attention::padding_bias(
            &mask.index_select(&pick, 0).unwrap(),
            DType::F32,
        )
        .unwrap();
        let q = Tensor::randn(0f32, 1.0, (3, heads, 1, d), &dev).unwrap();
        let (kg, vg) = (
            k.index_select(&pick, 0).unwrap(),
            v.index_select(&pick, 0).unwrap(),
        );
        let full = attention(&q, &kg, &vg, &bias, None).unwrap();
        let indexed = attention(&q, &k, &v, &bias, Some(&index)).unwrap();
        // Padding keys weigh exactly zero, so skipping them changes no bit.
        assert_eq!(max_diff(&full, &indexed), 0.0);
        assert!(max_diff(&full, &reference(&q, &kg, &vg, &bias)) < 1e-5);
        index.rows[0] = 3;
        assert!(attention(&q, &k, &v, &bias, Some(&index)).is_err());
    }

    #[test]
    fn heads_side_by_side_give_the_same_bits() {
        let dev = Device::Cpu;
        let (rows, heads, len, d) = (3, 4, 7, 24);
        // (rows, len, heads, d) viewed as (rows, heads, len, d): a key's heads are adjacent, as in
        // the stacked cross-attention projection.
        let k = Tensor::randn(0f32, 1.0, (rows, len, heads, d), &dev)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let v = Tensor::randn(0f32, 1.0, (rows, len, heads, d), &dev)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        assert_eq!(k.stride()[1], d);
        let q = Tensor::randn(0f32, 1.0, (rows, heads, 1, d), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, (1, heads, 1, len), &dev).unwrap();
        let side_by_side = attention(&q, &k, &v, &bias, None).unwrap();
        let (kc, vc) = (k.contiguous().unwrap(), v.contiguous().unwrap());
        let per_head = attention(&q, &kc, &vc, &bias, None).unwrap();
        assert_eq!(max_diff(&side_by_side, &per_head), 0.0);
        assert!(max_diff(&side_by_side, &reference(&q, &kc, &vc, &bias)) < 1e-5);
        let mask = Tensor::new(
            &[
                [1u8, 1, 1, 1, 1, 1, 1],
                [1, 1, 1, 0, 0, 0, 0],
                [1, 0, 0, 0, 0, 0, 0],
            ],
            &dev,
        )
        .unwrap();
        let mut index = KvIndex::from_mask(&mask).unwrap();
        index.select(&[1, 2, 0]);
        let pick = Tensor::new(&[1u32, 2, 0], &dev).unwrap();
        let pad = crate::model::attention::padding_bias(
            &mask.index_select(&pick, 0).unwrap(),
            DType::F32,
        )
        .unwrap();
        let indexed = attention(&q, &k, &v, &pad, Some(&index)).unwrap();
        let gathered = attention(
            &q,
            &kc.index_select(&pick, 0).unwrap(),
            &vc.index_select(&pick, 0).unwrap(),
            &pad,
            None,
        )
        .unwrap();
        assert_eq!(max_diff(&indexed, &gathered), 0.0);
    }

    #[test]
    fn rms_norm_matches_composed() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (3, 7, 16), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 16, &dev).unwrap();
        let composed = crate::model::layers::RmsNorm {
            weight: w.clone(),
            eps: 1e-6,
        }
        .forward_composed(&x)
        .unwrap();
        assert!(max_diff(&rms_norm(&x, &w, 1e-6).unwrap(), &composed) < 1e-5);
    }
}
