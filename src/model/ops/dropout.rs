//! Dropout with masks from our own seeded generator (candle's CPU generator cannot be seeded, and a
//! resumed training run must draw the same masks). The same on every device: the mask is drawn on the
//! host and multiplied in.

use candle_core::Tensor;
use rayon::prelude::*;

use crate::error::Result;
use crate::model::mode::Mode;
use crate::rng::Rng;

/// Elements per dropout-mask chunk (one RNG stream each).
pub(crate) const DROPOUT_CHUNK: usize = 16384;

/// Inverted dropout of `x` at rate `p` in training mode; `x` itself at inference.
pub fn dropout(x: &Tensor, p: f64, mode: &Mode) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let Some(seed) = mode.next_seed() else {
        return Ok(x.clone());
    };
    let mask = dropout_mask(x.elem_count(), p, seed);
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok(x.mul(&mask)?)
}

/// Dropout at the model's rate (0 at inference).
pub fn model_dropout(x: &Tensor, mode: &Mode) -> Result<Tensor> {
    dropout(x, mode.dropout_rate(), mode)
}

/// An inverted-dropout mask of `n` elements: 0 where dropped (with probability `p`), 1 / (1 - p)
/// elsewhere. Drawn in parallel, chunk by chunk, each chunk from its own stream of `seed`: the same
/// mask whatever the thread count (drawn serially, every core but one would wait on it at every
/// sublayer).
pub fn dropout_mask(n: usize, p: f64, seed: u64) -> Vec<f32> {
    let scale = (1.0 / (1.0 - p)) as f32;
    let drop_below = (p * 4_294_967_296.0) as u64; // a 32-bit draw below this drops the element
    let mut mask = vec![0f32; n];
    mask.par_chunks_mut(DROPOUT_CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut rng = Rng::derive(seed, i as u64);
            for pair in chunk.chunks_mut(2) {
                let r = rng.next_u64();
                for (j, m) in pair.iter_mut().enumerate() {
                    let draw = (r >> (32 * j)) & 0xFFFF_FFFF;
                    *m = if draw < drop_below { 0.0 } else { scale };
                }
            }
        });
    mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::mode::{Dropout, TrainState};
    use candle_core::{DType, Device};

    #[test]
    fn dropout_is_seeded_and_inactive_at_inference() {
        let x = Tensor::ones((4, 8), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            dropout(&x, 0.5, &Mode::INFER)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            32.0
        );
        let draw = |seed: u64, x: &Tensor, p: f64| -> Vec<f32> {
            let st = std::cell::RefCell::new(TrainState::new(Dropout::uniform(p), Rng::new(seed)));
            dropout(x, p, &Mode { train: Some(&st) })
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (a, b) = (draw(3, &x, 0.5), draw(3, &x, 0.5));
        assert_eq!(a, b);
        assert!(a.iter().all(|v| *v == 0.0 || *v == 2.0));
        // Over several chunks, about p of the elements are dropped, and chunks differ.
        let big = Tensor::ones((5, 10_000), DType::F32, &Device::Cpu).unwrap();
        let m = draw(4, &big, 0.25);
        let dropped = m.iter().filter(|v| **v == 0.0).count() as f64 / m.len() as f64;
        assert!((dropped - 0.25).abs() < 0.01, "dropped {dropped}");
        assert_ne!(m[..DROPOUT_CHUNK], m[DROPOUT_CHUNK..2 * DROPOUT_CHUNK]);
    }
}
