//! The token cross-entropy on the CPU: one pass per row forward (max and log-sum-exp) and one
//! backward, `g * w * (softmax - (1 - e) * onehot - e / V)`. Composed from candle's ops (log-softmax,
//! gather, mask, sum) the loss and its gradient took some thirty passes over the logits, the largest
//! tensor of a training step (tokens x vocabulary), each with a fresh temporary.

use std::sync::Mutex;

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, storage_f32};
use crate::error::Result;

/// Sum over rows of `weights[i] * loss(logits[i], labels[i])` for (rows, vocab) f32 logits on the CPU,
/// differentiable in the logits. A label outside the vocabulary at a weighted row is an error.
pub fn cross_entropy_sum(
    logits: &Tensor,
    labels: Vec<u32>,
    weights: Vec<f32>,
    smoothing: f64,
) -> Result<Tensor> {
    let op = CrossEntropy {
        labels,
        weights,
        smoothing: smoothing as f32,
        log_sum_exp: Mutex::new(vec![]),
    };
    Ok(logits.contiguous()?.apply_op1(op)?)
}

/// Rows (tokens) per parallel task, at least.
const MIN_ROWS: usize = 8;

/// Weighted, smoothed cross-entropy of each row of (rows, vocab) logits against its label, summed.
struct CrossEntropy {
    labels: Vec<u32>,
    /// Per row: 1 for a label position, 0 for padding.
    weights: Vec<f32>,
    smoothing: f32,
    /// Each row's log-sum-exp, kept by the forward pass for the backward pass.
    log_sum_exp: Mutex<Vec<f32>>,
}

