//! From a typed plan to a running chain of operators.
//!
//! [`build`] opens the source, builds every operator against the schema its predecessor declares, and
//! checks the order of steps — all before any row is read, so `conala validate` and `conala run` fail
//! the same way on a bad plan. [`Pipeline::run`] streams the rows through the chain into the sink.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;

use super::spec::{Plan, Step};
use crate::context::Context;
use crate::error::{Error, PlanError, PlanLocation, Result};
use crate::operators::evaluate::Evaluate;
use crate::operators::filter::Filter;
use crate::operators::format::Format;
use crate::operators::generate::Generate;
use crate::operators::source::Source;
use crate::operators::tokenize::Tokenize;
use crate::operators::train::{EvalRows, Train, TrainContext};
use crate::operators::write::{Provenance, Write, WriteSummary};
use crate::operators::{Exec, MemoryEstimate, Operator, Sink, SinkReport, StepError};
use crate::progress::Progress;
use crate::reports::{RunStats, StepReports};

/// A transform and its step's index in the plan.
type Transforms = Vec<(usize, Box<dyn Operator>)>;

/// A validated plan, ready to run.
pub struct Pipeline {
    pub plan: Plan,
    source: Source,
    transforms: Transforms,
    sink: Box<dyn Sink>,
}

/// What a run did, for the CLI's summary.
#[derive(Debug)]
pub struct RunSummary {
    pub plan_name: String,
    /// Rows out of each step (`N:operator`, in step order; the eval rows' `eval N:operator` after).
    pub rows_per_step: Vec<(String, u64)>,
    pub write: Option<WriteSummary>,
    /// What the steps reported (generation speed, scores, the training outcome).
    pub reports: StepReports,
    pub seconds: f64,
}

/// The source's rows until a signal asks the run to stop: then the stream ends, the steps finish
/// the rows in flight and the sink writes them (and reports the stop).
fn stop_on_signal(stream: SendableRecordBatchStream) -> SendableRecordBatchStream {
    let schema = stream.schema();
    let until =
        stream.take_while(|_| futures::future::ready(crate::interrupt::requested().is_none()));
    Box::pin(RecordBatchStreamAdapter::new(schema, until))
}

fn located(plan: &Plan, i: usize, e: StepError) -> Error {
    PlanError {
        at: PlanLocation {
            file: plan.file.clone(),
            step: Some((i, plan.steps[i].operator().to_string())),
            key: e.key,
        },
        message: e.message,
        suggestion: e.suggestion,
    }
    .into()
}

fn order_error(plan: &Plan, i: usize, message: impl Into<String>) -> Error {
    located(plan, i, StepError::general(message.into()))
}

/// The tokenizer's vocabulary of the last `tokenize` step before a model step: (step, size).
type TokenizerVocab = Option<(usize, usize)>;

/// A model step fed ids from a larger tokenizer would index past its embedding on some rows: refuse
/// the plan at the `tokenize` step instead of failing rows one by one.
fn check_vocab(plan: &Plan, vocab: TokenizerVocab, model_vocab: usize) -> Result<()> {
    match vocab {
        Some((i, n)) if n > model_vocab => Err(located(
            plan,
            i,
            StepError::at(
                "tokenizer",
                format!(
                    "the tokenizer has {n} tokens but the model's vocabulary has {model_vocab} \
                     (config.json vocab_size): ids from {model_vocab} on have no embedding; use \
                     the model's own tokenizer"
                ),
            ),
        )),
        _ => Ok(()),
    }
}

/// The transforms between the source and the sink, built against `schema`. Shared by the main chain
/// and by `train`'s evaluation rows, which flow through the same steps.
async fn build_transforms(
    plan: &Plan,
    steps: std::ops::Range<usize>,
    mut schema: SchemaRef,
    row_id: &str,
    ctx: &Context,
) -> Result<(Transforms, SchemaRef, TokenizerVocab)> {
    let mut out: Transforms = vec![];
    let mut vocab: TokenizerVocab = None;
    for i in steps {
        let op: Box<dyn Operator> = match &plan.steps[i] {
            Step::Filter(s) => Box::new(
                Filter::new(s, schema.clone(), &ctx.session).map_err(|e| located(plan, i, e))?,
            ),
            Step::Format(s) => {
                Box::new(Format::new(s, schema.clone(), row_id).map_err(|e| located(plan, i, e))?)
            }
            Step::Tokenize(s) => {
                let tok = load_step_tokenizer(plan, s.tokenizer.as_deref(), ctx)
                    .await
                    .map_err(|e| located(plan, i, e))?;
                vocab = Some((i, tok.get_vocab_size(true)));
                Box::new(Tokenize::new(s, schema.clone(), &tok).map_err(|e| located(plan, i, e))?)
            }
            Step::Generate(s) => {
                let g = Generate::new(s, schema.clone(), plan.model.as_ref(), row_id, ctx)
                    .await
                    .map_err(|e| located(plan, i, e))?;
                check_vocab(plan, vocab, g.model_vocab())?;
                Box::new(g)
            }
            Step::Evaluate(s) => {
                Box::new(Evaluate::new(s, schema.clone()).map_err(|e| located(plan, i, e))?)
            }
            Step::Source(_) => {
                return Err(order_error(
                    plan,
                    i,
                    "a plan has one source, as its first step",
                ))
            }
            Step::Write(_) | Step::Train(_) => {
                return Err(order_error(
                    plan,
                    i,
                    "a sink (write, train) must be the last step",
                ))
            }
        };
        schema = op.schema();
        out.push((i, op));
    }
    Ok((out, schema, vocab))
}

