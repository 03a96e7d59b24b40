//! Attention for training on the CPU: `softmax(scale · q kᵀ + bias) v`, dropout on the weights
//! included, as one op with a one-pass backward.
//!
//! Composed from candle's ops, a training step's attention is a score matmul, the scale, the bias,
//! the softmax, the dropout and a second matmul, each with a materialized (rows, heads, queries,
//! keys) tensor and an autograd node that zero-fills and sums its gradient: on a small BART step that
//! was more time than every linear layer together. Here each (row, head) is a loop over its queries
//! (dot products, a softmax, a weighted sum), and the backward recomputes the weights from q and k
//! (flash attention's trade: no score tensor is kept) and gives dq, dk and dv at once. The dropout
//! mask is the composed path's (drawn from the same seed, in the same order), so both paths give the
//! same values. The bias is a constant (masks, a frozen position bias).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::matmul::gemm_into;
use super::{dot, fast_exp};
use crate::error::Result;

struct TrainAttention {
    scale: f32,
    /// Additive bias with dims `bias_dims`, each of the first three 1 or full size.
    bias: Arc<Vec<f32>>,
    bias_dims: [usize; 4],
    /// Inverted-dropout mask over the weights (rows, heads, queries, keys), already scaled.
    mask: Option<Arc<Vec<f32>>>,
}

/// Element offset of (b, h, t, 0) in a 4-d layout.
fn at(l: &Layout, b: usize, h: usize, t: usize) -> usize {
    let s = l.stride();
    l.start_offset() + b * s[0] + h * s[1] + t * s[2]
}

/// Slices of q, k, v with their layouts.
struct Inputs<'a> {
    q: &'a [f32],
    ql: &'a Layout,
    k: &'a [f32],
    kl: &'a Layout,
    v: &'a [f32],
    vl: &'a Layout,
}

impl TrainAttention {
    #[inline(always)]
    fn bias_row(&self, b: usize, h: usize, t: usize) -> &[f32] {
        let [rb, hb, tb, s] = self.bias_dims;
        &self.bias[(((b % rb) * hb + (h % hb)) * tb + (t % tb)) * s..][..s]
    }

    /// The weights of (b, h) into `p` (queries x keys): the scaled scores in one product, the bias,
    /// a softmax per query (before dropout).
    #[inline(always)]
    fn weights_of(&self, x: &Inputs, dims: Dims, b: usize, h: usize, p: &mut [f32]) {
        let (_, _, t, s, d) = dims;
        gemm_into(
            p,
            s,
            (t, d, s),
            &x.q[at(x.ql, b, h, 0)..],
            (x.ql.stride()[2], 1),
            &x.k[at(x.kl, b, h, 0)..],
            (1, x.kl.stride()[2]),
            self.scale,
        );
        for (i, row) in p.chunks_mut(s).enumerate() {
            let bias = self.bias_row(b, h, i);
            let mut max = f32::NEG_INFINITY;
            for (v, c) in row.iter_mut().zip(bias) {
                *v += c;
                max = max.max(*v);
            }
            let mut total = 0f32;
            for v in row.iter_mut() {
                *v = fast_exp(*v - max);
                total += *v;
            }
            let inv = 1.0 / total;
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }

    /// The dropout mask of (b, h), queries x keys.
    #[inline(always)]
    fn mask_of(&self, dims: Dims, b: usize, h: usize) -> Option<&[f32]> {
        let (_, heads, t, s, _) = dims;
        self.mask
            .as_ref()
            .map(|m| &m[(b * heads + h) * t * s..][..t * s])
    }

    /// Row `b`'s output, (queries, heads, d), into `o`; `p` is (queries x keys) scratch.
    #[inline(always)]
    fn forward_row(&self, x: &Inputs, dims: Dims, b: usize, o: &mut [f32], p: &mut [f32]) {
        let (_, heads, t, s, d) = dims;
        for h in 0..heads {
            self.weights_of(x, dims, b, h, p);
            if let Some(m) = self.mask_of(dims, b, h) {
                for (v, k) in p.iter_mut().zip(m) {
                    *v *= k;
                }
            }
            gemm_into(
                &mut o[h * d..],
                heads * d,
                (t, s, d),
                p,
                (s, 1),
                &x.v[at(x.vl, b, h, 0)..],
                (x.vl.stride()[2], 1),
                1.0,
            );
        }
    }

    /// Row `b`'s dq, dk and dv from the output's gradient ((rows, queries, heads, d)); `p` and `dp`
    /// are (queries x keys) scratch.
    #[inline(always)]
    fn backward_row(
        &self,
        x: &Inputs,
        dims: Dims,
        b: usize,
        grad: &[f32],
        g: Grads,
        (p, dp): (&mut [f32], &mut [f32]),
    ) {
        let (_, heads, t, s, d) = dims;
        let go = &grad[b * t * heads * d..];
        for h in 0..heads {
            self.weights_of(x, dims, b, h, p);
            let mask = self.mask_of(dims, b, h);
            // dP' = dO Vᵀ: the gradient of the weights after dropout.
            gemm_into(
                dp,
                s,
                (t, d, s),
                &go[h * d..],
                (heads * d, 1),
                &x.v[at(x.vl, b, h, 0)..],
                (1, x.vl.stride()[2]),
                1.0,
            );
            // dS = P ⊙ (dP - Σ_j P dP) with dP = M ⊙ dP', scaled; then P' = M ⊙ P for dV.
            for i in 0..t {
                let (pr, dr) = (&mut p[i * s..][..s], &mut dp[i * s..][..s]);
                let mr = mask.map(|m| &m[i * s..][..s]);
                if let Some(m) = mr {
                    for (v, k) in dr.iter_mut().zip(m) {
                        *v *= k;
                    }
                }
                let di = dot(pr, dr);
                for (dv, pv) in dr.iter_mut().zip(pr.iter()) {
                    *dv = pv * (*dv - di) * self.scale;
                }
                if let Some(m) = mr {
                    for (v, k) in pr.iter_mut().zip(m) {
                        *v *= k;
                    }
                }
            }
            // dV = P'ᵀ dO, dQ = dS K, dK = dSᵀ Q.
            gemm_into(
                &mut g.dv[h * s * d..],
                d,
                (s, t, d),
                p,
                (1, s),
                &go[h * d..],
                (heads * d, 1),
                1.0,
            );
            gemm_into(
                &mut g.dq[h * t * d..],
                d,
                (t, s, d),
                dp,
                (s, 1),
                &x.k[at(x.kl, b, h, 0)..],
                (x.kl.stride()[2], 1),
                1.0,
            );
            gemm_into(
                &mut g.dk[h * s * d..],
                d,
                (s, t, d),
                dp,
                (1, s),
                &x.q[at(x.ql, b, h, 0)..],
                (x.ql.stride()[2], 1),
                1.0,
            );
        }
    }
}

/// One row's gradient slices: dq (heads, t, d), dk and dv (heads, s, d).
struct Grads<'a> {
    dq: &'a mut [f32],
    dk: &'a mut [f32],
    dv: &'a mut [f32],
}

