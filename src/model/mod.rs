//! The project's own T5 on candle (see DESIGN: the stock candle-transformers T5 has no padding masks,
//! no cross-attention cache, no way to drop rows, last-position logits only, no backward through its
//! softmax, private Linear layers, and differs from HF in logit scaling and decoder position buckets).
//!
//! - [`config`]: HF `config.json` (t5 / t5 v1.1 / flan-t5 / UL2 feed-forward variants).
//! - [`layers`], [`attention`], [`t5`]: the network.
//! - [`weights`]: locating and reading checkpoints (folders, the Hub, sharded safetensors).
//! - [`lora`]: LoRA adapters in PEFT's format, and merging.
//! - [`init`]: random models written as HF folders (`conala model init`).
//! - [`copy_prior`]: a model whose hand-set weights copy the input (the offline default starts there).

pub mod attention;
pub mod beam;
pub mod config;
pub mod copy_prior;
pub mod cpu_attention;
pub mod cpu_matmul;
pub mod decoding;
pub mod denormals;
pub mod frozen_matmul;
pub mod fused_activation;
pub mod fused_residual;
pub mod fused_softmax;
pub mod init;
pub mod layers;
pub mod lora;
pub mod t5;
pub mod weights;

use candle_core::{DType, Device};

pub use config::T5Config;
pub use t5::{DecodeState, T5};

/// The f32 elements a contiguous CPU layout covers, for custom ops (`op` names the op in the error).
pub(crate) fn contiguous_f32<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input not contiguous")))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

/// Elements per parallel task of [`par_map2`]: big enough that a task outweighs its scheduling.
const MAP_CHUNK: usize = 8192;

/// `f(a[i], b[i])` for every element, in parallel chunks (the elementwise pass of custom ops).
pub(crate) fn par_map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(MAP_CHUNK)
        .zip(a.par_chunks(MAP_CHUNK).zip(b.par_chunks(MAP_CHUNK)))
        .for_each(|(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = f(a, b);
            }
        });
    out
}

/// Run `f` on a thread of the CPU compute pool (rayon's) rather than on the calling thread. A
/// decoding batch or a training run is thousands of small parallel ops; called from outside the pool,
/// each one wakes the pool's threads and puts the caller to sleep until they finish (two context
/// switches per op, cores idle in between). From inside, the caller is one of the pool's threads and
/// takes its share of every op. `f` must not wait on work that needs the pool (a pool of one thread
/// would deadlock): pass it computations, not channel receivers.
/// Denormal floats are flushed to zero on the pool's threads (see [`denormals`]).
pub(crate) fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    denormals::flush_on_compute_threads();
    rayon::scope(|_| f())
}

/// Largest absolute elementwise difference of two tensors (unit tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("comparable f32 tensors")
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

use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::plans::spec::ModelSpec;

/// The device a `device:` setting names. `auto` is the first GPU of the kind the binary was built
/// for, else the CPU.
pub fn select_device(spec: &str) -> Result<Device> {
    let gpu_err =
        |what: &str, e: candle_core::Error| Error::model(format!("device `{spec}`: {what}: {e}"));
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                Device::new_cuda(0).map_err(|e| gpu_err("CUDA", e))
            } else if candle_core::utils::metal_is_available() {
                Device::new_metal(0).map_err(|e| gpu_err("Metal", e))
            } else {
                Ok(Device::Cpu)
            }
        }
        "metal" => {
            Device::new_metal(0).map_err(|e| gpu_err("Metal (build with --features metal)", e))
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = s
                .strip_prefix("cuda:")
                .map(|n| n.parse::<usize>())
                .transpose()
                .map_err(|_| Error::model(format!("device `{spec}`: expected cuda or cuda:N")))?;
            Device::new_cuda(ordinal.unwrap_or(0))
                .map_err(|e| gpu_err("CUDA (build with --features cuda)", e))
        }
        other => Err(Error::model(format!(
            "unknown device `{other}` (auto, cpu, cuda, cuda:N, metal)"
        ))),
    }
}

/// The dtype a `dtype:` setting names on `device`: `auto` is bf16 on CUDA and f32 elsewhere. f16 is
/// allowed but warned about: T5 activations overflow in f16.
pub fn select_dtype(spec: &str, device: &Device) -> Result<DType> {
    match spec {
        "auto" => Ok(if device.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        }),
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => {
            log::warn!("dtype f16: T5 activations overflow in float16 (inf/NaN outputs are likely); prefer bf16 or f32");
            Ok(DType::F16)
        }
        other => Err(Error::model(format!(
            "unknown dtype `{other}` (auto, f32, bf16, f16)"
        ))),
    }
}

/// A model ready to run: the network, its tokenizer, and its identity for manifests.
pub struct LoadedModel {
    pub model: T5,
    pub tokenizer: Option<tokenizers::Tokenizer>,
    pub files: weights::ModelFiles,
    /// Content hash of the base weights.
    pub hash: String,
    /// Content hash of the adapter, if one is applied.
    pub adapter_hash: Option<String>,
}

/// Read a model's config (cheap: for validating plans before loading weights).
pub async fn load_config(spec: &ModelSpec, hub: &Hub) -> Result<(weights::ModelFiles, T5Config)> {
    if let Some(init) = &spec.init {
        init::materialize(std::path::Path::new(&spec.path), init)?;
    }
    let files = weights::locate(&spec.path, spec.revision.as_deref(), hub).await?;
    let text =
        std::fs::read_to_string(&files.config).map_err(|e| Error::io(files.config.display(), e))?;
    let cfg = T5Config::from_json(&text, &files.config.display().to_string())?;
    Ok((files, cfg))
}

/// Load a plan's model: weights, optional LoRA adapter (kept separate, so it can be trained or merged),
/// tokenizer and hashes.
pub async fn load(spec: &ModelSpec, hub: &Hub) -> Result<LoadedModel> {
    let (files, cfg) = load_config(spec, hub).await?;
    let device = select_device(&spec.device)?;
    let dtype = select_dtype(&spec.dtype, &device)?;
    let w = weights::Weights::open(&files.weights, &files.origin, &device, dtype)?;
    let mut model = T5::load(&cfg, &w)?;
    let mut adapter_hash = None;
    if let Some(a) = &spec.adapter {
        let adapter = lora::AdapterFiles::locate(a, hub).await?;
        adapter_hash = Some(weights::content_hash(std::slice::from_ref(
            &adapter.weights,
        ))?);
        adapter.apply(&mut model)?;
    }
    let tokenizer = match &files.tokenizer {
        Some(p) => Some(crate::tokenizer::load(p)?),
        None => None,
    };
    let weight_files = files.weights.clone();
    let hash = tokio::task::spawn_blocking(move || weights::content_hash(&weight_files))
        .await
        .map_err(|e| Error::model(format!("hashing weights: {e}")))??;
    Ok(LoadedModel {
        model,
        tokenizer,
        files,
        hash,
        adapter_hash,
    })
}
