//! The fused CPU kernels behind [`super`]: each is one or two passes over memory where candle's
//! composed ops take many (and, for decoding's small matmuls and attention, many small calls). They
//! run on f32 tensors on the CPU only; [`super`] decides when they apply and keeps the composed form
//! beside each for every other case and as the reference the tests compare against.

pub mod activation;
pub mod attention;
pub mod attention_train;
pub mod cross_entropy;
pub mod denormals;
pub mod lora_linear;
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

/// The contiguous f32 data of a tensor's storage, which must be on the CPU (what custom ops read of
/// tensors they hold or are given in backward).
pub(crate) fn storage_f32<'a>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::Storage::Cpu(s) = storage else {
        candle_core::bail!("{op}: expected a tensor on the CPU");
    };
    contiguous_f32(s, layout, op)
}

/// Elements per parallel task of [`par_map2`]: big enough that a task outweighs its scheduling.
const MAP_CHUNK: usize = 8192;

/// `f(a[i], b[i])` for every element, in parallel chunks (the elementwise pass of custom ops).
pub(crate) fn par_map2(
    a: &[f32],
    b: &[f32],
    f: impl Fn(f32, f32) -> f32 + Sync + Copy,
) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(MAP_CHUNK)
        .zip(a.par_chunks(MAP_CHUNK).zip(b.par_chunks(MAP_CHUNK)))
        .for_each(|(o, (a, b))| simd_map2(o, a, b, f));
    out
}

/// `o[i] = f(a[i], b[i])`, compiled for the widest vector instructions this CPU has: the crate is
/// built for the baseline x86-64, where the branch-free math of [`fast_exp`] and the activations
/// runs 4 lanes wide (and `floor` is a libm call). `f` is taken by value and inlined into each copy of
/// the loop. Every level does the same f32 operations in the same order: the same bits.
#[inline(always)]
pub(crate) fn simd_map2<F: Fn(f32, f32) -> f32 + Copy>(o: &mut [f32], a: &[f32], b: &[f32], f: F) {
    #[inline(always)]
    fn body<F: Fn(f32, f32) -> f32>(o: &mut [f32], a: &[f32], b: &[f32], f: F) {
        for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
            *o = f(a, b);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512<F: Fn(f32, f32) -> f32>(o: &mut [f32], a: &[f32], b: &[f32], f: F) {
            body(o, a, b, f)
        }
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<F: Fn(f32, f32) -> f32>(o: &mut [f32], a: &[f32], b: &[f32], f: F) {
            body(o, a, b, f)
        }
        match simd_level() {
            // SAFETY: the features were detected on this CPU.
            2 => return unsafe { avx512(o, a, b, f) },
            1 => return unsafe { avx2(o, a, b, f) },
            _ => {}
        }
    }
    body(o, a, b, f)
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

/// e^x for the softmaxes of the fused kernels: Cody-Waite range reduction to r in [-ln2/2, ln2/2],
/// Cephes' degree-6 polynomial for e^r, and 2^n put in the exponent bits. Within 1e-7 relative of
/// the exact value over [-20, 1] (what softmax weights that matter take), and without libm's
/// branches, so loops over scores vectorize (libm's `expf` took most of a training attention's
/// time).
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_2e-4f32;
    for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = p * r + c;
    }
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
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

#[cfg(test)]
mod fast_exp_tests {
    use super::fast_exp;

    #[test]
    fn fast_exp_is_within_2e_7_relative_where_softmax_needs_it() {
        let mut worst = 0f64;
        for i in -40_000..=2_000 {
            let x = i as f32 * 5e-4;
            let exact = (x as f64).exp();
            worst = worst.max((fast_exp(x) as f64 - exact).abs() / exact);
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        assert_eq!(fast_exp(0.0), 1.0);
        assert!(fast_exp(-200.0) < 1e-37 && fast_exp(-200.0) >= 0.0);
    }
}

#[cfg(test)]
mod simd_tests {
    use super::{fast_exp, simd_map2};

    #[test]
    fn the_vector_copies_give_the_scalar_loops_bits() {
        let a: Vec<f32> = (0..1003).map(|i| (i as f32 - 500.0) * 0.037).collect();
        let b: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.71).sin()).collect();
        let f = |x: f32, y: f32| fast_exp(-0.5 * x * x) * y + (x * 0.5).floor();
        let mut out = vec![0f32; a.len()];
        simd_map2(&mut out, &a, &b, f);
        for i in 0..a.len() {
            assert_eq!(out[i].to_bits(), f(a[i], b[i]).to_bits(), "element {i}");
        }
    }
}
