//! A stop asked for by a signal (SIGTERM from a scheduler's preemption, SIGINT from Ctrl-C): the
//! source stops reading, the rows in flight are finished and written, the output is left resumable
//! (and marked incomplete), and the run ends with an error that says how to resume. The CLI installs
//! the handlers; the library only reads the flag.

use std::sync::atomic::{AtomicU8, Ordering};

static SIGNAL: AtomicU8 = AtomicU8::new(0);

const NAMES: [&str; 3] = ["", "SIGINT", "SIGTERM"];

/// Which signal asked the run to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Interrupt,
    Terminate,
}

impl Signal {
    pub fn name(self) -> &'static str {
        NAMES[self as usize + 1]
    }
    /// The shell's exit status for a process stopped by this signal.
    pub fn exit_code(self) -> i32 {
        match self {
            Signal::Interrupt => 130,
            Signal::Terminate => 143,
        }
    }
}

/// Ask the run to stop; returns whether a stop was already asked for.
pub fn request(signal: Signal) -> bool {
    SIGNAL.swap(signal as u8 + 1, Ordering::SeqCst) != 0
}

/// The signal that asked the run to stop, if any.
pub fn requested() -> Option<Signal> {
    match SIGNAL.load(Ordering::SeqCst) {
        1 => Some(Signal::Interrupt),
        2 => Some(Signal::Terminate),
        _ => None,
    }
}
