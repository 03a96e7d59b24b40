//! `x @ Wᵀ` for a frozen weight, with a backward pass that computes only the input's gradient.
//!
//! candle's matmul backward always computes the weight's gradient too (as costly as the forward matmul)
//! and accumulates it into a fresh zero tensor, even when the weight is not trained. In LoRA training every
//! base weight is frozen, so that is a third of a step's matmul work and a weight-sized allocation per
//! linear layer thrown away. This op runs on the CPU in f32; other devices and dtypes take the plain path.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

struct FrozenMatmul {
    /// The frozen weight, `[out, in]`.
    weight: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let data = storage.as_slice::<f32>()?;
        let ((m, k), (n, k2)) = (layout.shape().dims2()?, self.weight.dims2()?);
        if k != k2 {
            candle_core::bail!("frozen-matmul: ({m}, {k}) @ ({n}, {k2})ᵀ");
        }
        let (ws, wl) = self.weight.storage_and_layout();
        let candle_core::Storage::Cpu(w) = &*ws else {
            candle_core::bail!("frozen-matmul: the weight must be on the CPU");
        };
        let w = &w.as_slice::<f32>()?[wl.start_offset()..];
        // Straight into the output (candle's matmul would zero-fill it first and this op then copied
        // it out); Wᵀ is W with its strides swapped.
        let (sx, sw) = (layout.stride(), wl.stride());
        let y = crate::model::cpu_matmul::gemm_f32(
            (m, k, n),
            &data[layout.start_offset()..],
            (sx[0], sx[1]),
            w,
            (sw[1], sw[0]),
        );
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.weight)?))
    }
}

/// Whether `x2 @ weightᵀ` (x2 two-dimensional) should take the frozen path: gradients flow through `x2`
/// but not into `weight`, on the CPU, in f32.
pub fn applies(x2: &Tensor, weight: &Tensor) -> bool {
    // `track_op` is true for variables too: a trained weight takes the plain path.
    x2.track_op()
        && !weight.track_op()
        && x2.device().is_cpu()
        && x2.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && x2.is_contiguous()
}

/// `x2 @ weightᵀ` with only `x2`'s gradient in the backward pass.
pub fn forward(x2: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x2.apply_op1(FrozenMatmul {
        weight: weight.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn same_values_and_input_gradient_as_matmul() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 3), &dev)?;
        let x = Var::randn(0f32, 1.0, (4, 3), &dev)?;
        let plain = x.as_tensor().matmul(&w.t()?)?;
        assert!(applies(x.as_tensor(), &w));
        let frozen = forward(x.as_tensor(), &w)?;
        let diff = crate::model::max_abs_diff(&plain, &frozen);
        assert!(diff < 1e-6, "{diff}");
        let target = Tensor::randn(0f32, 1.0, (4, 5), &dev)?;
        let g_plain = (plain * &target)?.sum_all()?.backward()?;
        let g_frozen = (frozen * &target)?.sum_all()?.backward()?;
        let (a, b) = (
            g_plain.get(x.as_tensor()).unwrap(),
            g_frozen.get(x.as_tensor()).unwrap(),
        );
        let diff = crate::model::max_abs_diff(a, b);
        assert!(diff < 1e-5, "{diff}");
        // The weight gets no gradient at all.
        assert!(g_frozen.get(&w).is_none());
        Ok(())
    }
}
