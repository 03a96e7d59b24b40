//! One run of `generate`: load the model, then three things at once — reading windows and cutting them
//! into jobs, the model worker generating them, and the assembly of finished jobs into output
//! batches — joined at the end, so an error or panic in any of them fails the step.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::{concat_batches, sort_to_indices, take_record_batch};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::execution::SendableRecordBatchStream;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::assemble::{assemble, Counters, Done};
use super::batcher::{Batcher, Job};
use crate::error::{from_stream_error, row_message, Error, Result};
use crate::hub::Hub;
use crate::model::decoding::{generate, DecodeOptions};
use crate::model::device::free_memory;
use crate::model::memory::{DecodeFootprint, CPU_BATCH_TOKENS};
use crate::model::{ops, LoadedModel, ModelSource, Seq2Seq};
use crate::operators::runtime::{self, Emitter};
use crate::operators::Exec;
use crate::plans::spec::{BatchTokens, GenerateSpec};
use crate::progress::Progress;
use crate::reports::GenerateReport;

/// Everything a run of the step needs.
pub(super) struct Run {
    pub spec: GenerateSpec,
    pub model: ModelSource,
    pub options: DecodeOptions,
    pub hub: Arc<Hub>,
    pub input_schema: SchemaRef,
    pub schema: SchemaRef,
    pub row_id: String,
    pub exec: Exec,
}