async fn load_step_tokenizer(
    plan: &Plan,
    explicit: Option<&str>,
    ctx: &Context,
) -> Result<tokenizers::Tokenizer, StepError> {
    let (spec, revision) = match (explicit, &plan.model) {
        (Some(t), _) => (t.to_string(), None),
        // A model made by `model.init` (maybe not yet) carries the tokenizer it was made for.
        (None, Some(m)) if m.init.is_some() && !std::path::Path::new(&m.path).is_dir() => {
            let init = m.init.as_ref().expect("checked");
            (init.tokenizer.clone(), None)
        }
        (None, Some(m)) => (m.path.clone(), m.revision.clone()),
        (None, None) => return Err(StepError::at("tokenizer", "no tokenizer: set `tokenizer:` (a tokenizer.json, a model folder or a Hub id) or give the plan a `model`")),
    };
    let files = crate::tokenizer::resolve_tokenizer(&spec, revision.as_deref(), &ctx.hub)
        .await
        .map_err(|e| StepError::at("tokenizer", e))?;
    files.load().map_err(|e| StepError::at("tokenizer", e))
}

/// Validate a plan completely and build its operators.
pub async fn build(plan: &Plan, ctx: &Context) -> Result<Pipeline> {
    let last = plan.steps.len() - 1;
    let Step::Source(src_spec) = &plan.steps[0] else {
        return Err(order_error(plan, 0, "the first step must be a `source`"));
    };
    if !matches!(plan.steps[last], Step::Write(_) | Step::Train(_)) || last == 0 {
        return Err(order_error(
            plan,
            last,
            "the last step must be a sink: `write` (parquet) or `train`",
        ));
    }
    let source = Source::open(src_spec, ctx)
        .await
        .map_err(|e| located(plan, 0, e))?;
    let row_id = source.row_id_column().to_string();
    let (transforms, schema, vocab) =
        build_transforms(plan, 1..last, source.schema(), &row_id, ctx).await?;
    let sink: Box<dyn Sink> = match &plan.steps[last] {
        Step::Write(w) => {
            let provenance = Provenance {
                plan_name: plan.name.clone(),
                plan: serde_json::to_value(plan).map_err(|e| Error::json("the plan", e))?,
            };
            let write = Write::new(w, schema, ctx, plan.has_generate(), &row_id, provenance)
                .map_err(|e| located(plan, last, e))?;
            Box::new(write)
        }
        Step::Train(t) => {
            let eval = match &t.eval {
                None => None,
                Some(e) => Some(eval_rows(plan, last, &e.source, &row_id, ctx).await?),
            };
            // The labels' text and the lengths: the last `tokenize`'s (BLEU references).
            let tokenize = plan.steps.iter().rev().find_map(|s| match s {
                Step::Tokenize(t) => Some(t),
                _ => None,
            });
            let train_ctx = TrainContext {
                model: plan.model.as_ref(),
                target_text: tokenize.and_then(|t| t.target.clone()),
                lengths: tokenize.map(|t| (t.max_input_tokens, t.max_target_tokens)),
                eval,
            };
            let train = Train::new(t, schema, train_ctx, ctx)
                .await
                .map_err(|e| located(plan, last, e))?;
            check_vocab(plan, vocab, train.model_vocab())?;
            Box::new(train)
        }
        _ => unreachable!("checked above"),
    };
    Ok(Pipeline {
        plan: plan.clone(),
        source,
        transforms,
        sink,
    })
}

/// `train`'s evaluation rows: another source, through the same steps as the training rows.
async fn eval_rows(
    plan: &Plan,
    last: usize,
    spec: &crate::plans::spec::SourceSpec,
    row_id: &str,
    ctx: &Context,
) -> Result<EvalRows> {
    let source = Source::open(spec, ctx).await.map_err(|err| {
        located(
            plan,
            last,
            StepError {
                key: err.key.map(|k| format!("eval.source.{k}")),
                ..err
            },
        )
    })?;
    let (ops, schema, _) = build_transforms(plan, 1..last, source.schema(), row_id, ctx)
        .await
        .map_err(|err| match err {
            Error::Plan(mut p) => {
                p.message = format!("{} (while checking the eval rows of `train`)", p.message);
                Error::Plan(p)
            }
            other => other,
        })?;
    Ok(EvalRows {
        schema,
        row_id: source.row_id_column().to_string(),
        start: Box::new(move |exec: &Exec| {
            let step = Exec {
                step: "eval rows: step 1 (source)".into(),
                ..exec.clone()
            };
            let rows = counted(source.execute(&step), &exec.stats, "eval 1:source");
            chain(rows, &ops, exec, "eval ")
        }),
    })
}

