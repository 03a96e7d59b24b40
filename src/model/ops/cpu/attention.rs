//! Attention for decoding on the CPU: softmax(q k^T + bias) v in one parallel pass.
//!
//! Composed from tensor ops this costs many passes over memory, one small gemm call per (row, head)
//! (candle loops over the batch dimension of a matmul) and a materialized score tensor; in decoding,
//! with tens of ops per layer and step, that overhead is larger than the arithmetic. Here each (row,
//! head, query) is a dot-product loop, a softmax and a weighted sum over the keys and values (which
//! may be strided views of the KV cache, or read through a [`KvIndex`]), spread over threads.
//! Inference only: no backward pass.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{dot, simd_level};
use crate::error::Result;
use crate::model::kv_cache::KvIndex;

struct FusedAttention<'a> {
    /// Additive bias, broadcast over (rows, heads, queries): `bias` has dims `bias_dims` where each of
    /// the first three is 1 or the full size, and the last is the key length.
    bias: Vec<f32>,
    bias_dims: [usize; 4],
    /// Optional per-query-row indirection into the keys and values (see [`KvIndex`]).
    index: Option<&'a KvIndex>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::max_abs_diff as max_diff;
    use crate::model::mode::Mode;
    use crate::model::ops::composed;
    use candle_core::Device;

    /// The composed form (candle's batched matmuls and softmax), as other devices run it.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Tensor {
        composed::attention(q, k, v, bias, None, &Mode::INFER).unwrap()
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
        // Rows finish and beams repeat: query rows read key rows 2, 1, 1 (see kv_cache's tests).
        index.select(&[2, 1, 1]);
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
}