impl Run {
    pub async fn run(self, mut input: SendableRecordBatchStream, out: Emitter) -> Result<()> {
        let started = Instant::now();
        let LoadedModel {
            mut model,
            tokenizer,
            files,
            hash,
            adapter_hash,
        } = crate::model::load(&self.model, &self.hub).await?;
        model.prepare_for_inference()?;
        let load_seconds = started.elapsed().as_secs_f64();
        let batch_tokens = self.batch_tokens(model.as_ref());
        let tokenizer = tokenizer
            .ok_or_else(|| Error::model(format!("{}: no tokenizer.json", files.origin)))?;
        let (dtype, device) = (
            format!("{:?}", model.dtype()),
            format!("{:?}", model.device()),
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

        let (job_tx, job_rx) = mpsc::channel::<Job>(2);
        let (done_tx, done_rx) = mpsc::channel::<Done>(2);
        let worker = runtime::spawn_worker({
            let options = self.options.clone();
            move || work(model.as_ref(), &options, job_rx, done_tx)
        });
        let assembler = tokio::spawn(
            Assembler {
                schema: self.schema.clone(),
                input_schema: self.input_schema.clone(),
                input: self.spec.input.clone(),
                row_id: self.row_id.clone(),
                keep_order: self.spec.keep_order,
                tokenizer,
                counters: counters.clone(),
                out,
            }
            .run(done_rx),
        );
        let fed = self.feed(&mut input, &job_tx, batch_tokens).await;
        drop(job_tx);
        // The worker's and the assembler's own failures explain a feed that stopped early.
        let worker = runtime::join(&format!("{}: model worker", self.exec.step), worker).await;
        let assembled = runtime::join(&format!("{}: output", self.exec.step), assembler).await;
        progress.finish();
        worker?;
        assembled?;
        fed?;

        let secs = started.elapsed().as_secs_f64();
        let (rows, tokens) = (
            counters.rows.load(Ordering::Relaxed),
            counters.tokens.load(Ordering::Relaxed),
        );
        let report = GenerateReport {
            model: files.origin,
            model_hash: hash,
            adapter: self.model.adapter.clone(),
            adapter_hash,
            dtype,
            device,
            settings: self.spec.clone(),
            rows,
            generated_rows: counters.generated_rows.load(Ordering::Relaxed),
            generated_tokens: tokens,
            seconds: secs,
            load_seconds,
            rows_per_second: rows as f64 / secs,
            tokens_per_second: tokens as f64 / secs,
            finish_reason: counters.finish_counts(),
        };
        self.exec.stats.report(|r| r.generate = Some(report));
        Ok(())
    }

    /// The batches' token budget: as set, or from the device's free memory and the model's shape.
    fn batch_tokens(&self, model: &dyn Seq2Seq) -> usize {
        let BatchTokens::Fixed(n) = self.spec.batch_tokens else {
            let Some(free) = free_memory(model.device()) else {
                return CPU_BATCH_TOKENS;
            };
            let o = &self.options;
            let footprint = DecodeFootprint::new(
                model.config(),
                model.dtype(),
                o.max_new_tokens,
                o.num_beams,
                o.encoder_batch_tokens,
            );
            let tokens = footprint.batch_tokens(free, self.spec.max_batch_rows);
            log::info!(
                "generate: batch_tokens auto: {tokens} ({} MB free on the device)",
                free >> 20
            );
            return tokens;
        };
        n
    }

    /// Read windows of rows and hand their jobs to the worker.
    async fn feed(
        &self,
        input: &mut SendableRecordBatchStream,
        jobs: &mpsc::Sender<Job>,
        batch_tokens: usize,
    ) -> Result<()> {
        let batcher = Batcher {
            input: self.spec.input.clone(),
            row_id: self.row_id.clone(),
            dedup: self.spec.dedup && !self.options.do_sample,
            seed: self.spec.seed,
            batch_tokens,
            max_batch_rows: self.spec.max_batch_rows,
        };
        let mut window: Vec<RecordBatch> = vec![];
        let mut rows_in_window = 0usize;
        // One batch is read ahead, so the last window is known to be the last when it is cut.
        let mut next = input.next().await;
        while let Some(b) = next {
            let b = b.map_err(from_stream_error)?;
            rows_in_window += b.num_rows();
            window.push(b);
            next = input.next().await;
            let end = next.is_none();
            if (rows_in_window >= self.spec.window_rows || end) && rows_in_window > 0 {
                for job in batcher.plan_window(std::mem::take(&mut window), end)? {
                    if jobs.send(job).await.is_err() {
                        return Err(Error::Run(format!(
                            "{}: the model worker stopped early",
                            self.exec.step
                        )));
                    }
                }
                rows_in_window = 0;
            }
        }
        Ok(())
    }
}

/// Turns finished jobs into output batches, while the worker runs the next ones.
struct Assembler {
    schema: SchemaRef,
    input_schema: SchemaRef,
    /// The token-id column.
    input: String,
    row_id: String,
    keep_order: bool,
    tokenizer: tokenizers::Tokenizer,
    counters: Arc<Counters>,
    out: Emitter,
}

impl Assembler {
    /// Turn finished jobs into output batches (in input order per window with `keep_order`).
    async fn run(self, mut done_rx: mpsc::Receiver<Done>) -> Result<()> {
        let mut pending: Vec<RecordBatch> = vec![];
        while let Some(done) = done_rx.recv().await {
            let last = done.job.last_of_window;
            let batch = assemble(
                &done,
                &self.schema,
                &self.input_schema,
                &self.input,
                &self.tokenizer,
                &self.counters,
            )?;
            if !self.keep_order {
                if batch.num_rows() > 0 && !self.out.send(batch).await {
                    return Ok(());
                }
                continue;
            }
            pending.push(batch);
            if last {
                let all = concat_batches(&self.schema, &pending)
                    .map_err(|e| Error::arrow("generate", e))?;
                pending.clear();
                let ids = all.column_by_name(&self.row_id).ok_or_else(|| {
                    Error::Data(format!("generate: no row id column `{}`", self.row_id))
                })?;
                let order =
                    sort_to_indices(ids, None, None).map_err(|e| Error::arrow("generate", e))?;
                let sorted =
                    take_record_batch(&all, &order).map_err(|e| Error::arrow("generate", e))?;
                if !self.out.send(sorted).await {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// The model worker: jobs in, results out, in order, on the compute pool.
fn work(
    model: &dyn Seq2Seq,
    options: &DecodeOptions,
    mut jobs: mpsc::Receiver<Job>,
    done: mpsc::Sender<Done>,
) -> Result<()> {
    while let Some(job) = jobs.blocking_recv() {
        if job.last_of_input {
            crate::faults::panic_if_injected("generate-last-batch");
        }
        let refs: Vec<&[u32]> = job.inputs.iter().map(|v| v.as_slice()).collect();
        let results = match ops::on_compute_pool(|| generate(model, &refs, &job.seeds, options)) {
            Ok(r) => r.into_iter().map(Ok).collect(),
            // A failing batch: retry its rows one by one so one bad row fails alone.
            Err(batch_err) => refs
                .iter()
                .zip(&job.seeds)
                .map(|(r, s)| {
                    generate(model, &[r], &[*s], options)
                        .map(|mut v| v.remove(0))
                        .map_err(|e| {
                            format!(
                                "generation failed: {} (batch error: {})",
                                row_message(&e),
                                row_message(&batch_err)
                            )
                        })
                })
                .collect(),
        };
        if done.blocking_send(Done { job, results }).is_err() {
            return Ok(());
        }
    }
    Ok(())
}
