//! The project's own seq2seq models on candle (see DESIGN: the stock candle-transformers T5 has no
//! padding masks, no cross-attention cache, no way to drop rows, last-position logits only, no
//! backward through its softmax, private Linear layers, and differs from HF in logit scaling and
//! decoder position buckets).
//!
//! - [`seq2seq`]: the seam. [`Seq2Seq`] is what decoding, training, merging and the benchmarks use;
//!   each family is a folder behind it ([`t5`], [`bart`]), chosen by `model_type` in [`registry`].
//! - [`config`]: what every family's config says that conala needs (tokens, sizes, dropout).
//! - [`attention`], [`layers`], [`position_bias`]: the modules families share, written as plain
//!   tensor math; every kernel is behind [`ops`], which picks the fused CPU kernel or candle's
//!   composed path.
//! - [`checkpointing`]: gradients of a step, with or without recomputing activations.
//! - [`kv_cache`], [`decode_state`], [`decoding`]: decoding state, and greedy / sampled / beam
//!   decoding.
//! - [`weights`]: locating and reading checkpoints (folders, the Hub, sharded safetensors).
//! - [`lora`]: LoRA adapters in PEFT's format, and merging.
//! - [`init`]: new models written as HF folders (random, or the copy prior).
//! - [`device`], [`mode`]: where a model runs and in what precision; inference or training.

pub mod activation;
pub mod attention;
pub mod bart;
pub mod checkpointing;
pub mod config;
pub mod decode_state;
pub mod decoding;
pub mod device;
pub mod init;
pub mod kv_cache;
pub mod layers;
pub mod lora;
pub mod memory;
pub mod mode;
pub mod ops;
pub mod position_bias;
pub mod registry;
pub mod seq2seq;
pub mod t5;
pub mod torch_bin;
pub mod weights;

use std::path::Path;

pub use config::ModelConfig;
pub use decode_state::DecodeState;
pub use device::{DTypeChoice, DeviceChoice};
pub use seq2seq::Seq2Seq;
pub use t5::{T5Config, T5};

use crate::error::{Error, Result};
use crate::hub::Hub;

/// Which model to load, from where, on what device and in what dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSource {
    /// A local folder (config.json + safetensors + tokenizer.json) or a Hub model id.
    pub path: String,
    /// Hub revision when `path` is a Hub id.
    pub revision: Option<String>,
    /// A PEFT-format LoRA adapter folder (or Hub id) applied on top.
    pub adapter: Option<String>,
    pub device: DeviceChoice,
    pub dtype: DTypeChoice,
    /// Make this model at `path` first when no model is there yet.
    pub init: Option<init::NewModel>,
}

impl ModelSource {
    /// A model folder or Hub id as it is: no adapter, nothing to make.
    pub fn at(path: &str, device: DeviceChoice, dtype: DTypeChoice) -> ModelSource {
        ModelSource {
            path: path.to_string(),
            revision: None,
            adapter: None,
            device,
            dtype,
            init: None,
        }
    }
}

/// A model ready to run: the network, its tokenizer, and its identity for manifests.
pub struct LoadedModel {
    pub model: Box<dyn Seq2Seq>,
    pub tokenizer: Option<tokenizers::Tokenizer>,
    pub files: weights::ModelFiles,
    /// Content hash of the base weights.
    pub hash: String,
    /// Content hash of the adapter, if one is applied.
    pub adapter_hash: Option<String>,
}

/// Read a model's config (cheap: for validating plans before loading weights).
pub async fn load_config(
    source: &ModelSource,
    hub: &Hub,
) -> Result<(weights::ModelFiles, ModelConfig)> {
    locate(source, hub, weights::Fetch::Metadata).await
}

