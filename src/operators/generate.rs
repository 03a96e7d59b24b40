//! `generate`: decode a text column from token ids with the plan's model, fast.
//!
//! Rows are read in windows of `window_rows`; within a window identical inputs are generated once, the
//! rest are sorted by length and cut into batches by a token budget (`batch_tokens` = rows x padded
//! length, at most `max_batch_rows` rows), so little is spent on padding. A worker thread runs the model
//! while the next window is read and tokenized and earlier results are written. Each output row keeps
//! its input columns (and row id) and gains the text, its token ids, `n_input_tokens`,
//! `n_output_tokens`, `finish_reason` (eos | length | error) and `error`. Rows come out as their batch
//! finishes, or in input order with `keep_order: true`.
//!
//! A row that cannot be generated (null ids, an upstream error, a failure inside the model) is passed
//! through with `finish_reason = error` and a message; the run goes on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{
    Array, ArrayRef, Int32Array, ListArray, RecordBatch, StringArray, StringBuilder, UInt64Array,
};
use datafusion::arrow::compute::{
    concat_batches, interleave_record_batch, sort_to_indices, take_record_batch,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::tokenize::{ids_array, ids_field, ERROR, N_INPUT_TOKENS};
use super::{require_column, require_new_column, Exec, Operator, StepError, StepResult};
use crate::context::Context;
use crate::error::{from_stream_error, Error, Result};
use crate::hub::Hub;
use crate::model::decoding::{generate, DecodeOptions, Generated};
use crate::model::LoadedModel;
use crate::plans::spec::{GenerateSpec, ModelSpec};
use crate::progress::Progress;
use crate::rng::Rng;

pub const N_OUTPUT_TOKENS: &str = "n_output_tokens";
pub const FINISH_REASON: &str = "finish_reason";

/// Decoding settings from a plan step (sampling is on when asked for, or when a sampling parameter is
/// given without `do_sample`).
pub fn decode_options(spec: &GenerateSpec) -> StepResult<DecodeOptions> {
    let sampling_params =
        spec.temperature.is_some() || spec.top_p.is_some() || spec.top_k.is_some();
    let do_sample = spec.do_sample.unwrap_or(sampling_params);
    if spec.max_new_tokens == 0 {
        return Err(StepError::at("max_new_tokens", "must be at least 1"));
    }
    if spec.min_new_tokens > spec.max_new_tokens {
        return Err(StepError::at(
            "min_new_tokens",
            format!(
                "{} is more than max_new_tokens {}",
                spec.min_new_tokens, spec.max_new_tokens
            ),
        ));
    }
    if let Some(t) = spec.temperature {
        if t <= 0.0 {
            return Err(StepError::at(
                "temperature",
                "must be positive (use do_sample: false for greedy decoding)",
            ));
        }
    }
    if let Some(p) = spec.top_p {
        if !(0.0 < p && p <= 1.0) {
            return Err(StepError::at("top_p", "must be in (0, 1]"));
        }
    }
    if spec.repetition_penalty <= 0.0 {
        return Err(StepError::at(
            "repetition_penalty",
            "must be positive (1.0 = off)",
        ));
    }
    if spec.num_beams == 0 {
        return Err(StepError::at("num_beams", "must be at least 1"));
    }
    if spec.num_beams > 1 && do_sample {
        return Err(StepError::at(
            "num_beams",
            "beam search samples nothing: set do_sample: false (or num_beams: 1)",
        ));
    }
    if spec.batch_tokens == 0 || spec.max_batch_rows == 0 || spec.window_rows == 0 {
        return Err(StepError::at(
            "batch_tokens",
            "batch_tokens, max_batch_rows and window_rows must be positive",
        ));
    }
    Ok(DecodeOptions {
        max_new_tokens: spec.max_new_tokens,
        min_new_tokens: spec.min_new_tokens,
        do_sample,
        temperature: spec.temperature.unwrap_or(1.0),
        top_k: spec.top_k.unwrap_or(0),
        top_p: spec.top_p.unwrap_or(1.0),
        repetition_penalty: spec.repetition_penalty,
        no_repeat_ngram_size: spec.no_repeat_ngram_size,
        num_beams: spec.num_beams,
        length_penalty: spec.length_penalty,
        early_stopping: spec.early_stopping,
        encoder_batch_tokens: spec.encoder_batch_tokens.max(1),
    })
}

pub struct Generate {
    spec: GenerateSpec,
    model_spec: ModelSpec,
    options: DecodeOptions,
    hub: Arc<Hub>,
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
        // The model must exist and be a T5 now, not after the first window was read.
        let (files, cfg) = crate::model::load_config(model, &ctx.hub)
            .await
            .map_err(|e| StepError {
                key: None,
                message: format!("model: {e}"),
                suggestion: None,
            })?;
        if files.tokenizer.is_none() {
            return Err(StepError::general(format!(
                "model {}: no tokenizer.json to decode the output with",
                files.origin
            )));
        }
        crate::model::select_device(&model.device).map_err(|e| StepError {
            key: None,
            message: format!("model.device: {e}"),
            suggestion: None,
        })?;
        log::debug!("generate: {} ({} layers)", files.origin, cfg.num_layers);
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
            model_spec: model.clone(),
            options,
            hub: ctx.hub.clone(),
            input_schema: input,
            schema: Arc::new(Schema::new(fields)),
            row_id: row_id.to_string(),
        })
    }
}

