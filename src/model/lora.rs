//! LoRA adapters in PEFT's on-disk format, so PEFT loads ours and we load PEFT's:
//! `adapter_config.json` (r, lora_alpha, lora_dropout, target_modules, use_rslora) and
//! `adapter_model.safetensors` with keys like
//! `base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight` ([r, in]) and `…lora_B.weight`
//! ([out, r]). Merging folds `scale * B @ A` into the base weight and writes a plain HF checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::config::ModelConfig;
use super::layers::Lora;
use super::seq2seq::Seq2Seq;
use super::weights::{save_safetensors, ModelFiles, Weights};
use crate::error::{Error, Result};
use crate::hub::{looks_like_repo_id, Hub, RepoId};
use crate::rng::Rng;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
const KEY_PREFIX: &str = "base_model.model.";

/// LoRA hyper-parameters for a new adapter (PEFT's names; its defaults: r 8, alpha 8, and the
/// family's targets: q and v for T5, q_proj and v_proj for BART).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraSettings {
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    /// Target module names (the last component of a Linear's path: q, k, v, o, wi, wi_0, wi_1, wo
    /// in T5; q_proj, k_proj, v_proj, out_proj, fc1, fc2 in BART). Unset: PEFT's default for the
    /// model's family.
    #[serde(default)]
    pub targets: Option<Vec<String>>,
    /// rsLoRA: scale alpha / sqrt(r) instead of alpha / r.
    #[serde(default)]
    pub rslora: bool,
}

impl Default for LoraSettings {
    fn default() -> Self {
        LoraSettings {
            r: default_r(),
            alpha: default_alpha(),
            dropout: 0.0,
            targets: None,
            rslora: false,
        }
    }
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}

impl LoraSettings {
    /// The target modules for a model of `cfg`: as set, else PEFT's default for its family.
    pub fn targets_for(&self, cfg: &ModelConfig) -> Vec<String> {
        match &self.targets {
            Some(t) => t.clone(),
            None => cfg.lora_targets.iter().map(|t| t.to_string()).collect(),
        }
    }

    /// An error naming the targets that match no linear layer of a model of `cfg`.
    pub fn check_targets(&self, cfg: &ModelConfig) -> Result<()> {
        let names = TargetModules::Names(self.targets_for(cfg));
        let modules = cfg.linears();
        let mut hits = 0;
        for m in &modules {
            if names.matches(&m.name)? {
                hits += 1;
            }
        }
        if hits == 0 {
            return Err(Error::model(format!(
                "LoRA targets {:?} match no module of this {} model (its modules: {})",
                self.targets_for(cfg),
                cfg.model_type,
                cfg.lora_modules
            )));
        }
        Ok(())
    }
}

/// The part of PEFT's `adapter_config.json` that defines a LoRA adapter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    #[serde(default)]
    pub peft_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub bias: Option<String>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
}

/// PEFT accepts a list of module names (matching the last path component(s)) or one regex.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TargetModules {
    Names(Vec<String>),
    Regex(String),
}

impl TargetModules {
    /// PEFT's rule: a name in the list equals the module path or ends it after a dot; a regex must
    /// match the whole path.
    pub fn matches(&self, module: &str) -> Result<bool> {
        Ok(match self {
            TargetModules::Names(names) => names
                .iter()
                .any(|n| module == n || module.ends_with(&format!(".{n}"))),
            TargetModules::Regex(re) => {
                let r = regex::Regex::new(&format!("^(?:{re})$"))
                    .map_err(|e| Error::model(format!("target_modules regex: {e}")))?;
                r.is_match(module)
            }
        })
    }
}

impl AdapterConfig {
    /// The config of a new adapter with `settings` for the base model `base` of config `cfg`.
    pub fn new(spec: &LoraSettings, base: &str, cfg: &ModelConfig) -> Self {
        AdapterConfig {
            peft_type: Some("LORA".into()),
            r: spec.r,
            lora_alpha: spec.alpha,
            lora_dropout: spec.dropout,
            target_modules: TargetModules::Names(spec.targets_for(cfg)),
            use_rslora: spec.rslora,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            base_model_name_or_path: Some(base.to_string()),
            task_type: Some("SEQ_2_SEQ_LM".into()),
            bias: Some("none".into()),
            fan_in_fan_out: false,
        }
    }

    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    fn check(&self, origin: &str) -> Result<()> {
        if let Some(t) = &self.peft_type {
            if t != "LORA" {
                return Err(Error::model(format!(
                    "{origin}: peft_type `{t}` is not LORA"
                )));
            }
        }
        if self.r == 0 {
            return Err(Error::model(format!("{origin}: r must be positive")));
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return Err(Error::model(format!(
                "{origin}: rank_pattern / alpha_pattern are not supported"
            )));
        }
        if self.bias.as_deref().is_some_and(|b| b != "none") {
            return Err(Error::model(format!(
                "{origin}: LoRA bias `{}` is not supported (only `none`: the adapter trains no biases)",
                self.bias.as_deref().unwrap_or("")
            )));
        }
        Ok(())
    }

