//! Matrix products on the CPU in f32, straight through the gemm crate.
//!
//! - [`matmul`]: `a @ b` into an output the gemm fills once. candle's CPU matmul zero-fills its output
//!   before the gemm overwrites it: a single-threaded pass over memory between parallel gemms, at
//!   every layer of every decoding step, and hundreds of MB of fresh pages touched twice for the
//!   cross-attention projection of a batch. No backward pass (inference, and frozen forwards).
//! - [`frozen_linear`]: `x @ Wᵀ` for a frozen weight, whose backward computes only the input's
//!   gradient. candle's matmul backward always computes the weight's gradient too (as costly as the
//!   forward) and accumulates it into a fresh zero tensor; in LoRA training every base weight is
//!   frozen, so that is a large share of a step's matmul work thrown away.
//! - [`add_bias_in_place`]: a bias added to every row of a fresh product, with no second tensor.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use crate::error::Result;

/// `a (m, k) @ b (k, n)` for row-major-or-strided slices: element (i, j) of `a` is at
/// `a[i * a_rs + j * a_cs]`, likewise for `b`. Returns the (m, n) product, row-major.
pub fn gemm_f32(
    (m, k, n): (usize, usize, usize),
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
) -> Vec<f32> {
    if m == 0 || n == 0 || k == 0 {
        return vec![0f32; m * n];
    }
    // Bounds: the last element each operand reads must exist (the gemm works on raw pointers).
    assert!(
        (m - 1) * a_rs + (k - 1) * a_cs < a.len(),
        "gemm_f32: lhs too short"
    );
    assert!(
        (k - 1) * b_rs + (n - 1) * b_cs < b.len(),
        "gemm_f32: rhs too short"
    );
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: the operands hold every element the strides reach (checked above); the output has room
    // for m * n elements, all of which the gemm writes (read_dst = false: it never reads them) before
    // the length is set.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.spare_capacity_mut().as_mut_ptr() as *mut f32,
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
        out.set_len(m * n);
    }
    out
}

/// `dst = scale * a @ b` on the calling thread, for the many small products of a kernel that is
/// already parallel over its rows: `a` (m, k) and `b` (k, n) as in [`gemm_f32`], `dst` (m, n) with
/// row stride `dst_rs` (overwritten).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into(
    dst: &mut [f32],
    dst_rs: usize,
    (m, k, n): (usize, usize, usize),
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst_rs + n <= dst.len(),
        "gemm_into: dst too short"
    );
    if k == 0 {
        for r in 0..m {
            dst[r * dst_rs..][..n].fill(0.0);
        }
        return;
    }
    assert!(
        (m - 1) * a_rs + (k - 1) * a_cs < a.len(),
        "gemm_into: lhs too short"
    );
    assert!(
        (k - 1) * b_rs + (n - 1) * b_cs < b.len(),
        "gemm_into: rhs too short"
    );
    // SAFETY: every element the strides reach exists (checked above).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

struct CpuMatmul;

impl CustomOp2 for CpuMatmul {
    fn name(&self) -> &'static str {
        "cpu-matmul"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((m, k), (k2, n)) = (al.shape().dims2()?, bl.shape().dims2()?);
        if k != k2 {
            candle_core::bail!("cpu-matmul: ({m}, {k}) @ ({k2}, {n})");
        }
        let (a, b) = (
            &a.as_slice::<f32>()?[al.start_offset()..],
            &b.as_slice::<f32>()?[bl.start_offset()..],
        );
        let (sa, sb) = (al.stride(), bl.stride());
        let out = gemm_f32((m, k, n), a, (sa[0], sa[1]), b, (sb[0], sb[1]));
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// `a (m, k) @ b (k, n)` (any strides) without gradients.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.apply_op2_no_bwd(b, &CpuMatmul)?)
}

struct AddBias;

impl candle_core::InplaceOp2 for AddBias {
    fn name(&self) -> &'static str {
        "add-bias"
    }

    fn cpu_fwd(
        &self,
        y: &mut CpuStorage,
        yl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<()> {
        let n = *yl.dims().last().unwrap_or(&1);
        let b = super::contiguous_f32(b, bl, self.name())?;
        if b.len() != n || !yl.is_contiguous() {
            candle_core::bail!("add-bias: a bias of {} for contiguous rows of {n}", b.len());
        }
        let (start, end) = yl
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("add-bias: not contiguous".into()))?;
        let CpuStorage::F32(y) = y else {
            candle_core::bail!("add-bias: f32 only");
        };
        use rayon::prelude::*;
        y[start..end]
            .par_chunks_mut(n.max(1) * 64)
            .for_each(|rows| {
                for row in rows.chunks_mut(n) {
                    for (v, c) in row.iter_mut().zip(b) {
                        *v += c;
                    }
                }
            });
        Ok(())
    }
}

