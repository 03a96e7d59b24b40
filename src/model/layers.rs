//! The small modules T5 is made of: Linear (with an optional LoRA adapter), T5's RMS layer norm, the
//! feed-forward block, activations, dropout and a softmax that has a backward pass.

use candle_core::{DType, Device, Module, Tensor, Var, D};

use super::config::{Activation, FeedForward};
use crate::error::Result;
use crate::rng::Rng;
use rayon::prelude::*;

/// What a forward pass is for: inference, or training (dropout on, differentiable softmax).
pub struct Mode<'a> {
    pub train: Option<&'a std::cell::RefCell<TrainState>>,
}

impl Mode<'_> {
    pub const INFER: Mode<'static> = Mode { train: None };
}

/// Training-time randomness: model and LoRA dropout rates, and the generator for their masks.
pub struct TrainState {
    pub dropout: f64,
    pub rng: Rng,
}

/// Inverted dropout with a mask drawn from our own seeded generator (candle's CPU RNG cannot be seeded).
pub fn dropout(x: &Tensor, p: f64, mode: &Mode) -> Result<Tensor> {
    let Some(state) = mode.train else {
        return Ok(x.clone());
    };
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let seed = state.borrow_mut().rng.next_u64();
    let mask = dropout_mask(x.elem_count(), p, seed);
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok(x.mul(&mask)?)
}

/// An inverted-dropout mask of `n` elements: 0 where dropped (with probability `p`), 1 / (1 - p)
/// elsewhere. Drawn in parallel, chunk by chunk, each chunk from its own stream of `seed`: the same
/// mask whatever the thread count (drawn serially, it was a few percent of a training step with every
/// core but one waiting).
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

/// Elements per dropout-mask chunk (one RNG stream each).
const DROPOUT_CHUNK: usize = 16384;

/// Model dropout rate in training mode (0 at inference).
pub fn model_dropout(x: &Tensor, mode: &Mode) -> Result<Tensor> {
    match mode.train {
        Some(s) => {
            let p = s.borrow().dropout;
            dropout(x, p, mode)
        }
        None => Ok(x.clone()),
    }
}

/// Softmax over the last dimension in f32. candle's fused kernel has no backward pass, so training
/// uses ours on the CPU and the composed form elsewhere.
pub fn softmax_last_dim(x: &Tensor, train: bool) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let y = if train && super::fused_softmax::applies(&x) {
        super::fused_softmax::softmax(&x)?
    } else if train {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
    } else {
        candle_nn::ops::softmax_last_dim(&x)?
    };
    Ok(y.to_dtype(dtype)?)
}

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

/// A bias-free linear layer (T5 has no biases). `weight` is (out, in), as in HF checkpoints.
#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub lora: Option<Lora>,
    /// Inference on the CPU only: the weight stored transposed, (in, out) contiguous; `weight` is then
    /// a view of it. The CPU gemm runs decoding's few-row products up to 1.5x faster this way.
    pub weight_t: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        Linear {
            weight,
            lora: None,
            weight_t: None,
        }
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn forward(&self, x: &Tensor, mode: &Mode) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (lead, k) = dims.split_at(dims.len() - 1);
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, k[0]))?;
        let wt = match &self.weight_t {
            Some(wt) => wt.clone(),
            None => self.weight.t()?,
        };
        let mut y = if super::frozen_matmul::applies(&x2, &self.weight) {
            super::frozen_matmul::forward(&x2, &self.weight)?
        } else if super::cpu_matmul::applies(&x2, &wt) {
            super::cpu_matmul::matmul(&x2, &wt)?
        } else {
            x2.matmul(&wt)?
        };
        if let Some(l) = &self.lora {
            let xd = dropout(&x2, l.dropout, mode)?;
            let a = l.a.as_tensor().to_dtype(x.dtype())?;
            let b = l.b.as_tensor().to_dtype(x.dtype())?;
            let delta = xd.matmul(&a.t()?)?.matmul(&b.t()?)?;
            y = (y + (delta * l.scale)?)?;
        }
        let mut out_shape = lead.to_vec();
        out_shape.push(self.out_dim());
        Ok(y.reshape(out_shape)?)
    }

    /// Store the weight transposed for inference on the CPU in f32 (no-op elsewhere, or with an
    /// adapter): for layers that see few rows at a time (decoding), where the gemm is faster with a
    /// row-major right-hand side. The model can no longer be trained after this.
    pub fn transpose_for_inference(&mut self) -> Result<()> {
        if self.lora.is_some()
            || self.weight_t.is_some()
            || !self.weight.device().is_cpu()
            || self.weight.dtype() != DType::F32
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
        // One fused pass at inference on the CPU; the composed form when gradients flow.
        if super::cpu_attention::applies(x) && !x.track_op() && !self.weight.track_op() {
            return super::cpu_attention::rms_norm(x, &self.weight, self.eps);
        }
        self.forward_composed(x)
    }

    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        // x * rsqrt(var + eps), as HF computes it.
        let y = xf.broadcast_mul(&(var + self.eps)?.sqrt()?.recip()?)?;
        Ok(y.to_dtype(dtype)?
            .broadcast_mul(&self.weight.to_dtype(dtype)?)?)
    }
}

