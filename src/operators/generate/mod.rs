//! `generate`: decode a text column from token ids with the plan's model, fast.
//!
//! Rows are read in windows of `window_rows` and cut into jobs ([`batcher`]): identical inputs once,
//! sorted by length, batched by a token budget. A model worker runs the jobs while the next window is
//! read and earlier results are assembled into output batches ([`assemble`]). Each output row keeps its
//! input columns (and row id) and gains the text, its token ids, `n_input_tokens`, `n_output_tokens`,
//! `finish_reason` (eos | length | error) and `error`. Rows come out as their batch finishes, or in
//! input order with `keep_order: true`.
//!
//! A row that cannot be generated (null ids, an upstream error, a failure inside the model) is passed
//! through with `finish_reason = error` and a message; the run goes on. A panic in the worker fails the
//! run (see [`super::runtime`]).

mod assemble;
mod batcher;
mod options;
mod run;

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::execution::SendableRecordBatchStream;

use self::run::Run;
use super::tokenize::{ids_field, ERROR, N_INPUT_TOKENS};
use super::{
    check_model, require_column, require_new_column, runtime, Exec, MemoryEstimate, Operator,
    StepError, StepResult,
};
use crate::context::Context;
use crate::error::Result;
use crate::hub::Hub;
use crate::model::decoding::DecodeOptions;
use crate::model::memory::{parameters_text, DecodeFootprint, CPU_BATCH_TOKENS};
use crate::model::{DeviceChoice, ModelConfig, ModelSource};
use crate::plans::spec::{BatchTokens, GenerateSpec, ModelSpec};

pub use options::decode_options;

pub const N_OUTPUT_TOKENS: &str = "n_output_tokens";
pub const FINISH_REASON: &str = "finish_reason";

pub struct Generate {
    spec: GenerateSpec,
    model: ModelSource,
    options: DecodeOptions,
    hub: Arc<Hub>,
    cfg: ModelConfig,
    input_schema: SchemaRef,
    schema: SchemaRef,
    row_id: String,
}

impl Generate {
    pub async fn new(
        spec: &GenerateSpec,
        input: SchemaRef,
        model: Option<&ModelSpec>,
        row_id: &str,
        ctx: &Context,
    ) -> StepResult<Generate> {
        let Some(model) = model else {
            return Err(StepError::general(
                "`generate` needs the plan's `model: { path: ... }`",
            ));
        };
        let options = decode_options(spec)?;
        if spec.do_sample.is_none() && options.do_sample {
            log::info!(
                "generate: temperature/top_p/top_k given without do_sample, so conala samples \
                 (HF transformers would ignore them and decode greedily; set do_sample: false for that)"
            );
        }
        let f = require_column(&input, "input", &spec.input)?;
        if !matches!(f.data_type(), DataType::List(inner) if inner.data_type() == &DataType::Int32)
        {
            return Err(StepError::at(
                "input",
                format!(
                    "column `{}` holds {}, expected token ids (list<int32>) from `tokenize`",
                    spec.input,
                    f.data_type()
                ),
            ));
        }
        require_new_column(&input, "output", &spec.output)?;
        let ids_col = format!("{}_ids", spec.output);
        for c in [ids_col.as_str(), N_OUTPUT_TOKENS, FINISH_REASON] {
            require_new_column(&input, "output", c)?;
        }
        let model = model.source();
        let (files, cfg) = check_model(&model, ctx).await?;
        if let Some(max) = cfg.max_positions {
            // The decoder reads the start token and every generated token but the last.
            if options.max_new_tokens > max {
                return Err(StepError::at(
                    "max_new_tokens",
                    format!(
                        "{} is more than the model's max_position_embeddings {max}",
                        options.max_new_tokens
                    ),
                ));
            }
        }
        if files.tokenizer.is_none() {
            return Err(StepError::general(format!(
                "model {}: no tokenizer (tokenizer.json, vocab.json + merges.txt, or spiece.model) to decode the output with",
                files.origin
            )));
        }
        if !ctx.plan_only {
            model.device.resolve().map_err(|e| StepError {
                key: None,
                message: format!("model.device: {e}"),
                suggestion: None,
            })?;
        }
        log::debug!(
            "generate: {} ({}, {} layers)",
            files.origin,
            cfg.model_type,
            cfg.shape.encoder_layers
        );
        let mut fields: Vec<Arc<Field>> = input.fields().iter().cloned().collect();
        fields.push(Arc::new(Field::new(&spec.output, DataType::Utf8, true)));
        fields.push(Arc::new(ids_field(&ids_col)));
        if input.field_with_name(N_INPUT_TOKENS).is_err() {
            fields.push(Arc::new(Field::new(N_INPUT_TOKENS, DataType::Int32, true)));
        }
        fields.push(Arc::new(Field::new(N_OUTPUT_TOKENS, DataType::Int32, true)));
        fields.push(Arc::new(Field::new(FINISH_REASON, DataType::Utf8, false)));
        if input.field_with_name(ERROR).is_err() {
            fields.push(Arc::new(Field::new(ERROR, DataType::Utf8, true)));
        }
        Ok(Generate {
            spec: spec.clone(),
            model,
            options,
            hub: ctx.hub.clone(),
            cfg,
            input_schema: input,
            schema: Arc::new(Schema::new(fields)),
            row_id: row_id.to_string(),
        })
    }
}

