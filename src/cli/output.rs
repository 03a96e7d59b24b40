//! Command output on stdout that survives a closed pipe: `conala run ... | head -1` reads one line and
//! closes the pipe; the rest of the output is dropped instead of panicking (`println!` panics), and the
//! run itself carries on to its end.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static CLOSED: AtomicBool = AtomicBool::new(false);

/// `println!` for command output (see the module doc).
macro_rules! out {
    () => {
        $crate::cli::output::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::cli::output::line(format_args!($($arg)*))
    };
}
pub(crate) use out;

pub fn line(args: std::fmt::Arguments) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(args)
        .and_then(|_| stdout.write_all(b"\n"))
        .and_then(|_| stdout.flush());
    if let Err(e) = written {
        CLOSED.store(true, Ordering::Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            log::warn!("stdout: {e}; no more output is printed there");
        }
    }
}
