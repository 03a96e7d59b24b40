//! What a run reports: rows out of each step, and the typed facts steps add (the model and speed of
//! `generate`, the scores of `evaluate`, the outcome of `train`). The CLI prints them and the
//! manifest records them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::metrics::Scores;
use crate::plans::spec::GenerateSpec;
use crate::training::TrainSummary;

/// What `generate` did: which model, with what settings, how many rows and tokens, how fast.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerateReport {
    pub model: String,
    pub model_hash: String,
    pub adapter: Option<String>,
    pub adapter_hash: Option<String>,
    pub dtype: String,
    pub device: String,
    pub settings: GenerateSpec,
    /// Rows out of the step (generated, copies of identical inputs, and error rows).
    pub rows: u64,
    /// Distinct inputs the model generated for.
    pub generated_rows: u64,
    pub generated_tokens: u64,
    /// The step's time, from its start: loading, hashing and preparing the model included.
    pub seconds: f64,
    /// Of `seconds`, loading, hashing and preparing the model for generation.
    #[serde(default)]
    pub load_seconds: f64,
    pub rows_per_second: f64,
    pub tokens_per_second: f64,
    pub finish_reason: FinishCounts,
}

/// Rows by how their generation ended.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FinishCounts {
    pub eos: u64,
    pub length: u64,
    pub error: u64,
}

/// The facts steps add, by step (the manifest's `extra`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepReports {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate: Option<GenerateReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluate: Option<Scores>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<TrainSummary>,
}

/// Counters a run updates as batches flow, and the reports steps file.
#[derive(Debug, Default)]
pub struct RunStats {
    /// Rows out of each step, by step label (`1:source`, `2:filter`, …).
    rows: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    reports: Mutex<StepReports>,
}

impl RunStats {
    pub fn counter(&self, label: &str) -> Arc<AtomicU64> {
        self.rows
            .lock()
            .expect("stats lock")
            .entry(label.to_string())
            .or_default()
            .clone()
    }

    pub fn rows(&self) -> BTreeMap<String, u64> {
        self.rows
            .lock()
            .expect("stats lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed)))
            .collect()
    }

    /// File or amend a step's report.
    pub fn report(&self, f: impl FnOnce(&mut StepReports)) {
        f(&mut self.reports.lock().expect("stats lock"))
    }

    pub fn reports(&self) -> StepReports {
        self.reports.lock().expect("stats lock").clone()
    }
}
