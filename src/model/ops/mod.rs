//! The only door to kernels. The model calls these plain functions; each picks, for its inputs'
//! device and dtype, a fused CPU kernel ([`cpu`]) or the composed candle path ([`composed`]), which
//! is also the reference every fused kernel is tested against. A new device plugs in here and nowhere
//! else: the model families read without kernel code.
//!
//! The rule today: f32 tensors on the CPU take the fused kernels (where one exists for that use:
//! some have no backward pass and serve inference only); everything else is composed, so CUDA and
//! Metal run candle's kernels and candle's backward passes. [`with_composed_kernels`] forces the
//! composed path on the calling thread, to compare the two on the CPU.

pub mod composed;
pub mod cpu;
mod dropout;
mod host;

use std::cell::Cell;

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::model::activation::Activation;
use crate::model::device::DeviceChoice;
use crate::model::kv_cache::KvIndex;
use crate::model::mode::Mode;

pub use cpu::pool::on_compute_pool;
pub use dropout::{dropout, dropout_mask, model_dropout};
pub use host::{first_argmax, with_host_f32};

thread_local! {
    static FORCE_COMPOSED: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` with every op called on this thread taking its composed path (the override is per
/// thread: call the model directly inside `f`, not through [`on_compute_pool`]).
pub fn with_composed_kernels<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCE_COMPOSED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FORCE_COMPOSED.with(|c| c.replace(true)));
    f()
}

/// Whether the fused CPU kernels serve `x`: f32 on the CPU, unless composed ops are forced.
fn fused_cpu(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && !FORCE_COMPOSED.with(|c| c.get())
}

/// Whether decoding on `x`'s device and dtype should keep weights transposed (in, out): the fused
/// CPU gemm runs decoding's few-row products faster with a row-major right-hand side.
pub fn prefers_transposed_weights(x: &Tensor) -> bool {
    fused_cpu(x)
}

/// Whether attention on `x`'s device and dtype reads cross-attention keys and values through a
/// [`KvIndex`] in place (the fused CPU kernel). Elsewhere an index costs a gather at every step, so
/// decoding keeps per-row copies instead.
pub fn reads_kv_in_place(x: &Tensor) -> bool {
    fused_cpu(x)
}

/// Whether attention in `mode` on `x`'s device and dtype reads (rows, heads, len, d) views of the
/// projections in place (the fused CPU training kernel), so the heads need no contiguous copies.
/// Whether training on `device` in `dtype` runs the fused training attention (what the memory
/// estimate needs to know before any tensor exists).
pub fn fused_training_attention(device: DeviceChoice, dtype: DType) -> bool {
    !device.is_cuda() && device != DeviceChoice::Metal && dtype == DType::F32
}

pub fn reads_heads_in_place(x: &Tensor, mode: &Mode) -> bool {
    mode.is_training() && fused_cpu(x)
}

/// `x2 (rows, in) @ weightᵀ (+ bias)` for a weight (out, in); `weight_t` is the same weight stored
/// transposed (in, out), when the model keeps one. On the CPU in f32: without gradients, the gemm
/// straight into its output and the bias added in place; with gradients through `x2` only (a frozen
/// weight), a backward that skips the weight's gradient.
pub fn linear(
    x2: &Tensor,
    weight: &Tensor,
    weight_t: Option<&Tensor>,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let frozen_bias = bias.is_none_or(|b| fused_cpu(b) && !b.track_op());
    if fused_cpu(x2) && fused_cpu(weight) && !weight.track_op() && frozen_bias {
        if !x2.track_op() {
            let wt = match weight_t {
                Some(wt) => wt.clone(),
                None => weight.t()?,
            };
            let y = cpu::matmul::matmul(x2, &wt)?;
            if let Some(b) = bias {
                cpu::matmul::add_bias_in_place(&y, b)?;
            }
            return Ok(y);
        }
        if x2.is_contiguous() {
            return cpu::matmul::frozen_linear(x2, weight, bias);
        }
    }
    composed::linear(x2, weight, weight_t, bias)
}

/// T5's RMS norm over the last dimension (one fused pass at inference on the CPU).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_cpu(x) && fused_cpu(weight) && !x.track_op() && !weight.track_op() {
        return cpu::norm::rms_norm(x, weight, eps);
    }
    composed::rms_norm(x, weight, eps)
}

/// The classic layer norm over the last dimension (BART), in f32 (on the CPU one fused pass, and
/// one for its backward).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_cpu(x) && fused_cpu(weight) && fused_cpu(bias) {
        return cpu::norm::layer_norm(x, weight, bias, eps);
    }
    composed::layer_norm(x, weight, bias, eps)
}

/// Softmax over the last dimension, in f32. `differentiable`: gradients must flow through it
/// (training); candle's own softmax kernel has no backward pass.
pub fn softmax_last_dim(x: &Tensor, differentiable: bool) -> Result<Tensor> {
    // The fused kernel takes any dtype on the CPU (in f32); elsewhere no cast just to choose.
    if differentiable && x.device().is_cpu() && !FORCE_COMPOSED.with(|c| c.get()) {
        let dtype = x.dtype();
        return Ok(cpu::softmax::softmax(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)?);
    }
    composed::softmax_last_dim(x, differentiable)
}

/// The feed-forward activation `act(a)`, differentiable.
pub fn act(a: &Tensor, act: Activation) -> Result<Tensor> {
    if fused_cpu(a) && cpu::activation::supported(act) {
        return cpu::activation::act(a, act);
    }
    composed::activate(a, act)
}

/// The gated feed-forward activation `act(a) * b`, differentiable in both.
pub fn gated_act(a: &Tensor, b: &Tensor, act: Activation) -> Result<Tensor> {
    let same = b.dims() == a.dims() && b.dtype() == a.dtype();
    if fused_cpu(a) && same && cpu::activation::supported(act) {
        return cpu::activation::gated(a, b, act);
    }
    composed::gated_act(a, b, act)
}

/// `act(y[.., :f]) * y[.., f:]` for `y` = the stacked `[wi_0; wi_1]` projections (inference).
pub fn gated_act_stacked(y: &Tensor, act: Activation) -> Result<Tensor> {
    if fused_cpu(y) && cpu::activation::supported(act) {
        return cpu::activation::gated_stacked(y, act);
    }
    composed::gated_act_stacked(y, act)
}

/// A frozen linear layer `x Wᵀ (+ bias)` on inputs that carry gradients, on the CPU in f32, straight
/// on a contiguous `x` of any rank (no reshape nodes, each of which candle's backward gives a
/// zero-filled gradient buffer of its own). `None`: it does not apply; the caller reshapes and
/// calls [`linear`].
pub fn fused_frozen_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let frozen = |t: &Tensor| fused_cpu(t) && !t.track_op();
    if fused_cpu(x)
        && x.track_op()
        && x.is_contiguous()
        && frozen(weight)
        && bias.is_none_or(frozen)
    {
        return Ok(Some(cpu::matmul::frozen_linear(x, weight, bias)?));
    }
    Ok(None)
}

/// A linear layer with a LoRA adapter in training, `x Wᵀ (+ bias) + scale · dropout(x) Aᵀ Bᵀ`, as
/// one op with its own backward where it applies: on the CPU in f32, a frozen weight and bias, a
/// contiguous `x` of any rank (last dimension `in`), an f32 adapter `a` (r, in), `b` (out, r). The
/// dropout mask is drawn as the composed path draws it (one seed, only when `dropout` > 0). `None`:
/// it does not apply, and the caller runs the composed layer.
pub fn fused_lora_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    (a, b): (&Tensor, &Tensor),
    scale: f64,
    dropout: f64,
    mode: &Mode,
) -> Result<Option<Tensor>> {
    let frozen = |t: &Tensor| fused_cpu(t) && !t.track_op();
    let applies = mode.is_training()
        && fused_cpu(x)
        && x.is_contiguous()
        && frozen(weight)
        && bias.is_none_or(frozen)
        && fused_cpu(a)
        && fused_cpu(b);
    if !applies {
        return Ok(None);
    }
    let mask = (dropout > 0.0)
        .then(|| mode.next_seed())
        .flatten()
        .map(|seed| dropout_mask(x.elem_count(), dropout, seed));
    let y = cpu::lora_linear::lora_linear(x, weight, bias, (a, b), scale, mask)?;
    Ok(Some(y))
}

/// softmax(scale · q kᵀ + bias) v, with dropout on the weights in training: q (rows, heads, queries, d), k and
/// v (kv_rows, heads, len, d) (strided views allowed), bias broadcastable to (rows, heads, queries,
/// len); returns (rows, heads, queries, d). With an `index`, query row r reads key row
/// `index.rows[r]`. One query per row at inference on the CPU (a decoding step) is the fused
/// decoding kernel; training on the CPU with a constant bias is the fused training kernel (its own
/// backward); the encoder at inference is faster as batched matmuls.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
    index: Option<&KvIndex>,
    mode: &Mode,
) -> Result<Tensor> {
    let constant_bias = !bias.track_op() && index.is_none();
    if mode.is_training() && constant_bias && fused_cpu(q) && fused_cpu(k) && fused_cpu(v) {
        // Dropout on the weights with the composed path's mask (the same draw of the generator).
        let p = mode.attention_dropout_rate();
        let n = q.dims()[0] * q.dims()[1] * q.dims()[2] * k.dims()[2];
        let mask = (p > 0.0)
            .then(|| mode.next_seed())
            .flatten()
            .map(|seed| dropout_mask(n, p, seed));
        return cpu::attention_train::attention(q, k, v, bias, scale, mask);
    }
    // The scale goes on the queries: (s q)·k, one pass over the smallest operand.
    let q = if scale == 1.0 {
        q.clone()
    } else {
        (q * scale)?
    };
    if !mode.is_training() && q.dims()[2] == 1 && fused_cpu(&q) {
        return cpu::attention::attention(&q, k, v, bias, index);
    }
    composed::attention(&q, k, v, bias, index, mode)
}

/// `x + dropout(h)`, the residual connection of every sublayer, at the model's dropout rate (`x + h`
/// at inference). On the CPU in f32 one op with a one-pass backward, bit-identical to the composed
/// form (the same mask from the same draw of the generator).
pub fn residual_dropout(x: &Tensor, h: &Tensor, mode: &Mode) -> Result<Tensor> {
    let p = mode.dropout_rate();
    if !mode.is_training() || p <= 0.0 {
        return Ok((x + h)?);
    }
    if fused_cpu(x) && fused_cpu(h) && x.dims() == h.dims() {
        let seed = mode.next_seed().expect("training mode");
        return cpu::residual::residual_dropout(x, h, dropout_mask(h.elem_count(), p, seed));
    }
    composed::residual_dropout(x, h, mode)
}

/// The seq2seq loss: the sum of per-token cross-entropies over unmasked positions (padding ignored,
/// as HF's -100), with label smoothing as PyTorch defines it (`(1 - e) * nll + e * mean_v(-log p_v)`),
/// and the number of those positions. `logits` (b, t, v) f32; `labels` (b, t) u32 (any id at padded
/// positions); `mask` (b, t) 1/0.
pub fn cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    mask: &Tensor,
    smoothing: f64,
) -> Result<(Tensor, f64)> {
    if fused_cpu(logits) {
        let weights: Vec<f32> = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let n = weights.iter().map(|&w| w as f64).sum();
        let v = logits.dim(D::Minus1)?;
        let rows = logits.reshape(((), v))?;
        let labels = labels.flatten_all()?.to_vec1()?;
        let sum = cpu::cross_entropy::cross_entropy_sum(&rows, labels, weights, smoothing)?;
        return Ok((sum, n));
    }
    composed::cross_entropy(logits, labels, mask, smoothing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::max_abs_diff;
    use candle_core::{Device, Var};

    /// The override reaches every op's choice and is undone afterwards, also on a panic.
    #[test]
    fn composed_kernels_can_be_forced_per_thread() {
        let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(fused_cpu(&x));
        with_composed_kernels(|| {
            assert!(!fused_cpu(&x));
            assert!(!reads_kv_in_place(&x));
        });
        assert!(fused_cpu(&x));
        let r = std::panic::catch_unwind(|| with_composed_kernels(|| panic!("inside")));
        assert!(r.is_err());
        assert!(fused_cpu(&x));
        // Not f32, not fused.
        assert!(!fused_cpu(&x.to_dtype(DType::BF16).unwrap()));
    }

    /// Every op gives the same values by both paths (each kernel's own tests check gradients too).
    #[test]
    fn every_op_agrees_with_its_composed_path() {
        let dev = Device::Cpu;
        let both = |f: &dyn Fn() -> Tensor| (f(), with_composed_kernels(f));
        let x = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev).unwrap();
        let x2 = x.reshape((6, 8)).unwrap();
        let w = Tensor::randn(0f32, 1.0, (5, 8), &dev).unwrap();
        let g = Tensor::randn(1f32, 0.1, 8, &dev).unwrap();
        let beta = Tensor::randn(0f32, 0.5, 8, &dev).unwrap();
        let bias5 = Tensor::randn(0f32, 1.0, 5, &dev).unwrap();
        let q = Tensor::randn(0f32, 1.0, (2, 2, 1, 4), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 2, 6, 4), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, (1, 2, 1, 6), &dev).unwrap();
        let labels = Tensor::new(&[[1u32, 2, 3], [4, 0, 7]], &dev).unwrap();
        let mask = Tensor::new(&[[1f32, 1., 0.], [1., 1., 1.]], &dev).unwrap();
        type Case<'a> = (&'static str, Box<dyn Fn() -> Tensor + 'a>, f32);
        let cases: Vec<Case> = vec![
            (
                "linear",
                Box::new(|| linear(&x2, &w, None, None).unwrap()),
                1e-5,
            ),
            (
                "linear with bias",
                Box::new(|| linear(&x2, &w, None, Some(&bias5)).unwrap()),
                1e-5,
            ),
            (
                "layer_norm",
                Box::new(|| layer_norm(&x, &g, &beta, 1e-5).unwrap()),
                1e-5,
            ),
            (
                "rms_norm",
                Box::new(|| rms_norm(&x, &g, 1e-6).unwrap()),
                1e-5,
            ),
            (
                "softmax",
                Box::new(|| softmax_last_dim(&x, true).unwrap()),
                1e-6,
            ),
            (
                "act",
                Box::new(|| act(&x, Activation::GeluNew).unwrap()),
                1e-5,
            ),
            (
                "gated_act",
                Box::new(|| gated_act(&x, &x, Activation::Silu).unwrap()),
                1e-6,
            ),
            (
                "gated_act_stacked",
                Box::new(|| gated_act_stacked(&x, Activation::Relu).unwrap()),
                0.0,
            ),
            (
                "attention",
                Box::new(|| attention(&q, &k, &k, &bias, 0.5, None, &Mode::INFER).unwrap()),
                1e-5,
            ),
            (
                "cross_entropy",
                Box::new(|| cross_entropy(&x, &labels, &mask, 0.1).unwrap().0),
                1e-5,
            ),
        ];
        for (name, f, tol) in &cases {
            let (fused, composed) = both(f.as_ref());
            let d = max_abs_diff(&fused, &composed);
            assert!(d <= *tol, "{name}: fused and composed differ by {d}");
        }
        // Gradients flow through the differentiable ops on both paths.
        let v = Var::new(&[[1f32, 2., 3.]], &dev).unwrap();
        for forced in [false, true] {
            let run = || softmax_last_dim(v.as_tensor(), true).unwrap();
            let y = if forced {
                with_composed_kernels(run)
            } else {
                run()
            };
            let grads = y
                .narrow(1, 0, 1)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert!(grads.get(v.as_tensor()).is_some());
        }
    }
}
