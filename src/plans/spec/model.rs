//! `model:` — which model a plan's `generate` and `train` steps use, and how to make it offline.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::model::init::{Family, NewModel, Prior, Size};
use crate::model::{DTypeChoice, DeviceChoice, ModelSource};

/// `model:` — a local folder or a Hub model id, optionally with a LoRA adapter.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Local folder with config.json + safetensors + tokenizer.json, or a Hub model id (`owner/name`).
    pub path: String,
    /// Hub revision (branch, tag or commit) when `path` is a Hub id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// PEFT-format LoRA adapter folder (or Hub id) applied on top of the base model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// `auto` (f32 on CPU, bf16 on CUDA), `f32`, `bf16` or `f16` (T5 overflows in f16: warned).
    #[serde(default)]
    pub dtype: DTypeChoice,
    /// `auto` (first GPU if built with one, else CPU), `cpu`, `cuda`, `cuda:N` or `metal`.
    #[serde(default)]
    pub device: DeviceChoice,
    /// Create a randomly initialised model at `path` when the folder does not exist yet (for training
    /// from scratch, offline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitSpec>,
}

/// `model.init:` — what `conala model init` would make.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InitSpec {
    /// `t5`, `flan-t5` or `ul2`.
    pub family: Family,
    /// `tiny`, `mini`, `small` or `base`.
    #[serde(default = "default_init_size")]
    pub size: Size,
    /// tokenizer.json the model is made for (its vocabulary size).
    pub tokenizer: String,
    #[serde(default)]
    pub seed: u64,
    /// `random` (transformers' initialisation) or `copy` (hand-set weights that copy the input, in
    /// the copy prior's own shape, which replaces `size`: see `model::copy_prior`).
    #[serde(default = "default_init_prior")]
    pub prior: Prior,
}

fn default_init_prior() -> Prior {
    Prior::Random
}

fn default_init_size() -> Size {
    Size::Tiny
}

impl ModelSpec {
    /// What the model layer loads for this spec.
    pub fn source(&self) -> ModelSource {
        ModelSource {
            path: self.path.clone(),
            revision: self.revision.clone(),
            adapter: self.adapter.clone(),
            device: self.device,
            dtype: self.dtype,
            init: self.init.as_ref().map(InitSpec::new_model),
        }
    }
}

impl InitSpec {
    /// The model this describes.
    pub fn new_model(&self) -> NewModel {
        NewModel {
            family: self.family,
            size: self.size,
            prior: self.prior,
            tokenizer: PathBuf::from(&self.tokenizer),
            seed: self.seed,
        }
    }
}
