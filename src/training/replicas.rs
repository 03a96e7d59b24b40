//! Data parallelism in one process: one model replica per device, each with its own copy of the
//! trainable variables and its own dropout generator. A batch is split into contiguous shards, one
//! per replica; each replica computes its shard's share of the loss (normalized by the whole batch's
//! token count) and its gradients in parallel; the gradients are summed on the host in replica order
//! (LoRA's are a few MB, so the copies cost little and the sum is deterministic) and applied by the
//! primary replica's optimizer, whose new values are then copied to the others. Every replica
//! therefore holds the same weights after every step, and the result equals one device training on
//! the whole batch (up to float rounding; with dropout on, each replica draws its own masks).

use std::cell::RefCell;

use candle_core::{Device, Tensor, Var};

use super::batching::Example;
use super::examples::BatchTensors;
use crate::error::{Error, Result};
use crate::model::mode::{Mode, TrainState};
use crate::model::{ops, Seq2Seq};
use crate::rng::Rng;

/// A replica's share of a batch's loss and its gradients, in the variables' order.
type Share = (f64, Vec<Tensor>);

/// One model on one device.
pub struct Replica {
    pub model: Box<dyn Seq2Seq>,
    /// Its trainable variables, in the primary's order.
    pub vars: Vec<Var>,
    /// Its dropout rate and generator.
    pub dropout: RefCell<TrainState>,
}

/// What a training step computes of a batch besides the model: the loss of logits.
pub struct StepLoss<'a> {
    pub labels_smoothing: f64,
    /// Label tokens of the whole batch (every replica divides by it).
    pub total_tokens: usize,
    pub checkpointing: bool,
    pub examples: &'a [Example],
}

impl Replica {
    /// This replica's share of the loss and its gradients for the rows `idx` (none when empty).
    fn gradients(&self, idx: &[usize], step: &StepLoss) -> Result<Option<Share>> {
        if idx.is_empty() {
            return Ok(None);
        }
        let batch: Vec<&Example> = idx.iter().map(|&i| &step.examples[i]).collect();
        let t = BatchTensors::new(self.model.as_ref(), &batch)?;
        let mode = Mode {
            train: Some(&self.dropout),
        };
        let (loss, grads) = self.model.gradients(
            (&t.ids, &t.mask, &t.decoder_ids),
            &mode,
            &self.vars,
            step.checkpointing,
            &|logits| {
                let (sum, _) =
                    ops::cross_entropy(logits, &t.labels, &t.label_mask, step.labels_smoothing)?;
                Ok((sum / step.total_tokens as f64)?)
            },
        )?;
        let grads = grads
            .into_iter()
            .zip(&self.vars)
            .map(|(g, v)| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Some((loss.to_scalar::<f32>()? as f64, grads)))
    }
}

/// The replicas of a run; the first is the primary (its variables are saved and optimized).
pub struct Replicas {
    pub list: Vec<Replica>,
    /// Each replica's pass on its own thread (GPUs: every device's kernels queued at once). CPU
    /// replicas share the cores their kernels already use, so they take turns.
    pub threaded: bool,
}

impl Replicas {
    pub fn new(list: Vec<Replica>) -> Replicas {
        let threaded = list.iter().any(|r| !r.model.device().is_cpu());
        Replicas { list, threaded }
    }

    pub fn primary(&self) -> &Replica {
        &self.list[0]
    }

    pub fn primary_mut(&mut self) -> &mut Replica {
        &mut self.list[0]
    }

