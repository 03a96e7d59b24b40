//! The small modules every family is made of: Linear (optional bias, optional LoRA adapter), T5's RMS
//! norm and the classic layer norm, and the feed-forward block. Their arithmetic goes through
//! [`super::ops`].

use candle_core::{DType, Tensor, Var};

use super::activation::FeedForward;
use super::mode::Mode;
use super::ops;
use crate::error::Result;

/// LoRA: `B @ A` added to a frozen weight, scaled by `scale` (alpha / r, or alpha / sqrt(r)).
#[derive(Clone)]
pub struct Lora {
    /// (r, in)
    pub a: Var,
    /// (out, r)
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
}

/// A linear layer. `weight` is (out, in), as in HF checkpoints; `bias` (out) where the family has one
/// (BART: every projection; T5: none).
#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
    /// Inference only, where [`ops::prefers_transposed_weights`]: the weight stored transposed, (in,
    /// out) contiguous; `weight` is then a view of it.
    pub weight_t: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        Linear {
            weight,
            bias: None,
            lora: None,
            weight_t: None,
        }
    }

    pub fn with_bias(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            bias,
            ..Linear::new(weight)
        }
    }

    /// Stack layers' weights (and biases) along the output dimension: one matmul for all of them.
    /// Every part must have a bias, or none.
    pub fn stacked(parts: &[&Linear]) -> Result<Linear> {
        let weights: Vec<&Tensor> = parts.iter().map(|l| &l.weight).collect();
        let biases: Option<Vec<&Tensor>> = parts.iter().map(|l| l.bias.as_ref()).collect();
        let bias = match biases {
            Some(b) if !b.is_empty() => Some(Tensor::cat(&b, 0)?),
            _ => None,
        };
        Ok(Linear::with_bias(Tensor::cat(&weights, 0)?, bias))
    }

    /// Point each of `parts` at its rows of this stacked layer (no second copy of the weights).
    pub fn unstack_into(&self, parts: &mut [&mut Linear]) -> Result<()> {
        let mut at = 0;
        for p in parts.iter_mut() {
            let n = p.out_dim();
            p.weight = self.weight.narrow(0, at, n)?;
            if let Some(b) = &self.bias {
                p.bias = Some(b.narrow(0, at, n)?);
            }
            at += n;
        }
        Ok(())
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn forward(&self, x: &Tensor, mode: &Mode) -> Result<Tensor> {
        if let Some(l) = &self.lora {
            let adapter = (l.a.as_tensor(), l.b.as_tensor());
            let (w, bias) = (&self.weight, self.bias.as_ref());
            if let Some(y) = ops::fused_lora_linear(x, w, bias, adapter, l.scale, l.dropout, mode)?
            {
                return Ok(y);
            }
        } else if let Some(y) = ops::fused_frozen_linear(x, &self.weight, self.bias.as_ref())? {
            return Ok(y);
        }
        let dims = x.dims().to_vec();
        let (lead, k) = dims.split_at(dims.len() - 1);
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, k[0]))?;
        let y = ops::linear(
            &x2,
            &self.weight,
            self.weight_t.as_ref(),
            self.bias.as_ref(),
        )?;
        let y = self.add_adapter(y, &x2, mode)?;
        let mut out_shape = lead.to_vec();
        out_shape.push(self.out_dim());
        Ok(y.reshape(out_shape)?)
    }

    /// The base layer's output `y` (rows, out) for inputs `x2` (rows, in) with the adapter's path
    /// added, when there is an adapter. As PEFT does (its `autocast_adapter_dtype`): the adapter keeps
    /// its own dtype (f32 for a bf16 base) and its path runs in it; the base output is cast up for
    /// the sum, and the sum back to the inputs' dtype.
    pub fn add_adapter(&self, y: Tensor, x2: &Tensor, mode: &Mode) -> Result<Tensor> {
        let Some(l) = &self.lora else {
            return Ok(y);
        };
        let ad = l.a.dtype();
        let xd = ops::dropout(&x2.to_dtype(ad)?, l.dropout, mode)?;
        let delta = xd
            .matmul(&l.a.as_tensor().t()?)?
            .matmul(&l.b.as_tensor().t()?)?;
        Ok((y.to_dtype(ad)? + (delta * l.scale)?)?.to_dtype(x2.dtype())?)
    }

    /// Store the weight transposed for inference where the kernels prefer it (no-op elsewhere, or
    /// with an adapter): for layers that see few rows at a time (decoding), where the CPU gemm is
    /// faster with a row-major right-hand side. The model can no longer be trained after this.
    pub fn transpose_for_inference(&mut self) -> Result<()> {
        if self.lora.is_some()
            || self.weight_t.is_some()
            || !ops::prefers_transposed_weights(&self.weight)
        {
            return Ok(());
        }
        let wt = self.weight.t()?.contiguous()?;
        self.weight = wt.t()?;
        self.weight_t = Some(wt);
        Ok(())
    }

    /// The weight with the adapter folded in: W + scale * B @ A.
    pub fn merged_weight(&self) -> Result<Tensor> {
        match &self.lora {
            None => Ok(self.weight.clone()),
            Some(l) => {
                let delta =
                    (l.b.as_tensor()
                        .to_dtype(DType::F32)?
                        .matmul(&l.a.as_tensor().to_dtype(DType::F32)?)?
                        * l.scale)?;
                Ok((self.weight.to_dtype(DType::F32)? + delta)?.to_dtype(self.weight.dtype())?)
            }
        }
    }
}

