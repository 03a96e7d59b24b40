//! The YAML schema of a plan: what each key means, its type and its default.
//!
//! A plan is `name`, an optional `model` block and an ordered list of `steps`, each a one-key mapping
//! from an operator name to its settings. Unknown keys are errors (see `plans::load`).

mod generate;
mod model;
mod push;
mod source;
mod train;
mod transforms;
mod write;

use serde::Serialize;

pub use generate::{BatchTokens, GenerateSpec};
pub use model::{InitSpec, ModelSpec};
pub use push::PushSpec;
pub use source::{default_row_id, FileFormat, SourceSpec};
pub use train::{Devices, EvalSpec, TrainSpec};
pub use transforms::{EvaluateSpec, FilterSpec, FormatSpec, OnNull, TokenizeSpec};
pub use write::{Compression, WriteMode, WriteSpec};

/// The operators a step may name, in the order they usually appear.
pub const OPERATORS: &[&str] = &[
    "source", "filter", "format", "tokenize", "generate", "evaluate", "train", "write",
];

/// Top-level keys of a plan file.
pub const PLAN_KEYS: &[&str] = &["name", "description", "model", "steps"];

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSpec>,
    pub steps: Vec<Step>,
    /// The file the plan came from (for error messages); `<embedded>` for built-in plans.
    #[serde(skip)]
    pub file: String,
}

impl Plan {
    pub fn steps_named<'a>(&'a self, op: &'a str) -> impl Iterator<Item = (usize, &'a Step)> + 'a {
        self.steps
            .iter()
            .enumerate()
            .filter(move |(_, s)| s.operator() == op)
    }
    pub fn has_generate(&self) -> bool {
        self.steps.iter().any(|s| matches!(s, Step::Generate(_)))
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    Source(SourceSpec),
    Filter(FilterSpec),
    Format(FormatSpec),
    Tokenize(TokenizeSpec),
    Generate(GenerateSpec),
    Evaluate(EvaluateSpec),
    Train(Box<TrainSpec>),
    Write(WriteSpec),
}

impl Step {
    pub fn operator(&self) -> &'static str {
        match self {
            Step::Source(_) => "source",
            Step::Filter(_) => "filter",
            Step::Format(_) => "format",
            Step::Tokenize(_) => "tokenize",
            Step::Generate(_) => "generate",
            Step::Evaluate(_) => "evaluate",
            Step::Train(_) => "train",
            Step::Write(_) => "write",
        }
    }
}

pub fn yes() -> bool {
    true
}
fn one_f64() -> f64 {
    1.0
}
fn one_usize() -> usize {
    1
}
fn one_u64() -> u64 {
    1
}