    /// The loss and the summed gradients (on the primary's device) of the rows `idx`, split across
    /// the replicas.
    pub fn gradients(&mut self, idx: &[usize], step: &StepLoss) -> Result<Share> {
        if self.list.len() == 1 {
            return self.list[0]
                .gradients(idx, step)?
                .ok_or_else(|| Error::model("train: an empty batch"));
        }
        let n = self.list.len();
        let per = idx.len().div_ceil(n);
        let mut results: Vec<Result<Option<Share>>> = (0..n).map(|_| Ok(None)).collect();
        let shards = idx
            .chunks(per.max(1))
            .map(Some)
            .chain(std::iter::repeat(None));
        let jobs = self.list.iter_mut().zip(results.iter_mut()).zip(shards);
        if !self.threaded {
            for ((replica, slot), shard) in jobs {
                *slot = replica.gradients(shard.unwrap_or(&[]), step);
            }
        } else {
            rayon::scope(|s| {
                for ((replica, slot), shard) in jobs {
                    let shard = shard.unwrap_or(&[]);
                    s.spawn(move |_| *slot = replica.gradients(shard, step));
                }
            });
        }
        // Summed on the host, in replica order.
        let mut loss = 0f64;
        let mut sum: Option<Vec<Tensor>> = None;
        for r in results {
            let Some((l, grads)) = r? else { continue };
            loss += l;
            let grads = grads
                .iter()
                .map(|g| g.to_device(&Device::Cpu))
                .collect::<candle_core::Result<Vec<_>>>()?;
            sum = Some(match sum {
                None => grads,
                Some(acc) => acc
                    .iter()
                    .zip(&grads)
                    .map(|(a, b)| a + b)
                    .collect::<candle_core::Result<_>>()?,
            });
        }
        let device = self.list[0].model.device().clone();
        let grads = sum
            .ok_or_else(|| Error::model("train: an empty batch"))?
            .iter()
            .map(|g| g.to_device(&device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((loss, grads))
    }

    /// Give every other replica the primary's variables (after the optimizer updated them).
    pub fn broadcast(&self) -> Result<()> {
        let (primary, others) = self.list.split_first().expect("at least one replica");
        for r in others {
            for (v, p) in r.vars.iter().zip(&primary.vars) {
                v.set(&p.as_tensor().to_device(r.model.device())?)?;
            }
        }
        Ok(())
    }

    /// Each replica's dropout generator, for checkpoints.
    pub fn rngs(&self) -> Vec<Rng> {
        self.list
            .iter()
            .map(|r| r.dropout.borrow().rng.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init::{Family, NewModel, Prior, Size};
    use crate::model::lora::{attach_new, AdapterConfig, LoraSettings};
    use crate::model::mode::Dropout;
    use crate::model::weights::Weights;
    use candle_core::DType;

    fn values(vars: &[Var]) -> Vec<Vec<f32>> {
        vars.iter()
            .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    }

    /// Replicas on their own threads (as on GPUs), trained step by step: after every update and
    /// broadcast each replica holds exactly the primary's weights, and the summed gradients are one
    /// model's on the whole batch.
    #[test]
    fn threaded_replicas_hold_the_primarys_weights_after_every_step() {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let cfg = NewModel {
            family: Family::FlanT5,
            size: Size::Tiny,
            prior: Prior::Random,
            tokenizer: root.join("data/tokenizer/conala-unigram-8k.json"),
            seed: 0,
        }
        .write(tmp.path())
        .unwrap();
        let files = [tmp.path().join("model.safetensors")];
        let replica = |seed: u64| {
            let w = Weights::open(&files, "test", &Device::Cpu, DType::F32).unwrap();
            let mut model = cfg.build(&w).unwrap();
            let adapter = AdapterConfig::new(&LoraSettings::default(), "test", &cfg);
            let vars = attach_new(model.as_mut(), &adapter, seed)
                .unwrap()
                .into_iter()
                .map(|(_, v)| v)
                .collect();
            Replica {
                model,
                vars,
                dropout: RefCell::new(TrainState::new(Dropout::uniform(0.0), Rng::new(seed))),
            }
        };
        let mut rng = Rng::new(3);
        let examples: Vec<Example> = (0..12)
            .map(|i| Example {
                input: (0..5 + i % 4).map(|_| 3 + rng.below(7000) as u32).collect(),
                labels: (0..3 + i % 3).map(|_| 3 + rng.below(7000) as u32).collect(),
            })
            .collect();
        let idx: Vec<usize> = (0..examples.len()).collect();
        let step = StepLoss {
            labels_smoothing: 0.0,
            total_tokens: examples.iter().map(|e| e.labels.len()).sum(),
            checkpointing: false,
            examples: &examples,
        };
        let mut many = Replicas {
            list: vec![replica(1), replica(2), replica(3)],
            threaded: true,
        };
        let mut one = Replicas::new(vec![replica(1)]);
        assert!(!one.threaded, "CPU replicas take turns");
        many.broadcast().unwrap();
        for _ in 0..4 {
            let (loss, grads) = many.gradients(&idx, &step).unwrap();
            let (loss1, grads1) = one.gradients(&idx, &step).unwrap();
            assert!(
                (loss - loss1).abs() < 1e-5 * loss1.abs(),
                "{loss} vs {loss1}"
            );
            for (a, b) in values_of(&grads).iter().zip(values_of(&grads1)) {
                let scale = b.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
                let diff = a
                    .iter()
                    .zip(&b)
                    .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(
                    diff <= 1e-4 * scale,
                    "gradients differ by {diff} (scale {scale})"
                );
            }
            // A plain SGD step on each primary, then the broadcast.
            for (r, g) in [(&many, &grads), (&one, &grads1)] {
                for (v, g) in r.primary().vars.iter().zip(g.iter()) {
                    v.set(&(v.as_tensor() - (g * 0.5).unwrap()).unwrap())
                        .unwrap();
                }
            }
            many.broadcast().unwrap();
            let primary = values(&many.primary().vars);
            for r in &many.list[1..] {
                assert_eq!(values(&r.vars), primary, "a replica differs after the step");
            }
        }
    }

    fn values_of(ts: &[Tensor]) -> Vec<Vec<f32>> {
        ts.iter()
            .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    }
}
