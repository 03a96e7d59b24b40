//! `tokenize`: encode a text column (and optionally a target column) with a `tokenizer.json` into
//! `input_ids` / `labels` (`list<int32>`) with their lengths `n_input_tokens` / `n_label_tokens`.
//!
//! Long texts are cut to `max_input_tokens` / `max_target_tokens` keeping the final `</s>` (as HF's
//! `truncation=True`). With `truncation: false` a longer row gets null ids and a message in the `error`
//! column; so does a row the tokenizer rejects. A null text gives null ids (and no error). Batches are
//! encoded on the blocking pool, each in parallel across rows, two batches in flight.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, Int32Array, ListArray, RecordBatch, StringArray, StringBuilder,
};
use datafusion::arrow::buffer::{NullBuffer, OffsetBuffer, ScalarBuffer};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use super::{
    at_most, require_new_column, require_text_column, runtime, Operator, StepError, StepResult,
    MAX_SEQUENCE_TOKENS,
};
use crate::error::{Error, Result};
use crate::plans::spec::TokenizeSpec;

pub const INPUT_IDS: &str = "input_ids";
pub const N_INPUT_TOKENS: &str = "n_input_tokens";
pub const LABELS: &str = "labels";
pub const N_LABEL_TOKENS: &str = "n_label_tokens";
pub const ERROR: &str = "error";

pub fn ids_field(name: &str) -> Field {
    Field::new(
        name,
        DataType::List(Arc::new(Field::new("item", DataType::Int32, false))),
        true,
    )
}

struct Side {
    column: usize,
    max: usize,
    tokenizer: Tokenizer,
}

pub struct Tokenize {
    input: Arc<Side>,
    target: Option<Arc<Side>>,
    truncation: bool,
    error_col: Option<usize>,
    schema: SchemaRef,
}

fn with_truncation(tok: &Tokenizer, max: usize, on: bool) -> StepResult<Tokenizer> {
    let mut t = tok.clone();
    let params = on.then_some(TruncationParams {
        max_length: max,
        strategy: TruncationStrategy::LongestFirst,
        stride: 0,
        direction: TruncationDirection::Right,
    });
    t.with_truncation(params)
        .map_err(|e| StepError::general(format!("tokenizer truncation: {e}")))?;
    t.with_padding(None);
    Ok(t)
}

impl Tokenize {
    pub fn new(
        spec: &TokenizeSpec,
        input: SchemaRef,
        tokenizer: &Tokenizer,
    ) -> StepResult<Tokenize> {
        require_text_column(&input, "input", &spec.input)?;
        if spec.max_input_tokens == 0 {
            return Err(StepError::at("max_input_tokens", "must be at least 1"));
        }
        at_most(
            "max_input_tokens",
            spec.max_input_tokens,
            MAX_SEQUENCE_TOKENS,
        )?;
        for name in [INPUT_IDS, N_INPUT_TOKENS] {
            require_new_column(&input, "input", name)?;
        }
        let mut fields: Vec<Arc<Field>> = input.fields().iter().cloned().collect();
        fields.push(Arc::new(ids_field(INPUT_IDS)));
        fields.push(Arc::new(Field::new(N_INPUT_TOKENS, DataType::Int32, true)));
        let input_side = Side {
            column: input.index_of(&spec.input).expect("checked"),
            max: spec.max_input_tokens,
            tokenizer: with_truncation(tokenizer, spec.max_input_tokens, spec.truncation)?,
        };
        let target = match &spec.target {
            None => None,
            Some(t) => {
                require_text_column(&input, "target", t)?;
                if spec.max_target_tokens == 0 {
                    return Err(StepError::at("max_target_tokens", "must be at least 1"));
                }
                at_most(
                    "max_target_tokens",
                    spec.max_target_tokens,
                    MAX_SEQUENCE_TOKENS,
                )?;
                for name in [LABELS, N_LABEL_TOKENS] {
                    require_new_column(&input, "target", name)?;
                }
                fields.push(Arc::new(ids_field(LABELS)));
                fields.push(Arc::new(Field::new(N_LABEL_TOKENS, DataType::Int32, true)));
                Some(Arc::new(Side {
                    column: input.index_of(t).expect("checked"),
                    max: spec.max_target_tokens,
                    tokenizer: with_truncation(tokenizer, spec.max_target_tokens, spec.truncation)?,
                }))
            }
        };
        let error_col = input.index_of(ERROR).ok();
        if let Some(i) = error_col {
            if input.field(i).data_type() != &DataType::Utf8 {
                return Err(StepError::general(format!(
                    "the input has a column `{ERROR}` that is not text; rename it"
                )));
            }
        } else {
            fields.push(Arc::new(Field::new(ERROR, DataType::Utf8, true)));
        }
        Ok(Tokenize {
            input: Arc::new(input_side),
            target,
            truncation: spec.truncation,
            error_col,
            schema: Arc::new(Schema::new(fields)),
        })
    }

