//! `write:` — parquet part files and the run manifest.

use serde::{Deserialize, Serialize};

/// `write:` — parquet part files plus `_manifest.json`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WriteSpec {
    /// Output folder: a local path or an object-store URL.
    pub path: String,
    /// Rows per part file; a part is written (atomically) each time this many rows are buffered.
    #[serde(default = "default_rows_per_file")]
    pub rows_per_file: usize,
    /// Rows per parquet row group.
    #[serde(default = "default_row_group_rows")]
    pub row_group_rows: usize,
    /// `zstd` (default), `snappy` or `none`.
    #[serde(default)]
    pub compression: Compression,
    /// Write only these columns (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
    /// Columns to leave out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drop: Vec<String>,
    /// `auto` (resume when the plan generates, else overwrite), `overwrite`, `resume` or `error`
    /// (fail if the folder already holds output).
    #[serde(default)]
    pub mode: WriteMode,
    /// Push the output to the Hub as a dataset once it is complete (off by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<super::PushSpec>,
}

fn default_rows_per_file() -> usize {
    100_000
}
fn default_row_group_rows() -> usize {
    20_000
}

/// Parquet compression of the part files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    Zstd,
    Snappy,
    #[serde(alias = "uncompressed")]
    None,
}

/// What `write` does with output already in its folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    /// `resume` for plans that generate (expensive work is never thrown away), else `overwrite`.
    #[default]
    Auto,
    /// Replace earlier output once this run has succeeded.
    Overwrite,
    /// Keep earlier parts; their row ids are skipped.
    Resume,
    /// Refuse a folder that already holds output.
    Error,
}
