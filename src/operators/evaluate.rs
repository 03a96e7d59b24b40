//! `evaluate`: score a prediction column against a reference column. Adds the per-row smoothed
//! sentence BLEU-4 (CoNaLa tokenization, 0-100) and `exact_match`; at the end of the stream the corpus
//! scores (sacreBLEU BLEU, CoNaLa BLEU, mean sentence BLEU, exact match) go into the run summary and
//! the manifest under `evaluate`. Rows with a null prediction or reference are not scored (null BLEU).

use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, RecordBatch, StringArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;

use super::{require_new_column, require_text_column, Exec, Operator, StepResult};
use crate::error::{Error, Result};
use crate::metrics::Scorer;
use crate::plans::spec::EvaluateSpec;

pub const EXACT_MATCH: &str = "exact_match";

pub struct Evaluate {
    prediction: usize,
    reference: usize,
    schema: SchemaRef,
}

impl Evaluate {
    pub fn new(spec: &EvaluateSpec, input: SchemaRef) -> StepResult<Evaluate> {
        require_text_column(&input, "prediction", &spec.prediction)?;
        require_text_column(&input, "reference", &spec.reference)?;
        require_new_column(&input, "column", &spec.column)?;
        require_new_column(&input, "column", EXACT_MATCH)?;
        let mut fields: Vec<Arc<Field>> = input.fields().iter().cloned().collect();
        fields.push(Arc::new(Field::new(&spec.column, DataType::Float64, true)));
        fields.push(Arc::new(Field::new(EXACT_MATCH, DataType::Boolean, true)));
        Ok(Evaluate {
            prediction: input.index_of(&spec.prediction).expect("checked"),
            reference: input.index_of(&spec.reference).expect("checked"),
            schema: Arc::new(Schema::new(fields)),
        })
    }
}

fn score_batch(
    batch: &RecordBatch,
    pred: usize,
    reference: usize,
    scorer: &Mutex<Scorer>,
    schema: &SchemaRef,
) -> Result<RecordBatch> {
    let as_text = |i: usize| -> Result<StringArray> {
        let c = datafusion::arrow::compute::cast(batch.column(i), &DataType::Utf8)
            .map_err(|e| Error::arrow("evaluate", e))?;
        Ok(c.as_any()
            .downcast_ref::<StringArray>()
            .expect("Utf8")
            .clone())
    };
    let (p, r) = (as_text(pred)?, as_text(reference)?);
    let mut bleu = Vec::with_capacity(batch.num_rows());
    let mut exact = Vec::with_capacity(batch.num_rows());
    let mut s = scorer.lock().expect("scorer lock");
    for i in 0..batch.num_rows() {
        if p.is_null(i) || r.is_null(i) {
            bleu.push(None);
            exact.push(None);
        } else {
            let (b, e) = s.add(p.value(i), r.value(i));
            bleu.push(Some(100.0 * b));
            exact.push(Some(e));
        }
    }
    let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
    cols.push(Arc::new(Float64Array::from(bleu)));
    cols.push(Arc::new(BooleanArray::from(exact)));
    RecordBatch::try_new(schema.clone(), cols).map_err(|e| Error::arrow("evaluate", e))
}

impl Operator for Evaluate {
    fn name(&self) -> &'static str {
        "evaluate"
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn execute(
        &self,
        input: SendableRecordBatchStream,
        exec: &Exec,
    ) -> Result<SendableRecordBatchStream> {
        let scorer = Arc::new(Mutex::new(Scorer::default()));
        let (pred, reference, schema) = (self.prediction, self.reference, self.schema.clone());
        let s2 = scorer.clone();
        let scored =
            input.map(move |b| b.and_then(|b| Ok(score_batch(&b, pred, reference, &s2, &schema)?)));
        let stats = exec.stats.clone();
        // When the input ends, publish the corpus scores.
        let publish = futures::stream::once(async move {
            let scores = scorer.lock().expect("scorer lock").scores();
            stats.report(|r| r.evaluate = Some(scores));
        })
        .filter_map(|_| std::future::ready(None));
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            scored.chain(publish),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reports::RunStats;
    use futures::TryStreamExt;

    #[tokio::test]
    async fn scores_rows_and_publishes_corpus_metrics() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("pred", DataType::Utf8, true),
            Field::new("ref", DataType::Utf8, true),
        ]));
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec![
                    Some("sort list `l`"),
                    Some("x"),
                    None,
                ])),
                Arc::new(StringArray::from(vec![
                    Some("sort list `l`"),
                    Some("y z"),
                    Some("r"),
                ])),
            ],
        )
        .unwrap();
        let op = Evaluate::new(
            &EvaluateSpec {
                prediction: "pred".into(),
                reference: "ref".into(),
                column: "bleu".into(),
            },
            schema.clone(),
        )
        .unwrap();
        let stats = Arc::new(RunStats::default());
        let input: SendableRecordBatchStream = Box::pin(RecordBatchStreamAdapter::new(
            schema,
            futures::stream::iter(vec![Ok(b)]),
        ));
        let out: Vec<RecordBatch> = op
            .execute(
                input,
                &Exec {
                    stats: stats.clone(),
                    ..Exec::detached("evaluate")
                },
            )
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let bleu = out[0]
            .column_by_name("bleu")
            .unwrap()
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap();
        assert!((bleu.value(0) - 100.0).abs() < 1e-9);
        assert!(bleu.is_null(2));
        let em = out[0]
            .column_by_name(EXACT_MATCH)
            .unwrap()
            .as_any()
            .downcast_ref::<BooleanArray>()
            .unwrap();
        assert!(em.value(0) && !em.value(1));
        let scores = stats.reports().evaluate.expect("scores published");
        assert_eq!(scores.rows, 2);
        assert_eq!(scores.exact_match, 0.5);
    }
}