/// `y[r] += bias` for every row of a fresh, contiguous product `y` (inference: no gradient).
pub fn add_bias_in_place(y: &Tensor, bias: &Tensor) -> Result<()> {
    Ok(y.inplace_op2(&bias.contiguous()?, &AddBias)?)
}

/// A frozen 2-d weight read in place, a view included (a transposed or narrowed tensor): its f32
/// data from the layout's start and its (row, column) strides, for [`gemm_f32`].
fn strided_weight<'a>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<(&'a [f32], (usize, usize))> {
    let candle_core::Storage::Cpu(w) = storage else {
        candle_core::bail!("{op}: the weight must be on the CPU");
    };
    let stride = layout.stride();
    if stride.len() != 2 {
        candle_core::bail!("{op}: the weight must be 2-d, not {:?}", layout.dims());
    }
    Ok((
        &w.as_slice::<f32>()?[layout.start_offset()..],
        (stride[0], stride[1]),
    ))
}

struct FrozenMatmul {
    /// The frozen weight, `[out, in]`.
    weight: Tensor,
    /// A frozen bias `[out]`, added in the same pass.
    bias: Option<Tensor>,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = super::contiguous_f32(storage, layout, "frozen-matmul")?;
        let dims = layout.dims();
        let k = *dims.last().unwrap_or(&0);
        let m = data.len().checked_div(k).unwrap_or(0);
        let (n, k2) = self.weight.dims2()?;
        if k != k2 {
            candle_core::bail!("frozen-matmul: ({m}, {k}) @ ({n}, {k2})ᵀ");
        }
        let (ws, wl) = self.weight.storage_and_layout();
        let (w, sw) = strided_weight(&ws, wl, self.name())?;
        // Straight into the output (candle's matmul would zero-fill it first and this op then copied
        // it out); Wᵀ is W with its strides swapped.
        let mut y = gemm_f32((m, k, n), data, (k, 1), w, (sw.1, sw.0));
        if let Some(b) = &self.bias {
            let (bs, bl) = b.storage_and_layout();
            let b = super::storage_f32(&bs, bl, "frozen-matmul")?;
            if b.len() != n {
                candle_core::bail!("frozen-matmul: a bias of {} for {n} outputs", b.len());
            }
            use rayon::prelude::*;
            y.par_chunks_mut(n.max(1) * 16).for_each(|rows| {
                for row in rows.chunks_mut(n.max(1)) {
                    for (v, c) in row.iter_mut().zip(b) {
                        *v += c;
                    }
                }
            });
        }
        let mut out = dims.to_vec();
        if let Some(last) = out.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dx = grad.contiguous()?.apply_op1_no_bwd(&FrozenMatmulBackward {
            weight: self.weight.clone(),
        })?;
        Ok(Some(dx.reshape(arg.shape())?))
    }
}

/// The input's gradient of [`FrozenMatmul`], `dy (rows, out) @ W (out, in)`, straight into its
/// output (candle's matmul zero-fills it first).
struct FrozenMatmulBackward {
    weight: Tensor,
}

impl CustomOp1 for FrozenMatmulBackward {
    fn name(&self) -> &'static str {
        "frozen-matmul-backward"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dy = super::contiguous_f32(storage, layout, self.name())?;
        let (n, k) = self.weight.dims2()?;
        if layout.dims().last() != Some(&n) {
            candle_core::bail!(
                "{}: a gradient of {:?} for {n} outputs",
                self.name(),
                layout.dims()
            );
        }
        let rows = dy.len().checked_div(n).unwrap_or(0);
        let (ws, wl) = self.weight.storage_and_layout();
        let (w, sw) = strided_weight(&ws, wl, self.name())?;
        let dx = gemm_f32((rows, n, k), dy, (n, 1), w, sw);
        Ok((CpuStorage::F32(dx), Shape::from((rows, k))))
    }
}

