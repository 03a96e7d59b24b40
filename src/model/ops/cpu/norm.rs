//! Norms on the CPU in one pass per row: T5's RMS norm, `x * rsqrt(mean(x^2) + eps) * weight`
//! (composed it is a square, a mean, an add, a sqrt, a reciprocal and two multiplies, each a pass
//! with a temporary), and BART's layer norm, `(x - mean) * rsqrt(var + eps) * weight + bias`.
//! The RMS norm is inference only; the layer norm also trains: its backward is one more pass that
//! gives the input's, the weight's and the bias's gradients at once (composed, the forward and its
//! autograd were some two dozen passes over the activations, most of a BART training step's
//! elementwise time).

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

/// The forward pass: one pass per row.
fn layer_norm_fwd(
    eps: f32,
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
    bs: &CpuStorage,
    bl: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let d = *xl.dims().last().unwrap_or(&1);
    let (x, w, b) = (
        contiguous_f32(xs, xl, "fused-layer-norm")?,
        contiguous_f32(ws, wl, "fused-layer-norm")?,
        contiguous_f32(bs, bl, "fused-layer-norm")?,
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
            let scale = 1.0 / (var + eps).sqrt();
            for ((o, g), c) in o.iter_mut().zip(w).zip(b) {
                *o = *o * scale * g + c;
            }
        });
    Ok((CpuStorage::F32(out), xl.shape().clone()))
}

/// The layer norm over the last dimension, in one pass per row (differentiable in all three).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let op = FusedLayerNorm { eps: eps as f32 };
    let (x, w, b) = (x.contiguous()?, weight.contiguous()?, bias.contiguous()?);
    if x.track_op() || w.track_op() || b.track_op() {
        return Ok(x.apply_op3(&w, &b, op)?);
    }
    Ok(x.apply_op3_no_bwd(&w, &b, &op)?)
}

/// Rows per task of the backward pass (each task sums its own weight and bias gradients).
const BACKWARD_ROWS: usize = 64;

/// The gradients of the layer norm: `[dx (rows x d); dweight (d); dbias (d)]` flat, from x, the
/// weight and the output's gradient.
struct LayerNormBackward {
    eps: f32,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "fused-layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = *xl.dims().last().unwrap_or(&1);
        let (x, w, g) = (
            contiguous_f32(xs, xl, self.name())?,
            contiguous_f32(ws, wl, self.name())?,
            contiguous_f32(gs, gl, self.name())?,
        );
        let mut dx = vec![0f32; x.len()];
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(d * BACKWARD_ROWS)
            .zip(x.par_chunks(d * BACKWARD_ROWS))
            .zip(g.par_chunks(d * BACKWARD_ROWS))
            .map(|((dx, x), g)| {
                // This task's [dweight; dbias].
                let mut acc = vec![0f32; 2 * d];
                let mut xhat = vec![0f32; d];
                for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                    let mean = x.iter().sum::<f32>() / d as f32;
                    for (h, v) in xhat.iter_mut().zip(x) {
                        *h = v - mean;
                    }
                    let rstd = 1.0 / (dot(&xhat, &xhat) / d as f32 + self.eps).sqrt();
                    for h in xhat.iter_mut() {
                        *h *= rstd;
                    }
                    // dxhat = g * w; dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
                    let (mut m1, mut m2) = (0f32, 0f32);
                    for ((gi, wi), hi) in g.iter().zip(w).zip(&xhat) {
                        let dh = gi * wi;
                        m1 += dh;
                        m2 += dh * hi;
                    }
                    let (m1, m2) = (m1 / d as f32, m2 / d as f32);
                    for (i, ((o, gi), wi)) in dx.iter_mut().zip(g).zip(w).enumerate() {
                        *o = rstd * (gi * wi - m1 - xhat[i] * m2);
                        acc[i] += gi * xhat[i];
                        acc[d + i] += gi;
                    }
                }
                acc
            })
            .collect();
        let mut out = dx;
        let mut sums = vec![0f32; 2 * d];
        for p in partials {
            for (s, v) in sums.iter_mut().zip(p) {
                *s += v;
            }
        }
        out.extend(sums);
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
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
        layer_norm_fwd(self.eps, xs, xl, ws, wl, bs, bl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let n = x.elem_count();
        let all = x.apply_op3_no_bwd(
            &w.contiguous()?,
            &grad.contiguous()?,
            &LayerNormBackward { eps: self.eps },
        )?;
        Ok((
            Some(all.narrow(0, 0, n)?.reshape(x.shape())?),
            Some(all.narrow(0, n, d)?.reshape(w.shape())?),
            Some(all.narrow(0, n + d, d)?.reshape(w.shape())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::composed;
    use crate::model::{max_abs_diff, weighted_sum_grads};
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

    /// The fused backward gives autograd's gradients of the composed norm, for the input, the weight
    /// and the bias, over rows enough for several tasks.
    #[test]
    fn layer_norm_gradients_match_autograd() {
        use candle_core::Var;
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 2.0, (3, 50, 24), &dev).unwrap();
        let w = Var::randn(1f32, 0.3, 24, &dev).unwrap();
        let b = Var::randn(0f32, 0.5, 24, &dev).unwrap();
        let target = Tensor::randn(0f32, 1.0, (3, 50, 24), &dev).unwrap();
        let grads = |y: Tensor| weighted_sum_grads(&y, &target);
        let fused = grads(layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap());
        let composed =
            grads(composed::layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap());
        for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
            let (f, c) = (fused.get(v).unwrap(), composed.get(v).unwrap());
            let scale = c
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let d = max_abs_diff(f, c);
            assert!(d <= 1e-4 * scale.max(1.0), "{name}: {d} (scale {scale})");
        }
    }
}
