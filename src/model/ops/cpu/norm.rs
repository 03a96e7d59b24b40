//! T5's RMS norm on the CPU, `x * rsqrt(mean(x^2) + eps) * weight`, in one pass per row (composed it
//! is a square, a mean, an add, a sqrt, a reciprocal and two multiplies, each a pass with a temporary).
//! Inference only: no backward pass.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, dot};
use crate::error::Result;

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
            contiguous_f32(xs, xl, self.name())?,
            contiguous_f32(ws, wl, self.name())?,
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

/// T5's RMS norm over the last dimension, in one pass.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op2_no_bwd(&weight.contiguous()?, &FusedRmsNorm { eps: eps as f32 })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::max_abs_diff;
    use crate::model::ops::composed;
    use candle_core::Device;

    #[test]
    fn matches_composed() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (3, 7, 16), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 16, &dev).unwrap();
        let reference = composed::rms_norm(&x, &w, 1e-6).unwrap();
        assert!(max_abs_diff(&rms_norm(&x, &w, 1e-6).unwrap(), &reference) < 1e-5);
    }
}