    /// The JSON PEFT writes (with the keys PEFT needs to load it).
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        let m = v.as_object_mut().expect("struct serializes to an object");
        m.insert("inference_mode".into(), true.into());
        m.insert("init_lora_weights".into(), true.into());
        m.insert("modules_to_save".into(), serde_json::Value::Null);
        m.insert("layers_to_transform".into(), serde_json::Value::Null);
        m.insert("layers_pattern".into(), serde_json::Value::Null);
        m.insert("revision".into(), serde_json::Value::Null);
        v
    }
}

/// Attach fresh trainable adapters to the target modules (PEFT's init: A kaiming-uniform, B zero).
/// Returns the LoRA variables by their PEFT key.
pub fn attach_new(
    model: &mut dyn Seq2Seq,
    cfg: &AdapterConfig,
    seed: u64,
) -> Result<Vec<(String, Var)>> {
    let modules = model.config().lora_modules;
    let model_type = model.config().model_type.clone();
    cfg.check("lora settings")?;
    let mut rng = Rng::new(seed);
    let mut vars = vec![];
    let mut hits = 0;
    for (name, lin) in model.linears_mut() {
        if name == "lm_head" || !cfg.target_modules.matches(&name)? {
            continue;
        }
        hits += 1;
        let (out, inp) = lin.weight.dims2()?;
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..cfg.r * inp)
            .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
            .collect();
        let a = Var::from_tensor(
            &Tensor::from_vec(a, (cfg.r, inp), &Device::Cpu)?.to_device(lin.weight.device())?,
        )?;
        let b = Var::from_tensor(&Tensor::zeros(
            (out, cfg.r),
            DType::F32,
            lin.weight.device(),
        )?)?;
        vars.push((format!("{KEY_PREFIX}{name}.lora_A.weight"), a.clone()));
        vars.push((format!("{KEY_PREFIX}{name}.lora_B.weight"), b.clone()));
        lin.lora = Some(Lora {
            a,
            b,
            scale: cfg.scale(),
            dropout: cfg.lora_dropout,
        });
    }
    if hits == 0 {
        return Err(Error::model(format!(
            "LoRA targets {:?} match no module of this {model_type} model (its modules: {modules})",
            cfg.target_modules
        )));
    }
    Ok(vars)
}

/// An adapter on disk.
pub struct AdapterFiles {
    pub dir: String,
    pub config: AdapterConfig,
    pub weights: PathBuf,
}

impl AdapterFiles {
    /// A local adapter folder or a Hub repo holding one.
    pub async fn locate(spec: &str, hub: &Hub) -> Result<AdapterFiles> {
        let dir = Path::new(spec);
        let (cfg_path, weights) = if dir.is_dir() {
            (dir.join(ADAPTER_CONFIG), dir.join(ADAPTER_WEIGHTS))
        } else if looks_like_repo_id(spec) {
            let repo = RepoId::model(spec);
            (
                hub.fetch(&repo, "main", ADAPTER_CONFIG).await?,
                hub.fetch(&repo, "main", ADAPTER_WEIGHTS).await?,
            )
        } else {
            return Err(Error::model(format!(
                "adapter {spec}: no such folder or Hub id"
            )));
        };
        for f in [&cfg_path, &weights] {
            if !f.is_file() {
                return Err(Error::model(format!(
                    "adapter {spec}: missing file {}",
                    f.display()
                )));
            }
        }
        let text =
            std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(cfg_path.display(), e))?;
        let config: AdapterConfig = serde_json::from_str(&text).map_err(|e| {
            Error::model(format!(
                "{}: not a LoRA adapter_config.json: {e}",
                cfg_path.display()
            ))
        })?;
        config.check(spec)?;
        Ok(AdapterFiles {
            dir: spec.to_string(),
            config,
            weights,
        })
    }

    /// Load the adapter's A/B into the model's target modules (as variables, so they can keep training).
    pub fn apply(&self, model: &mut dyn Seq2Seq) -> Result<Vec<(String, Var)>> {
        let w = Weights::open(
            std::slice::from_ref(&self.weights),
            &self.dir,
            model.device(),
            DType::F32,
        )?;
        let r = self.config.r;
        let mut vars = vec![];
        let mut used = 0usize;
        for (name, lin) in model.linears_mut() {
            let ka = format!("{KEY_PREFIX}{name}.lora_A.weight");
            let kb = format!("{KEY_PREFIX}{name}.lora_B.weight");
            // PEFT may also save with the adapter name (`.lora_A.default.weight`).
            let (ka, kb) = if w.contains(&ka) {
                (ka, kb)
            } else {
                (
                    format!("{KEY_PREFIX}{name}.lora_A.default.weight"),
                    format!("{KEY_PREFIX}{name}.lora_B.default.weight"),
                )
            };
            if !w.contains(&ka) {
                if self.config.target_modules.matches(&name)? && name != "lm_head" {
                    return Err(Error::model(format!(
                        "adapter {}: missing tensor `{ka}`",
                        self.dir
                    )));
                }
                continue;
            }
            let (out, inp) = lin.weight.dims2()?;
            let a = w.get(&ka, &[r, inp]).map_err(|e| {
                Error::model(format!("{e} (does the adapter belong to this base model?)"))
            })?;
            let b = w.get(&kb, &[out, r]).map_err(|e| {
                Error::model(format!("{e} (does the adapter belong to this base model?)"))
            })?;
            let (a, b) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
            vars.push((ka.clone(), a.clone()));
            vars.push((kb.clone(), b.clone()));
            lin.lora = Some(Lora {
                a,
                b,
                scale: self.config.scale(),
                dropout: self.config.lora_dropout,
            });
            used += 2;
        }
        let total = w.names().filter(|n| n.contains(".lora_")).count();
        if used == 0 || used != total {
            return Err(Error::model(format!(
                "adapter {}: {used} of its {total} LoRA tensors fit this model's modules (does the adapter belong to this base model?)",
                self.dir
            )));
        }
        Ok(vars)
    }
}