/// (rows, heads, queries, keys, d)
type Dims = (usize, usize, usize, usize, usize);

fn inputs<'a>(
    q: &'a CpuStorage,
    ql: &'a Layout,
    k: &'a CpuStorage,
    kl: &'a Layout,
    v: &'a CpuStorage,
    vl: &'a Layout,
) -> candle_core::Result<Inputs<'a>> {
    for l in [ql, kl, vl] {
        if l.dims().len() != 4 || l.stride()[3] != 1 {
            candle_core::bail!("train-attention: 4-d inputs with a contiguous last dimension");
        }
    }
    Ok(Inputs {
        q: q.as_slice::<f32>()?,
        ql,
        k: k.as_slice::<f32>()?,
        kl,
        v: v.as_slice::<f32>()?,
        vl,
    })
}

impl CustomOp3 for TrainAttention {
    fn name(&self) -> &'static str {
        "train-attention"
    }

    /// The output in (rows, queries, heads, d) layout: the output projection's input as it is.
    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = inputs(qs, ql, ks, kl, vs, vl)?;
        let (rows, heads, t, d) = ql.shape().dims4()?;
        let s = kl.dims()[2];
        if self.bias_dims[3] != s {
            candle_core::bail!(
                "train-attention: a bias over {} keys, there are {s}",
                self.bias_dims[3]
            );
        }
        let mut out = vec![0f32; rows * t * heads * d];
        out.par_chunks_mut(t * heads * d).enumerate().for_each_init(
            || vec![0f32; t * s],
            |p, (b, o)| self.forward_row(&x, (rows, heads, t, s, d), b, o, p),
        );
        Ok((CpuStorage::F32(out), Shape::from((rows, t, heads, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // One op over (q, k, v), the output's gradient held by the struct.
        let op = TrainAttentionBackward {
            forward: self,
            grad: grad.contiguous()?,
        };
        let all = q.apply_op3_no_bwd(k, v, &op)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        Ok((
            Some(all.narrow(0, 0, nq)?.reshape(q.shape())?),
            Some(all.narrow(0, nq, nk)?.reshape(k.shape())?),
            Some(all.narrow(0, nq + nk, nk)?.reshape(v.shape())?),
        ))
    }
}

/// `[dq; dk; dv]` flat (each row-major in its input's shape).
struct TrainAttentionBackward<'a> {
    forward: &'a TrainAttention,
    /// The output's gradient, (rows, queries, heads, d) contiguous.
    grad: Tensor,
}

impl CustomOp3 for TrainAttentionBackward<'_> {
    fn name(&self) -> &'static str {
        "train-attention-backward"
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
        let x = inputs(qs, ql, ks, kl, vs, vl)?;
        let f = self.forward;
        let (rows, heads, t, d) = ql.shape().dims4()?;
        let s = kl.dims()[2];
        let grad: Vec<f32> = self.grad.flatten_all()?.to_vec1()?;
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; rows * heads * t * d],
            vec![0f32; rows * heads * s * d],
            vec![0f32; rows * heads * s * d],
        );
        dq.par_chunks_mut(heads * t * d)
            .zip(dk.par_chunks_mut(heads * s * d))
            .zip(dv.par_chunks_mut(heads * s * d))
            .enumerate()
            .for_each_init(
                || (vec![0f32; t * s], vec![0f32; t * s]),
                |(p, dp), (b, ((dq, dk), dv))| {
                    let grads = Grads { dq, dk, dv };
                    f.backward_row(&x, (rows, heads, t, s, d), b, &grad, grads, (p, dp))
                },
            );
        let mut all = dq;
        all.extend(dk);
        all.extend(dv);
        let n = all.len();
        Ok((CpuStorage::F32(all), Shape::from(n)))
    }
}

