//! Fault injection for the tests: `CONALA_INJECT_PANIC=POINT` makes the background work at `POINT`
//! panic, so a test can check that a panic anywhere fails the run (naming the step), leaves nothing
//! marked complete, and that a rerun resumes to an exact output. Points:
//! - `source`: the source's reader, after its first batch;
//! - `generate-last-batch`: the model worker, at the input's last batch.
//!
//! Read once per process; unset (always, outside tests) it costs one branch.

use std::sync::OnceLock;

/// Panic here when the environment asks for a panic at `point`.
pub fn panic_if_injected(point: &str) {
    static INJECTED: OnceLock<Option<String>> = OnceLock::new();
    let injected = INJECTED.get_or_init(|| std::env::var("CONALA_INJECT_PANIC").ok());
    if injected.as_deref() == Some(point) {
        panic!("injected panic at `{point}` (CONALA_INJECT_PANIC)");
    }
}
