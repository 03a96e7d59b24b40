//! `x + dropout(h)`, the residual connection of every T5 sublayer in training, as one op on the CPU.
//!
//! Composed from candle's ops it is a mask tensor, a multiply and an add, and candle's backward of
//! those computes a zero-filled accumulator and an add for each of their four inputs, and the mask's
//! gradient too, which nothing uses: about a dozen passes over the hidden states per sublayer. Here the
//! forward is one pass and the backward one (`dh = g * mask`); `dx = g` is passed through. Values are
//! bit-identical to the composed form (`x + h * mask`, the same mask from the same seed).

use std::sync::Arc;

use candle_core::{CpuStorage, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, par_map2};
use crate::error::Result;

/// Elements per parallel task.
const CHUNK: usize = 16384;

/// `x + h * mask`, with the backward pass `(g, g * mask)`; `mask` is an inverted-dropout mask of
/// `h`'s elements (see [`crate::model::ops::dropout_mask`]).
pub fn residual_dropout(x: &Tensor, h: &Tensor, mask: Vec<f32>) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op2(
        &h.contiguous()?,
        ResidualDropout {
            mask: Arc::new(mask),
        },
    )?)
}

struct ResidualDropout {
    /// 0 where dropped, 1 / (1 - p) where kept.
    mask: Arc<Vec<f32>>,
}

impl candle_core::CustomOp2 for ResidualDropout {
    fn name(&self) -> &'static str {
        "fused-residual-dropout"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, h) = (
            contiguous_f32(s1, l1, self.name())?,
            contiguous_f32(s2, l2, self.name())?,
        );
        if x.len() != h.len() || h.len() != self.mask.len() {
            candle_core::bail!(
                "{}: {} + {} with a mask of {}",
                self.name(),
                x.len(),
                h.len(),
                self.mask.len()
            );
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .zip(h.par_chunks(CHUNK).zip(self.mask.par_chunks(CHUNK)))
            .for_each(|((o, x), (h, m))| {
                for (((o, &x), &h), &m) in o.iter_mut().zip(x).zip(h).zip(m) {
                    *o = x + h * m;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _h: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let dh = g.apply_op1_no_bwd(&MaskGrad {
            mask: self.mask.clone(),
        })?;
        Ok((Some(g), Some(dh)))
    }
}

/// `g * mask`, the gradient of the dropped-out input.
struct MaskGrad {
    mask: Arc<Vec<f32>>,
}

impl candle_core::CustomOp1 for MaskGrad {
    fn name(&self) -> &'static str {
        "fused-residual-dropout-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(s, l, self.name())?;
        if g.len() != self.mask.len() {
            candle_core::bail!(
                "{}: gradient of {} for a mask of {}",
                self.name(),
                g.len(),
                self.mask.len()
            );
        }
        let out = par_map2(g, &self.mask, |g, m| g * m);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use crate::model::mode::{Dropout, Mode, TrainState};
    use crate::model::ops::{self, composed};
    use crate::model::{max_abs_diff, weighted_sum_grads};
    use crate::rng::Rng;
    use candle_core::{Device, Tensor, Var};

    /// Same values as `x + dropout(h)` composed (same seed, bit for bit), and the same gradients.
    #[test]
    fn matches_composed_residual_dropout() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 50, 40), &dev).unwrap()).unwrap();
        let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 50, 40), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 50, 40), &dev).unwrap();
        let state =
            |seed| std::cell::RefCell::new(TrainState::new(Dropout::uniform(0.25), Rng::new(seed)));
        let (s1, s2) = (state(7), state(7));
        let fused = ops::residual_dropout(&x, &h, &Mode { train: Some(&s1) }).unwrap();
        let composed = composed::residual_dropout(&x, &h, &Mode { train: Some(&s2) }).unwrap();
        assert_eq!(max_abs_diff(&fused, &composed), 0.0);
        // Both consumed the generator alike: the next draws agree.
        assert_eq!(
            s1.borrow_mut().rng.next_u64(),
            s2.borrow_mut().rng.next_u64()
        );
        let gf = weighted_sum_grads(&fused, &w);
        let gc = weighted_sum_grads(&composed, &w);
        for v in [&x, &h] {
            assert_eq!(max_abs_diff(gf.get(v).unwrap(), gc.get(v).unwrap()), 0.0);
        }
        // Some of h's gradient was dropped, none of x's.
        let zeros = |t: &Tensor| {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .filter(|v| **v == 0.0)
                .count()
        };
        assert!(zeros(gf.get(&h).unwrap()) > 500);
        assert_eq!(zeros(gf.get(&x).unwrap()), 0);
    }

    #[test]
    fn inference_is_a_plain_sum() {
        let dev = Device::Cpu;
        let x = Tensor::ones((2, 3), candle_core::DType::F32, &dev).unwrap();
        let y = ops::residual_dropout(&x, &x, &Mode::INFER).unwrap();
        assert_eq!(y.sum_all().unwrap().to_scalar::<f32>().unwrap(), 12.0);
    }
}
