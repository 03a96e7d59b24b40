//! The operators a plan's steps name. Each is built from its settings and the schema it receives —
//! building it is the validation: a missing column or a bad path fails here, before any work — and it
//! declares the schema it yields. At run time a transform ([`Operator`]) maps a record-batch stream to
//! a stream; a [`Sink`] (`write`, `train`) consumes one. Work in the background runs through
//! [`runtime`], so its errors and panics reach whoever reads its stream.

pub mod evaluate;
pub mod filter;
pub mod format;
pub mod generate;
pub mod runtime;
pub mod source;
pub mod tokenize;
pub mod train;
pub mod write;

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Schema, SchemaRef};
use datafusion::execution::SendableRecordBatchStream;
use futures::future::BoxFuture;

use crate::context::Context;
use crate::error::{closest, Result};
use crate::model::weights::ModelFiles;
use crate::model::{DeviceChoice, ModelConfig, ModelSource};
use crate::reports::RunStats;
use crate::row_ids::RowIdSet;
use crate::training::TrainSummary;

/// A transform step: a schema contract and a stream transform.
pub trait Operator: Send + Sync {
    fn name(&self) -> &'static str;
    /// The schema of the batches `execute` yields.
    fn schema(&self) -> SchemaRef;
    fn execute(
        &self,
        input: SendableRecordBatchStream,
        exec: &Exec,
    ) -> Result<SendableRecordBatchStream>;
    /// What the step will hold on each device, for steps that run a model.
    fn memory(&self) -> Option<MemoryEstimate> {
        None
    }
}

/// What a step will hold on each of its devices, estimated before it runs (`conala validate`).
#[derive(Debug, Clone)]
pub struct MemoryEstimate {
    /// What is estimated: the model, its dtype, the batch.
    pub what: String,
    /// The parts of the peak, per device.
    pub parts: Vec<(&'static str, u64)>,
    /// The peak per device.
    pub peak: u64,
    /// The devices the step runs on.
    pub devices: Vec<DeviceChoice>,
    /// The model's weights' dtype (a fit hint suggests bf16 only to an f32 model).
    pub dtype: candle_core::DType,
    /// The peak under other settings (with or without checkpointing), to compare.
    pub alternatives: Vec<(String, u64)>,
}

/// A step that consumes the stream at the end of a chain.
pub trait Sink: Send {
    fn name(&self) -> &'static str;

    /// The schema of what it stores, when it stores rows.
    fn schema(&self) -> Option<SchemaRef> {
        None
    }

    /// Check the destination before any row is read; the row ids an earlier run already finished,
    /// which the source then skips.
    fn prepare(&self) -> BoxFuture<'_, Result<Option<Arc<RowIdSet>>>> {
        Box::pin(async { Ok(None) })
    }

    /// What the sink will hold on each device, for sinks that run a model.
    fn memory(&self) -> Option<MemoryEstimate> {
        None
    }

    /// Consume every row; the report says what became of them.
    fn run<'a>(
        &'a mut self,
        input: SendableRecordBatchStream,
        exec: &'a Exec,
    ) -> BoxFuture<'a, Result<SinkReport>>;
}

/// What a sink produced.
#[derive(Debug)]
pub enum SinkReport {
    Write(write::WriteSummary),
    Train(Box<TrainSummary>),
}

/// What a running step may use besides its input: the run's counters and reports, how to report
/// progress, and the step's name for messages.
#[derive(Clone)]
pub struct Exec {
    pub stats: Arc<RunStats>,
    pub progress_bars: bool,
    /// `step N (operator)`, naming the step in errors (a panic in its background work included).
    pub step: String,
}

impl Exec {
    /// For work outside a plan's run (tools, benchmarks): counters of its own, no progress bars.
    pub fn detached(step: &str) -> Exec {
        Exec {
            stats: Arc::new(RunStats::default()),
            progress_bars: false,
            step: step.to_string(),
        }
    }

    /// The same run, for step `index` (0-based) named `operator`.
    pub fn for_step(&self, index: usize, operator: &str) -> Exec {
        Exec {
            step: format!("step {} ({operator})", index + 1),
            ..self.clone()
        }
    }
}

/// A problem with one step's settings found while building it: which key, and what is wrong. The plan
/// runner adds the file and step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError {
    pub key: Option<String>,
    pub message: String,
    pub suggestion: Option<String>,
}

impl StepError {
    pub fn at(key: &str, message: impl std::fmt::Display) -> Self {
        StepError {
            key: Some(key.to_string()),
            message: message.to_string(),
            suggestion: None,
        }
    }
    pub fn general(message: impl std::fmt::Display) -> Self {
        StepError {
            key: None,
            message: message.to_string(),
            suggestion: None,
        }
    }
}

pub type StepResult<T> = std::result::Result<T, StepError>;

/// Longest sequence a step may ask for (T5 models are trained on 512 tokens, UL2 on 2048). Buffers are
/// sized from these settings, so an absurd value must fail at validation, not as a huge allocation.
pub const MAX_SEQUENCE_TOKENS: usize = 1 << 16;

/// `key` must be at most `limit`.
pub fn at_most(key: &str, value: usize, limit: usize) -> StepResult<()> {
    if value > limit {
        return Err(StepError::at(
            key,
            format!("{value} is more than the limit of {limit}"),
        ));
    }
    Ok(())
}

/// The model a step uses must exist and be of a family conala runs when the plan is built, not after
/// rows were read: its files and config.
pub async fn check_model(
    model: &ModelSource,
    ctx: &Context,
) -> StepResult<(ModelFiles, ModelConfig)> {
    crate::model::load_config(model, &ctx.hub)
        .await
        .map_err(|e| StepError::general(format!("model: {e}")))
}

/// Look up a column the step needs; the error lists what the input has and suggests the closest name.
pub fn require_column<'a>(
    schema: &'a Schema,
    key: &str,
    column: &str,
) -> StepResult<&'a Arc<datafusion::arrow::datatypes::Field>> {
    match schema.fields().iter().find(|f| f.name() == column) {
        Some(f) => Ok(f),
        None => {
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            Err(StepError {
                key: Some(key.to_string()),
                message: format!(
                    "missing column `{column}` (the input has: {})",
                    names.join(", ")
                ),
                suggestion: closest(column, names.iter().copied()),
            })
        }
    }
}

/// Like [`require_column`], and the column must hold text.
pub fn require_text_column(schema: &Schema, key: &str, column: &str) -> StepResult<()> {
    let f = require_column(schema, key, column)?;
    match f.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Ok(()),
        other => Err(StepError::at(
            key,
            format!("column `{column}` holds {other}, expected text"),
        )),
    }
}

/// Columns an operator adds must not collide with existing ones.
pub fn require_new_column(schema: &Schema, key: &str, column: &str) -> StepResult<()> {
    if schema.field_with_name(column).is_ok() {
        return Err(StepError::at(
            key,
            format!("column `{column}` already exists; choose another output name"),
        ));
    }
    Ok(())
}
