//! Feed-forward activations, by the names HF configs give them: T5's `feed_forward_proj` (`relu`,
//! `gated-gelu`, ...) and BART's `activation_function` (`gelu`, `relu`, ...).

use crate::error::{Error, Result};

/// The feed-forward block's activation and whether it is gated (`wi_0` * `wi_1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Relu,
    /// HF `gelu` (erf form).
    Gelu,
    /// HF `gelu_new` (tanh approximation) — what `gated-gelu` uses.
    GeluNew,
    Silu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedForward {
    pub activation: Activation,
    pub gated: bool,
}

impl FeedForward {
    /// Parse T5's `feed_forward_proj`: `relu`, `gelu`, `gated-gelu` (gelu_new), `gated-silu`, …
    pub fn parse(s: &str) -> Result<FeedForward> {
        let (gated, act) = match s.split_once('-') {
            Some(("gated", act)) => (true, act),
            None => (false, s),
            Some(_) => {
                return Err(Error::model(format!(
                    "unknown feed_forward_proj `{s}` (expected ACT or gated-ACT)"
                )))
            }
        };
        let activation = match (act, gated) {
            ("gelu", true) => Activation::GeluNew,
            ("gelu", false) => Activation::Gelu,
            ("gelu_new", _) => Activation::GeluNew,
            ("relu", _) => Activation::Relu,
            ("silu", _) | ("swish", _) => Activation::Silu,
            _ => {
                return Err(Error::model(format!(
                    "unknown feed_forward_proj `{s}` (supported: relu, gelu, gelu_new, silu, and gated-* of them)"
                )))
            }
        };
        Ok(FeedForward { activation, gated })
    }
}

impl Activation {
    /// HF's `ACT2FN` name (BART's `activation_function`): `gelu` is the erf form, `gelu_new` the
    /// tanh approximation.
    pub fn from_hf_name(name: &str) -> Result<Activation> {
        Ok(match name {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluNew,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            other => {
                return Err(Error::model(format!(
                    "activation_function `{other}` is not supported (supported: gelu, gelu_new, gelu_pytorch_tanh, relu, silu)"
                )))
            }
        })
    }
}