/// The config of a model's files: config.json read by its family, generation_config.json on top.
pub fn read_config(files: &weights::ModelFiles) -> Result<ModelConfig> {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| Error::io(p.display(), e));
    let cfg = ModelConfig::from_json(&read(&files.config)?, &files.config.display().to_string())?;
    match &files.generation_config {
        Some(g) => cfg.with_generation_config(&read(g)?, &g.display().to_string()),
        None => Ok(cfg),
    }
}

/// The model's files (what `fetch` asks for) and its parsed config.
async fn locate(
    source: &ModelSource,
    hub: &Hub,
    fetch: weights::Fetch,
) -> Result<(weights::ModelFiles, ModelConfig)> {
    if let Some(new) = &source.init {
        new.materialize(Path::new(&source.path))?;
    }
    let files = weights::locate(&source.path, source.revision.as_deref(), hub, fetch).await?;
    let cfg = read_config(&files)?;
    Ok((files, cfg))
}

/// The model alone on `source.device` (another replica of a model already loaded, hashed and
/// checked): weights and adapter, no tokenizer, no hashing.
pub async fn load_replica(source: &ModelSource, hub: &Hub) -> Result<Box<dyn Seq2Seq>> {
    let (files, cfg) = locate(source, hub, weights::Fetch::All).await?;
    Ok(build(source, hub, &files, &cfg).await?.0)
}

/// The model of `files` on its device, with its adapter applied; the adapter's hash.
async fn build(
    source: &ModelSource,
    hub: &Hub,
    files: &weights::ModelFiles,
    cfg: &ModelConfig,
) -> Result<(Box<dyn Seq2Seq>, Option<String>)> {
    let device = source.device.resolve()?;
    let dtype = source.dtype.resolve(&device);
    let w = weights::Weights::open(&files.weights, &files.origin, &device, dtype)?;
    let mut model = cfg.build(&w)?;
    let mut adapter_hash = None;
    if let Some(a) = &source.adapter {
        let adapter = lora::AdapterFiles::locate(a, hub).await?;
        adapter_hash = Some(weights::content_hash(std::slice::from_ref(
            &adapter.weights,
        ))?);
        adapter.apply(model.as_mut())?;
    }
    Ok((model, adapter_hash))
}

/// Load a model: weights, optional LoRA adapter (kept separate, so it can be trained or merged),
/// tokenizer and hashes.
pub async fn load(source: &ModelSource, hub: &Hub) -> Result<LoadedModel> {
    let (files, cfg) = locate(source, hub, weights::Fetch::All).await?;
    let (model, adapter_hash) = build(source, hub, &files, &cfg).await?;
    let tokenizer = match &files.tokenizer {
        Some(t) => Some(t.load()?),
        None => None,
    };
    let weight_files = files.weights.clone();
    let hash = tokio::task::spawn_blocking(move || weights::content_hash(&weight_files))
        .await
        .map_err(|e| Error::task("hashing the model's weights", e))??;
    Ok(LoadedModel {
        model,
        tokenizer,
        files,
        hash,
        adapter_hash,
    })
}

/// Largest absolute elementwise difference of two tensors (unit tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("comparable f32 tensors")
}

/// The gradients of `sum(y * weights)`: a loss that weights every output differently, so a test
/// that compares two ops' gradients checks every entry (unit tests).
#[cfg(test)]
pub(crate) fn weighted_sum_grads(
    y: &candle_core::Tensor,
    weights: &candle_core::Tensor,
) -> candle_core::backprop::GradStore {
    (y * weights)
        .and_then(|l| l.sum_all()?.backward())
        .expect("a differentiable f32 tensor")
}

/// Largest elementwise difference of two tensors, each element divided by `scale` first (unit tests of
/// approximations whose error grows with the size of their inputs).
#[cfg(test)]
pub(crate) fn max_scaled_diff(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    scale: &candle_core::Tensor,
) -> f32 {
    let (a, b) = (
        (a / scale).expect("same shapes"),
        (b / scale).expect("same shapes"),
    );
    max_abs_diff(&a, &b)
}
