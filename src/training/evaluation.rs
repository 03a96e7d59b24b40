//! Evaluating a model during and after training: the mean token loss over the eval rows, and
//! generations scored against their references (BLEU, exact match), written out per row.

use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{Float64Array, RecordBatch, StringArray, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema};

use super::batching::Example;
use super::examples::{BatchTensors, LabelledRows};
use crate::error::{Error, Result};
use crate::metrics::{Scorer, Scores};
use crate::model::decoding::{generate, DecodeOptions};
use crate::model::mode::Mode;
use crate::model::{ops, Seq2Seq};

/// Rows per evaluation batch.
const EVAL_BATCH: usize = 32;

/// Mean token loss over examples (no dropout), in length-sorted batches.
pub fn eval_loss(model: &dyn Seq2Seq, examples: &[Example]) -> Result<f64> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| examples[i].input.len());
    let (mut sum, mut n) = (0f64, 0f64);
    for chunk in order.chunks(EVAL_BATCH) {
        let batch: Vec<&Example> = chunk.iter().map(|&i| &examples[i]).collect();
        let t = BatchTensors::new(model, &batch)?;
        let logits = model
            .forward(&t.ids, &t.mask, &t.decoder_ids, &Mode::INFER)?
            .detach();
        let (s, k) = ops::cross_entropy(&logits, &t.labels, &t.label_mask, 0.0)?;
        sum += s.to_scalar::<f32>()? as f64;
        n += k;
    }
    Ok(sum / n.max(1.0))
}

/// Generations for the first `rows` eval rows (all when 0) decoded with `options`, scored against
/// their references; returns the scores and the predictions in row order.
pub fn score_generations(
    model: &dyn Seq2Seq,
    tok: &tokenizers::Tokenizer,
    eval: &LabelledRows,
    rows: usize,
    options: &DecodeOptions,
) -> Result<(Scores, Vec<String>)> {
    let n = if rows > 0 {
        rows.min(eval.examples.len())
    } else {
        eval.examples.len()
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(eval.examples[i].input.len()));
    let mut predictions = vec![String::new(); n];
    for chunk in order.chunks(EVAL_BATCH) {
        let inputs: Vec<&[u32]> = chunk
            .iter()
            .map(|&i| eval.examples[i].input.as_slice())
            .collect();
        let seeds = vec![0u64; inputs.len()];
        let out = generate(model, &inputs, &seeds, options)?;
        for (&i, g) in chunk.iter().zip(out) {
            predictions[i] = tok
                .decode(&g.tokens, true)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
        }
    }
    let mut sc = Scorer::default();
    for (p, r) in predictions.iter().zip(&eval.references) {
        if let Some(r) = r {
            sc.add(p, r);
        }
    }
    Ok((sc.scores(), predictions))
}

/// Scores of copying the baseline column instead of generating.
pub fn baseline_scores(eval: &LabelledRows) -> Scores {
    let mut sc = Scorer::default();
    for (b, r) in eval.baselines.iter().zip(&eval.references) {
        if let (Some(b), Some(r)) = (b, r) {
            sc.add(b, r);
        }
    }
    sc.scores()
}

/// `eval_predictions.parquet`: row id, prediction, reference and sentence BLEU of each scored row.
pub fn write_predictions(path: &Path, eval: &LabelledRows, predictions: &[String]) -> Result<()> {
    let n = predictions.len();
    let schema = Arc::new(Schema::new(vec![
        Field::new("row_id", DataType::UInt64, false),
        Field::new("prediction", DataType::Utf8, false),
        Field::new("reference", DataType::Utf8, true),
        Field::new("sentence_bleu", DataType::Float64, true),
    ]));
    let bleu: Vec<Option<f64>> = predictions
        .iter()
        .zip(&eval.references)
        .map(|(p, r)| {
            r.as_ref()
                .map(|r| 100.0 * crate::metrics::sentence_bleu(p, r))
        })
        .collect();
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(UInt64Array::from(eval.row_ids[..n].to_vec())),
            Arc::new(StringArray::from(predictions.to_vec())),
            Arc::new(StringArray::from(eval.references[..n].to_vec())),
            Arc::new(Float64Array::from(bleu)),
        ],
    )
    .map_err(|e| Error::arrow("eval predictions", e))?;
    let f = std::fs::File::create(path).map_err(|e| Error::io(path.display(), e))?;
    let mut w = datafusion::parquet::arrow::ArrowWriter::try_new(f, schema, None)
        .map_err(|e| Error::parquet(path.display(), e))?;
    w.write(&batch)
        .map_err(|e| Error::parquet(path.display(), e))?;
    w.close().map_err(|e| Error::parquet(path.display(), e))?;
    Ok(())
}