/// `softmax(scale · q kᵀ + bias) · v` with gradients into q, k and v: q (rows, heads, queries, d), k
/// and v (rows, heads, keys, d) (strided views allowed, last dimension contiguous), a constant bias
/// broadcastable to (rows, heads, queries, keys), and an optional inverted-dropout `mask` of
/// (rows, heads, queries, keys) elements. Returns (rows, heads, queries, d) (a view of a (rows,
/// queries, heads, d) tensor).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
    mask: Option<Vec<f32>>,
) -> Result<Tensor> {
    let (b0, b1, b2, b3) = bias.dims4()?;
    let op = TrainAttention {
        scale: scale as f32,
        bias: Arc::new(bias.contiguous()?.flatten_all()?.to_vec1()?),
        bias_dims: [b0, b1, b2, b3],
        mask: mask.map(Arc::new),
    };
    Ok(q.apply_op3(k, v, op)?.transpose(1, 2)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::max_abs_diff;
    use crate::model::mode::{Dropout, Mode, TrainState};
    use crate::model::ops::composed;
    use candle_core::{Device, Var};

    /// Values and the gradients of q, k and v as autograd gives them through the composed ops, with a
    /// padding bias broadcast over heads and queries, strided (head-split) inputs, and dropout.
    #[test]
    fn matches_the_composed_path_values_and_gradients() {
        let dev = Device::Cpu;
        let (b, h, t, s, d) = (3, 2, 5, 7, 8);
        let qx = Var::randn(0f32, 1.0, (b, t, h * d), &dev).unwrap();
        let kx = Var::randn(0f32, 1.0, (b, s, h * d), &dev).unwrap();
        let vx = Var::randn(0f32, 1.0, (b, s, h * d), &dev).unwrap();
        let heads = |x: &Tensor, n| x.reshape((b, n, h, d)).unwrap().transpose(1, 2).unwrap();
        let mut pad = vec![0f32; b * s];
        pad[s - 1] = -1e9;
        pad[2 * s - 3..2 * s].fill(-1e9);
        let bias = Tensor::from_vec(pad, (b, 1, 1, s), &dev).unwrap();
        let target = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev).unwrap();
        for p in [0.0, 0.3] {
            let run = |fused: bool| {
                let st = std::cell::RefCell::new(TrainState::new(
                    Dropout::uniform(p),
                    crate::rng::Rng::new(4),
                ));
                let mode = Mode { train: Some(&st) };
                let (q, k, v) = (
                    heads(qx.as_tensor(), t),
                    heads(kx.as_tensor(), s),
                    heads(vx.as_tensor(), s),
                );
                let o = if fused {
                    let mask = (p > 0.0).then(|| {
                        let seed = mode.next_seed().unwrap();
                        crate::model::ops::dropout_mask(b * h * t * s, p, seed)
                    });
                    attention(&q, &k, &v, &bias, 0.35, mask).unwrap()
                } else {
                    // The composed path takes heads split into contiguous copies, as the model makes.
                    let c = |x: Tensor| x.contiguous().unwrap();
                    let q = (c(q) * 0.35).unwrap();
                    composed::attention(&q, &c(k), &c(v), &bias, None, &mode).unwrap()
                };
                let g = (&o * &target)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let grads: Vec<Tensor> = [&qx, &kx, &vx]
                    .iter()
                    .map(|x| g.get(x.as_tensor()).unwrap().clone())
                    .collect();
                (o, grads)
            };
            let ((of, gf), (oc, gc)) = (run(true), run(false));
            assert!(
                max_abs_diff(&of, &oc) < 1e-5,
                "p {p}: values {}",
                max_abs_diff(&of, &oc)
            );
            for (name, (a, c)) in ["q", "k", "v"].iter().zip(gf.iter().zip(&gc)) {
                let d = max_abs_diff(a, c);
                assert!(d < 1e-4, "p {p}: d{name} differs by {d}");
            }
        }
    }
}
