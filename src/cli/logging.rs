//! Log lines on stderr, and errors printed with their causes.

/// The error and its causes, skipping causes whose text the message already contains (library errors
/// carry their cause in their own message).
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

/// Log lines to stderr; `CONALA_LOG=debug|info|warn|error` (default info).
pub fn init_logging() {
    struct Stderr(log::LevelFilter);
    impl log::Log for Stderr {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.level() <= self.0 && m.target().starts_with("conala")
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) {
                let level = match r.level() {
                    log::Level::Error => "error: ",
                    log::Level::Warn => "warning: ",
                    _ => "",
                };
                eprintln!(
                    "[conala] {level}{}",
                    conala::secrets::redact(&r.args().to_string())
                );
            }
        }
        fn flush(&self) {}
    }
    let level = match std::env::var("CONALA_LOG").as_deref() {
        Ok("debug") | Ok("trace") => log::LevelFilter::Debug,
        Ok("warn") => log::LevelFilter::Warn,
        Ok("error") => log::LevelFilter::Error,
        _ => log::LevelFilter::Info,
    };
    if log::set_boxed_logger(Box::new(Stderr(level))).is_ok() {
        log::set_max_level(level);
    }
}
