//! The library's error type. Every variant carries the context a user needs to act: the file, the plan
//! step and key, the row, or the tensor that was wrong. The CLI prints these as they are.

use std::fmt;

use datafusion::arrow::error::ArrowError;
use datafusion::error::DataFusionError;
use datafusion::parquet::errors::ParquetError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where in a plan something went wrong: the file, the step (index and operator) and the key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanLocation {
    pub file: String,
    /// Zero-based step index and operator name.
    pub step: Option<(usize, String)>,
    /// Dotted key inside the step (or the top-level key), e.g. `eval.source.uri`.
    pub key: Option<String>,
}

impl fmt::Display for PlanLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some((i, op)) = &self.step {
            write!(f, ": step {} ({op})", i + 1)?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        Ok(())
    }
}

/// An invalid plan: found before any work starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanError {
    pub at: PlanLocation,
    pub message: String,
    /// The closest valid key or name, when one is close enough to be a likely typo.
    pub suggestion: Option<String>,
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)?;
        if let Some(s) = &self.suggestion {
            write!(f, " (did you mean `{s}`?)")?;
        }
        Ok(())
    }
}

impl std::error::Error for PlanError {}

impl From<PlanError> for Error {
    fn from(e: PlanError) -> Self {
        Error::Plan(Box::new(e))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Boxed: plan errors carry a location and suggestions, and `Result<T>` is returned everywhere.
    #[error(transparent)]
    Plan(Box<PlanError>),

    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{}{source}", prefix(.context))]
    DataFusion {
        context: String,
        #[source]
        source: Box<DataFusionError>,
    },

    #[error("{context}: {source}")]
    Arrow {
        context: String,
        #[source]
        source: ArrowError,
    },

    #[error("{context}: {source}")]
    Parquet {
        context: String,
        #[source]
        source: ParquetError,
    },

    #[error("{context}: {source}")]
    ObjectStore {
        context: String,
        #[source]
        source: object_store::Error,
    },

    /// Bad input data: the message names the file and row (or row id).
    #[error("{0}")]
    Data(String),

    /// Hugging Face Hub access (listing, download, offline cache).
    #[error("{0}")]
    Hub(String),

    /// Loading, saving or running a model.
    #[error("{0}")]
    Model(String),

    #[error("{0}")]
    Tokenizer(String),

    /// A tensor operation failed; candle's message names the op and the shapes.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Tensors could not be read or written (`context` names the file).
    #[error("{context}: {source}")]
    Tensors {
        context: String,
        #[source]
        source: candle_core::Error,
    },

    #[error("{context}: {source}")]
    Json {
        context: String,
        #[source]
        source: serde_json::Error,
    },

    /// A background task could not be joined (cancelled with its runtime).
    #[error("{context}: {source}")]
    Task {
        context: String,
        #[source]
        source: tokio::task::JoinError,
    },

    /// Background work panicked: the stage that did, and the panic's message. The run fails; what was
    /// written before stays resumable, and nothing is marked complete.
    #[error("{stage}: panicked: {message}")]
    Panic { stage: String, message: String },

    /// A run that failed after writing part of its output, which a rerun resumes from.
    #[error("{source} ({rows_kept} rows already written are kept; run again to resume)")]
    Resumable {
        rows_kept: u64,
        #[source]
        source: Box<Error>,
    },

    /// A signal stopped the run; the message says what was kept and how to resume.
    #[error("{message}")]
    Interrupted {
        signal: crate::interrupt::Signal,
        message: String,
    },

    /// A run stopped on purpose (for example a NaN loss) with an explanation.
    #[error("{0}")]
    Run(String),
}

impl Error {
    pub fn io(path: impl fmt::Display, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_string(),
            source,
        }
    }
    pub fn datafusion(context: impl fmt::Display, source: DataFusionError) -> Self {
        Error::DataFusion {
            context: context.to_string(),
            source: Box::new(source),
        }
    }
    pub fn arrow(context: impl fmt::Display, source: ArrowError) -> Self {
        Error::Arrow {
            context: context.to_string(),
            source,
        }
    }
    pub fn parquet(context: impl fmt::Display, source: ParquetError) -> Self {
        Error::Parquet {
            context: context.to_string(),
            source,
        }
    }
    pub fn object_store(context: impl fmt::Display, source: object_store::Error) -> Self {
        Error::ObjectStore {
            context: context.to_string(),
            source,
        }
    }
    pub fn model(message: impl fmt::Display) -> Self {
        Error::Model(message.to_string())
    }
    pub fn tensors(context: impl fmt::Display, source: candle_core::Error) -> Self {
        Error::Tensors {
            context: context.to_string(),
            source,
        }
    }
    pub fn json(context: impl fmt::Display, source: serde_json::Error) -> Self {
        Error::Json {
            context: context.to_string(),
            source,
        }
    }
    /// A third-party reader that panicked on a corrupt file: the file is unreadable, said so with its
    /// name (parquet and arrow assert on some malformed metadata instead of returning errors).
    pub fn reader_crash(
        file: impl fmt::Display,
        what: &str,
        payload: &(dyn std::any::Any + Send),
    ) -> Self {
        Error::Data(format!(
            "{file}: not a readable {what} file (the reader failed on it: {})",
            panic_message(payload)
        ))
    }

