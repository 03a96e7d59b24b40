//! Cutting a window of rows into model jobs: rows that cannot be generated (an upstream error, null or
//! empty ids) pass through as failed; identical inputs are generated once (when decoding is
//! deterministic); the rest are sorted by length, longest first, and cut into batches by a token budget
//! (rows x padded length) and a row cap, so little is spent on padding.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, Int32Array, ListArray, RecordBatch, StringArray, UInt64Array,
};

use crate::error::{Error, Result};
use crate::operators::tokenize::ERROR;
use crate::rng::Rng;

/// A row inside a window: (batch index, row index).
pub(super) type RowRef = (usize, usize);

/// Work for the model worker: rows to generate, plus rows that only pass through.
pub(super) struct Job {
    pub window: Arc<Vec<RecordBatch>>,
    /// Rows to generate; `same[i]` are further rows with the same input as `rows[i]`.
    pub rows: Vec<RowRef>,
    pub same: Vec<Vec<RowRef>>,
    pub inputs: Vec<Vec<u32>>,
    /// Each generated row's sampling seed, from (seed, row id).
    pub seeds: Vec<u64>,
    /// Rows that pass through with an error.
    pub failed: Vec<(RowRef, String)>,
    pub last_of_window: bool,
    /// The last job of the whole input.
    pub last_of_input: bool,
}

/// How a window's rows become jobs.
pub(super) struct Batcher {
    /// The token-id column.
    pub input: String,
    pub row_id: String,
    /// Generate identical inputs once.
    pub dedup: bool,
    pub seed: u64,
    /// Rows x padded input length per batch.
    pub batch_tokens: usize,
    pub max_batch_rows: usize,
}

/// A row to generate: its ids, where it is, its row id.
struct Unique {
    ids: Vec<u32>,
    at: RowRef,
    row_id: u64,
}