impl candle_core::CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let (rows, v) = l.shape().dims2()?;
        if self.labels.len() != rows || self.weights.len() != rows {
            candle_core::bail!(
                "{}: {rows} rows of logits, {} labels, {} mask values",
                self.name(),
                self.labels.len(),
                self.weights.len()
            );
        }
        // Padded positions may hold any id; only label positions must be in the vocabulary.
        let out_of_vocab =
            (0..rows).find(|&i| self.weights[i] != 0.0 && self.labels[i] as usize >= v);
        if let Some(i) = out_of_vocab {
            candle_core::bail!(
                "{}: label {} at position {i} is outside the vocabulary of {v}",
                self.name(),
                self.labels[i]
            );
        }
        let e = self.smoothing;
        let per_row: Vec<(f32, f64)> = x
            .par_chunks(v)
            .zip(self.labels.par_iter().zip(self.weights.par_iter()))
            .with_min_len(MIN_ROWS)
            .map(|(x, (&label, &w))| {
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = x.iter().map(|&x| (x - max).exp()).sum();
                let lse = max + sum.ln();
                if w == 0.0 {
                    return (lse, 0.0);
                }
                let nll = lse - x[label as usize];
                let loss = if e > 0.0 {
                    let mean = x.iter().map(|&x| x as f64).sum::<f64>() / v as f64;
                    (1.0 - e as f64) * nll as f64 + e as f64 * (lse as f64 - mean)
                } else {
                    nll as f64
                };
                (lse, w as f64 * loss)
            })
            .collect();
        let total: f64 = per_row.iter().map(|(_, l)| l).sum();
        if let Ok(mut lse) = self.log_sum_exp.lock() {
            *lse = per_row.into_iter().map(|(lse, _)| lse).collect();
        }
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let (rows, v) = arg.dims2()?;
        let lse = self
            .log_sum_exp
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: poisoned", self.name())))?;
        if lse.len() != rows {
            candle_core::bail!("{}: backward before forward", self.name());
        }
        let (storage, layout) = arg.storage_and_layout();
        let x = storage_f32(&storage, layout, self.name())?;
        let (e, uniform) = (self.smoothing, self.smoothing / v as f32);
        let mut dx = vec![0f32; rows * v];
        dx.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .zip(self.labels.par_iter().zip(self.weights.par_iter()))
            .zip(lse.par_iter())
            .with_min_len(MIN_ROWS)
            .for_each(|(((dx, x), (&label, &w)), &lse)| {
                let scale = g * w;
                if scale == 0.0 {
                    return;
                }
                for (d, &x) in dx.iter_mut().zip(x) {
                    *d = scale * ((x - lse).exp() - uniform);
                }
                dx[label as usize] -= scale * (1.0 - e);
            });
        Ok(Some(Tensor::from_vec(dx, (rows, v), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use crate::model::ops::{composed, cross_entropy};
    use candle_core::{DType, Device, Tensor, Var};

    #[test]
    fn cross_entropy_ignores_masked_positions() {
        let dev = Device::Cpu;
        // One row, two positions, vocab 3; the second position is padding.
        let logits = Tensor::new(&[[[2f32, 0.0, 0.0], [0.0, 9.0, 0.0]]], &dev).unwrap();
        let labels = Tensor::new(&[[0u32, 2]], &dev).unwrap();
        let mask = Tensor::new(&[[1f32, 0.0]], &dev).unwrap();
        let (sum, n) = cross_entropy(&logits, &labels, &mask, 0.0).unwrap();
        let want = -(2f64.exp() / (2f64.exp() + 2.0)).ln();
        assert_eq!(n, 1.0);
        assert!((sum.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-5);
        let (s2, _) = cross_entropy(&logits, &labels, &mask, 0.1).unwrap();
        let lp: Vec<f64> = [2f64, 0.0, 0.0]
            .iter()
            .map(|x| x - (2f64.exp() + 2.0).ln())
            .collect();
        let want2 = 0.9 * want + 0.1 * (-(lp.iter().sum::<f64>()) / 3.0);
        assert!((s2.to_scalar::<f32>().unwrap() as f64 - want2).abs() < 1e-5);
    }

    /// The fused op's loss and gradient equal the composed form's, with and without smoothing, with
    /// padded positions (whose label may be any id) getting no gradient.
    #[test]
    fn fused_matches_composed_loss_and_gradient() {
        let dev = Device::Cpu;
        let (b, t, v) = (3, 7, 50);
        let logits = Var::from_tensor(&Tensor::randn(0f32, 4.0, (b, t, v), &dev).unwrap()).unwrap();
        let labels: Vec<u32> = (0..b * t).map(|i| (i * 17 % v) as u32).collect();
        let labels = Tensor::from_vec(labels, (b, t), &dev).unwrap();
        let mask: Vec<f32> = (0..b * t)
            .map(|i| if i % t < 5 || i < t { 1.0 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (b, t), &dev).unwrap();
        for smoothing in [0.0, 0.1] {
            let (fused, n) = cross_entropy(logits.as_tensor(), &labels, &mask, smoothing).unwrap();
            let (composed, _) =
                composed::cross_entropy(logits.as_tensor(), &labels, &mask, smoothing).unwrap();
            assert_eq!(n, 17.0);
            let (f, c) = (
                fused.to_scalar::<f32>().unwrap(),
                composed.to_scalar::<f32>().unwrap(),
            );
            assert!((f - c).abs() < 1e-4 * c.abs(), "{f} vs {c}");
            let gf = (fused * 0.5).unwrap().backward().unwrap();
            let gc = (composed * 0.5).unwrap().backward().unwrap();
            let (gf, gc) = (gf.get(&logits).unwrap(), gc.get(&logits).unwrap());
            let d = crate::model::max_abs_diff(gf, gc);
            assert!(d < 1e-6, "smoothing {smoothing}: gradients differ by {d}");
            // A padded position gets no gradient.
            let padded: f32 = gf
                .get(1)
                .unwrap()
                .get(6)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert_eq!(padded, 0.0);
        }
    }

    #[test]
    fn a_label_outside_the_vocabulary_is_an_error() {
        let dev = Device::Cpu;
        let logits = Tensor::zeros((1, 2, 4), DType::F32, &dev).unwrap();
        let labels = Tensor::new(&[[1u32, 9]], &dev).unwrap();
        let mask = Tensor::new(&[[1f32, 1.0]], &dev).unwrap();
        let err = cross_entropy(&logits, &labels, &mask, 0.0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("label 9") && err.contains("vocabulary of 4"),
            "{err}"
        );
    }
}
