//! Labelled rows for training and evaluation: token ids and labels read off a stream (rows with an
//! upstream error or without ids are skipped and counted), and padded batch tensors.

use candle_core::Tensor;
use datafusion::arrow::array::{Array, ArrayRef, Int32Array, ListArray, StringArray, UInt64Array};
use datafusion::arrow::datatypes::DataType;
use datafusion::execution::SendableRecordBatchStream;
use futures::StreamExt;

use super::batching::Example;
use crate::error::{from_stream_error, Error, Result};
use crate::model::decoding::pad_batch;
use crate::model::Seq2Seq;
use crate::operators::tokenize::{ERROR, INPUT_IDS, LABELS};

/// The rows of a labelled stream: examples plus, when asked, reference and baseline texts and row ids.
#[derive(Default)]
pub struct LabelledRows {
    pub examples: Vec<Example>,
    pub references: Vec<Option<String>>,
    pub baselines: Vec<Option<String>>,
    pub row_ids: Vec<u64>,
    /// Rows left out: an upstream error, or no ids or labels.
    pub skipped: usize,
}

/// The text columns to keep beside each example.
#[derive(Debug, Clone, Copy, Default)]
pub struct TextColumns<'a> {
    /// The target text (BLEU references).
    pub target: Option<&'a str>,
    /// A column scored as a baseline.
    pub baseline: Option<&'a str>,
    pub row_id: &'a str,
}

fn list_u32(a: &ListArray, i: usize) -> Vec<u32> {
    let v = a.value(i);
    v.as_any()
        .downcast_ref::<Int32Array>()
        .map(|x| x.values().iter().map(|&t| t as u32).collect())
        .unwrap_or_default()
}

/// Read every row of `s` (with `input_ids` and `labels` from `tokenize`).
pub async fn collect_rows(
    mut s: SendableRecordBatchStream,
    columns: TextColumns<'_>,
) -> Result<LabelledRows> {
    let mut rows = LabelledRows::default();
    while let Some(b) = s.next().await {
        let b = b.map_err(from_stream_error)?;
        let ids = b
            .column_by_name(INPUT_IDS)
            .and_then(|c| c.as_any().downcast_ref::<ListArray>().cloned());
        let labels = b
            .column_by_name(LABELS)
            .and_then(|c| c.as_any().downcast_ref::<ListArray>().cloned());
        let (Some(ids), Some(labels)) = (ids, labels) else {
            return Err(Error::Data(
                "train: rows lack `input_ids` / `labels`".into(),
            ));
        };
        let errors = b
            .column_by_name(ERROR)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned());
        let text = |name: Option<&str>| {
            name.and_then(|n| b.column_by_name(n))
                .and_then(|c| datafusion::arrow::compute::cast(c, &DataType::Utf8).ok())
        };
        let refs = text(columns.target);
        let bases = text(columns.baseline);
        let rid = b
            .column_by_name(columns.row_id)
            .and_then(|c| c.as_any().downcast_ref::<UInt64Array>().cloned());
        for i in 0..b.num_rows() {
            let bad = ids.is_null(i)
                || labels.is_null(i)
                || errors.as_ref().is_some_and(|e| e.is_valid(i));
            if bad {
                rows.skipped += 1;
                continue;
            }
            let ex = Example {
                input: list_u32(&ids, i),
                labels: list_u32(&labels, i),
            };
            if ex.input.is_empty() || ex.labels.is_empty() {
                rows.skipped += 1;
                continue;
            }
            rows.examples.push(ex);
            let get = |a: &Option<ArrayRef>| {
                a.as_ref().and_then(|a| {
                    let s = a.as_any().downcast_ref::<StringArray>()?;
                    s.is_valid(i).then(|| s.value(i).to_string())
                })
            };
            rows.references.push(get(&refs));
            rows.baselines.push(get(&bases));
            rows.row_ids
                .push(rid.as_ref().map(|r| r.value(i)).unwrap_or(i as u64));
        }
    }
    Ok(rows)
}

/// A batch's tensors: encoder ids and mask, decoder inputs (the family's shift of the labels: start +
/// labels[:-1]), labels, label mask.
pub struct BatchTensors {
    pub ids: Tensor,
    pub mask: Tensor,
    pub decoder_ids: Tensor,
    pub labels: Tensor,
    pub label_mask: Tensor,
}

impl BatchTensors {
    /// Right-padded tensors for `batch` on the model's device.
    pub fn new(model: &dyn Seq2Seq, batch: &[&Example]) -> Result<BatchTensors> {
        let dev = model.device();
        let cfg = model.config();
        let inputs: Vec<&[u32]> = batch.iter().map(|e| e.input.as_slice()).collect();
        let (ids, mask) = pad_batch(&inputs, cfg.tokens.pad, dev)?;
        let t = batch.iter().map(|e| e.labels.len()).max().unwrap_or(1);
        let (mut dec, mut lab, mut lmask) = (vec![], vec![], vec![]);
        for e in batch {
            dec.extend(cfg.decoder_inputs(&e.labels, t));
            for j in 0..t {
                lab.push(e.labels.get(j).copied().unwrap_or(0));
                lmask.push(if j < e.labels.len() { 1f32 } else { 0.0 });
            }
        }
        let b = batch.len();
        Ok(BatchTensors {
            ids,
            mask,
            decoder_ids: Tensor::from_vec(dec, (b, t), dev)?,
            labels: Tensor::from_vec(lab, (b, t), dev)?,
            label_mask: Tensor::from_vec(lmask, (b, t), dev)?,
        })
    }
}