/// Write the model's adapters in PEFT's format.
pub fn save_adapter(model: &mut dyn Seq2Seq, cfg: &AdapterConfig, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), e))?;
    let mut tensors = BTreeMap::new();
    for (name, lin) in model.linears_mut() {
        if let Some(l) = &lin.lora {
            tensors.insert(
                format!("{KEY_PREFIX}{name}.lora_A.weight"),
                l.a.as_tensor().clone(),
            );
            tensors.insert(
                format!("{KEY_PREFIX}{name}.lora_B.weight"),
                l.b.as_tensor().clone(),
            );
        }
    }
    if tensors.is_empty() {
        return Err(Error::model("the model has no LoRA adapters to save"));
    }
    save_safetensors(&tensors, &dir.join(ADAPTER_WEIGHTS))?;
    let json =
        serde_json::to_string_pretty(&cfg.to_json()).map_err(|e| Error::model(e.to_string()))?;
    let p = dir.join(ADAPTER_CONFIG);
    std::fs::write(&p, json).map_err(|e| Error::io(p.display(), e))
}

/// Write the model (adapters folded in) as a plain HF checkpoint folder: `model.safetensors`, and the
/// base model's config.json, generation_config.json and tokenizer files (as they were) beside it.
pub fn save_merged(model: &mut dyn Seq2Seq, base: &ModelFiles, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out.display(), e))?;
    let sd = model.state_dict()?;
    save_safetensors(&sd, &out.join(super::weights::SAFETENSORS))?;
    let copy = |from: &Path, name: &str| -> Result<()> {
        let dst = out.join(name);
        std::fs::copy(from, &dst).map_err(|e| Error::io(dst.display(), e))?;
        Ok(())
    };
    copy(&base.config, super::weights::CONFIG)?;
    if let Some(g) = &base.generation_config {
        copy(g, super::weights::GENERATION_CONFIG)?;
    }
    if let Some(t) = &base.tokenizer {
        for (path, name) in t.files() {
            copy(path, name)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_matching_follows_peft() {
        let t = TargetModules::Names(vec!["q".into(), "v".into()]);
        assert!(t
            .matches("encoder.block.0.layer.0.SelfAttention.q")
            .unwrap());
        assert!(t
            .matches("decoder.block.1.layer.1.EncDecAttention.v")
            .unwrap());
        assert!(!t
            .matches("decoder.block.1.layer.1.EncDecAttention.o")
            .unwrap());
        assert!(!t
            .matches("encoder.block.0.layer.1.DenseReluDense.wi_0")
            .unwrap());
        let r = TargetModules::Regex(r".*encoder.*\.(q|v)".into());
        assert!(r
            .matches("encoder.block.0.layer.0.SelfAttention.q")
            .unwrap());
        assert!(!r
            .matches("decoder.block.0.layer.0.SelfAttention.q")
            .unwrap());
    }

    #[test]
    fn scale_and_rslora() {
        let mut c = AdapterConfig::new(
            &LoraSettings {
                r: 16,
                alpha: 32.0,
                ..Default::default()
            },
            "base",
            &crate::model::init::config(
                crate::model::init::Family::FlanT5,
                crate::model::init::Size::Tiny,
                100,
            )
            .model_config(),
        );
        assert_eq!(
            c.target_modules,
            TargetModules::Names(vec!["q".into(), "v".into()])
        );
        assert_eq!(c.scale(), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scale(), 8.0);
        let v = c.to_json();
        assert_eq!(v["peft_type"], "LORA");
        assert_eq!(v["target_modules"], serde_json::json!(["q", "v"]));
    }
}
