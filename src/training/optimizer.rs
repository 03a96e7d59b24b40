//! AdamW as PyTorch implements it (decoupled weight decay, bias-corrected moments), with the state
//! exposed so checkpoints can save and restore it exactly.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// One parameter with its moments.
pub struct Param {
    pub name: String,
    pub var: Var,
    pub decay: bool,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    pub params: Vec<Param>,
    pub config: AdamWConfig,
    /// Optimizer steps taken.
    pub step: u64,
}

impl AdamW {
    /// `decay(name)` says whether weight decay applies (HF: not to biases and layer norms).
    pub fn new(
        vars: Vec<(String, Var)>,
        config: AdamWConfig,
        decay: impl Fn(&str) -> bool,
    ) -> Result<AdamW> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let m = var.as_tensor().zeros_like()?.to_dtype(DType::F32)?;
                Ok(Param {
                    decay: decay(&name),
                    name,
                    m: m.clone(),
                    v: m,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            params,
            config,
            step: 0,
        })
    }

    /// One update with gradients `grads` (same order as `params`) at learning rate `lr`.
    pub fn apply(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(Error::model(format!(
                "optimizer: {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )));
        }
        self.step += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (p, g) in self.params.iter_mut().zip(grads) {
            let g = g.to_dtype(DType::F32)?;
            let mut w = p.var.as_tensor().to_dtype(DType::F32)?;
            if p.decay && c.weight_decay != 0.0 {
                w = (w * (1.0 - lr * c.weight_decay))?;
            }
            p.m = ((&p.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            p.v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((p.v.sqrt()? / bc2.sqrt())? + c.eps)?;
            let update = (p.m.broadcast_div(&denom)? * (lr / bc1))?;
            let w = (w - update)?;
            p.var.set(&w.to_dtype(p.var.dtype())?)?;
        }
        Ok(())
    }

    /// Moments by parameter name (`NAME.exp_avg`, `NAME.exp_avg_sq`), for checkpoints.
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for p in &self.params {
            out.insert(format!("{}.exp_avg", p.name), p.m.clone());
            out.insert(format!("{}.exp_avg_sq", p.name), p.v.clone());
        }
        out
    }

    pub fn load_state(
        &mut self,
        state: &std::collections::HashMap<String, Tensor>,
        step: u64,
    ) -> Result<()> {
        for p in &mut self.params {
            let get = |k: String| {
                state
                    .get(&k)
                    .cloned()
                    .ok_or_else(|| Error::model(format!("optimizer state: missing `{k}`")))
            };
            let dev = p.var.device().clone();
            p.m = get(format!("{}.exp_avg", p.name))?.to_device(&dev)?;
            p.v = get(format!("{}.exp_avg_sq", p.name))?.to_device(&dev)?;
        }
        self.step = step;
        Ok(())
    }
}

/// Global L2 norm of gradients; scales them down to `max_norm` when above it (0 = no clipping).
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter() {
        total += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_pytorch_adamw_two_steps() {
        // torch.optim.AdamW([p], lr=0.1, weight_decay=0.01) with p = [1, -2], grads [0.5, 0.1] then [-1, 0.2]:
        // computed by hand from the update rule.
        let v = Var::new(&[1f32, -2.0], &Device::Cpu).unwrap();
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut opt = AdamW::new(vec![("p".into(), v.clone())], cfg, |_| true).unwrap();
        let mut expect = [1f64, -2.0];
        let mut m = [0f64; 2];
        let mut s = [0f64; 2];
        for (t, g) in [[0.5f64, 0.1], [-1.0, 0.2]].iter().enumerate() {
            opt.apply(
                &[Tensor::new(&[g[0] as f32, g[1] as f32], &Device::Cpu).unwrap()],
                0.1,
            )
            .unwrap();
            let step = (t + 1) as i32;
            for i in 0..2 {
                expect[i] *= 1.0 - 0.1 * 0.01;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                s[i] = 0.999 * s[i] + 0.001 * g[i] * g[i];
                let mh = m[i] / (1.0 - 0.9f64.powi(step));
                let denom = s[i].sqrt() / (1.0 - 0.999f64.powi(step)).sqrt() + 1e-8;
                expect[i] -= 0.1 * mh / denom;
            }
        }
        let got: Vec<f32> = v.as_tensor().to_vec1().unwrap();
        for i in 0..2 {
            assert!(
                (got[i] as f64 - expect[i]).abs() < 1e-5,
                "{got:?} vs {expect:?}"
            );
        }
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let mut g = vec![Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap()];
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-6);
        let v: Vec<f32> = g[0].to_vec1().unwrap();
        assert!((v[0] - 0.6).abs() < 1e-5 && (v[1] - 0.8).abs() < 1e-5);
    }
}
