//! `_manifest.json` (`_manifest-sIIIIofNNNN.json` per shard): what produced an output folder — the
//! resolved plan, versions, row counts per step, timings, whatever the steps add (model hashes,
//! generation settings, metrics) — and which part files are committed. Readers read the parts a
//! manifest lists, nothing else: a part is committed when the manifest that names it is stored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::reports::StepReports;

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
    /// The run wrote every row it was given. `false` while a run is under way or after it stopped
    /// (a rerun resumes it). Manifests from before this field existed were written at the end.
    #[serde(default = "complete_by_default")]
    pub complete: bool,
    /// The run that wrote this manifest last.
    #[serde(default)]
    pub run_id: String,
    /// The output's columns (`name: type`), checked when a run resumes into the folder.
    #[serde(default)]
    pub columns: Vec<String>,
    /// Rows out of each step in this run.
    pub rows_per_step: BTreeMap<String, u64>,
    /// Rows written by this run and by earlier runs it resumed.
    pub rows_written: u64,
    pub rows_resumed: u64,
    /// Every part file in the folder that belongs to this output (this run's and resumed ones).
    pub parts: Vec<PartInfo>,
    /// What the steps reported (model hashes, generation settings, scores).
    #[serde(default)]
    pub extra: StepReports,
}

fn complete_by_default() -> bool {
    true
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
