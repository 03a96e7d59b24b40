//! `metrics.jsonl`: one JSON object per logged step or evaluation, appended as training goes; a
//! resumed run drops the lines after its checkpoint and writes them again. The same lines go to a
//! TensorBoard event file in `tensorboard/` (rewritten from the kept lines when a resumed run drops
//! some, so both always agree).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::tensorboard::{event_files, line_scalars, EventWriter};
use crate::error::{Error, Result};

pub const METRICS: &str = "metrics.jsonl";

/// The metrics file of a training output folder.
pub struct MetricsLog {
    path: PathBuf,
    tensorboard: PathBuf,
}

impl MetricsLog {
    pub fn new(output: &Path) -> MetricsLog {
        MetricsLog {
            path: output.join(METRICS),
            tensorboard: output.join(super::tensorboard::TENSORBOARD),
        }
    }

    /// Append one line.
    pub fn append(&self, v: serde_json::Value) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io(self.path.display(), e))?;
        writeln!(f, "{v}").map_err(|e| Error::io(self.path.display(), e))?;
        let step = v["step"].as_u64().unwrap_or(0);
        EventWriter::open(&self.tensorboard)?.scalars(step, &line_scalars(&v))
    }

    /// Remove the event files (they are written again from `metrics.jsonl`).
    fn clear_events(&self) -> Result<()> {
        for p in event_files(&self.tensorboard) {
            std::fs::remove_file(&p).map_err(|e| Error::io(p.display(), e))?;
        }
        Ok(())
    }

    /// Start over (a fresh run).
    pub fn clear(&self) -> Result<()> {
        self.clear_events()?;
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(self.path.display(), e))
            }
            _ => Ok(()),
        }
    }

    /// Drop lines after `step` (a resumed run writes them again).
    pub fn truncate_after(&self, step: u64) -> Result<()> {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return Ok(());
        };
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s <= step)
            })
            .collect();
        std::fs::write(
            &self.path,
            kept.join("\n") + if kept.is_empty() { "" } else { "\n" },
        )
        .map_err(|e| Error::io(self.path.display(), e))?;
        self.clear_events()?;
        let events = EventWriter::open(&self.tensorboard)?;
        for l in kept {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(l) {
                events.scalars(v["step"].as_u64().unwrap_or(0), &line_scalars(&v))?;
            }
        }
        Ok(())
    }

    /// (step, value) of every line that has `key`.
    pub fn curve(&self, key: &str) -> Vec<(u64, f64)> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| Some((v["step"].as_u64()?, v[key].as_f64()?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_truncates_and_reads_curves() {
        let dir = tempfile::tempdir().unwrap();
        let log = MetricsLog::new(dir.path());
        for step in 1..=3u64 {
            log.append(serde_json::json!({"step": step, "loss": step as f64 / 10.0}))
                .unwrap();
        }
        log.append(serde_json::json!({"step": 3, "eval_loss": 0.5}))
            .unwrap();
        assert_eq!(log.curve("eval_loss"), vec![(3, 0.5)]);
        let events = |log: &MetricsLog| {
            let files = event_files(&log.tensorboard);
            assert!(files.len() <= 1, "one event file: {files:?}");
            files
                .first()
                .map(|f| std::fs::read(f).unwrap())
                .unwrap_or_default()
        };
        let count =
            |bytes: &[u8], tag: &[u8]| bytes.windows(tag.len()).filter(|w| *w == tag).count();
        assert_eq!(count(&events(&log), b"train/loss"), 3);
        assert_eq!(count(&events(&log), b"eval/loss"), 1);
        log.truncate_after(2).unwrap();
        assert_eq!(log.curve("loss"), vec![(1, 0.1), (2, 0.2)]);
        assert!(log.curve("eval_loss").is_empty());
        // The event file is rewritten from the kept lines.
        assert_eq!(count(&events(&log), b"train/loss"), 2);
        assert_eq!(count(&events(&log), b"eval/loss"), 0);
        log.clear().unwrap();
        assert!(event_files(&log.tensorboard).is_empty());
        log.clear().unwrap();
        assert!(log.curve("loss").is_empty());
    }
}
