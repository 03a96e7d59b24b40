//! A LoRA linear layer for training on the CPU in f32 as one op: `y = x Wᵀ (+ b) + s · (m ⊙ x) Aᵀ Bᵀ`
//! for a frozen weight `W` (out, in) and bias, the adapter `A` (r, in) and `B` (out, r), scale `s` and
//! an optional dropout mask `m` on the adapter's input, with a backward that gives `dx`, `dA` and `dB`
//! in one pass.
//!
//! Composed, the same layer is a reshape, the frozen product, the dropout, two small products, the
//! scale, the sum and a reshape back: eight autograd nodes, each of which candle's backward gives a
//! fresh zero-filled gradient buffer of the layer's full size and sums into it. In LoRA training
//! that bookkeeping was as costly as the frozen products themselves on small models. The mask is the
//! composed path's (drawn by the caller from the same seed), so both paths give the same values.
//! Inputs of any rank whose last dimension is `in` (contiguous) keep their leading dimensions.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::matmul::gemm_f32;
use super::{contiguous_f32, par_map2, storage_f32};
use crate::error::Result;

struct LoraLinear {
    /// The frozen weight (out, in).
    weight: Tensor,
    /// The frozen bias (out).
    bias: Option<Tensor>,
    scale: f32,
    /// The inverted-dropout mask over x's elements, already scaled.
    mask: Option<Vec<f32>>,
}

impl LoraLinear {
    /// `m ⊙ x`, or `x` without a mask.
    fn masked<'a>(&self, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match &self.mask {
            Some(m) => std::borrow::Cow::Owned(par_map2(x, m, |a, b| a * b)),
            None => std::borrow::Cow::Borrowed(x),
        }
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = self.name();
        let x = contiguous_f32(x, xl, op)?;
        let (a, b) = (contiguous_f32(a, al, op)?, contiguous_f32(b, bl, op)?);
        let dims = xl.dims();
        let k = *dims.last().unwrap_or(&0);
        let m = x.len().checked_div(k).unwrap_or(0);
        let ((n, k2), (r, k3), (n2, r2)) = (
            self.weight.dims2()?,
            al.shape().dims2()?,
            bl.shape().dims2()?,
        );
        if k != k2 || k != k3 || n != n2 || r != r2 {
            candle_core::bail!("{op}: x (.., {k}), W ({n}, {k2}), A ({r}, {k3}), B ({n2}, {r2})");
        }
        if self.mask.as_ref().is_some_and(|mk| mk.len() != x.len()) {
            candle_core::bail!("{op}: the dropout mask does not cover x");
        }
        let (ws, wl) = self.weight.storage_and_layout();
        let w = storage_f32(&ws, wl, op)?;
        // The frozen product (Wᵀ is W with its strides swapped), then the adapter's path.
        let mut y = gemm_f32((m, k, n), x, (k, 1), w, (1, k));
        let xd = self.masked(x);
        let u = gemm_f32((m, k, r), &xd, (k, 1), a, (1, k));
        let v = gemm_f32((m, r, n), &u, (r, 1), b, (1, r));
        let bias_storage = self.bias.as_ref().map(|t| t.storage_and_layout());
        let bias = match &bias_storage {
            Some((bs, blay)) => {
                let bias = storage_f32(bs, blay, op)?;
                if bias.len() != n {
                    candle_core::bail!("{op}: a bias of {} for {n} outputs", bias.len());
                }
                Some(bias)
            }
            None => None,
        };
        let s = self.scale;
        y.par_chunks_mut(n.max(1))
            .zip(v.par_chunks(n.max(1)))
            .for_each(|(yr, vr)| match &bias {
                Some(bias) => {
                    for ((y, v), c) in yr.iter_mut().zip(vr).zip(bias.iter()) {
                        *y += c + s * v;
                    }
                }
                None => {
                    for (y, v) in yr.iter_mut().zip(vr) {
                        *y += s * v;
                    }
                }
            });
        let mut out = dims.to_vec();
        if let Some(last) = out.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = self.name();
        let ((n, k), (r, _)) = (self.weight.dims2()?, a.dims2()?);
        let m = x.elem_count() / k.max(1);
        let grad = grad.contiguous()?;
        let (gs, gl) = grad.storage_and_layout();
        let dy = storage_f32(&gs, gl, op)?;
        let (xs, xl) = x.storage_and_layout();
        let xv = storage_f32(&xs, xl, op)?;
        let (as_, al) = a.storage_and_layout();
        let av = storage_f32(&as_, al, op)?;
        let (bs, bl) = b.storage_and_layout();
        let bv = storage_f32(&bs, bl, op)?;
        let (ws, wl) = self.weight.storage_and_layout();
        let w = storage_f32(&ws, wl, op)?;
        let s = self.scale;
        // g = dy B (m, r); the adapter's input and its projection u = xd Aᵀ (m, r), recomputed.
        let g = gemm_f32((m, n, r), dy, (n, 1), bv, (r, 1));
        let xd = self.masked(xv);
        let u = gemm_f32((m, k, r), &xd, (k, 1), av, (1, k));
        // dx = dy W + s · m ⊙ (g A).
        let mut dx = gemm_f32((m, n, k), dy, (n, 1), w, (k, 1));
        let ga = gemm_f32((m, r, k), &g, (r, 1), av, (k, 1));
        match &self.mask {
            Some(mk) => dx
                .par_iter_mut()
                .zip(ga.par_iter().zip(mk.par_iter()))
                .for_each(|(d, (t, mv))| *d += s * t * mv),
            None => dx
                .par_iter_mut()
                .zip(ga.par_iter())
                .for_each(|(d, t)| *d += s * t),
        }
        // dA = s · gᵀ xd (r, k); dB = s · dyᵀ u (n, r).
        let mut da = gemm_f32((r, m, k), &g, (1, r), &xd, (k, 1));
        let mut db = gemm_f32((n, m, r), dy, (1, n), &u, (r, 1));
        da.iter_mut().chain(db.iter_mut()).for_each(|v| *v *= s);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(da, (r, k), dev)?),
            Some(Tensor::from_vec(db, (n, r), dev)?),
        ))
    }
}

