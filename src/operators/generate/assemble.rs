//! Output batches of finished jobs: each row's input columns (gathered from its window) plus the
//! generated text, its ids, `n_input_tokens`, `n_output_tokens`, `finish_reason` and `error`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, Int32Array, ListArray, RecordBatch, StringArray, StringBuilder,
};
use datafusion::arrow::compute::interleave_record_batch;
use datafusion::arrow::datatypes::SchemaRef;

use super::batcher::{Job, RowRef};
use crate::error::{Error, Result};
use crate::model::decoding::{Finish, Generated};
use crate::operators::tokenize::{ids_array, ERROR, N_INPUT_TOKENS};
use crate::reports::FinishCounts;

/// A job and what the model made of each of its rows.
pub(super) struct Done {
    pub job: Job,
    pub results: Vec<std::result::Result<Generated, String>>,
}

/// Counters shared with the progress display and the step's report.
#[derive(Default)]
pub(super) struct Counters {
    pub rows: AtomicU64,
    pub tokens: AtomicU64,
    pub eos: AtomicU64,
    pub length: AtomicU64,
    pub errors: AtomicU64,
    pub generated_rows: AtomicU64,
}

impl Counters {
    pub fn finish_counts(&self) -> FinishCounts {
        FinishCounts {
            eos: self.eos.load(Ordering::Relaxed),
            length: self.length.load(Ordering::Relaxed),
            error: self.errors.load(Ordering::Relaxed),
        }
    }
}

/// Output rows for a finished job: its rows' input columns plus the generated columns.
pub(super) fn assemble(
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
                        Finish::Eos => counters.eos.fetch_add(1, Ordering::Relaxed),
                        Finish::Length => counters.length.fetch_add(1, Ordering::Relaxed),
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
