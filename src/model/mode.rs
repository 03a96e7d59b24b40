//! What a forward pass is for: inference, or training (dropout on, gradients through every op).

use std::cell::RefCell;

use crate::rng::Rng;

/// Passed down every forward call; `train` is `None` at inference.
pub struct Mode<'a> {
    pub train: Option<&'a RefCell<TrainState>>,
}

impl Mode<'_> {
    pub const INFER: Mode<'static> = Mode { train: None };

    pub fn is_training(&self) -> bool {
        self.train.is_some()
    }

    /// The model's dropout rate in this pass (0 at inference): embeddings, residual branches.
    pub fn dropout_rate(&self) -> f64 {
        self.train.map_or(0.0, |s| s.borrow().dropout.hidden)
    }

    /// Dropout on the attention probabilities (0 at inference).
    pub fn attention_dropout_rate(&self) -> f64 {
        self.train.map_or(0.0, |s| s.borrow().dropout.attention)
    }

    /// Dropout on the feed-forward's hidden activations (0 at inference).
    pub fn activation_dropout_rate(&self) -> f64 {
        self.train.map_or(0.0, |s| s.borrow().dropout.activation)
    }

    /// A fresh seed for one dropout mask, from the training generator (None at inference).
    pub fn next_seed(&self) -> Option<u64> {
        self.train.map(|s| s.borrow_mut().rng.next_u64())
    }

    /// The generator's state, to replay the same masks later (None at inference).
    pub fn rng_state(&self) -> Option<Rng> {
        self.train.map(|s| s.borrow().rng.clone())
    }

    /// Put the generator back to a state [`Mode::rng_state`] returned.
    pub fn set_rng_state(&self, state: &Option<Rng>) {
        if let (Some(s), Some(rng)) = (self.train, state) {
            s.borrow_mut().rng = rng.clone();
        }
    }
}

/// Training-time randomness: the model's dropout rates, and the generator its masks (and LoRA's) are
/// drawn from. Ours, not candle's: candle's CPU generator cannot be seeded, and a resumed run must
/// draw the same masks.
pub struct TrainState {
    pub dropout: Dropout,
    pub rng: Rng,
}

impl TrainState {
    pub fn new(dropout: Dropout, rng: Rng) -> TrainState {
        TrainState { dropout, rng }
    }
}

/// A family's dropout rates. T5 has one (`dropout_rate`); BART has three (`dropout`,
/// `attention_dropout`, `activation_dropout`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// Embeddings and every residual branch.
    pub hidden: f64,
    /// Attention probabilities.
    pub attention: f64,
    /// The feed-forward's hidden activations.
    pub activation: f64,
}

impl Dropout {
    /// One rate everywhere (T5, and a plan's `train.dropout`).
    pub fn uniform(p: f64) -> Dropout {
        Dropout {
            hidden: p,
            attention: p,
            activation: p,
        }
    }
}
