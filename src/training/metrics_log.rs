//! `metrics.jsonl`: one JSON object per logged step or evaluation, appended as training goes; a
//! resumed run drops the lines after its checkpoint and writes them again.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const METRICS: &str = "metrics.jsonl";

/// The metrics file of a training output folder.
pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    pub fn new(output: &Path) -> MetricsLog {
        MetricsLog {
            path: output.join(METRICS),
        }
    }

    /// Append one line.
    pub fn append(&self, v: serde_json::Value) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io(self.path.display(), e))?;
        writeln!(f, "{v}").map_err(|e| Error::io(self.path.display(), e))
    }

    /// Start over (a fresh run).
    pub fn clear(&self) -> Result<()> {
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
        .map_err(|e| Error::io(self.path.display(), e))
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
        log.truncate_after(2).unwrap();
        assert_eq!(log.curve("loss"), vec![(1, 0.1), (2, 0.2)]);
        assert!(log.curve("eval_loss").is_empty());
        log.clear().unwrap();
        log.clear().unwrap();
        assert!(log.curve("loss").is_empty());
    }
}
