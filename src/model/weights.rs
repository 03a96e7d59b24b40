//! Checkpoint files: finding a model's files (a local folder or a Hub model id), reading safetensors
//! and PyTorch `.bin` checkpoints (single or sharded with an index, mapped and read tensor by tensor)
//! with errors that name the tensor, and hashing content for provenance.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use super::torch_bin::TorchBin;
use crate::error::{Error, Result};
use crate::hub::{looks_like_repo_id, Hub, RepoId};
use crate::tokenizer::TokenizerFiles;

pub const CONFIG: &str = "config.json";
pub const GENERATION_CONFIG: &str = "generation_config.json";
pub const SAFETENSORS: &str = "model.safetensors";
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
pub const TORCH_BIN: &str = "pytorch_model.bin";
pub const TORCH_BIN_INDEX: &str = "pytorch_model.bin.index.json";
pub const TOKENIZER: &str = "tokenizer.json";

/// The files of one model checkpoint on local disk.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// What the user named (folder or Hub id), for messages.
    pub origin: String,
    pub config: PathBuf,
    /// HF's generation defaults (the token ids `generate` uses), when the model has them.
    pub generation_config: Option<PathBuf>,
    /// Empty for a Hub model located for its metadata only ([`Fetch::Metadata`]).
    pub weights: Vec<PathBuf>,
    pub tokenizer: Option<TokenizerFiles>,
}

fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index.display(), e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::model(format!("{}: invalid index JSON: {e}", index.display())))?;
    let map = v["weight_map"]
        .as_object()
        .ok_or_else(|| Error::model(format!("{}: no `weight_map`", index.display())))?;
    let files: BTreeSet<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    if files.is_empty() {
        return Err(Error::model(format!(
            "{}: empty `weight_map`",
            index.display()
        )));
    }
    Ok(files.into_iter().collect())
}

/// What [`locate`] fetches from the Hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// The config and tokenizer: what checking a plan needs (`weights` stays empty), so a plan for a
    /// 40 GB model validates without downloading it.
    Metadata,
    /// Everything, weights included.
    All,
}

/// Locate a model: a local folder, else a Hub model id (downloaded into the HF cache).
pub async fn locate(
    path: &str,
    revision: Option<&str>,
    hub: &Hub,
    fetch: Fetch,
) -> Result<ModelFiles> {
    let dir = Path::new(path);
    if dir.is_dir() {
        let config = dir.join(CONFIG);
        if !config.is_file() {
            return Err(Error::model(format!("{path}: missing file {CONFIG}")));
        }
        let weights = local_weights(dir, path)?;
        let generation = dir.join(GENERATION_CONFIG);
        return Ok(ModelFiles {
            origin: path.to_string(),
            config,
            generation_config: generation.is_file().then_some(generation),
            weights,
            tokenizer: TokenizerFiles::in_folder(dir)?,
        });
    }
    if dir.exists() {
        return Err(Error::model(format!(
            "{path}: is a file; a model is a folder or a Hub model id"
        )));
    }
    if !looks_like_repo_id(path) || path.starts_with('.') || path.contains('\\') {
        return Err(Error::model(format!("{path}: no such model folder")));
    }
    let repo = RepoId::model(path);
    let rev = revision.unwrap_or("main");
    let config = hub.fetch(&repo, rev, CONFIG).await?;
    let weights = match fetch {
        Fetch::Metadata => vec![],
        Fetch::All => fetch_weights(hub, &repo, rev).await?,
    };
    let tokenizer = TokenizerFiles::from_hub(&repo, rev, hub).await?;
    let generation_config = hub.fetch_optional(&repo, rev, GENERATION_CONFIG).await?;
    Ok(ModelFiles {
        origin: path.to_string(),
        config,
        generation_config,
        weights,
        tokenizer,
    })
}

/// The checkpoint files of a model folder: safetensors (one file, or the shards its index names),
/// else PyTorch `.bin` (likewise).
fn local_weights(dir: &Path, path: &str) -> Result<Vec<PathBuf>> {
    for (single, index) in [
        (SAFETENSORS, SAFETENSORS_INDEX),
        (TORCH_BIN, TORCH_BIN_INDEX),
    ] {
        if dir.join(single).is_file() {
            return Ok(vec![dir.join(single)]);
        }
        if dir.join(index).is_file() {
            let files: Vec<PathBuf> = shard_names(&dir.join(index))?
                .iter()
                .map(|n| dir.join(n))
                .collect();
            if let Some(missing) = files.iter().find(|f| !f.is_file()) {
                return Err(Error::model(format!(
                    "{path}: missing shard {} named in {index}",
                    missing.display()
                )));
            }
            return Ok(files);
        }
    }
    Err(Error::model(format!(
        "{path}: no weights: missing {SAFETENSORS} (or {SAFETENSORS_INDEX}, {TORCH_BIN}, {TORCH_BIN_INDEX})"
    )))
}

