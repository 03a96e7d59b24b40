//! Padded batches: right-padded ids with their masks, and encoder outputs of rows encoded in
//! length-homogeneous chunks, stacked for one decoding batch.

use candle_core::Tensor;

use crate::error::Result;
use crate::model::mode::Mode;
use crate::model::seq2seq::Seq2Seq;

/// Encode rows in chunks of about `budget` padded tokens (rows in the order given; sort them by
/// length for little padding) and stack the results, padded to the longest row: (rows, len, d) hidden
/// states and their (rows, len) mask.
pub fn encode_rows(
    model: &dyn Seq2Seq,
    rows: &[&[u32]],
    budget: usize,
) -> Result<(Tensor, Tensor)> {
    let width = rows.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
    let mut hidden = vec![];
    let mut masks = vec![];
    let mut i = 0;
    while i < rows.len() {
        let mut j = i + 1;
        let mut longest = rows[i].len().max(1);
        while j < rows.len() && (j - i + 1) * longest.max(rows[j].len()) <= budget.max(longest) {
            longest = longest.max(rows[j].len());
            j += 1;
        }
        let (ids, mask) = pad_batch(&rows[i..j], model.config().tokens.pad, model.device())?;
        let h = model.encode(&ids, &mask, &Mode::INFER)?;
        let (b, s, d) = h.dims3()?;
        if s < width {
            hidden.push(Tensor::cat(
                &[
                    &h,
                    &Tensor::zeros((b, width - s, d), h.dtype(), h.device())?,
                ],
                1,
            )?);
            masks.push(Tensor::cat(
                &[
                    &mask,
                    &Tensor::zeros((b, width - s), mask.dtype(), mask.device())?,
                ],
                1,
            )?);
        } else {
            hidden.push(h);
            masks.push(mask);
        }
        i = j;
    }
    if hidden.len() == 1 {
        return Ok((hidden.remove(0), masks.remove(0)));
    }
    Ok((Tensor::cat(&hidden, 0)?, Tensor::cat(&masks, 0)?))
}

/// Right-padded ids and 0/1 mask for a batch of rows.
pub fn pad_batch(
    rows: &[&[u32]],
    pad: u32,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let len = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(rows.len() * len);
    let mut mask = Vec::with_capacity(rows.len() * len);
    for r in rows {
        ids.extend_from_slice(r);
        ids.extend(std::iter::repeat_n(pad, len - r.len()));
        mask.extend(std::iter::repeat_n(1u8, r.len()));
        mask.extend(std::iter::repeat_n(0u8, len - r.len()));
    }
    Ok((
        Tensor::from_vec(ids, (rows.len(), len), device)?,
        Tensor::from_vec(mask, (rows.len(), len), device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_rows_with_masks() {
        let (ids, mask) = pad_batch(&[&[5, 6, 7], &[8]], 0, &candle_core::Device::Cpu).unwrap();
        assert_eq!(
            ids.to_vec2::<u32>().unwrap(),
            vec![vec![5, 6, 7], vec![8, 0, 0]]
        );
        assert_eq!(
            mask.to_vec2::<u8>().unwrap(),
            vec![vec![1, 1, 1], vec![1, 0, 0]]
        );
    }
}