/// Chain operators onto a stream, counting rows out of each step under `prefix` + `N:operator`.
fn chain(
    mut stream: SendableRecordBatchStream,
    ops: &Transforms,
    exec: &Exec,
    prefix: &str,
) -> Result<SendableRecordBatchStream> {
    for (i, op) in ops {
        let step = Exec {
            step: format!(
                "{}step {} ({})",
                if prefix.is_empty() { "" } else { "eval rows: " },
                i + 1,
                op.name()
            ),
            ..exec.clone()
        };
        stream = op.execute(stream, &step)?;
        stream = counted(
            stream,
            &exec.stats,
            &format!("{prefix}{}:{}", i + 1, op.name()),
        );
    }
    Ok(stream)
}

fn counted(
    stream: SendableRecordBatchStream,
    stats: &RunStats,
    label: &str,
) -> SendableRecordBatchStream {
    let counter = stats.counter(label);
    let schema = stream.schema();
    let s = stream.inspect(move |b| {
        if let Ok(b) = b {
            counter.fetch_add(b.num_rows() as u64, Ordering::Relaxed);
        }
    });
    Box::pin(RecordBatchStreamAdapter::new(schema, s))
}

impl Pipeline {
    /// Each step's output columns (for `conala validate`).
    pub fn describe(&self) -> Vec<(String, Vec<String>)> {
        let cols = |s: SchemaRef| {
            s.fields()
                .iter()
                .map(|f| format!("{}: {}", f.name(), f.data_type()))
                .collect::<Vec<_>>()
        };
        let mut out = vec![("1:source".to_string(), cols(self.source.schema()))];
        for (i, op) in &self.transforms {
            out.push((format!("{}:{}", i + 1, op.name()), cols(op.schema())));
        }
        let last = self.plan.steps.len();
        out.push((
            format!("{last}:{}", self.sink.name()),
            self.sink.schema().map(cols).unwrap_or_default(),
        ));
        out
    }

    /// What each model-running step will hold per device, by step (`N:operator`).
    pub fn memory_estimates(&self) -> Vec<(String, MemoryEstimate)> {
        let mut out: Vec<(String, MemoryEstimate)> = self
            .transforms
            .iter()
            .filter_map(|(i, op)| Some((format!("{}:{}", i + 1, op.name()), op.memory()?)))
            .collect();
        if let Some(m) = self.sink.memory() {
            out.push((format!("{}:{}", self.plan.steps.len(), self.sink.name()), m));
        }
        out
    }

    pub async fn run(mut self, ctx: &Context) -> Result<RunSummary> {
        let started = Instant::now();
        if let Some(done) = self.sink.prepare().await? {
            self.source.skip_rows(done);
        }
        let exec = Exec {
            stats: Arc::new(RunStats::default()),
            progress_bars: ctx.progress_bars,
            step: String::new(),
        };
        let stream = counted(
            stop_on_signal(self.source.execute(&exec.for_step(0, "source"))),
            &exec.stats,
            "1:source",
        );
        let stream = chain(stream, &self.transforms, &exec, "")?;
        let rows = exec.stats.counter("1:source");
        let progress = Progress::start(
            &self.plan.name,
            "rows",
            ctx.progress_bars,
            None,
            move || (rows.load(Ordering::Relaxed), None),
        );
        // The rows line stops when the sink has read its input (`train` then reports its own steps).
        let stopper = progress.stopper();
        let schema = stream.schema();
        let tail = futures::stream::poll_fn(move |_| {
            stopper.stop();
            std::task::Poll::Ready(None)
        });
        let stream: SendableRecordBatchStream =
            Box::pin(RecordBatchStreamAdapter::new(schema, stream.chain(tail)));
        let sink_exec = exec.for_step(self.plan.steps.len() - 1, self.sink.name());
        let report = self.sink.run(stream, &sink_exec).await;
        progress.finish();
        let write = match report? {
            SinkReport::Write(w) => Some(w),
            SinkReport::Train(_) => None,
        };
        let mut rows_per_step: Vec<(String, u64)> = exec.stats.rows().into_iter().collect();
        rows_per_step.sort_by_key(|(k, _)| {
            let n = k
                .split(':')
                .next()
                .and_then(|h| h.rsplit(' ').next())
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(0);
            (k.starts_with("eval"), n)
        });
        Ok(RunSummary {
            plan_name: self.plan.name.clone(),
            rows_per_step,
            write,
            reports: exec.stats.reports(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}
