//! Progress of long work: a live bar on a terminal (rows/s, tokens/s, ETA), plain log lines otherwise.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// The unit that makes [`Progress`] show sizes and transfer rates (`1.2 GiB/3.4 GiB, 12 MiB/s`).
pub const BYTES: &str = "bytes";

/// `1.82 GiB`, `312 MiB`, `96 KiB`.
pub fn human_bytes(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else if bytes < 1 << 20 {
        format!("{:.0} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// How often plain log lines are printed when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(15);

pub struct Progress {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

/// `(rows done, tokens done)`; tokens are optional.
pub type Sample = (u64, Option<u64>);

impl Progress {
    /// Start reporting. `sample` is polled from a background thread; `total` rows, when known, gives an ETA.
    pub fn start(
        label: &str,
        unit: &str,
        bars: bool,
        total: Option<u64>,
        sample: impl Fn() -> Sample + Send + 'static,
    ) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let label = label.to_string();
        let unit = unit.to_string();
        let handle = std::thread::spawn(move || {
            let started = Instant::now();
            let bar = bars.then(|| {
                let b = match total {
                    Some(t) => ProgressBar::new(t),
                    None => ProgressBar::new_spinner(),
                };
                let template = if unit == BYTES {
                    "{prefix} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}".to_string()
                } else if total.is_some() {
                    format!("{{prefix}} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {unit} {{msg}} ETA {{eta}}")
                } else {
                    format!("{{prefix}} [{{elapsed_precise}}] {{spinner}} {{pos}} {unit} {{msg}}")
                };
                b.set_style(ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()));
                b.set_prefix(label.clone());
                b
            });
            let mut last_log = Instant::now();
            loop {
                let done = flag.load(Ordering::Relaxed);
                let (rows, tokens) = sample();
                let secs = started.elapsed().as_secs_f64().max(1e-9);
                let mut msg = if unit == BYTES {
                    format!("{}/s", human_bytes((rows as f64 / secs) as u64))
                } else {
                    format!("{:.1} {unit}/s", rows as f64 / secs)
                };
                if let Some(t) = tokens {
                    msg.push_str(&format!(", {t} tokens, {:.1} tokens/s", t as f64 / secs));
                }
                match &bar {
                    Some(b) => {
                        b.set_position(rows);
                        b.set_message(msg);
                    }
                    None if last_log.elapsed() >= LOG_EVERY && !done => {
                        let eta = total
                            .filter(|_| rows > 0)
                            .map(|t| {
                                format!(
                                    ", ETA {:.0}s",
                                    t.saturating_sub(rows) as f64 * secs / rows as f64
                                )
                            })
                            .unwrap_or_default();
                        if unit == BYTES {
                            log::info!("{label}: {}, {msg}{eta}", human_bytes(rows));
                        } else {
                            log::info!("{label}: {rows} {unit}, {msg}{eta}");
                        }
                        last_log = Instant::now();
                    }
                    None => {}
                }
                if done {
                    if let Some(b) = bar {
                        b.finish_and_clear();
                    }
                    return;
                }
                // Parked rather than slept: `finish` unparks it, so ending a run never waits out a tick.
                std::thread::park_timeout(Duration::from_millis(if bars { 200 } else { 500 }));
            }
        });
        Progress {
            stop,
            handle: Some(handle),
        }
    }

    /// A handle that ends the reporting from elsewhere (e.g. when an input stream runs dry).
    pub fn stopper(&self) -> Stopper {
        Stopper {
            stop: self.stop.clone(),
            thread: self.handle.as_ref().map(|h| h.thread().clone()),
        }
    }

    pub fn finish(mut self) {
        self.stopper().stop();
        if let Some(h) = self.handle.take() {
            // The display is not the work: a failure of its own is reported, not raised.
            if h.join().is_err() {
                log::warn!("the progress display stopped with a panic");
            }
        }
    }
}

/// Ends a [`Progress`]'s reporting without waiting for its thread.
pub struct Stopper {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::Thread>,
}

impl Stopper {
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = &self.thread {
            t.unpark();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stopper().stop();
    }
}
