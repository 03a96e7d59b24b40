//! The fused CPU kernels behind [`super`]: each is one or two passes over memory where candle's
//! composed ops take many (and, for decoding's small matmuls and attention, many small calls). They
//! run on f32 tensors on the CPU only; [`super`] decides when they apply and keeps the composed form
//! beside each for every other case and as the reference the tests compare against.

pub mod activation;
pub mod attention;
pub mod cross_entropy;
pub mod denormals;
pub mod matmul;
pub mod norm;
pub mod pool;
pub mod residual;
pub mod softmax;

use candle_core::{CpuStorage, Layout};
use rayon::prelude::*;

/// The f32 elements a contiguous CPU layout covers, for custom ops (`op` names the op in the error).
pub(crate) fn contiguous_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input not contiguous")))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

/// Elements per parallel task of [`par_map2`]: big enough that a task outweighs its scheduling.
const MAP_CHUNK: usize = 8192;

/// `f(a[i], b[i])` for every element, in parallel chunks (the elementwise pass of custom ops).
pub(crate) fn par_map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(MAP_CHUNK)
        .zip(a.par_chunks(MAP_CHUNK).zip(b.par_chunks(MAP_CHUNK)))
        .for_each(|(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = f(a, b);
            }
        });
    out
}

/// Sum of `a[i] * b[i]` in 16 independent lanes, so the compiler can keep it in SIMD registers (a
/// single running f32 sum cannot be vectorized without reassociation). The order of operations is
/// fixed, so every instruction set gives the same bits.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// The widest vector instructions this CPU has: 2 AVX-512, 1 AVX2, 0 the baseline. The crate is built
/// for the baseline x86-64; kernels bound by their dot products compile a copy per level.
pub(crate) fn simd_level() -> u8 {
    static LEVEL: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return 2;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return 1;
            }
        }
        0
    })
}