/// A row inside a window: (batch index, row index).
type RowRef = (usize, usize);

/// Work for the model thread: rows to generate, plus rows that only pass through.
struct Job {
    window: Arc<Vec<RecordBatch>>,
    /// Rows to generate; `same[i]` are further rows with the same input as `rows[i]`.
    rows: Vec<RowRef>,
    same: Vec<Vec<RowRef>>,
    inputs: Vec<Vec<u32>>,
    seeds: Vec<u64>,
    /// Rows that pass through with an error.
    failed: Vec<(RowRef, String)>,
    last_of_window: bool,
}

struct Done {
    job: Job,
    results: Vec<std::result::Result<Generated, String>>,
}

/// Counters shared with the progress display.
#[derive(Default)]
struct Counters {
    rows: AtomicU64,
    tokens: AtomicU64,
    eos: AtomicU64,
    length: AtomicU64,
    errors: AtomicU64,
    generated_rows: AtomicU64,
}

impl Operator for Generate {
    fn name(&self) -> &'static str {
        "generate"
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn execute(
        &self,
        input: SendableRecordBatchStream,
        exec: &Exec,
    ) -> Result<SendableRecordBatchStream> {
        let (out_tx, out_rx) = mpsc::channel::<Result<RecordBatch>>(4);
        let run = Run {
            spec: self.spec.clone(),
            model_spec: self.model_spec.clone(),
            options: self.options.clone(),
            hub: self.hub.clone(),
            input_schema: self.input_schema.clone(),
            schema: self.schema.clone(),
            row_id: self.row_id.clone(),
            exec: exec.clone(),
        };
        tokio::spawn(async move {
            if let Err(e) = run.run(input, &out_tx).await {
                let _ = out_tx.send(Err(e)).await;
            }
        });
        let stream = futures::stream::unfold(out_rx, |mut rx| async move {
            rx.recv().await.map(|b| (b.map_err(Into::into), rx))
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            stream,
        )))
    }
}

struct Run {
    spec: GenerateSpec,
    model_spec: ModelSpec,
    options: DecodeOptions,
    hub: Arc<Hub>,
    input_schema: SchemaRef,
    schema: SchemaRef,
    row_id: String,
    exec: Exec,
}

