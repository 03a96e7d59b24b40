//! Softmax over the last dimension for training on the CPU, with a one-pass backward.
//!
//! Composed from candle's ops (max, subtract, exp, sum, divide), the attention softmax and its
//! gradient take about twenty passes over the score tensor, each with a fresh temporary; the score
//! tensor is the largest activation of a training step (batch x heads x queries x keys). Here the
//! forward is one pass per row and the backward, `dx = y * (g - sum(g * y))`, one more.

use candle_core::{CpuStorage, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous_f32;
use crate::error::Result;

/// Rows per parallel task, at least: a row is as short as a few keys.
const MIN_ROWS: usize = 64;

/// softmax(x) over the last dimension, differentiable.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(Softmax)?)
}

fn row_len(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}

struct Softmax;

impl candle_core::CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let n = row_len(l);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .with_min_len(MIN_ROWS)
            .for_each(|(y, x)| {
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = (x - max).exp();
                    sum += *y;
                }
                let inv = 1.0 / sum;
                y.iter_mut().for_each(|y| *y *= inv);
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            res.contiguous()?
                .apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward)?,
        ))
    }
}

/// `y * (g - sum(g * y))` per row, from the softmax output `y` and its gradient `g`.
struct SoftmaxBackward;

impl candle_core::CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "fused-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (y, g) = (
            contiguous_f32(s1, l1, self.name())?,
            contiguous_f32(s2, l2, self.name())?,
        );
        let n = row_len(l1);
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(n)
            .zip(y.par_chunks(n).zip(g.par_chunks(n)))
            .with_min_len(MIN_ROWS)
            .for_each(|(dx, (y, g))| {
                let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
                for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                    *dx = y * (g - dot);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::max_abs_diff;
    use crate::model::ops::composed;
    use candle_core::{Device, Var};

    /// Values and gradients equal candle's composed softmax (as training used before), including rows
    /// with masked (very negative) scores.
    #[test]
    fn matches_composed_softmax_and_its_gradient() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 3.0, (2, 3, 5, 37), &dev).unwrap();
        // Mask the last keys of some rows as attention does.
        let mask = Tensor::arange(0u32, 37, &dev)
            .unwrap()
            .ge(30u32)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .affine(f32::MIN as f64 / 2.0, 0.0)
            .unwrap();
        let x = Var::from_tensor(&x.broadcast_add(&mask).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (2, 3, 5, 37), &dev).unwrap();
        let composed = composed::softmax_last_dim(x.as_tensor(), true).unwrap();
        let fused = softmax(x.as_tensor()).unwrap();
        assert!(max_abs_diff(&composed, &fused) < 1e-6);
        let masked: f32 = fused
            .narrow(3, 30, 7)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(masked, 0.0);
        let loss = |y: &Tensor| (y * &w).unwrap().sum_all().unwrap();
        let gc = loss(&composed).backward().unwrap();
        let gf = loss(&fused).backward().unwrap();
        let (gc, gf) = (gc.get(&x).unwrap(), gf.get(&x).unwrap());
        assert!(max_abs_diff(gc, gf) < 1e-5, "{}", max_abs_diff(gc, gf));
    }
}