    /// A task that did not finish: a panic becomes [`Error::Panic`] naming `context`.
    pub fn task(context: impl fmt::Display, source: tokio::task::JoinError) -> Self {
        if source.is_panic() {
            return Error::Panic {
                stage: context.to_string(),
                message: panic_message(source.into_panic().as_ref()),
            };
        }
        Error::Task {
            context: context.to_string(),
            source,
        }
    }
}

/// `context: ` before a cause, or nothing for no context.
fn prefix(context: &str) -> String {
    if context.is_empty() {
        String::new()
    } else {
        format!("{context}: ")
    }
}

/// The text of a panic payload (`panic!` carries a `&str` or a `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// Errors that cross DataFusion streams must be `DataFusionError`s; keep ours intact inside.
impl From<Error> for DataFusionError {
    fn from(e: Error) -> Self {
        match e {
            Error::DataFusion { context, source } if context.is_empty() => *source,
            other => DataFusionError::External(Box::new(other)),
        }
    }
}

/// The longest message kept in a row's `error` column.
const ROW_MESSAGE_CHARS: usize = 1000;

/// An error as it goes into data (a row's `error` column): without the backtrace candle appends when
/// `RUST_BACKTRACE` is set (frames are for developers, and kilobytes per row), and bounded in length.
pub fn row_message(e: &impl fmt::Display) -> String {
    let text = crate::secrets::redact(&e.to_string());
    let mut kept: Vec<&str> = vec![];
    let mut in_backtrace = false;
    for line in text.lines() {
        let t = line.trim_start();
        let frame = t.split_once(": ").is_some_and(|(n, _)| {
            !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()) && line.starts_with(' ')
        });
        if frame || t == "stack backtrace:" || (in_backtrace && t.starts_with("at ")) {
            in_backtrace = true;
            continue;
        }
        in_backtrace = false;
        kept.push(line);
    }
    let joined = kept.join(" ").trim().to_string();
    match joined.char_indices().nth(ROW_MESSAGE_CHARS) {
        Some((i, _)) => format!("{}…", &joined[..i]),
        None => joined,
    }
}

/// Recover our error from a stream error so messages are not wrapped twice.
pub fn from_stream_error(e: DataFusionError) -> Error {
    match e {
        DataFusionError::External(inner) => match inner.downcast::<Error>() {
            Ok(ours) => *ours,
            Err(other) => Error::datafusion("", DataFusionError::External(other)),
        },
        DataFusionError::Context(ctx, inner) => match from_stream_error(*inner) {
            Error::DataFusion { context, source } if context.is_empty() => {
                Error::datafusion(ctx, *source)
            }
            ours => Error::datafusion(ctx, DataFusionError::External(Box::new(ours))),
        },
        DataFusionError::ArrowError(a, _) => Error::arrow("arrow", *a),
        DataFusionError::ParquetError(p) => Error::parquet("parquet", *p),
        other => Error::datafusion("", other),
    }
}

/// Edit distance counting a swap of two adjacent characters as one edit (optimal string alignment),
/// for "did you mean" suggestions: `cdua` is one edit from `cuda`.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // d[i][j]: distance between a[..i] and b[..j].
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// The closest candidate to `word`, if it is close enough to be a typo (distance <= max(2, len/3)).
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_basics() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("max_input_token", "max_input_tokens"), 1);
        assert_eq!(edit_distance("cdua", "cuda"), 1);
        assert_eq!(
            closest("cdua", ["auto", "cpu", "cuda"]).as_deref(),
            Some("cuda")
        );
    }

    #[test]
    fn closest_picks_typo_and_rejects_far_words() {
        let keys = ["max_input_tokens", "max_target_tokens", "input", "target"];
        assert_eq!(
            closest("max_input_token", keys).as_deref(),
            Some("max_input_tokens")
        );
        assert_eq!(closest("inptu", keys).as_deref(), Some("input"));
        assert_eq!(closest("completely_different", keys), None);
    }

    #[test]
    fn row_messages_carry_no_backtrace() {
        let e = Error::Candle(candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg(
                "index-select invalid index 9159 with dim size 120".into(),
            )),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        });
        assert!(e.to_string().lines().count() > 3, "a backtrace to strip");
        assert_eq!(
            row_message(&e),
            "index-select invalid index 9159 with dim size 120"
        );
        let long = Error::Data("x".repeat(5000));
        assert_eq!(row_message(&long).chars().count(), ROW_MESSAGE_CHARS + 1);
        assert_eq!(row_message(&Error::Data("a\nb".into())), "a b");
    }

    #[test]
    fn plan_error_display_names_file_step_key() {
        let e = PlanError {
            at: PlanLocation {
                file: "p.yaml".into(),
                step: Some((3, "tokenize".into())),
                key: Some("max_input_token".into()),
            },
            message: "unknown key".into(),
            suggestion: Some("max_input_tokens".into()),
        };
        assert_eq!(
            e.to_string(),
            "p.yaml: step 4 (tokenize): key `max_input_token`: unknown key (did you mean `max_input_tokens`?)"
        );
    }
}
