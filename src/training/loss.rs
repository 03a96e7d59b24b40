//! The seq2seq loss: token cross-entropy over label positions (padding ignored, as HF's -100), with
//! optional label smoothing as PyTorch defines it: `(1 - e) * nll + e * mean_v(-log p_v)`.

use candle_core::{DType, Tensor, D};

use crate::error::Result;

/// Sum of per-token losses over unmasked positions, and the number of those positions.
/// `logits` (b, t, v) f32; `labels` (b, t) u32 (any id at padded positions); `mask` (b, t) 1/0.
pub fn token_loss_sum(
    logits: &Tensor,
    labels: &Tensor,
    mask: &Tensor,
    smoothing: f64,
) -> Result<(Tensor, f64)> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let nll = logp
        .gather(&labels.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?
        .neg()?;
    let per_token = if smoothing > 0.0 {
        let smooth = logp.mean(D::Minus1)?.neg()?;
        ((nll * (1.0 - smoothing))? + (smooth * smoothing)?)?
    } else {
        nll
    };
    let mask = mask.to_dtype(DType::F32)?;
    let n = mask.sum_all()?.to_scalar::<f32>()? as f64;
    Ok(((per_token * mask)?.sum_all()?, n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cross_entropy_ignores_masked_positions() {
        let dev = Device::Cpu;
        // One row, two positions, vocab 3; the second position is padding.
        let logits = Tensor::new(&[[[2f32, 0.0, 0.0], [0.0, 9.0, 0.0]]], &dev).unwrap();
        let labels = Tensor::new(&[[0u32, 2]], &dev).unwrap();
        let mask = Tensor::new(&[[1f32, 0.0]], &dev).unwrap();
        let (sum, n) = token_loss_sum(&logits, &labels, &mask, 0.0).unwrap();
        let want = -(2f64.exp() / (2f64.exp() + 2.0)).ln();
        assert_eq!(n, 1.0);
        assert!((sum.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-5);
        let (s2, _) = token_loss_sum(&logits, &labels, &mask, 0.1).unwrap();
        let lp: Vec<f64> = [2f64, 0.0, 0.0]
            .iter()
            .map(|x| x - (2f64.exp() + 2.0).ln())
            .collect();
        let want2 = 0.9 * want + 0.1 * (-(lp.iter().sum::<f64>()) / 3.0);
        assert!((s2.to_scalar::<f32>().unwrap() as f64 - want2).abs() < 1e-5);
    }
}
