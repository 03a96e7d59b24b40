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

use super::spec::{ModelSpec, Plan, Step};
use crate::context::Context;
use crate::error::{Error, PlanError, PlanLocation, Result};
use crate::manifest::RunStats;
use crate::operators::evaluate::Evaluate;
use crate::operators::filter::Filter;
use crate::operators::format::Format;
use crate::operators::generate::Generate;
use crate::operators::source::Source;
use crate::operators::tokenize::Tokenize;
use crate::operators::train::{Train, TrainSummary};
use crate::operators::write::{Mode, Write, WriteSummary};
use crate::operators::{Exec, Operator, StepError};
use crate::progress::Progress;

/// Where a chain ends.
pub enum Sink {
    Write(Box<Write>),
    Train(Box<Train>),
}

/// A validated plan, ready to run.
pub struct Pipeline {
    pub plan: Plan,
    source: Source,
    transforms: Vec<(usize, Box<dyn Operator>)>,
    sink: Sink,
}

/// What a run did, for the CLI's summary.
#[derive(Debug)]
pub struct RunSummary {
    pub plan_name: String,
    pub rows_per_step: Vec<(String, u64)>,
    pub write: Option<WriteSummary>,
    pub train: Option<TrainSummary>,
    pub seconds: f64,
    pub extra: std::collections::BTreeMap<String, serde_json::Value>,
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

/// The transforms between the source and the sink, built against `schema`. Shared by the main chain
/// and by `train`'s evaluation rows, which flow through the same steps.
async fn build_transforms(
    plan: &Plan,
    steps: std::ops::Range<usize>,
    mut schema: SchemaRef,
    row_id: &str,
    ctx: &Context,
) -> Result<(Vec<(usize, Box<dyn Operator>)>, SchemaRef)> {
    let mut out: Vec<(usize, Box<dyn Operator>)> = vec![];
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
                Box::new(Tokenize::new(s, schema.clone(), &tok).map_err(|e| located(plan, i, e))?)
            }
            Step::Generate(s) => Box::new(
                Generate::new(s, schema.clone(), plan.model.as_ref(), row_id, ctx)
                    .await
                    .map_err(|e| located(plan, i, e))?,
            ),
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
    Ok((out, schema))
}

