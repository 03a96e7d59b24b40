//! Flush denormal floats to zero on the CPU compute threads.
//!
//! Arithmetic on denormals (magnitudes below 1.2e-38 in f32) takes a slow microcode path on x86, tens
//! of times slower than on normal numbers. Training produces them in bulk: the gradient of the
//! cross-entropy is the softmax over the vocabulary, and most of its entries are far below that, so
//! the output layer's backward gemm runs many times slower than the same gemm on ordinary numbers (the
//! README has the measurement). Flushing them changes nothing a model can see.
//! The floating-point control register is per thread, so every thread that computes is set: rayon's
//! pool (our kernels and the gemm crate's) and candle's own pool (its elementwise ops).

use std::sync::Once;

/// Set flush-to-zero and denormals-are-zero on the pools' threads (once per process) and on the
/// calling thread (every call: a cheap register write).
pub fn flush_on_compute_threads() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        rayon::broadcast(|_| flush_on_this_thread());
        candle_core::utils::barrier_pool().execute(|_| flush_on_this_thread());
    });
    flush_on_this_thread();
}

/// Set the calling thread's floating-point control register to flush denormals.
pub fn flush_on_this_thread() {
    #[cfg(target_arch = "x86_64")]
    {
        /// MXCSR bits: flush-to-zero (results) and denormals-are-zero (inputs).
        const FTZ_DAZ: u32 = 0x8040;
        let mut csr: u32 = 0;
        // SAFETY: reads and writes the MXCSR register through a valid local; setting FTZ/DAZ only
        // changes how denormal floats are rounded.
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
            csr |= FTZ_DAZ;
            std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags));
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        /// FPCR bit 24: flush denormals to zero.
        const FZ: u64 = 1 << 24;
        // SAFETY: reads and writes FPCR; setting FZ only changes how denormal floats are rounded.
        unsafe {
            let mut fpcr: u64;
            std::arch::asm!("mrs {}, fpcr", out(reg) fpcr, options(nomem, nostack, preserves_flags));
            fpcr |= FZ;
            std::arch::asm!("msr fpcr, {}", in(reg) fpcr, options(nomem, nostack, preserves_flags));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After the flush, a product whose exact value is denormal comes out as zero, on the calling
    /// thread and on the pool's threads.
    #[test]
    fn denormal_results_become_zero() {
        let tiny = std::hint::black_box(1e-30f32);
        let small = std::hint::black_box(1e-10f32);
        flush_on_compute_threads();
        assert_eq!(std::hint::black_box(tiny * small), 0.0);
        let on_pool: Vec<f32> = rayon::broadcast(|_| std::hint::black_box(tiny * small));
        assert!(on_pool.iter().all(|&p| p == 0.0), "{on_pool:?}");
        // Normal numbers are untouched.
        assert_eq!(std::hint::black_box(tiny * 2.0), 2e-30);
    }
}
