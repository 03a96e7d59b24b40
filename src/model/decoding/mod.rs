//! Decoding a batch of rows with any [`Seq2Seq`] model: greedy, sampling (temperature, top-k, top-p, per-row seeds) and
//! beam search, with HF's logits processors (repetition penalty, no-repeat n-grams, min new tokens).
//!
//! Every row leaves the running batch (and every cache) at the step it finishes, so no work is spent on
//! finished rows. Semantics follow HF `generate` for encoder-decoder models:
//! - the decoder sequence starts with `decoder_start_token_id`; outputs exclude it and include `</s>`;
//! - `repetition_penalty` applies to the tokens of the decoder sequence (the start token and the tokens
//!   generated so far), not to the encoder input — HF's `RepetitionPenaltyLogitsProcessor` sees the
//!   decoder ids only (its encoder variant is a separate option HF calls `encoder_repetition_penalty`);
//! - processors run in HF's order: repetition penalty, no-repeat n-gram, min new tokens, then (when
//!   sampling) temperature, top-k, top-p.

mod batch;
mod beam;
mod greedy;
mod options;
mod processors;
mod sampling;

pub use batch::{encode_rows, pad_batch};
pub use options::{DecodeOptions, Finish, Generated};
pub use processors::process;

use crate::error::{Error, Result};
use crate::model::seq2seq::Seq2Seq;

/// Generate for a batch of rows: beam search when `num_beams > 1`, else greedy or sampled. `seeds`
/// (one per row) make sampling independent of batching.
pub fn generate(
    model: &dyn Seq2Seq,
    rows: &[&[u32]],
    seeds: &[u64],
    o: &DecodeOptions,
) -> Result<Vec<Generated>> {
    if rows.is_empty() {
        return Ok(vec![]);
    }
    if o.num_beams > 1 {
        if o.do_sample {
            return Err(Error::model(
                "beam sampling (num_beams > 1 with do_sample) is not supported",
            ));
        }
        return beam::beam_search(model, rows, o);
    }
    greedy::greedy_or_sampled(model, rows, seeds, o)
}
