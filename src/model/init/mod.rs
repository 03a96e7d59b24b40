//! New models written as Hugging Face folders (config.json, model.safetensors, tokenizer.json) that
//! transformers loads as they are: random ones in a family's shape (`conala model init`, tests,
//! benchmarks), or the copy prior the offline default fine-tunes ([`copy_prior`]).

pub mod bart;
mod copy_prior;
mod folder;
mod random;
mod shapes;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use folder::{write_folder, write_model, write_tokenizer_config};
pub use random::{random_weights, write_random_model};
pub use shapes::{config, config_json, Family, Size};

use crate::error::{Error, Result};
use crate::model::weights::CONFIG;
use crate::model::ModelConfig;

/// How a new model's weights start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prior {
    /// transformers' initialisation of the family, in its shape at the given size.
    Random,
    /// Hand-set weights that copy the input ([`copy_prior`]), in the prior's own shape.
    Copy,
}
crate::named_setting!(Prior);

impl Prior {
    /// For messages: `random mini`, `copy-prior`.
    pub fn describe(self, size: Size) -> String {
        match self {
            Prior::Random => format!("random {size}"),
            Prior::Copy => "copy-prior".to_string(),
        }
    }
}

/// A model to make: what `model.init` in a plan and `conala model init` describe.
#[derive(Debug, Clone, PartialEq)]
pub struct NewModel {
    pub family: Family,
    /// Applies to the random prior only (the copy prior has its own shape).
    pub size: Size,
    pub prior: Prior,
    /// The tokenizer.json the model is made for (its vocabulary size), copied into the folder.
    pub tokenizer: PathBuf,
    pub seed: u64,
}

impl NewModel {
    /// Write the model folder at `out`; returns its config.
    pub fn write(&self, out: &Path) -> Result<ModelConfig> {
        let tok = crate::tokenizer::load(&self.tokenizer)?;
        let vocab = tok.get_vocab_size(true);
        if self.family == Family::Bart {
            if self.prior == Prior::Copy {
                return Err(Error::model(
                    "model.init.prior copy is a T5 circuit: use family flan-t5 or ul2 (a BART starts random)",
                ));
            }
            let id = |t: &str| {
                tok.token_to_id(t).ok_or_else(|| {
                    Error::model(format!(
                        "{}: no `{t}` token, which a new BART needs",
                        self.tokenizer.display()
                    ))
                })
            };
            let cfg = bart::config_json(self.size, vocab, id("<pad>")?, id("</s>")?);
            let w = bart::random_weights(&cfg, self.seed)?;
            write_folder(&cfg, &w, &self.tokenizer, out)?;
            return ModelConfig::from_json(&cfg.to_string(), &out.display().to_string());
        }
        let (cfg, weights) = match self.prior {
            Prior::Random => {
                let cfg = config(self.family, self.size, vocab);
                let w = random_weights(&cfg, self.seed)?;
                (cfg, w)
            }
            Prior::Copy => {
                let cfg = copy_prior::config(self.family, vocab)?;
                let w = copy_prior::weights(&cfg, self.seed)?;
                (cfg, w)
            }
        };
        write_model(&cfg, &weights, &self.tokenizer, out)?;
        Ok(cfg.model_config())
    }

    /// Make the model at `path` unless a model is already there.
    pub fn materialize(&self, path: &Path) -> Result<()> {
        if path.join(CONFIG).is_file() {
            return Ok(());
        }
        log::info!(
            "creating a {} {} model at {}",
            self.family,
            self.prior.describe(self.size),
            path.display()
        );
        self.write(path)?;
        Ok(())
    }
}
