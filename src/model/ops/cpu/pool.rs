//! Where model work runs on the CPU: on rayon's compute pool, with denormals flushed.

/// Run `f` on a thread of the CPU compute pool (rayon's) rather than on the calling thread. A
/// decoding batch or a training run is thousands of small parallel ops; called from outside the pool,
/// each one wakes the pool's threads and puts the caller to sleep until they finish (two context
/// switches per op, cores idle in between). From inside, the caller is one of the pool's threads and
/// takes its share of every op. `f` must not wait on work that needs the pool (a pool of one thread
/// would deadlock): pass it computations, not channel receivers.
/// Denormal floats are flushed to zero on the pool's threads (see [`super::denormals`]).
pub fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    super::denormals::flush_on_compute_threads();
    rayon::scope(|_| f())
}
