//! `_manifest.json`: what produced an output folder — the resolved plan, versions, row counts per step,
//! timings, the part files, and whatever the steps add (model hashes, generation settings, metrics).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// Counters a run updates as batches flow, and facts steps attach for the manifest.
#[derive(Debug, Default)]
pub struct RunStats {
    /// Rows out of each step, by step label (`1:source`, `2:filter`, …).
    rows: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    /// Facts steps add (for example `generate` puts its model hash and settings here).
    extra: Mutex<BTreeMap<String, serde_json::Value>>,
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

    pub fn set_extra(&self, key: &str, value: serde_json::Value) {
        self.extra
            .lock()
            .expect("stats lock")
            .insert(key.to_string(), value);
    }

    pub fn extra(&self) -> BTreeMap<String, serde_json::Value> {
        self.extra.lock().expect("stats lock").clone()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PartInfo {
    pub file: String,
    pub rows: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub plan_name: String,
    /// The plan after `--set` overrides and defaults.
    pub plan: serde_json::Value,
    pub versions: BTreeMap<String, String>,
    pub started_at: String,
    pub finished_at: String,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
    /// Rows out of each step in this run.
    pub rows_per_step: BTreeMap<String, u64>,
    /// Rows written by this run and by earlier runs it resumed.
    pub rows_written: u64,
    pub rows_resumed: u64,
    /// Every part file in the folder that belongs to this output (this run's and resumed ones).
    pub parts: Vec<PartInfo>,
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

pub fn versions() -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    v.insert("conala".to_string(), env!("CARGO_PKG_VERSION").to_string());
    v.insert(
        "datafusion".to_string(),
        datafusion::DATAFUSION_VERSION.to_string(),
    );
    v.insert("candle".to_string(), "0.11".to_string());
    v.insert(
        "os".to_string(),
        format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
    );
    v
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
