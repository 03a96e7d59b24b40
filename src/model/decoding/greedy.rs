//! Greedy and sampled decoding: every row leaves the running batch (and every cache) at the step it
//! finishes, so no work is spent on finished rows.

use candle_core::{DType, Tensor};

use super::batch::encode_rows;
use super::options::{DecodeOptions, Finish, Generated};
use super::processors::next_tokens;
use crate::error::Result;
use crate::model::seq2seq::Seq2Seq;
use crate::rng::Rng;

/// Greedy or sampled decoding of a batch of rows, one token per row and step. `seeds` (one per row)
/// make sampling independent of batching.
pub fn greedy_or_sampled(
    model: &dyn Seq2Seq,
    rows: &[&[u32]],
    seeds: &[u64],
    o: &DecodeOptions,
) -> Result<Vec<Generated>> {
    let special = model.config().tokens;
    let (eos, start) = (special.eos, special.decoder_start);
    let t0 = std::time::Instant::now();
    let (enc, mask) = encode_rows(model, rows, o.encoder_batch_tokens)?;
    let t_enc = t0.elapsed();
    let mut state = model.start_decoding(&enc, &mask, o.max_new_tokens + 1)?;
    let t_cross = t0.elapsed() - t_enc;
    drop(enc);
    let n = rows.len();
    let mut seqs: Vec<Vec<u32>> = vec![vec![start]; n];
    let mut done: Vec<Option<Finish>> = vec![None; n];
    let mut rngs: Vec<Rng> = seeds.iter().map(|s| Rng::new(*s)).collect();
    // Positions (in the original batch) of the rows still decoding, in state order.
    let mut active: Vec<usize> = (0..n).collect();
    for step in 0..o.max_new_tokens {
        let last: Vec<u32> = active
            .iter()
            .map(|&r| *seqs[r].last().expect("start token"))
            .collect();
        let tokens = Tensor::new(last, model.device())?;
        let logits = model
            .decode_step(&mut state, &tokens)?
            .to_dtype(DType::F32)?;
        let next = next_tokens(&logits, &active, &seqs, &mut rngs, step, &special, o)?;
        // A forced last token ends the row at the length limit, not by the model's choice.
        let last_step = step + 1 == o.max_new_tokens;
        let forced_end = last_step && special.forced_eos.is_some();
        let mut keep: Vec<u32> = vec![];
        let mut still: Vec<usize> = vec![];
        for (slot, (&r, next)) in active.iter().zip(next).enumerate() {
            seqs[r].push(next);
            if next == eos && !forced_end {
                done[r] = Some(Finish::Eos);
            } else if last_step {
                done[r] = Some(Finish::Length);
            } else {
                keep.push(slot as u32);
                still.push(r);
            }
        }
        if still.is_empty() {
            break;
        }
        if still.len() < active.len() {
            state.select_rows(&keep)?;
        }
        active = still;
    }
    log::debug!(
        "generate: {} rows x {} input tokens: encode {:.0} ms, cross K/V {:.0} ms, decode {:.0} ms",
        n,
        mask.dims()[1],
        t_enc.as_secs_f64() * 1e3,
        t_cross.as_secs_f64() * 1e3,
        (t0.elapsed() - t_enc - t_cross).as_secs_f64() * 1e3
    );
    Ok(seqs
        .into_iter()
        .zip(done)
        .map(|(s, d)| Generated {
            tokens: s[1..].to_vec(),
            finish: d.unwrap_or(Finish::Length),
        })
        .collect())
}