/// T5's layer norm: RMS only (no mean, no bias), computed in f32.
#[derive(Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::rms_norm(x, &self.weight, self.eps)
    }
}

/// The classic layer norm (BART): `(x - mean) / sqrt(var + eps) * weight + bias`, computed in f32.
#[derive(Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// The feed-forward block: `wo(act(wi(x)))`, or gated `wo(act(wi_0(x)) * wi_1(x))` (BART's `fc1` and
/// `fc2` are `wi` and `wo`).
#[derive(Clone)]
pub struct Ffn {
    pub kind: FeedForward,
    /// `wi` (not gated) or `wi_0` (gated).
    pub wi: Linear,
    /// `wi_1` when gated.
    pub wi_1: Option<Linear>,
    pub wo: Linear,
    /// `[wi_0; wi_1]` stacked for inference (one matmul, then a fused gated activation on the CPU).
    pub gate_stacked: Option<Linear>,
}

impl Ffn {
    /// Stack `wi_0` and `wi_1` for inference (adapters must be merged first; no-op otherwise).
    pub fn fuse(&mut self) -> Result<()> {
        let Some(w1) = &mut self.wi_1 else {
            return Ok(());
        };
        if self.wi.lora.is_some() || w1.lora.is_some() {
            return Ok(());
        }
        let stacked = Linear::stacked(&[&self.wi, w1])?;
        stacked.unstack_into(&mut [&mut self.wi, w1])?;
        self.gate_stacked = Some(stacked);
        Ok(())
    }

    /// Transposed weights for decoding (see [`Linear::transpose_for_inference`]).
    pub fn transpose_for_decoding(&mut self) -> Result<()> {
        match (&mut self.gate_stacked, &mut self.wi_1) {
            (Some(w), Some(w1)) => {
                w.transpose_for_inference()?;
                // wi_0 and wi_1 view the stacked weight: point them at its new storage.
                w.unstack_into(&mut [&mut self.wi, w1])?;
            }
            (_, w1) => {
                self.wi.transpose_for_inference()?;
                if let Some(w1) = w1 {
                    w1.transpose_for_inference()?;
                }
            }
        }
        self.wo.transpose_for_inference()
    }

    pub fn forward(&self, x: &Tensor, mode: &Mode) -> Result<Tensor> {
        let act = self.kind.activation;
        if let (Some(w), false) = (&self.gate_stacked, mode.is_training()) {
            let h = ops::gated_act_stacked(&w.forward(x, mode)?, act)?;
            return self.wo.forward(&h, mode);
        }
        let a = self.wi.forward(x, mode)?;
        let h = match &self.wi_1 {
            Some(w1) => ops::gated_act(&a, &w1.forward(x, mode)?, act)?,
            None => ops::act(&a, act)?,
        };
        let h = ops::dropout(&h, mode.activation_dropout_rate(), mode)?;
        self.wo.forward(&h, mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rms_norm_matches_formula() {
        let x = Tensor::new(&[[1f32, 2., 3., 4.]], &Device::Cpu).unwrap();
        let n = RmsNorm {
            weight: Tensor::new(&[1f32, 1., 2., 1.], &Device::Cpu).unwrap(),
            eps: 1e-6,
        };
        let y: Vec<f32> = n
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let rms = ((1. + 4. + 9. + 16.) / 4f32 + 1e-6).sqrt();
        let want = [1. / rms, 2. / rms, 6. / rms, 4. / rms];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn transposed_weight_gives_the_same_products() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 5), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5), &dev).unwrap();
        let plain = Linear::new(w.clone());
        let mut t = Linear::new(w);
        t.transpose_for_inference().unwrap();
        assert_eq!(t.weight_t.as_ref().unwrap().dims(), &[5, 6]);
        assert_eq!(t.out_dim(), 6);
        let (a, b) = (
            plain.forward(&x, &Mode::INFER).unwrap(),
            t.forward(&x, &Mode::INFER).unwrap(),
        );
        assert_eq!(b.dims(), &[2, 3, 6]);
        let d = crate::model::max_abs_diff(&a, &b);
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn lora_adds_scaled_delta_and_merges() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 0.], [0., 1.], [1., 1.]], &dev).unwrap(); // out 3, in 2
        let a = Var::new(&[[1f32, 2.]], &dev).unwrap(); // r=1, in=2
        let b = Var::new(&[[1f32], [0.], [-1.]], &dev).unwrap(); // out=3, r=1
        let lin = Linear {
            weight: w,
            bias: None,
            lora: Some(Lora {
                a,
                b,
                scale: 2.0,
                dropout: 0.0,
            }),
            weight_t: None,
        };
        let x = Tensor::new(&[[1f32, 1.]], &dev).unwrap();
        let y: Vec<f32> = lin
            .forward(&x, &Mode::INFER)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // base: [1,1,2]; delta: x@A^T = 3; @B^T = [3,0,-3]; * 2 = [6,0,-6]
        assert_eq!(y, vec![7., 1., -4.]);
        let merged = Linear::new(lin.merged_weight().unwrap());
        let y2: Vec<f32> = merged
            .forward(&x, &Mode::INFER)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(y, y2);
    }
}
