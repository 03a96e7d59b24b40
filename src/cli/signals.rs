//! SIGTERM (a scheduler preempting the job) and SIGINT (Ctrl-C) stop a run cleanly: the first asks the
//! run to finish the rows in flight, write them and exit saying how to resume; a second stops at once
//! (committed parts are kept either way).

use conala::interrupt::{self, Signal};

const FIRST: [&[u8]; 2] = [
    b"\n[conala] SIGINT received: finishing the rows in flight and writing them, then stopping (press Ctrl-C again to stop at once)\n",
    b"\n[conala] SIGTERM received: finishing the rows in flight and writing them, then stopping (send it again to stop at once)\n",
];
const SECOND: &[u8] =
    b"[conala] stopping at once: committed parts are kept; run the same command again to resume\n";

/// Only async-signal-safe work here: an atomic swap, `write(2)` and `_exit(2)`.
extern "C" fn on_signal(signum: libc::c_int) {
    let signal = if signum == libc::SIGINT {
        Signal::Interrupt
    } else {
        Signal::Terminate
    };
    let again = interrupt::request(signal);
    let text = if again {
        SECOND
    } else {
        FIRST[signal as usize]
    };
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `text` is a static buffer.
    unsafe {
        libc::write(2, text.as_ptr().cast(), text.len());
        if again {
            libc::_exit(signal.exit_code());
        }
    }
}

/// Install the handlers (Unix).
pub fn install() {
    let handler = on_signal as extern "C" fn(libc::c_int);
    for signum in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only does async-signal-safe work (see `on_signal`).
        unsafe {
            libc::signal(signum, handler as libc::sighandler_t);
        }
    }
}