impl Generate {
    /// The model's vocabulary (its embedding rows): token ids must stay below it.
    pub fn model_vocab(&self) -> usize {
        self.cfg.vocab_size
    }
}

impl Operator for Generate {
    fn name(&self) -> &'static str {
        "generate"
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// The weights and a batch at its peak. With `batch_tokens: auto` on a GPU batches fill the free
    /// memory whatever it is, so the estimate is the least that runs: one row of 512 tokens.
    fn memory(&self) -> Option<MemoryEstimate> {
        let device = self.model.device;
        let dtype = self.model.dtype.planned(device);
        let gpu = device.is_cuda() || device == DeviceChoice::Metal;
        let (tokens, auto) = match self.spec.batch_tokens {
            BatchTokens::Fixed(n) => (n, false),
            BatchTokens::Auto if !gpu => (CPU_BATCH_TOKENS, false),
            BatchTokens::Auto => (512, true),
        };
        let o = &self.options;
        let f = DecodeFootprint::new(
            &self.cfg,
            dtype,
            o.max_new_tokens,
            o.num_beams,
            o.encoder_batch_tokens,
        );
        let rows = self.spec.max_batch_rows.min(tokens).max(1);
        let weights = self.cfg.parameter_count() * dtype.size_in_bytes() as u64;
        let batch = f.bytes(tokens, rows);
        Some(MemoryEstimate {
            dtype,
            what: format!(
                "{} ({}) in {dtype:?}; {}, up to {rows} rows x {} beam(s) x {} new tokens",
                self.model.path,
                parameters_text(&self.cfg),
                if auto {
                    "batch_tokens auto (batches grow to fill 85% of free memory; at least 512 tokens)"
                        .to_string()
                } else {
                    format!("batches of {tokens} input tokens")
                },
                o.num_beams.max(1),
                o.max_new_tokens,
            ),
            parts: vec![
                ("weights", weights),
                (
                    "encoder output + cross-attention cache",
                    tokens as u64 * f.per_input_token,
                ),
                ("self-attention cache + logits", rows as u64 * f.per_row),
                ("encoder working set", f.encoder_reserve),
            ],
            peak: weights + batch,
            devices: vec![self.model.device],
            alternatives: vec![],
        })
    }

    fn execute(
        &self,
        input: SendableRecordBatchStream,
        exec: &Exec,
    ) -> Result<SendableRecordBatchStream> {
        let run = Run {
            spec: self.spec.clone(),
            model: self.model.clone(),
            options: self.options.clone(),
            hub: self.hub.clone(),
            input_schema: self.input_schema.clone(),
            schema: self.schema.clone(),
            row_id: self.row_id.clone(),
            exec: exec.clone(),
        };
        Ok(runtime::spawn_stage(
            &exec.step,
            self.schema.clone(),
            4,
            |out| run.run(input, out),
        ))
    }
}