impl Run {
    async fn run(
        self,
        mut input: SendableRecordBatchStream,
        out: &mpsc::Sender<Result<RecordBatch>>,
    ) -> Result<()> {
        let started = Instant::now();
        let loaded = crate::model::load(&self.model_spec, &self.hub).await?;
        let LoadedModel {
            mut model,
            tokenizer,
            files,
            hash,
            adapter_hash,
        } = loaded;
        model.prepare_for_inference()?;
        let tokenizer = tokenizer
            .ok_or_else(|| Error::model(format!("{}: no tokenizer.json", files.origin)))?;
        self.exec.stats.set_extra(
            "generate",
            serde_json::json!({
                "model": files.origin, "model_hash": hash, "adapter": self.model_spec.adapter,
                "adapter_hash": adapter_hash, "dtype": format!("{:?}", model.dtype), "device": format!("{:?}", model.device),
                "settings": self.spec,
            }),
        );
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let progress = Progress::start(
            "generate",
            "rows",
            self.exec.progress_bars,
            None,
            move || {
                (
                    c.rows.load(Ordering::Relaxed),
                    Some(c.tokens.load(Ordering::Relaxed)),
                )
            },
        );

        // The model thread: jobs in, results out, in order.
        let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<Job>(2);
        let (done_tx, mut done_rx) = mpsc::channel::<Done>(2);
        let options = self.options.clone();
        let worker = std::thread::Builder::new()
            .name("conala-generate".into())
            .spawn(move || {
                for job in job_rx {
                    let refs: Vec<&[u32]> = job.inputs.iter().map(|v| v.as_slice()).collect();
                    let results = match crate::model::on_compute_pool(|| {
                        generate(&model, &refs, &job.seeds, &options)
                    }) {
                        Ok(r) => r.into_iter().map(Ok).collect(),
                        // A failing batch: retry its rows one by one so one bad row fails alone.
                        Err(batch_err) => refs
                            .iter()
                            .zip(&job.seeds)
                            .map(|(r, s)| {
                                generate(&model, &[r], &[*s], &options)
                                    .map(|mut v| v.remove(0))
                                    .map_err(|e| {
                                        format!("generation failed: {e} (batch error: {batch_err})")
                                    })
                            })
                            .collect(),
                    };
                    if done_tx.blocking_send(Done { job, results }).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| Error::Run(format!("starting the generation thread: {e}")))?;

        // Results are turned into output batches while the model works on the next jobs.
        let emitter = {
            let schema = self.schema.clone();
            let out = out.clone();
            let counters = counters.clone();
            let keep_order = self.spec.keep_order;
            let row_id = self.row_id.clone();
            let input_schema = self.input_schema.clone();
            let input_col = self.spec.input.clone();
            tokio::spawn(async move {
                let mut pending: Vec<RecordBatch> = vec![];
                while let Some(done) = done_rx.recv().await {
                    let last = done.job.last_of_window;
                    let batch = assemble(
                        &done,
                        &schema,
                        &input_schema,
                        &input_col,
                        &tokenizer,
                        &counters,
                    )?;
                    if keep_order {
                        pending.push(batch);
                        if last {
                            let all = concat_batches(&schema, &pending)
                                .map_err(|e| Error::arrow("generate", e))?;
                            pending.clear();
                            let ids = all.column_by_name(&row_id).expect("row id kept");
                            let order = sort_to_indices(ids, None, None)
                                .map_err(|e| Error::arrow("generate", e))?;
                            let sorted = take_record_batch(&all, &order)
                                .map_err(|e| Error::arrow("generate", e))?;
                            if out.send(Ok(sorted)).await.is_err() {
                                return Ok(());
                            }
                        }
                    } else if batch.num_rows() > 0 && out.send(Ok(batch)).await.is_err() {
                        return Ok(());
                    }
                }
                Ok::<(), Error>(())
            })
        };

        // Read windows and cut them into jobs.
        let mut window: Vec<RecordBatch> = vec![];
        let mut rows_in_window = 0usize;
        let mut send_error: Option<Error> = None;
        loop {
            let next = input.next().await;
            let end = next.is_none();
            if let Some(b) = next {
                let b = b.map_err(from_stream_error)?;
                rows_in_window += b.num_rows();
                window.push(b);
            }
            if (rows_in_window >= self.spec.window_rows || end) && rows_in_window > 0 {
                let jobs = self.plan_window(std::mem::take(&mut window))?;
                rows_in_window = 0;
                for job in jobs {
                    let tx = job_tx.clone();
                    // The model thread may be busy: wait for it off the async runtime.
                    let sent = tokio::task::spawn_blocking(move || tx.send(job).is_ok()).await;
                    if !matches!(sent, Ok(true)) {
                        send_error = Some(Error::Run("the generation thread stopped".into()));
                        break;
                    }
                }
            }
            if end || send_error.is_some() {
                break;
            }
        }
        drop(job_tx);
        let emitted = emitter
            .await
            .map_err(|e| Error::Run(format!("generate output task: {e}")))?;
        let _ = worker.join();
        progress.finish();
        emitted?;
        if let Some(e) = send_error {
            return Err(e);
        }
        let secs = started.elapsed().as_secs_f64();
        let (rows, tokens) = (
            counters.rows.load(Ordering::Relaxed),
            counters.tokens.load(Ordering::Relaxed),
        );
        let mut extra = self
            .exec
            .stats
            .extra()
            .get("generate")
            .cloned()
            .unwrap_or_default();
        extra["rows"] = rows.into();
        extra["generated_rows"] = counters.generated_rows.load(Ordering::Relaxed).into();
        extra["generated_tokens"] = tokens.into();
        extra["seconds"] = secs.into();
        extra["rows_per_second"] = (rows as f64 / secs).into();
        extra["tokens_per_second"] = (tokens as f64 / secs).into();
        extra["finish_reason"] = serde_json::json!({
            "eos": counters.eos.load(Ordering::Relaxed),
            "length": counters.length.load(Ordering::Relaxed),
            "error": counters.errors.load(Ordering::Relaxed),
        });
        self.exec.stats.set_extra("generate", extra);
        Ok(())
    }

    /// Dedup, sort by length and batch one window's rows.
    fn plan_window(&self, batches: Vec<RecordBatch>) -> Result<Vec<Job>> {
        let window = Arc::new(batches);
        let mut failed: Vec<(RowRef, String)> = vec![];
        let mut unique: Vec<(Vec<u32>, RowRef, u64)> = vec![];
        let mut same: Vec<Vec<RowRef>> = vec![];
        let mut seen: HashMap<Vec<u32>, usize> = HashMap::new();
        let dedup = self.spec.dedup && !self.options.do_sample;
        for (bi, b) in window.iter().enumerate() {
            let ids = b
                .column_by_name(&self.spec.input)
                .and_then(|c| c.as_any().downcast_ref::<ListArray>())
                .ok_or_else(|| {
                    Error::Data(format!(
                        "generate: column `{}` is not list<int32>",
                        self.spec.input
                    ))
                })?;
            let errors = b
                .column_by_name(ERROR)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned());
            let row_ids = b
                .column_by_name(&self.row_id)
                .and_then(|c| c.as_any().downcast_ref::<UInt64Array>().cloned());
            for r in 0..b.num_rows() {
                if let Some(e) = errors.as_ref().filter(|e| e.is_valid(r)) {
                    failed.push(((bi, r), e.value(r).to_string()));
                    continue;
                }
                if ids.is_null(r) {
                    failed.push(((bi, r), format!("no input: `{}` is null", self.spec.input)));
                    continue;
                }
                let v = ids.value(r);
                let v = v
                    .as_any()
                    .downcast_ref::<Int32Array>()
                    .expect("list<int32>");
                if v.is_empty() {
                    failed.push(((bi, r), "empty input".to_string()));
                    continue;
                }
                let toks: Vec<u32> = v.values().iter().map(|&x| x as u32).collect();
                let row_id = row_ids.as_ref().map(|a| a.value(r)).unwrap_or(0);
                if dedup {
                    if let Some(&u) = seen.get(&toks) {
                        same[u].push((bi, r));
                        continue;
                    }
                    seen.insert(toks.clone(), unique.len());
                }
                unique.push((toks, (bi, r), row_id));
                same.push(vec![]);
            }
        }
        // Longest first: the biggest batch runs first (memory problems show at once), and each batch's
        // first row sets its padded length.
        let mut order: Vec<usize> = (0..unique.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(unique[i].0.len()));
        let mut jobs: Vec<Job> = vec![];
        let mut i = 0;
        while i < order.len() {
            let padded = unique[order[i]].0.len();
            let mut j = i;
            while j < order.len()
                && j - i < self.spec.max_batch_rows
                && (j - i + 1) * padded <= self.spec.batch_tokens.max(padded)
            {
                j += 1;
            }
            let mut job = Job {
                window: window.clone(),
                rows: vec![],
                same: vec![],
                inputs: vec![],
                seeds: vec![],
                failed: vec![],
                last_of_window: false,
            };
            for &k in &order[i..j] {
                let (toks, at, row_id) = &unique[k];
                job.rows.push(*at);
                job.same.push(std::mem::take(&mut same[k]));
                job.inputs.push(toks.clone());
                job.seeds
                    .push(Rng::derive(self.spec.seed, *row_id).next_u64());
            }
            jobs.push(job);
            i = j;
        }
        let mut tail = Job {
            window: window.clone(),
            rows: vec![],
            same: vec![],
            inputs: vec![],
            seeds: vec![],
            failed,
            last_of_window: true,
        };
        if tail.failed.is_empty() {
            if let Some(last) = jobs.last_mut() {
                last.last_of_window = true;
                return Ok(jobs);
            }
        }
        tail.last_of_window = true;
        jobs.push(tail);
        Ok(jobs)
    }
}

/// Output rows for a finished job: its rows' input columns plus the generated columns.
fn assemble(
    done: &Done,
    schema: &SchemaRef,
    input_schema: &SchemaRef,
    input_col: &str,
    tok: &tokenizers::Tokenizer,
    counters: &Counters,
) -> Result<RecordBatch> {
    let job = &done.job;
    let mut refs: Vec<RowRef> = vec![];
    let mut texts: Vec<Option<String>> = vec![];
    let mut ids: Vec<Option<Vec<u32>>> = vec![];
    let mut finish: Vec<&'static str> = vec![];
    let mut errors: Vec<Option<String>> = vec![];
    for (i, res) in done.results.iter().enumerate() {
        let group = std::iter::once(job.rows[i]).chain(job.same[i].iter().copied());
        match res {
            Ok(g) => {
                let text = tok
                    .decode(&g.tokens, true)
                    .map_err(|e| Error::Tokenizer(format!("decoding output: {e}")))?;
                counters.generated_rows.fetch_add(1, Ordering::Relaxed);
                counters
                    .tokens
                    .fetch_add(g.tokens.len() as u64, Ordering::Relaxed);
                for r in group {
                    refs.push(r);
                    texts.push(Some(text.clone()));
                    ids.push(Some(g.tokens.clone()));
                    finish.push(g.finish.as_str());
                    errors.push(None);
                    match g.finish {
                        crate::model::decoding::Finish::Eos => {
                            counters.eos.fetch_add(1, Ordering::Relaxed)
                        }
                        crate::model::decoding::Finish::Length => {
                            counters.length.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            }
            Err(e) => {
                for r in group {
                    refs.push(r);
                    texts.push(None);
                    ids.push(None);
                    finish.push("error");
                    errors.push(Some(e.clone()));
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    for (r, e) in &job.failed {
        refs.push(*r);
        texts.push(None);
        ids.push(None);
        finish.push("error");
        errors.push(Some(e.clone()));
        counters.errors.fetch_add(1, Ordering::Relaxed);
    }
    counters
        .rows
        .fetch_add(refs.len() as u64, Ordering::Relaxed);
    if refs.is_empty() {
        return Ok(RecordBatch::new_empty(schema.clone()));
    }
    let sources: Vec<&RecordBatch> = job.window.iter().collect();
    let base = interleave_record_batch(&sources, &refs)
        .map_err(|e| Error::arrow("generate: gathering rows", e))?;
    let mut cols: Vec<ArrayRef> = base.columns().to_vec();
    let mut text_b = StringBuilder::new();
    for t in &texts {
        text_b.append_option(t.as_deref());
    }
    cols.push(Arc::new(text_b.finish()));
    let (ids_arr, n_out) = ids_array(&ids);
    cols.push(ids_arr);
    if input_schema.field_with_name(N_INPUT_TOKENS).is_err() {
        let l = base
            .column_by_name(input_col)
            .and_then(|c| c.as_any().downcast_ref::<ListArray>().cloned())
            .expect("input ids column");
        let n: Vec<Option<i32>> = (0..l.len())
            .map(|i| l.is_valid(i).then(|| l.value_length(i)))
            .collect();
        cols.push(Arc::new(Int32Array::from(n)));
    }
    cols.push(n_out);
    cols.push(Arc::new(StringArray::from(finish)));
    let err_arr: ArrayRef = Arc::new(StringArray::from(
        errors.iter().map(|e| e.as_deref()).collect::<Vec<_>>(),
    ));
    match input_schema.index_of(ERROR) {
        Ok(i) => {
            // Keep upstream messages; add ours.
            let up = base
                .column(i)
                .as_any()
                .downcast_ref::<StringArray>()
                .cloned();
            let merged: Vec<Option<String>> = (0..refs.len())
                .map(|k| {
                    errors[k].clone().or_else(|| {
                        up.as_ref()
                            .filter(|u| u.is_valid(k))
                            .map(|u| u.value(k).to_string())
                    })
                })
                .collect();
            cols[i] = Arc::new(StringArray::from(merged));
        }
        Err(_) => cols.push(err_arr),
    }
    RecordBatch::try_new(schema.clone(), cols)
        .map_err(|e| Error::arrow("generate: output batch", e))
}