    fn apply(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let n = batch.num_rows();
        let mut errors: Vec<Option<String>> = match self.error_col {
            Some(i) => {
                let a = batch
                    .column(i)
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .expect("checked Utf8");
                a.iter().map(|v| v.map(str::to_string)).collect()
            }
            None => vec![None; n],
        };
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        let (ids, lens) = encode_side(&self.input, batch, self.truncation, "input", &mut errors)?;
        columns.push(ids);
        columns.push(lens);
        if let Some(t) = &self.target {
            let (ids, lens) = encode_side(t, batch, self.truncation, "target", &mut errors)?;
            columns.push(ids);
            columns.push(lens);
        }
        let mut eb = StringBuilder::with_capacity(n, 0);
        for e in &errors {
            eb.append_option(e.as_deref());
        }
        let err_array: ArrayRef = Arc::new(eb.finish());
        match self.error_col {
            Some(i) => columns[i] = err_array,
            None => columns.push(err_array),
        }
        RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| Error::arrow("tokenize", e))
    }
}

/// Encode one text column; rows that cannot be encoded get null ids and an error message.
fn encode_side(
    side: &Side,
    batch: &RecordBatch,
    truncation: bool,
    what: &str,
    errors: &mut [Option<String>],
) -> Result<(ArrayRef, ArrayRef)> {
    let n = batch.num_rows();
    let col = cast(batch.column(side.column), &DataType::Utf8)
        .map_err(|e| Error::arrow("tokenize", e))?;
    let texts = col.as_any().downcast_ref::<StringArray>().expect("Utf8");
    let present: Vec<usize> = (0..n)
        .filter(|&r| texts.is_valid(r) && errors[r].is_none())
        .collect();
    let inputs: Vec<&str> = present.iter().map(|&r| texts.value(r)).collect();
    let encoded: Vec<std::result::Result<Vec<u32>, String>> =
        match side.tokenizer.encode_batch(inputs.clone(), true) {
            Ok(encs) => encs.into_iter().map(|e| Ok(e.get_ids().to_vec())).collect(),
            // One bad row fails the whole batch call: encode row by row to find it.
            Err(_) => inputs
                .iter()
                .map(|t| {
                    side.tokenizer
                        .encode(*t, true)
                        .map(|e| e.get_ids().to_vec())
                        .map_err(|e| e.to_string())
                })
                .collect(),
        };
    let mut per_row: Vec<Option<Vec<u32>>> = vec![None; n];
    for (&r, enc) in present.iter().zip(encoded) {
        match enc {
            Ok(ids) if !truncation && ids.len() > side.max => {
                errors[r] = Some(format!(
                    "{what} has {} tokens, more than the {} allowed (truncation is off)",
                    ids.len(),
                    side.max
                ));
            }
            Ok(ids) => per_row[r] = Some(ids),
            Err(e) => errors[r] = Some(format!("tokenizing the {what}: {e}")),
        }
    }
    Ok(ids_array(&per_row))
}

/// `list<int32>` and `int32` length arrays from optional id vectors.
pub fn ids_array(rows: &[Option<Vec<u32>>]) -> (ArrayRef, ArrayRef) {
    let total: usize = rows.iter().map(|r| r.as_ref().map_or(0, |v| v.len())).sum();
    let mut values: Vec<i32> = Vec::with_capacity(total);
    let mut offsets: Vec<i32> = Vec::with_capacity(rows.len() + 1);
    offsets.push(0);
    let mut lens: Vec<Option<i32>> = Vec::with_capacity(rows.len());
    for r in rows {
        if let Some(ids) = r {
            values.extend(ids.iter().map(|&x| x as i32));
            lens.push(Some(ids.len() as i32));
        } else {
            lens.push(None);
        }
        offsets.push(values.len() as i32);
    }
    let nulls = NullBuffer::from(rows.iter().map(|r| r.is_some()).collect::<Vec<bool>>());
    let list = ListArray::new(
        Arc::new(Field::new("item", DataType::Int32, false)),
        OffsetBuffer::new(ScalarBuffer::from(offsets)),
        Arc::new(Int32Array::from(values)),
        Some(nulls),
    );
    (Arc::new(list), Arc::new(Int32Array::from(lens)))
}