/// The LoRA layer `x Wᵀ (+ bias) + scale · (mask ⊙ x) Aᵀ Bᵀ` for a contiguous f32 CPU `x` of any rank
/// (last dimension `in`), a frozen weight and bias, and the adapter `a` (r, in), `b` (out, r).
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    (a, b): (&Tensor, &Tensor),
    scale: f64,
    mask: Option<Vec<f32>>,
) -> Result<Tensor> {
    Ok(x.apply_op3(
        a,
        b,
        LoraLinear {
            weight: weight.contiguous()?,
            bias: bias.map(|t| t.contiguous()).transpose()?,
            scale: scale as f32,
            mask,
        },
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::dropout::dropout_mask;
    use crate::model::{max_abs_diff, weighted_sum_grads};
    use candle_core::{Device, Var};

    /// The composed layer, as `Linear` builds it from candle's ops.
    fn composed(
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        a: &Tensor,
        b: &Tensor,
        s: f64,
        mask: Option<&Tensor>,
    ) -> Tensor {
        let (rows, k) = (
            x.elem_count() / x.dims()[x.rank() - 1],
            x.dims()[x.rank() - 1],
        );
        let x2 = x.reshape((rows, k)).unwrap();
        let mut y = x2.matmul(&w.t().unwrap()).unwrap();
        if let Some(bias) = bias {
            y = y.broadcast_add(bias).unwrap();
        }
        let xd = match mask {
            Some(m) => (&x2 * m.reshape((rows, k)).unwrap()).unwrap(),
            None => x2,
        };
        let d = xd
            .matmul(&a.t().unwrap())
            .unwrap()
            .matmul(&b.t().unwrap())
            .unwrap();
        let mut out = x.dims().to_vec();
        *out.last_mut().unwrap() = w.dims()[0];
        (y + (d * s).unwrap()).unwrap().reshape(out).unwrap()
    }

    #[test]
    fn values_and_gradients_match_the_composed_layer() {
        let dev = Device::Cpu;
        let (k, n, r) = (24, 20, 4);
        let w = Tensor::randn(0f32, 0.3, (n, k), &dev).unwrap();
        let bias = Tensor::randn(0f32, 0.3, n, &dev).unwrap();
        for (with_bias, with_mask) in [(false, false), (true, true), (true, false)] {
            let x = Var::randn(0f32, 1.0, (3, 5, k), &dev).unwrap();
            let a = Var::randn(0f32, 0.3, (r, k), &dev).unwrap();
            let b = Var::randn(0f32, 0.3, (n, r), &dev).unwrap();
            let mask = with_mask.then(|| dropout_mask(3 * 5 * k, 0.25, 7));
            let mask_t = mask
                .clone()
                .map(|m| Tensor::from_vec(m, (3, 5, k), &dev).unwrap());
            let bias = with_bias.then_some(&bias);
            let ours = lora_linear(&x, &w, bias, (&a, &b), 2.0, mask).unwrap();
            let theirs = composed(&x, &w, bias, &a, &b, 2.0, mask_t.as_ref());
            assert_eq!(ours.dims(), &[3, 5, n]);
            assert!(max_abs_diff(&ours, &theirs) < 1e-5);
            // A loss that weights every output differently, so each gradient entry is checked.
            let weights = Tensor::randn(0f32, 1.0, (3, 5, n), &dev).unwrap();
            let go = weighted_sum_grads(&ours, &weights);
            let gt = weighted_sum_grads(&theirs, &weights);
            for v in [x.as_tensor(), a.as_tensor(), b.as_tensor()] {
                let (o, t) = (go.get(v).unwrap(), gt.get(v).unwrap());
                assert_eq!(o.dims(), t.dims());
                assert!(max_abs_diff(o, t) < 1e-4, "{:?}", v.dims());
            }
        }
    }
}
