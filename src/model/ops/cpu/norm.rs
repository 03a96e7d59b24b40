//! Norms on the CPU in one pass per row: T5's RMS norm, `x * rsqrt(mean(x^2) + eps) * weight`
//! (composed it is a square, a mean, an add, a sqrt, a reciprocal and two multiplies, each a pass
//! with a temporary), and BART's layer norm, `(x - mean) * rsqrt(var + eps) * weight + bias`.
//! Inference only: no backward pass.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
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

struct FusedLayerNorm {
    eps: f32,
}

impl CustomOp3 for FusedLayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = *xl.dims().last().unwrap_or(&1);
        let (x, w, b) = (
            contiguous_f32(xs, xl, self.name())?,
            contiguous_f32(ws, wl, self.name())?,
            contiguous_f32(bs, bl, self.name())?,
        );
        if w.len() != d || b.len() != d {
            candle_core::bail!(
                "fused-layer-norm: weight {} and bias {} for rows of {d}",
                w.len(),
                b.len()
            );
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, row)| {
                // Two passes over the row (mean, then the centered variance), as PyTorch computes
                // it: the one-pass E[x²] - E[x]² loses digits when the mean is large.
                let mean = row.iter().sum::<f32>() / d as f32;
                for (o, v) in o.iter_mut().zip(row) {
                    *o = v - mean;
                }
                let var = dot(o, o) / d as f32;
                let scale = 1.0 / (var + self.eps).sqrt();
                for ((o, g), c) in o.iter_mut().zip(w).zip(b) {
                    *o = *o * scale * g + c;
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// The layer norm over the last dimension, in one pass per row.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.contiguous()?,
        &FusedLayerNorm { eps: eps as f32 },
    )?)
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

    #[test]
    fn layer_norm_matches_composed_even_far_from_zero() {
        let dev = Device::Cpu;
        // A large common offset: the centered variance keeps its digits.
        let x = (Tensor::randn(0f32, 2.0, (3, 7, 16), &dev).unwrap() + 100.0).unwrap();
        let w = Tensor::randn(1f32, 0.1, 16, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.5, 16, &dev).unwrap();
        let reference = composed::layer_norm(&x, &w, &b, 1e-5).unwrap();
        let d = max_abs_diff(&layer_norm(&x, &w, &b, 1e-5).unwrap(), &reference);
        assert!(d < 1e-4, "{d}");
        // The mean is removed and the scale applied: a row of one value normalizes to the bias.
        let flat = Tensor::ones((1, 16), candle_core::DType::F32, &dev).unwrap();
        let y = layer_norm(&flat, &w, &b, 1e-5).unwrap();
        assert!(max_abs_diff(&y, &b.unsqueeze(0).unwrap()) < 1e-6);
    }
}