impl Operator for Tokenize {
    fn name(&self) -> &'static str {
        "tokenize"
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn execute(
        &self,
        input: SendableRecordBatchStream,
        exec: &super::Exec,
    ) -> Result<SendableRecordBatchStream> {
        let me = Arc::new(Tokenize {
            input: self.input.clone(),
            target: self.target.clone(),
            truncation: self.truncation,
            error_col: self.error_col,
            schema: self.schema.clone(),
        });
        let step = exec.step.clone();
        // Two batches tokenize at once, each on a blocking thread; a panic there fails the stream.
        let stream = input
            .map(move |b| {
                let (me, step) = (me.clone(), step.clone());
                async move {
                    let b = b?;
                    let tokenized = runtime::spawn_worker(move || me.apply(&b));
                    Ok(runtime::join(&step, tokenized).await?)
                }
            })
            .buffered(2);
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            stream,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::{train, TrainOptions, EOS_ID};
    use datafusion::arrow::array::UInt64Array;

    fn tok() -> Tokenizer {
        let texts: Vec<String> = (0..100)
            .map(|i| format!("convert list {i} to string with join and map"))
            .collect();
        train(
            texts.iter(),
            &TrainOptions {
                vocab_size: 120,
                max_piece_length: 8,
            },
        )
        .unwrap()
    }

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("row_id", DataType::UInt64, false),
            Field::new("input", DataType::Utf8, true),
            Field::new("target", DataType::Utf8, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(UInt64Array::from(vec![0, 1, 2])),
                Arc::new(StringArray::from(vec![
                    Some("map"),
                    None,
                    Some("convert list 1 to string with join and map and map"),
                ])),
                Arc::new(StringArray::from(vec![Some("map"), Some("map"), None])),
            ],
        )
        .unwrap()
    }

    fn spec(truncation: bool) -> TokenizeSpec {
        TokenizeSpec {
            input: "input".into(),
            target: Some("target".into()),
            max_input_tokens: 6,
            max_target_tokens: 8,
            tokenizer: None,
            truncation,
        }
    }

    fn ids(b: &RecordBatch, col: &str) -> Vec<Option<Vec<i32>>> {
        let l = b
            .column_by_name(col)
            .unwrap()
            .as_any()
            .downcast_ref::<ListArray>()
            .unwrap();
        (0..l.len())
            .map(|i| {
                l.is_valid(i).then(|| {
                    l.value(i)
                        .as_any()
                        .downcast_ref::<Int32Array>()
                        .unwrap()
                        .values()
                        .to_vec()
                })
            })
            .collect()
    }

    #[test]
    fn encodes_truncates_keeps_eos_and_nulls() {
        let t = tok();
        let b = batch();
        let op = Tokenize::new(&spec(true), b.schema(), &t).unwrap();
        let out = op.apply(&b).unwrap();
        let input_ids = ids(&out, INPUT_IDS);
        assert!(input_ids[1].is_none());
        let long = input_ids[2].as_ref().unwrap();
        assert_eq!(long.len(), 6);
        assert_eq!(*long.last().unwrap(), EOS_ID as i32);
        let expect: Vec<i32> = t
            .encode("map", true)
            .unwrap()
            .get_ids()
            .iter()
            .map(|&x| x as i32)
            .collect();
        assert!(expect.len() < 6, "{expect:?}");
        assert_eq!(input_ids[0].as_ref().unwrap(), &expect);
        let lens = out
            .column_by_name(N_INPUT_TOKENS)
            .unwrap()
            .as_any()
            .downcast_ref::<Int32Array>()
            .unwrap();
        assert_eq!(lens.value(0) as usize, expect.len());
        assert!(lens.is_null(1));
        let labels = ids(&out, LABELS);
        assert!(labels[2].is_none() && labels[1].is_some());
        let errs = out.column_by_name(ERROR).unwrap();
        assert_eq!(errs.null_count(), 3);
    }

    #[test]
    fn without_truncation_long_rows_are_recorded_errors() {
        let t = tok();
        let b = batch();
        let op = Tokenize::new(&spec(false), b.schema(), &t).unwrap();
        let out = op.apply(&b).unwrap();
        assert!(ids(&out, INPUT_IDS)[2].is_none());
        let errs = out
            .column_by_name(ERROR)
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert!(
            errs.value(2).contains("more than the 6 allowed"),
            "{}",
            errs.value(2)
        );
        assert!(errs.is_null(0), "{:?}", errs.value(0));
    }

    #[test]
    fn schema_errors() {
        let t = tok();
        let s = batch().schema();
        let mut sp = spec(true);
        sp.input = "inptu".into();
        let e = Tokenize::new(&sp, s.clone(), &t).err().unwrap();
        assert_eq!(e.suggestion.as_deref(), Some("input"));
        let mut sp = spec(true);
        sp.input = "row_id".into();
        assert!(Tokenize::new(&sp, s, &t)
            .err()
            .unwrap()
            .message
            .contains("expected text"));
    }
}
