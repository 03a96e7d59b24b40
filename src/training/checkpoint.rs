//! Training checkpoints: `checkpoint-STEP/` with the trainable weights (a PEFT adapter, or a full HF
//! model folder), the optimizer moments, and `trainer_state.json` (step, data position, RNG, best eval
//! loss). Written to a temporary folder and renamed, so a kill never leaves half a checkpoint. The
//! newest `save_total_limit` are kept, plus the best by eval loss.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::weights::save_safetensors;
use crate::rng::Rng;

pub const STATE: &str = "trainer_state.json";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const TRAINABLE: &str = "trainable.safetensors";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    /// Data position: the epoch and the next batch within it.
    pub epoch: u64,
    pub batch_in_epoch: usize,
    /// Dropout generator state.
    pub rng: Rng,
    pub best_eval_loss: Option<f64>,
    pub best_step: Option<u64>,
    /// Seconds of training before this checkpoint (for throughput across resumes).
    pub train_seconds: f64,
    /// The dropout generators of the replicas after the first (several devices).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replica_rngs: Vec<Rng>,
}

pub fn dir_for(output: &Path, step: u64) -> PathBuf {
    output.join(format!("checkpoint-{step}"))
}

/// Steps of the complete checkpoints in `output`, ascending.
pub fn list(output: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(output)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_prefix("checkpoint-"))
                        .and_then(|s| s.parse().ok())
                })
                .filter(|s| dir_for(output, *s).join(STATE).is_file())
                .collect()
        })
        .unwrap_or_default();
    steps.sort();
    steps
}

/// Write a checkpoint atomically. `write_weights` fills the folder with the model's trainable part.
pub fn save(
    output: &Path,
    state: &TrainerState,
    trainable: &BTreeMap<String, Tensor>,
    optimizer: &BTreeMap<String, Tensor>,
    write_weights: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let final_dir = dir_for(output, state.step);
    let tmp = output.join(format!(".checkpoint-{}.tmp", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(tmp.display(), e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(tmp.display(), e))?;
    write_weights(&tmp)?;
    save_safetensors(trainable, &tmp.join(TRAINABLE))?;
    save_safetensors(optimizer, &tmp.join(OPTIMIZER))?;
    let json = serde_json::to_string_pretty(state).map_err(|e| Error::json(STATE, e))?;
    std::fs::write(tmp.join(STATE), json).map_err(|e| Error::io(tmp.join(STATE).display(), e))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(final_dir.display(), e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(final_dir.display(), e))?;
    Ok(final_dir)
}

/// Remove checkpoints beyond the newest `keep`, never the best one.
pub fn prune(output: &Path, keep: usize, best: Option<u64>) -> Result<()> {
    let steps = list(output);
    if keep == 0 || steps.len() <= keep {
        return Ok(());
    }
    for s in &steps[..steps.len() - keep] {
        if Some(*s) != best {
            let d = dir_for(output, *s);
            std::fs::remove_dir_all(&d).map_err(|e| Error::io(d.display(), e))?;
        }
    }
    Ok(())
}

/// The newest checkpoint: its state, trainable tensors and optimizer moments.
pub struct Loaded {
    pub dir: PathBuf,
    pub state: TrainerState,
    pub trainable: std::collections::HashMap<String, Tensor>,
    pub optimizer: std::collections::HashMap<String, Tensor>,
}

pub fn load_latest(output: &Path, device: &candle_core::Device) -> Result<Option<Loaded>> {
    let Some(step) = list(output).last().copied() else {
        return Ok(None);
    };
    let dir = dir_for(output, step);
    let text = std::fs::read_to_string(dir.join(STATE))
        .map_err(|e| Error::io(dir.join(STATE).display(), e))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| Error::json(dir.join(STATE).display(), e))?;
    let load = |name: &str| {
        candle_core::safetensors::load(dir.join(name), device)
            .map_err(|e| Error::tensors(dir.join(name).display(), e))
    };
    Ok(Some(Loaded {
        trainable: load(TRAINABLE)?,
        optimizer: load(OPTIMIZER)?,
        state,
        dir,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn save_list_prune_load() {
        let dir = tempfile::tempdir().unwrap();
        let t: BTreeMap<String, Tensor> = [(
            "w".to_string(),
            Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap(),
        )]
        .into();
        for step in [2u64, 4, 6] {
            let st = TrainerState {
                step,
                epoch: 0,
                batch_in_epoch: step as usize,
                rng: Rng::new(1),
                best_eval_loss: None,
                best_step: Some(2),
                train_seconds: 0.0,
                replica_rngs: vec![],
            };
            save(dir.path(), &st, &t, &t, |_| Ok(())).unwrap();
        }
        assert_eq!(list(dir.path()), vec![2, 4, 6]);
        prune(dir.path(), 1, Some(2)).unwrap();
        assert_eq!(list(dir.path()), vec![2, 6]);
        let l = load_latest(dir.path(), &Device::Cpu).unwrap().unwrap();
        assert_eq!(l.state.step, 6);
        assert_eq!(l.trainable["w"].to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
        // A leftover temporary folder is not a checkpoint.
        std::fs::create_dir_all(dir.path().join(".checkpoint-8.tmp")).unwrap();
        assert_eq!(list(dir.path()), vec![2, 6]);
    }
}