impl Batcher {
    /// The jobs for one window, the last one marked (and marked last of the input when `last`).
    pub fn plan_window(&self, batches: Vec<RecordBatch>, last: bool) -> Result<Vec<Job>> {
        let window = Arc::new(batches);
        let mut failed: Vec<(RowRef, String)> = vec![];
        let mut unique: Vec<Unique> = vec![];
        let mut same: Vec<Vec<RowRef>> = vec![];
        let mut seen: HashMap<Vec<u32>, usize> = HashMap::new();
        for (bi, b) in window.iter().enumerate() {
            let ids = b
                .column_by_name(&self.input)
                .and_then(|c| c.as_any().downcast_ref::<ListArray>())
                .ok_or_else(|| {
                    Error::Data(format!(
                        "generate: column `{}` is not list<int32>",
                        self.input
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
                    failed.push(((bi, r), format!("no input: `{}` is null", self.input)));
                    continue;
                }
                let v = ids.value(r);
                let Some(v) = v.as_any().downcast_ref::<Int32Array>() else {
                    return Err(Error::Data(format!(
                        "generate: column `{}` does not hold int32 ids",
                        self.input
                    )));
                };
                if v.is_empty() {
                    failed.push(((bi, r), "empty input".to_string()));
                    continue;
                }
                let toks: Vec<u32> = v.values().iter().map(|&x| x as u32).collect();
                let row_id = row_ids.as_ref().map(|a| a.value(r)).unwrap_or(0);
                if self.dedup {
                    if let Some(&u) = seen.get(&toks) {
                        same[u].push((bi, r));
                        continue;
                    }
                    seen.insert(toks.clone(), unique.len());
                }
                unique.push(Unique {
                    ids: toks,
                    at: (bi, r),
                    row_id,
                });
                same.push(vec![]);
            }
        }
        // Longest first: the biggest batch runs first (memory problems show at once), and each batch's
        // first row sets its padded length.
        let mut order: Vec<usize> = (0..unique.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(unique[i].ids.len()));
        let job = |failed: Vec<(RowRef, String)>| Job {
            window: window.clone(),
            rows: vec![],
            same: vec![],
            inputs: vec![],
            seeds: vec![],
            failed,
            last_of_window: false,
            last_of_input: false,
        };
        let mut jobs: Vec<Job> = vec![];
        let mut i = 0;
        while i < order.len() {
            let padded = unique[order[i]].ids.len();
            let mut j = i;
            while j < order.len()
                && j - i < self.max_batch_rows
                && (j - i + 1) * padded <= self.batch_tokens.max(padded)
            {
                j += 1;
            }
            let mut next = job(vec![]);
            for &k in &order[i..j] {
                let u = &unique[k];
                next.rows.push(u.at);
                next.same.push(std::mem::take(&mut same[k]));
                next.inputs.push(u.ids.clone());
                next.seeds.push(Rng::derive(self.seed, u.row_id).next_u64());
            }
            jobs.push(next);
            i = j;
        }
        // Failed rows ride in a job of their own, after the window's batches.
        if !failed.is_empty() || jobs.is_empty() {
            jobs.push(job(failed));
        }
        let tail = jobs.last_mut().expect("at least one job");
        tail.last_of_window = true;
        tail.last_of_input = last;
        Ok(jobs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operators::tokenize::ids_array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    /// A batch of rows with these ids (None: null) and upstream errors.
    fn batch(rows: &[Option<Vec<u32>>], errors: &[Option<&str>]) -> RecordBatch {
        let (ids, _) = ids_array(rows);
        let schema = Arc::new(Schema::new(vec![
            Field::new("row_id", DataType::UInt64, false),
            Field::new("input_ids", ids.data_type().clone(), true),
            Field::new(ERROR, DataType::Utf8, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(UInt64Array::from_iter_values(0..rows.len() as u64)),
                ids,
                Arc::new(StringArray::from(errors.to_vec())),
            ],
        )
        .unwrap()
    }

    fn batcher(dedup: bool, batch_tokens: usize, max_batch_rows: usize) -> Batcher {
        Batcher {
            input: "input_ids".into(),
            row_id: "row_id".into(),
            dedup,
            seed: 7,
            batch_tokens,
            max_batch_rows,
        }
    }

    #[test]
    fn sorts_longest_first_and_cuts_by_token_budget_and_row_cap() {
        let rows: Vec<Option<Vec<u32>>> = [2usize, 5, 3, 5, 1]
            .iter()
            .map(|&n| Some(vec![9; n]))
            .collect();
        let b = batch(&rows, &[None; 5]);
        // Budget 10 tokens: [5, 5] (2 x 5 = 10), then [3, 2, 1] (3 x 3 = 9).
        let jobs = batcher(false, 10, 8)
            .plan_window(vec![b.clone()], true)
            .unwrap();
        let lens: Vec<Vec<usize>> = jobs
            .iter()
            .map(|j| j.inputs.iter().map(Vec::len).collect())
            .collect();
        assert_eq!(lens, vec![vec![5, 5], vec![3, 2, 1]]);
        assert_eq!(jobs[0].rows, vec![(0, 1), (0, 3)]);
        assert!(!jobs[0].last_of_window && jobs[1].last_of_window && jobs[1].last_of_input);
        // A row cap of 2 cuts the short rows too; a row longer than the budget goes alone.
        let jobs = batcher(false, 10, 2)
            .plan_window(vec![b.clone()], false)
            .unwrap();
        let sizes: Vec<usize> = jobs.iter().map(|j| j.rows.len()).collect();
        assert_eq!(sizes, vec![2, 2, 1]);
        assert!(!jobs.last().unwrap().last_of_input);
        let jobs = batcher(false, 3, 8).plan_window(vec![b], true).unwrap();
        assert_eq!(jobs[0].inputs, vec![vec![9; 5]]);
        // Seeds come from (seed, row id), whatever the batch.
        assert_eq!(jobs[0].seeds[0], Rng::derive(7, 1).next_u64());
    }

    #[test]
    fn identical_inputs_once_and_bad_rows_pass_through() {
        let rows = vec![
            Some(vec![1, 2]),
            Some(vec![3]),
            Some(vec![1, 2]),
            None,
            Some(vec![]),
            Some(vec![4]),
        ];
        let errors = [None, None, None, None, None, Some("too long")];
        let b = batch(&rows, &errors);
        let jobs = batcher(true, 100, 100)
            .plan_window(vec![b.clone()], true)
            .unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].inputs, vec![vec![1, 2], vec![3]]);
        assert_eq!(jobs[0].same, vec![vec![(0, 2)], vec![]]);
        let failed: Vec<(RowRef, &str)> = jobs[1]
            .failed
            .iter()
            .map(|(r, e)| (*r, e.as_str()))
            .collect();
        assert_eq!(
            failed,
            vec![
                ((0, 3), "no input: `input_ids` is null"),
                ((0, 4), "empty input"),
                ((0, 5), "too long")
            ]
        );
        assert!(jobs[1].last_of_window && jobs[1].inputs.is_empty());
        // Without dedup every row is generated.
        let jobs = batcher(false, 100, 100).plan_window(vec![b], true).unwrap();
        assert_eq!(jobs[0].inputs.len(), 3);
        // An empty window still yields its closing job.
        let jobs = batcher(true, 100, 100).plan_window(vec![], true).unwrap();
        assert!(jobs.len() == 1 && jobs[0].last_of_input);
    }
}
