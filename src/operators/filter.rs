//! `filter`: keep the rows where a SQL predicate (a DataFusion expression) is true; false and null drop
//! the row.

use std::sync::Arc;

use datafusion::arrow::array::{Array, BooleanArray, RecordBatch};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::DFSchema;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::ExprSchemable;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::prelude::SessionContext;
use futures::StreamExt;

use super::{Operator, StepError, StepResult};
use crate::error::{Error, Result};
use crate::plans::spec::FilterSpec;

pub struct Filter {
    predicate: Arc<dyn PhysicalExpr>,
    text: String,
    schema: SchemaRef,
}

impl Filter {
    pub fn new(
        spec: &FilterSpec,
        input: SchemaRef,
        session: &SessionContext,
    ) -> StepResult<Filter> {
        let bad = |e: datafusion::error::DataFusionError| {
            StepError::at(
                "predicate",
                format!("`{}`: {}", spec.predicate, e.strip_backtrace()),
            )
        };
        let df_schema = DFSchema::try_from(input.as_ref().clone()).map_err(bad)?;
        let expr = session
            .parse_sql_expr(&spec.predicate, &df_schema)
            .map_err(bad)?;
        let ty = expr.get_type(&df_schema).map_err(bad)?;
        if ty != DataType::Boolean && ty != DataType::Null {
            return Err(StepError::at(
                "predicate",
                format!("`{}` is {ty}, not a true/false condition", spec.predicate),
            ));
        }
        let predicate = session
            .create_physical_expr(expr, &df_schema)
            .map_err(bad)?;
        Ok(Filter {
            predicate,
            text: spec.predicate.clone(),
            schema: input,
        })
    }

    fn apply(predicate: &dyn PhysicalExpr, text: &str, batch: RecordBatch) -> Result<RecordBatch> {
        let ctx = |e| Error::datafusion(format!("filter `{text}`"), e);
        let mask = predicate
            .evaluate(&batch)
            .map_err(ctx)?
            .into_array(batch.num_rows())
            .map_err(ctx)?;
        let mask = mask
            .as_any()
            .downcast_ref::<BooleanArray>()
            .ok_or_else(|| Error::Data(format!("filter `{text}` did not yield true/false")))?;
        filter_record_batch(&batch, mask).map_err(|e| Error::arrow(format!("filter `{text}`"), e))
    }
}

impl Operator for Filter {
    fn name(&self) -> &'static str {
        "filter"
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn execute(
        &self,
        input: SendableRecordBatchStream,
        _exec: &super::Exec,
    ) -> Result<SendableRecordBatchStream> {
        let predicate = self.predicate.clone();
        let text = self.text.clone();
        let stream = input.filter_map(move |batch| {
            let out = batch.and_then(|b| Ok(Filter::apply(predicate.as_ref(), &text, b)?));
            // Batches emptied by the filter are dropped here rather than passed on.
            std::future::ready(match out {
                Ok(b) if b.num_rows() == 0 => None,
                other => Some(other),
            })
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            stream,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{StringArray, UInt64Array};
    use datafusion::arrow::datatypes::{Field, Schema};

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("row_id", DataType::UInt64, false),
            Field::new("intent", DataType::Utf8, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(UInt64Array::from(vec![0, 1, 2, 3])),
                Arc::new(StringArray::from(vec![
                    Some("a"),
                    None,
                    Some("ccc"),
                    Some("dd"),
                ])),
            ],
        )
        .unwrap()
    }

    #[test]
    fn keeps_true_rows_and_drops_null_and_false() {
        let b = batch();
        let f = Filter::new(
            &FilterSpec {
                predicate: "intent IS NOT NULL AND length(intent) > 1".into(),
            },
            b.schema(),
            &SessionContext::new(),
        )
        .unwrap();
        let out = Filter::apply(f.predicate.as_ref(), "", b).unwrap();
        let ids = out
            .column(0)
            .as_any()
            .downcast_ref::<UInt64Array>()
            .unwrap();
        assert_eq!(ids.values().to_vec(), vec![2, 3]);
        // null comparison result (intent = 'a' is null for the null row) drops the row
        let b = batch();
        let f = Filter::new(
            &FilterSpec {
                predicate: "intent <> 'a'".into(),
            },
            b.schema(),
            &SessionContext::new(),
        )
        .unwrap();
        let out = Filter::apply(f.predicate.as_ref(), "", b).unwrap();
        assert_eq!(out.num_rows(), 2);
    }

    #[test]
    fn unknown_column_and_non_boolean_are_step_errors() {
        let s = batch().schema();
        let e = Filter::new(
            &FilterSpec {
                predicate: "snipet IS NULL".into(),
            },
            s.clone(),
            &SessionContext::new(),
        )
        .err()
        .unwrap();
        assert_eq!(e.key.as_deref(), Some("predicate"));
        assert!(e.message.contains("snipet"), "{}", e.message);
        let e = Filter::new(
            &FilterSpec {
                predicate: "length(intent)".into(),
            },
            s.clone(),
            &SessionContext::new(),
        )
        .err()
        .unwrap();
        assert!(e.message.contains("not a true/false"), "{}", e.message);
        let e = Filter::new(
            &FilterSpec {
                predicate: "intent IS NOT".into(),
            },
            s,
            &SessionContext::new(),
        )
        .err()
        .unwrap();
        assert_eq!(e.key.as_deref(), Some("predicate"));
    }
}
