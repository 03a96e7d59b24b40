//! The allocator's settings for model work.

// mimalloc's C API (linked in by the `mimalloc` crate).
unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    fn mi_version() -> std::ffi::c_int;
}
/// `mi_option_purge_delay` in mimalloc v3's `mi_option_t` (v3.x: `mi_version()` 30000..40000).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// Keep freed memory instead of returning it to the OS: tensors of the same sizes are allocated every
/// decoding and training step, and memory handed back is zeroed again by the kernel on its next use
/// (a large share of training time). Peak memory is unchanged; `MIMALLOC_PURGE_DELAY` overrides.
pub fn keep_freed_memory() {
    // SAFETY: plain getters/setters of mimalloc's global state, valid at any time.
    let v3 = (30000..40000).contains(&unsafe { mi_version() });
    if v3 && std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// The program's allocator: mimalloc, optionally counting the bytes it hands out, so a benchmark can
/// read the peak of live memory (what the work needs) apart from what the allocator keeps for reuse.
/// Counting is off unless [`COUNT_ENV`] is set when the program starts (`conala bench memory` sets it
/// for its measuring processes): then it costs two relaxed atomic operations per allocation, else one
/// relaxed load.
pub struct Counting(pub mimalloc::MiMalloc);

/// The environment variable that turns counting on.
pub const COUNT_ENV: &str = "CONALA_COUNT_ALLOCATIONS";

use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering::Relaxed};

static ON: AtomicBool = AtomicBool::new(false);
// Signed: memory allocated before counting started may be freed after.
static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

/// Start counting if [`COUNT_ENV`] asks for it (call first thing in `main`).
pub fn count_if_asked() {
    if std::env::var_os(COUNT_ENV).is_some() {
        ON.store(true, Relaxed);
    }
}

// SAFETY: every call is forwarded to mimalloc unchanged; the counters only observe sizes.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() {
            added(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        if ON.load(Relaxed) {
            LIVE.fetch_sub(layout.size() as isize, Relaxed);
        }
        unsafe { self.0.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { self.0.alloc_zeroed(layout) };
        if !p.is_null() {
            added(layout.size() as isize);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        let p = unsafe { self.0.realloc(ptr, layout, new) };
        if !p.is_null() {
            added(new as isize - layout.size() as isize);
        }
        p
    }
}

fn added(n: isize) {
    if ON.load(Relaxed) {
        let live = LIVE.fetch_add(n, Relaxed) + n;
        PEAK.fetch_max(live, Relaxed);
    }
}

/// Bytes allocated and not yet freed since counting started (0 when it is off).
pub fn live_bytes() -> i64 {
    LIVE.load(Relaxed) as i64
}

/// The most live bytes since the last [`reset_peak`].
pub fn peak_bytes() -> i64 {
    PEAK.load(Relaxed) as i64
}

/// Start a new peak from what is live now.
pub fn reset_peak() {
    PEAK.store(LIVE.load(Relaxed), Relaxed);
}
