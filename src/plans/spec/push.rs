//! `push:` on `write` (the output as a dataset) and `train` (the merged model): what `conala push`
//! does, run when the step has finished. Off unless set.

use serde::{Deserialize, Serialize};

/// `push: { repo: OWNER/NAME, private: true }`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PushSpec {
    /// `OWNER/NAME` on the Hub (created if missing).
    pub repo: String,
    /// The branch (default `main`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Create the repository private.
    #[serde(default)]
    pub private: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The card's license (default: the source data's when conala knows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
}