pub fn activate(x: &Tensor, a: Activation) -> Result<Tensor> {
    Ok(match a {
        Activation::Relu => x.relu()?,
        Activation::Gelu => x.gelu_erf()?,
        Activation::GeluNew => x.gelu()?,
        Activation::Silu => candle_nn::Activation::Silu.forward(x)?,
    })
}

/// The feed-forward block: `wo(act(wi(x)))`, or gated `wo(act(wi_0(x)) * wi_1(x))`.
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
        let f = self.wi.out_dim();
        let w = Tensor::cat(&[&self.wi.weight, &w1.weight], 0)?;
        self.wi.weight = w.narrow(0, 0, f)?;
        w1.weight = w.narrow(0, f, f)?;
        self.gate_stacked = Some(Linear::new(w));
        Ok(())
    }

    /// Transposed weights for decoding (see [`Linear::transpose_for_inference`]).
    pub fn transpose_for_decoding(&mut self) -> Result<()> {
        match &mut self.gate_stacked {
            Some(w) => {
                w.transpose_for_inference()?;
                // wi_0 and wi_1 view the stacked weight: point them at its new storage.
                let f = self.wi.out_dim();
                self.wi.weight = w.weight.narrow(0, 0, f)?;
                if let Some(w1) = &mut self.wi_1 {
                    w1.weight = w.weight.narrow(0, f, f)?;
                }
            }
            None => {
                self.wi.transpose_for_inference()?;
                if let Some(w1) = &mut self.wi_1 {
                    w1.transpose_for_inference()?;
                }
            }
        }
        self.wo.transpose_for_inference()
    }

    pub fn forward(&self, x: &Tensor, mode: &Mode) -> Result<Tensor> {
        if let (Some(w), None) = (&self.gate_stacked, &mode.train) {
            let y = w.forward(x, mode)?;
            let act = self.kind.activation;
            let h = if super::cpu_attention::applies(&y) && super::fused_activation::supported(act)
            {
                super::cpu_attention::gated_act(&y, act)?
            } else {
                let f = y.dim(y.rank() - 1)? / 2;
                (activate(&y.narrow(y.rank() - 1, 0, f)?, act)? * y.narrow(y.rank() - 1, f, f)?)?
            };
            return self.wo.forward(&h, mode);
        }
        let act = self.kind.activation;
        let a = self.wi.forward(x, mode)?;
        let b = self
            .wi_1
            .as_ref()
            .map(|w1| w1.forward(x, mode))
            .transpose()?;
        let fused = super::fused_activation::supported(act)
            && super::fused_activation::applies(&a, b.as_ref());
        let h = match (b, fused) {
            (Some(b), true) => super::fused_activation::gated(&a, &b, act)?,
            (None, true) => super::fused_activation::act(&a, act)?,
            (Some(b), false) => (activate(&a, act)? * b)?,
            (None, false) => activate(&a, act)?,
        };
        let h = model_dropout(&h, mode)?;
        self.wo.forward(&h, mode)
    }
}

/// Zero-filled tensor on a device in a dtype — used for starting values.
pub fn zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::zeros(shape, dtype, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn softmax_train_and_infer_agree_and_train_has_gradients() {
        let v = Var::new(&[[1f32, 2., 3.], [0., -1., 5.]], &Device::Cpu).unwrap();
        let a = softmax_last_dim(v.as_tensor(), true).unwrap();
        let b = softmax_last_dim(v.as_tensor(), false).unwrap();
        let d = crate::model::max_abs_diff(&a, &b);
        assert!(d < 1e-6);
        // d/dx of softmax(x)[0,0]: nonzero gradient flows back.
        let loss = a.narrow(1, 0, 1).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        let gx = g
            .get(v.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(gx > 0.0);
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
        let st = std::cell::RefCell::new(TrainState {
            dropout: 0.5,
            rng: Rng::new(3),
        });
        let a: Vec<f32> = dropout(&x, 0.5, &Mode { train: Some(&st) })
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let st2 = std::cell::RefCell::new(TrainState {
            dropout: 0.5,
            rng: Rng::new(3),
        });
        let b: Vec<f32> = dropout(&x, 0.5, &Mode { train: Some(&st2) })
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b);
        assert!(a.iter().all(|v| *v == 0.0 || *v == 2.0));
        // Over several chunks, about p of the elements are dropped, and chunks differ.
        let big = Tensor::ones((5, 10_000), DType::F32, &Device::Cpu).unwrap();
        let m: Vec<f32> = dropout(&big, 0.25, &Mode { train: Some(&st) })
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let dropped = m.iter().filter(|v| **v == 0.0).count() as f64 / m.len() as f64;
        assert!((dropped - 0.25).abs() < 0.01, "dropped {dropped}");
        assert_ne!(m[..DROPOUT_CHUNK], m[DROPOUT_CHUNK..2 * DROPOUT_CHUNK]);
    }
}