/// A Hub model's weights: safetensors (one file, else the shards its index names), else PyTorch
/// `.bin` likewise. The first error is the one reported when the repo has none of them.
async fn fetch_weights(hub: &Hub, repo: &RepoId, rev: &str) -> Result<Vec<PathBuf>> {
    for (single, index) in [
        (SAFETENSORS, SAFETENSORS_INDEX),
        (TORCH_BIN, TORCH_BIN_INDEX),
    ] {
        if let Some(p) = hub.fetch_optional(repo, rev, single).await? {
            return Ok(vec![p]);
        }
        if let Some(index) = hub.fetch_optional(repo, rev, index).await? {
            let mut out = vec![];
            for n in shard_names(&index)? {
                out.push(hub.fetch(repo, rev, &n).await?);
            }
            return Ok(out);
        }
    }
    // Nothing found: the error the Hub gives for the usual file (offline: not in the cache).
    hub.fetch(repo, rev, SAFETENSORS).await.map(|p| vec![p])
}

/// Tensors of a checkpoint, read on demand and converted to the model's dtype and device.
pub struct Weights {
    /// The safetensors files, mapped together (None when the checkpoint is `.bin` only).
    st: Option<MmapedSafetensors>,
    bins: Vec<TorchBin>,
    origin: String,
    names: BTreeMap<String, (Stored, Vec<usize>)>,
    pub device: Device,
    pub dtype: DType,
}

/// Which file holds a tensor.
#[derive(Debug, Clone, Copy)]
enum Stored {
    Safetensors,
    /// The index into [`Weights::bins`].
    Bin(usize),
}

/// Whether `path` is a PyTorch checkpoint (`.bin`, `.pt`, `.pth`) rather than safetensors.
fn is_torch_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("bin" | "pt" | "pth")
    )
}

impl Weights {
    pub fn open(files: &[PathBuf], origin: &str, device: &Device, dtype: DType) -> Result<Weights> {
        let (bin_files, st_files): (Vec<&PathBuf>, Vec<&PathBuf>) =
            files.iter().partition(|f| is_torch_file(f));
        for f in &st_files {
            check_safetensors_header(f)?;
        }
        let mut names = BTreeMap::new();
        let st = if st_files.is_empty() {
            None
        } else {
            // SAFETY: the files are memory-mapped read-only; conala does not modify checkpoints
            // while a model is loaded from them.
            let st = unsafe { MmapedSafetensors::multi(&st_files) }
                .map_err(|e| Error::model(format!("{origin}: corrupt safetensors: {e}")))?;
            for (n, v) in st.tensors() {
                names.insert(n, (Stored::Safetensors, v.shape().to_vec()));
            }
            Some(st)
        };
        let mut bins = vec![];
        for f in bin_files {
            let b = TorchBin::open(f)?;
            for (n, shape) in b.names() {
                names.insert(n.clone(), (Stored::Bin(bins.len()), shape.to_vec()));
            }
            bins.push(b);
        }
        Ok(Weights {
            st,
            bins,
            origin: origin.to_string(),
            names,
            device: device.clone(),
            dtype,
        })
    }

    /// What the user named (folder or Hub id), for messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.names.keys()
    }

    /// The tensor `name` with exactly `shape`, in the model's dtype and device.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let Some((stored, found)) = self.names.get(name) else {
            return Err(Error::model(format!(
                "{}: missing tensor `{name}`",
                self.origin
            )));
        };
        if found.as_slice() != shape {
            return Err(Error::model(format!(
                "{}: tensor `{name}` has shape {found:?}, expected {shape:?}",
                self.origin
            )));
        }
        let reading = |e| Error::tensors(format!("{}: reading `{name}`", self.origin), e);
        let host = match stored {
            Stored::Safetensors => {
                let st = self
                    .st
                    .as_ref()
                    .expect("safetensors tensors come from a mapped file");
                let view = st.get(name).map_err(reading)?;
                host_tensor(view.dtype(), view.shape(), view.data(), self.dtype).map_err(reading)?
            }
            Stored::Bin(i) => {
                let (dtype, shape, bytes) = self.bins[*i].bytes(name)?;
                host_tensor(dtype, shape, &bytes, self.dtype).map_err(reading)?
            }
        };
        Ok(host.to_device(&self.device)?)
    }
}

/// The tensor of `shape` whose elements of `stored` type are `data`, in `dtype`, on the host:
/// converted element by element straight from the file's bytes (which are mapped, not read into
/// memory), so the result is the only allocation. A checkpoint is read tensor by tensor this way:
/// loading an f32 checkpoint as bf16 never holds an f32 copy of a tensor, let alone of the model.
/// Conversions round as candle's `to_dtype` does.
fn host_tensor(
    stored: safetensors::Dtype,
    shape: &[usize],
    data: &[u8],
    dtype: DType,
) -> candle_core::Result<Tensor> {
    use half::{bf16, f16};
    use safetensors::Dtype as D;
    let cpu = &Device::Cpu;
    let f32_of = |b: &[u8]| f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let bf16_of = |b: &[u8]| bf16::from_le_bytes([b[0], b[1]]);
    let f16_of = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]);
    match (stored, dtype) {
        (src, dst) if DType::try_from(src).ok() == Some(dst) => {
            Tensor::from_raw_buffer(data, dst, shape, cpu)
        }
        (D::F32, DType::BF16) => convert(data, 4, shape, |b| bf16::from_f32(f32_of(b))),
        (D::F32, DType::F16) => convert(data, 4, shape, |b| f16::from_f32(f32_of(b))),
        (D::BF16, DType::F32) => convert(data, 2, shape, |b| bf16_of(b).to_f32()),
        (D::F16, DType::F32) => convert(data, 2, shape, |b| f16_of(b).to_f32()),
        (D::BF16, DType::F16) => convert(data, 2, shape, |b| f16::from_f32(bf16_of(b).to_f32())),
        (D::F16, DType::BF16) => convert(data, 2, shape, |b| bf16::from_f32(f16_of(b).to_f32())),
        (src, dst) => {
            Tensor::from_raw_buffer(data, DType::try_from(src)?, shape, cpu)?.to_dtype(dst)
        }
    }
}

