//! `a @ b` on the CPU in f32 straight through the gemm crate, into an output it fills once.
//!
//! candle's CPU matmul zero-fills its output before the gemm overwrites it: a single-threaded pass over
//! memory on the calling thread, between parallel gemms. In decoding that is every layer's output at every
//! step; for the cross-attention projection of a batch it is hundreds of MB of fresh pages touched twice.
//! Here the gemm writes the output directly (it never reads it). Used at inference and in the forward pass
//! of frozen weights; anything that needs candle's backward pass takes candle's matmul.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

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

/// Whether `a @ b` can take this path: f32 on the CPU, two-dimensional, no gradient wanted.
pub fn applies(a: &Tensor, b: &Tensor) -> bool {
    a.device().is_cpu()
        && b.device().is_cpu()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && a.rank() == 2
        && b.rank() == 2
        && !a.track_op()
        && !b.track_op()
}

/// `a (m, k) @ b (k, n)` (any strides) without gradients.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.apply_op2_no_bwd(b, &CpuMatmul)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_for_plain_and_transposed_operands() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 5), &dev).unwrap();
        for b in [w.t().unwrap(), w.t().unwrap().contiguous().unwrap()] {
            assert!(applies(&a, &b));
            let ours = matmul(&a, &b).unwrap();
            let theirs = a.matmul(&b).unwrap();
            assert_eq!(ours.dims(), &[7, 3]);
            let d = crate::model::max_abs_diff(&ours, &theirs);
            assert!(d < 1e-5, "{d}");
        }
        // A narrowed (offset) left operand and an empty inner dimension.
        let a2 = Tensor::randn(0f32, 1.0, (9, 5), &dev)
            .unwrap()
            .narrow(0, 2, 7)
            .unwrap();
        let d = crate::model::max_abs_diff(
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
}