async fn load_step_tokenizer(
    plan: &Plan,
    explicit: Option<&str>,
    ctx: &Context,
) -> Result<tokenizers::Tokenizer, StepError> {
    let (spec, revision, key) = match (explicit, &plan.model) {
        (Some(t), _) => (t.to_string(), None, "tokenizer"),
        // A model made by `model.init` (maybe not yet) carries the tokenizer it was made for.
        (None, Some(ModelSpec { init: Some(init), path, .. }))
            if !std::path::Path::new(path).is_dir() =>
        {
            (init.tokenizer.clone(), None, "tokenizer")
        }
        (None, Some(m)) => (m.path.clone(), m.revision.clone(), "tokenizer"),
        (None, None) => return Err(StepError::at("tokenizer", "no tokenizer: set `tokenizer:` (a tokenizer.json, a model folder or a Hub id) or give the plan a `model`")),
    };
    let file = crate::tokenizer::resolve_tokenizer_file(&spec, revision.as_deref(), &ctx.hub)
        .await
        .map_err(|e| StepError::at(key, e))?;
    crate::tokenizer::load(&file).map_err(|e| StepError::at(key, e))
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
    let (transforms, schema) =
        build_transforms(plan, 1..last, source.schema(), &row_id, ctx).await?;
    let sink = match &plan.steps[last] {
        Step::Write(w) => Sink::Write(Box::new(
            Write::new(
                w,
                schema,
                &ctx.session,
                plan.has_generate(),
                &row_id,
                ctx.shard,
            )
            .map_err(|e| located(plan, last, e))?,
        )),
        Step::Train(t) => {
            // Evaluation rows take the same path as training rows.
            let eval = match &t.eval {
                None => None,
                Some(e) => {
                    let eval_source = Source::open(&e.source, ctx).await.map_err(|err| {
                        located(
                            plan,
                            last,
                            StepError {
                                key: err.key.map(|k| format!("eval.source.{k}")),
                                ..err
                            },
                        )
                    })?;
                    let (eval_ops, eval_schema) =
                        build_transforms(plan, 1..last, eval_source.schema(), &row_id, ctx)
                            .await
                            .map_err(|err| match err {
                                Error::Plan(mut p) => {
                                    p.message = format!(
                                        "{} (while checking the eval rows of `train`)",
                                        p.message
                                    );
                                    Error::Plan(p)
                                }
                                other => other,
                            })?;
                    Some((eval_source, eval_ops, eval_schema))
                }
            };
            Sink::Train(Box::new(
                Train::new(t, schema, eval, plan, ctx)
                    .await
                    .map_err(|e| located(plan, last, e))?,
            ))
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

/// Chain operators onto a stream, counting rows out of each step under `prefix` + `N:operator`.
pub fn chain(
    mut stream: SendableRecordBatchStream,
    ops: &[(usize, Box<dyn Operator>)],
    plan: &Plan,
    exec: &Exec,
    prefix: &str,
) -> Result<SendableRecordBatchStream> {
    for (i, op) in ops {
        stream = op.execute(stream, exec)?;
        stream = counted(
            stream,
            &exec.stats,
            &format!("{prefix}{}:{}", i + 1, plan.steps[*i].operator()),
        );
    }
    Ok(stream)
}

pub(crate) fn counted(
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
        match &self.sink {
            Sink::Write(w) => out.push((format!("{last}:write"), cols(w.schema()))),
            Sink::Train(_) => out.push((format!("{last}:train"), vec![])),
        }
        out
    }

    pub async fn run(mut self, ctx: &Context) -> Result<RunSummary> {
        let started = Instant::now();
        let stats = Arc::new(RunStats::default());
        let plan_json = serde_json::to_value(&self.plan)
            .map_err(|e| Error::Run(format!("plan as JSON: {e}")))?;
        if let Sink::Write(w) = &self.sink {
            if let Some(done) = w.prepare().await? {
                if w.mode() == Mode::Resume {
                    log::info!("resuming: {} rows already in {}", done.len(), w.loc.display);
                    self.source.skip_rows(done);
                }
            }
        }
        let stream = counted(self.source.execute(), &stats, "1:source");
        let exec = Exec {
            stats: stats.clone(),
            progress_bars: ctx.progress_bars,
        };
        let stream = chain(stream, &self.transforms, &self.plan, &exec, "")?;
        let label = self.plan.name.clone();
        let rows = stats.counter("1:source");
        let progress = Progress::start(&label, "rows", ctx.progress_bars, None, move || {
            (rows.load(Ordering::Relaxed), None)
        });
        // `train` reads all its rows before its first step and then reports steps itself: the rows
        // line stops when the input is exhausted instead of ticking on through training.
        let stream = match &self.sink {
            Sink::Train(_) => {
                let stopper = progress.stopper();
                let schema = stream.schema();
                let tail = futures::stream::poll_fn(move |_| {
                    stopper.stop();
                    std::task::Poll::Ready(None)
                });
                Box::pin(RecordBatchStreamAdapter::new(schema, stream.chain(tail)))
                    as SendableRecordBatchStream
            }
            Sink::Write(_) => stream,
        };
        let (write, train) = match &mut self.sink {
            Sink::Write(w) => (
                Some(w.run(stream, &stats, plan_json, &self.plan.name).await?),
                None,
            ),
            Sink::Train(t) => (None, Some(t.run(stream, &exec, ctx).await?)),
        };
        progress.finish();
        let rows_per_step = stats.rows().into_iter().collect::<Vec<_>>();
        let mut rows_per_step = rows_per_step;
        // `N:operator` in step order; the eval rows' counts (`eval N:operator`) after.
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
            train,
            seconds: started.elapsed().as_secs_f64(),
            extra: stats.extra(),
        })
    }
}