/// Elements of `width` bytes each, converted in parallel into a new host tensor.
fn convert<T: candle_core::WithDType>(
    data: &[u8],
    width: usize,
    shape: &[usize],
    f: impl Fn(&[u8]) -> T + Sync + Send,
) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    let out: Vec<T> = data.par_chunks_exact(width).map(f).collect();
    Tensor::from_vec(out, shape, &Device::Cpu)
}

/// A safetensors file starts with an 8-byte little-endian header length and a JSON header; check both
/// so a truncated or foreign file gets a clear message.
fn check_safetensors_header(path: &Path) -> Result<()> {
    let bad = |why: &str| Error::model(format!("{}: corrupt safetensors ({why})", path.display()));
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path.display(), e))?;
    let size = f
        .metadata()
        .map_err(|e| Error::io(path.display(), e))?
        .len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| bad("shorter than its header"))?;
    let n = u64::from_le_bytes(len);
    if n == 0 || n > 100_000_000 || 8 + n > size {
        return Err(bad("invalid header length"));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|_| bad("truncated header"))?;
    let v: serde_json::Value =
        serde_json::from_slice(&header).map_err(|_| bad("header is not JSON"))?;
    let max_end = v
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| *k != "__metadata__")
                .filter_map(|(_, t)| t["data_offsets"][1].as_u64())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    if 8 + n + max_end > size {
        return Err(bad(
            "file is truncated: tensor data ends past the end of the file",
        ));
    }
    Ok(())
}

/// SHA-256 of the files' contents, in order (the model's identity in manifests).
pub fn content_hash(files: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for p in files {
        let mut f = std::fs::File::open(p).map_err(|e| Error::io(p.display(), e))?;
        loop {
            let n = f.read(&mut buf).map_err(|e| Error::io(p.display(), e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(format!("sha256:{:x}", h.finalize()))
}

/// Write tensors as one safetensors file (HF naming), with `format: pt` metadata as transformers writes.
pub fn save_safetensors(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let mut owned: Vec<(String, Vec<u8>, Vec<usize>, Dtype)> = vec![];
    for (name, t) in tensors {
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        let (bytes, dtype) = match t.dtype() {
            DType::F32 => (
                t.flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                Dtype::F32,
            ),
            DType::BF16 => (
                t.flatten_all()?
                    .to_vec1::<half::bf16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                Dtype::BF16,
            ),
            DType::F16 => (
                t.flatten_all()?
                    .to_vec1::<half::f16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                Dtype::F16,
            ),
            other => {
                return Err(Error::model(format!(
                    "saving `{name}`: unsupported dtype {other:?}"
                )))
            }
        };
        owned.push((name.clone(), bytes, t.dims().to_vec(), dtype));
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, b, s, d)| {
            Ok((
                n.clone(),
                TensorView::new(*d, s.clone(), b).map_err(|e| Error::model(format!("{n}: {e}")))?,
            ))
        })
        .collect::<Result<_>>()?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), e))?;
    }
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, Some(meta), &tmp)
        .map_err(|e| Error::model(format!("{}: {e}", path.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path.display(), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every conversion a checkpoint is read with gives candle's `to_dtype` of the stored tensor, bit
    /// for bit, and keeps the shape.
    #[test]
    fn tensors_convert_as_candle_converts_them() {
        let dir = tempfile::tempdir().unwrap();
        let x = Tensor::randn(0f32, 3.0, (3, 5, 7), &Device::Cpu).unwrap();
        let mut stored = BTreeMap::new();
        for dt in [DType::F32, DType::BF16, DType::F16] {
            stored.insert(format!("{dt:?}"), x.to_dtype(dt).unwrap());
        }
        let path = dir.path().join("m.safetensors");
        save_safetensors(&stored, &path).unwrap();
        for want in [DType::F32, DType::BF16, DType::F16] {
            let w = Weights::open(std::slice::from_ref(&path), "test", &Device::Cpu, want).unwrap();
            for (name, t) in &stored {
                let got = w.get(name, &[3, 5, 7]).unwrap();
                assert_eq!(got.dtype(), want);
                let expect = t.to_dtype(want).unwrap();
                let (a, b): (Vec<f32>, Vec<f32>) = (
                    got.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap(),
                    expect
                        .to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap(),
                );
                let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{name} read as {want:?}");
            }
        }
    }
}
