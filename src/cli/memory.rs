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
