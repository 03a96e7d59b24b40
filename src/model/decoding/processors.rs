//! Choosing each row's next token: HF's logits processors (repetition penalty, no-repeat n-grams,
//! min new tokens, the forced first and last tokens) in HF's order, then argmax, or temperature /
//! top-k / top-p and a draw from the row's own generator (`sampling`).

use candle_core::Tensor;

use super::options::DecodeOptions;
use crate::error::{Error, Result};
use crate::model::config::Tokens;
use crate::model::ops;
use crate::rng::Rng;

/// Apply HF's processors to one row's logits in place. `seq` is the decoder sequence so far (with the
/// start token); `new` is how many tokens were generated.
pub fn process(logits: &mut [f32], seq: &[u32], new: usize, tokens: &Tokens, o: &DecodeOptions) {
    let eos = tokens.eos;
    if o.repetition_penalty != 1.0 {
        let p = o.repetition_penalty as f32;
        let mut seen = std::collections::HashSet::with_capacity(seq.len());
        for &t in seq {
            if seen.insert(t) {
                if let Some(x) = logits.get_mut(t as usize) {
                    *x = if *x < 0.0 { *x * p } else { *x / p };
                }
            }
        }
    }
    let n = o.no_repeat_ngram_size;
    if n > 0 && seq.len() + 1 >= n {
        let prefix = &seq[seq.len() + 1 - n..];
        for w in seq.windows(n) {
            if &w[..n - 1] == prefix {
                if let Some(x) = logits.get_mut(w[n - 1] as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
    }
    if new < o.min_new_tokens {
        if let Some(x) = logits.get_mut(eos as usize) {
            *x = f32::NEG_INFINITY;
        }
    }
    // HF's ForcedBOS / ForcedEOS processors: one token only, at the first step / the last one.
    if let Some(t) = forced(tokens, new, o) {
        force(logits, t);
    }
}

/// The token the family forces at generated position `new`, if any: `forced_bos_token_id` first,
/// `forced_eos_token_id` when the length limit is reached.
pub(super) fn forced(tokens: &Tokens, new: usize, o: &DecodeOptions) -> Option<u32> {
    match (tokens.forced_bos, tokens.forced_eos) {
        (Some(b), _) if new == 0 => Some(b),
        (_, Some(e)) if new + 1 == o.max_new_tokens => Some(e),
        _ => None,
    }
}

/// Every logit but `t`'s -inf, `t`'s 0 (as HF writes it).
fn force(logits: &mut [f32], t: u32) {
    for x in logits.iter_mut() {
        *x = f32::NEG_INFINITY;
    }
    if let Some(x) = logits.get_mut(t as usize) {
        *x = 0.0;
    }
}

fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// The items of the active rows, in slot order (`active` is ascending and has no repeats), each
/// borrowed on its own so rows can run in parallel.
pub(super) fn active_mut<'a, T>(items: &'a mut [T], active: &[usize]) -> Vec<&'a mut T> {
    let mut is_active = vec![false; items.len()];
    for &r in active {
        is_active[r] = true;
    }
    items
        .iter_mut()
        .enumerate()
        .filter(|(r, _)| is_active[*r])
        .map(|(_, x)| x)
        .collect()
}

/// The next token of every active row from its logits (rows in `active` order, (rows, vocab)):
/// processors, then argmax or a draw. Rows are independent, so they run in parallel, reading the
/// logits in place (a copy per row only when a processor edits them).
pub(super) fn next_tokens(
    logits: &Tensor,
    active: &[usize],
    seqs: &[Vec<u32>],
    rngs: &mut [Rng],
    step: usize,
    tokens: &Tokens,
    o: &DecodeOptions,
) -> Result<Vec<u32>> {
    use rayon::prelude::*;
    let (rows, vocab) = logits.dims2()?;
    if rows != active.len() {
        return Err(Error::model(format!(
            "decoder returned {rows} rows of logits for {} active rows",
            active.len()
        )));
    }
    let edits = o.repetition_penalty != 1.0
        || o.no_repeat_ngram_size > 0
        || step < o.min_new_tokens
        || forced(tokens, step, o).is_some();
    if !edits && !o.do_sample && !logits.device().is_cpu() {
        // Greedy without processors: the argmax where the logits are; a token per row crosses.
        return ops::first_argmax(logits);
    }
    let row_rngs = active_mut(rngs, active);
    ops::with_host_f32(logits, |flat| {
        flat.par_chunks(vocab)
            .zip(active.par_iter())
            .zip(row_rngs.into_par_iter())
            .map(|((row, &r), rng)| {
                if !edits && !o.do_sample {
                    return argmax(row);
                }
                let mut l = row.to_vec();
                process(&mut l, &seqs[r], step, tokens, o);
                if o.do_sample {
                    super::sampling::sample(&mut l, o, rng)
                } else {
                    argmax(&l)
                }
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> DecodeOptions {
        DecodeOptions::default()
    }

    fn eos(eos: u32) -> Tokens {
        Tokens {
            pad: 0,
            eos,
            decoder_start: 0,
            forced_bos: None,
            forced_eos: None,
        }
    }

    #[test]
    fn repetition_penalty_follows_hf() {
        let mut l = vec![2.0f32, -2.0, 1.0, 4.0];
        let o = DecodeOptions {
            repetition_penalty: 2.0,
            ..opts()
        };
        process(&mut l, &[0, 1, 1], 2, &eos(3), &o);
        assert_eq!(l, vec![1.0, -4.0, 1.0, 4.0]);
    }

    #[test]
    fn no_repeat_ngram_and_min_new_tokens() {
        let mut l = vec![0.0f32; 6];
        let o = DecodeOptions {
            no_repeat_ngram_size: 2,
            min_new_tokens: 3,
            ..opts()
        };
        // seq ... 4 5 ... 4 : the bigram (4, 5) was seen, so 5 is banned after 4.
        process(&mut l, &[0, 4, 5, 2, 4], 1, &eos(1), &o);
        assert_eq!(l[5], f32::NEG_INFINITY);
        assert_eq!(l[1], f32::NEG_INFINITY); // eos before min_new_tokens
        assert_eq!(l[2], 0.0);
    }

    #[test]
    fn forced_tokens_come_first_and_last_as_hf_forces_them() {
        let o = DecodeOptions {
            max_new_tokens: 4,
            ..opts()
        };
        let t = Tokens {
            forced_bos: Some(0),
            forced_eos: Some(2),
            ..eos(2)
        };
        let run = |new: usize| {
            let mut l = vec![1.0f32, 3.0, -1.0, 2.0];
            process(&mut l, &[2], new, &t, &o);
            l
        };
        let ninf = f32::NEG_INFINITY;
        assert_eq!(run(0), vec![0.0, ninf, ninf, ninf]);
        assert_eq!(run(1), vec![1.0, 3.0, -1.0, 2.0]);
        assert_eq!(run(3), vec![ninf, ninf, 0.0, ninf]);
        // Without forced tokens nothing changes at either end.
        let mut l = vec![1.0f32, 3.0, -1.0, 2.0];
        process(&mut l, &[2], 0, &eos(2), &o);
        assert_eq!(l, vec![1.0, 3.0, -1.0, 2.0]);
    }
}
