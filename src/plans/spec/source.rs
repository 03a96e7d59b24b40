//! `source:` — where a plan's rows come from.

use serde::{Deserialize, Serialize};

/// `source:` — where rows come from.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// A local file or folder, an object-store URL (`file://`, `s3://`, `gs://`, `az://`, `memory://`)
    /// or a Hugging Face dataset `hf://datasets/OWNER/NAME`.
    pub uri: String,
    /// Dataset configuration (Hub datasets, or folders in the Hub's `CONFIG/SPLIT/` layout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// Hub revision to read parquet files from (default `main`, then `refs/convert/parquet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// `parquet`, `json` or `jsonl`; by default taken from each file's extension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<FileFormat>,
    /// Read only these columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
    /// Stop after this many rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Name of the stable row id column added to every row (its ordinal in the source).
    #[serde(default = "default_row_id")]
    pub row_id: String,
    /// Rows per record batch.
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
    /// Repeat the source this many times, with new row ids each time (benchmarks, stress tests).
    #[serde(default = "super::one_u64")]
    pub repeat: u64,
}

pub fn default_row_id() -> String {
    "row_id".to_string()
}
fn default_batch_rows() -> usize {
    8192
}

/// The kind of the input files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    Parquet,
    /// A JSON array of objects, or JSON lines (told apart by the first byte).
    Json,
    /// JSON lines.
    #[serde(alias = "ndjson")]
    Jsonl,
}
