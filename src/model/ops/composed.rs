//! Every op composed from candle's own tensor ops: what runs on devices and dtypes the fused CPU
//! kernels do not cover (CUDA and Metal get candle's kernels for each piece, and candle's backward
//! passes), and the reference each fused kernel is tested against.

use candle_core::{DType, Module, Tensor, D};

use super::dropout::dropout;
use crate::error::Result;
use crate::model::activation::Activation;
use crate::model::kv_cache::KvIndex;
use crate::model::mode::Mode;

/// `x2 @ weightᵀ (+ bias)`; `weight_t` is the same weight stored transposed, when the model keeps one.
pub fn linear(
    x2: &Tensor,
    weight: &Tensor,
    weight_t: Option<&Tensor>,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let wt = match weight_t {
        Some(wt) => wt.clone(),
        None => weight.t()?,
    };
    let y = x2.matmul(&wt)?;
    Ok(match bias {
        Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
        None => y,
    })
}

/// T5's RMS norm `x * rsqrt(mean(x^2) + eps) * weight`, computed in f32 as HF does.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xf.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    Ok(y.to_dtype(dtype)?.broadcast_mul(&weight.to_dtype(dtype)?)?)
}

/// The layer norm `(x - mean) / sqrt(var + eps) * weight + bias` (biased variance, as PyTorch),
/// computed in f32.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centered = xf.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let y = centered.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    let y = y
        .broadcast_mul(&weight.to_dtype(DType::F32)?)?
        .broadcast_add(&bias.to_dtype(DType::F32)?)?;
    Ok(y.to_dtype(dtype)?)
}

/// Softmax over the last dimension, computed in f32. `differentiable`: from ops that have a backward
/// pass (candle's fused softmax kernel has none); otherwise candle's kernel.
pub fn softmax_last_dim(x: &Tensor, differentiable: bool) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let y = if differentiable {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
    } else {
        candle_nn::ops::softmax_last_dim(&x)?
    };
    Ok(y.to_dtype(dtype)?)
}

/// The feed-forward activation, by candle's formulas.
pub fn activate(x: &Tensor, a: Activation) -> Result<Tensor> {
    Ok(match a {
        Activation::Relu => x.relu()?,
        Activation::Gelu => x.gelu_erf()?,
        Activation::GeluNew => x.gelu()?,
        Activation::Silu => candle_nn::Activation::Silu.forward(x)?,
    })
}

/// `act(a) * b`.
pub fn gated_act(a: &Tensor, b: &Tensor, act: Activation) -> Result<Tensor> {
    Ok((activate(a, act)? * b)?)
}

/// `act(y[.., :f]) * y[.., f:]` for the stacked gate projections `y`.
pub fn gated_act_stacked(y: &Tensor, act: Activation) -> Result<Tensor> {
    let last = y.rank() - 1;
    let f = y.dim(last)? / 2;
    gated_act(&y.narrow(last, 0, f)?, &y.narrow(last, f, f)?, act)
}

/// softmax(q kᵀ + bias) v as batched matmuls: q (rows, heads, queries, d), k and v (kv_rows, heads,
/// len, d), bias broadcastable to (rows, heads, queries, len); dropout on the weights in training.
/// With an `index`, query row r reads key row `index.rows[r]` (gathered here; padding keys weigh
/// nothing through the bias, so `index.lens` needs no work). The softmax is [`super::softmax_last_dim`],
/// which picks its own kernel.
///
/// Below f32 (bf16, f16) the scores and their softmax are computed in f32, as PyTorch's SDPA (HF's
/// default attention) keeps them: rounded to bf16, a score of 10 is off by up to 0.03, and the
/// weights by as much; on a pre-norm model (mBART) that doubled the logits' error against HF's.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    index: Option<&KvIndex>,
    mode: &Mode,
) -> Result<Tensor> {
    let (k, v) = match index {
        Some(ix) => {
            let rows = Tensor::new(ix.rows.as_slice(), k.device())?;
            (
                k.contiguous()?.index_select(&rows, 0)?,
                v.contiguous()?.index_select(&rows, 0)?,
            )
        }
        None => (k.contiguous()?, v.clone()),
    };
    let q = q.contiguous()?;
    let dtype = q.dtype();
    let scores = if dtype == DType::F32 {
        q.matmul(&k.t()?)?.broadcast_add(bias)?
    } else {
        q.to_dtype(DType::F32)?
            .matmul(&k.to_dtype(DType::F32)?.t()?)?
            .broadcast_add(&bias.to_dtype(DType::F32)?)?
    };
    let w = super::softmax_last_dim(&scores, mode.is_training())?.to_dtype(dtype)?;
    let w = dropout(&w, mode.attention_dropout_rate(), mode)?;
    Ok(w.matmul(&v.contiguous()?)?)
}

/// `x + dropout(h)` at the model's dropout rate.
pub fn residual_dropout(x: &Tensor, h: &Tensor, mode: &Mode) -> Result<Tensor> {
    Ok((x + dropout(h, mode.dropout_rate(), mode)?)?)
}

/// Sum of per-token losses over unmasked positions, and the number of those positions (see
/// [`super::cross_entropy`]).
pub fn cross_entropy(
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