/// `x2 @ weightᵀ (+ bias)` for a frozen weight and bias, with only `x2`'s gradient in the backward
/// pass. `x2` is contiguous, of any rank (its last dimension `in`; the leading ones are kept).
pub fn frozen_linear(x2: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    Ok(x2.apply_op1(FrozenMatmul {
        weight: weight.clone(),
        bias: bias.map(|b| b.contiguous()).transpose()?,
    })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{max_abs_diff, weighted_sum_grads};
    use candle_core::{DType, Device, Var};

    #[test]
    fn matmul_matches_candle_for_plain_and_transposed_operands() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 5), &dev).unwrap();
        for b in [w.t().unwrap(), w.t().unwrap().contiguous().unwrap()] {
            let ours = matmul(&a, &b).unwrap();
            let theirs = a.matmul(&b).unwrap();
            assert_eq!(ours.dims(), &[7, 3]);
            let d = max_abs_diff(&ours, &theirs);
            assert!(d < 1e-5, "{d}");
        }
        // A narrowed (offset) left operand and an empty inner dimension.
        let a2 = Tensor::randn(0f32, 1.0, (9, 5), &dev)
            .unwrap()
            .narrow(0, 2, 7)
            .unwrap();
        let d = max_abs_diff(
            &matmul(&a2, &w.t().unwrap()).unwrap(),
            &a2.matmul(&w.t().unwrap()).unwrap(),
        );
        assert!(d < 1e-5, "{d}");
        let e = matmul(
            &Tensor::zeros((2, 0), DType::F32, &dev).unwrap(),
            &Tensor::zeros((0, 3), DType::F32, &dev).unwrap(),
        )
        .unwrap();
        assert_eq!(e.to_vec2::<f32>().unwrap(), vec![vec![0f32; 3]; 2]);
    }

    #[test]
    fn frozen_linear_gives_the_values_and_input_gradient_of_matmul() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 3), &dev).unwrap();
        let x = Var::randn(0f32, 1.0, (4, 3), &dev).unwrap();
        let plain = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let frozen = frozen_linear(x.as_tensor(), &w, None).unwrap();
        let diff = max_abs_diff(&plain, &frozen);
        assert!(diff < 1e-6, "{diff}");
        let target = Tensor::randn(0f32, 1.0, (4, 5), &dev).unwrap();
        let g_plain = weighted_sum_grads(&plain, &target);
        let g_frozen = weighted_sum_grads(&frozen, &target);
        let (a, b) = (
            g_plain.get(x.as_tensor()).unwrap(),
            g_frozen.get(x.as_tensor()).unwrap(),
        );
        let diff = max_abs_diff(a, b);
        assert!(diff < 1e-5, "{diff}");
        // The weight gets no gradient at all.
        assert!(g_frozen.get(&w).is_none());
    }

    #[test]
    fn frozen_linear_backward_takes_3d_inputs_and_strided_weights() {
        let dev = Device::Cpu;
        // A weight that is a view: the first 5 of 7 rows of a transposed tensor.
        let w = Tensor::randn(0f32, 1.0, (3, 7), &dev)
            .unwrap()
            .t()
            .unwrap()
            .narrow(0, 1, 5)
            .unwrap();
        let x = Var::randn(0f32, 1.0, (2, 4, 3), &dev).unwrap();
        let target = Tensor::randn(0f32, 1.0, (2, 4, 5), &dev).unwrap();
        let plain = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
        let frozen = frozen_linear(x.as_tensor(), &w, None).unwrap();
        assert_eq!(frozen.dims(), &[2, 4, 5]);
        assert!(max_abs_diff(&plain, &frozen) < 1e-5);
        let (gp, gf) = (
            weighted_sum_grads(&plain, &target),
            weighted_sum_grads(&frozen, &target),
        );
        let (a, b) = (
            gp.get(x.as_tensor()).unwrap(),
            gf.get(x.as_tensor()).unwrap(),
        );
        assert_eq!(b.dims(), &[2, 4, 3]);
        let d = max_abs_diff(a, b);
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn frozen_linear_adds_its_bias_and_passes_the_input_gradient() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 3), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 5, &dev).unwrap();
        let x = Var::randn(0f32, 1.0, (4, 3), &dev).unwrap();
        let plain = x
            .as_tensor()
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let frozen = frozen_linear(x.as_tensor(), &w, Some(&b)).unwrap();
        assert!(max_abs_diff(&plain, &frozen) < 1e-6);
        let target = Tensor::randn(0f32, 1.0, (4, 5), &dev).unwrap();
        let (gp, gf) = (
            weighted_sum_grads(&plain, &target),
            weighted_sum_grads(&frozen, &target),
        );
        let d = max_abs_diff(
            gp.get(x.as_tensor()).unwrap(),
            gf.get(x.as_tensor()).unwrap(),
        );
        assert!(d < 1e-5, "{d}");
    }
}
