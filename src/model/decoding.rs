//! Decoding a batch of rows with the T5: greedy, sampling (temperature, top-k, top-p, per-row seeds) and
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

use candle_core::{DType, Tensor};

use super::t5::T5;
use crate::error::{Error, Result};
use crate::rng::Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct DecodeOptions {
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    pub do_sample: bool,
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub repetition_penalty: f64,
    pub no_repeat_ngram_size: usize,
    pub num_beams: usize,
    pub length_penalty: f64,
    pub early_stopping: bool,
    /// Rows are encoded in chunks of about this many (padded) tokens, then decoded together: the
    /// encoder wants length-homogeneous chunks, the decoder wants many rows per step.
    pub encoder_batch_tokens: usize,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            max_new_tokens: 64,
            min_new_tokens: 0,
            do_sample: false,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: false,
            encoder_batch_tokens: 4096,
        }
    }
}

/// Encode rows in chunks of about `budget` padded tokens (rows in the order given; sort them by
/// length for little padding) and stack the results, padded to the longest row: (rows, len, d) hidden
/// states and their (rows, len) mask.
pub fn encode_rows(model: &T5, rows: &[&[u32]], budget: usize) -> Result<(Tensor, Tensor)> {
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
        let (ids, mask) = pad_batch(&rows[i..j], model.cfg.pad_token_id, &model.device)?;
        let h = model.encode(&ids, &mask, &super::layers::Mode::INFER)?;
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Eos,
    Length,
}

impl Finish {
    pub fn as_str(&self) -> &'static str {
        match self {
            Finish::Eos => "eos",
            Finish::Length => "length",
        }
    }
}

/// One row's result: generated ids (without the start token; with `</s>` when it finished on it).
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub finish: Finish,
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

/// Apply HF's processors to one row's logits in place. `seq` is the decoder sequence so far (with the
/// start token); `new` is how many tokens were generated.
pub(crate) fn process(logits: &mut [f32], seq: &[u32], new: usize, eos: u32, o: &DecodeOptions) {
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

/// HF's warpers (temperature, top-k, top-p) and a draw from the result.
fn sample(logits: &mut [f32], o: &DecodeOptions, rng: &mut Rng) -> u32 {
    if o.temperature > 0.0 && o.temperature != 1.0 {
        let t = o.temperature as f32;
        for x in logits.iter_mut() {
            *x /= t;
        }
    }
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    let mut keep = order.len();
    if o.top_k > 0 {
        keep = keep.min(o.top_k);
    }
    let max = logits[order[0] as usize];
    let probs: Vec<f64> = order[..keep]
        .iter()
        .map(|&i| ((logits[i as usize] - max) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    if o.top_p < 1.0 {
        // Keep the smallest prefix whose mass reaches top_p (at least one token).
        let mut cum = 0.0;
        let mut k = 0;
        while k < keep {
            cum += probs[k] / total;
            k += 1;
            if cum >= o.top_p {
                break;
            }
        }
        keep = k.max(1);
    }
    let mass: f64 = probs[..keep].iter().sum();
    let mut u = rng.next_f64() * mass;
    for (i, p) in probs[..keep].iter().enumerate() {
        if u < *p {
            return order[i];
        }
        u -= p;
    }
    order[keep - 1]
}

/// The next token of every active row from its logits (rows in `active` order, (rows, vocab)):
/// processors, then argmax or a draw. Rows are independent, so they run in parallel, reading the
/// logits in place (a copy per row only when a processor edits them).
fn next_tokens(
    logits: &Tensor,
    active: &[usize],
    seqs: &[Vec<u32>],
    rngs: &mut [Rng],
    step: usize,
    eos: u32,
    o: &DecodeOptions,
) -> Result<Vec<u32>> {
    let logits = logits.contiguous()?;
    let (rows, vocab) = logits.dims2()?;
    if rows != active.len() {
        return Err(Error::model(format!(
            "decoder returned {rows} rows of logits for {} active rows",
            active.len()
        )));
    }
    let (storage, layout) = logits.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        drop(storage);
        let flat: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        return Ok(pick(&flat, vocab, active, seqs, rngs, step, eos, o));
    };
    let flat = super::contiguous_f32(cpu, layout, "logits")?;
    Ok(pick(flat, vocab, active, seqs, rngs, step, eos, o))
}

/// `next_tokens` over host logits `flat` (rows x vocab).
#[allow(clippy::too_many_arguments)]
fn pick(
    flat: &[f32],
    vocab: usize,
    active: &[usize],
    seqs: &[Vec<u32>],
    rngs: &mut [Rng],
    step: usize,
    eos: u32,
    o: &DecodeOptions,
) -> Vec<u32> {
    use rayon::prelude::*;
    let edits =
        o.repetition_penalty != 1.0 || o.no_repeat_ngram_size > 0 || step < o.min_new_tokens;
    // Each active row's generator, in slot order (`active` is ascending and has no repeats).
    let mut is_active = vec![false; rngs.len()];
    for &r in active {
        is_active[r] = true;
    }
    let row_rngs: Vec<&mut Rng> = rngs
        .iter_mut()
        .enumerate()
        .filter(|(r, _)| is_active[*r])
        .map(|(_, g)| g)
        .collect();
    flat.par_chunks(vocab)
        .zip(active.par_iter())
        .zip(row_rngs.into_par_iter())
        .map(|((row, &r), rng)| {
            if !edits && !o.do_sample {
                return argmax(row);
            }
            let mut l = row.to_vec();
            process(&mut l, &seqs[r], step, eos, o);
            if o.do_sample {
                sample(&mut l, o, rng)
            } else {
                argmax(&l)
            }
        })
        .collect()
}

/// Generate for a batch of rows. `seeds` (one per row) make sampling independent of batching.
pub fn generate(
    model: &T5,
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
        return super::beam::beam_search(model, rows, o);
    }
    let cfg = &model.cfg;
    let (eos, start) = (cfg.eos_token_id, cfg.decoder_start());
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
        let tokens = Tensor::new(last, &model.device)?;
        let logits = model
            .decode_step(&mut state, &tokens)?
            .to_dtype(DType::F32)?;
        let next = next_tokens(&logits, &active, &seqs, &mut rngs, step, eos, o)?;
        let mut keep: Vec<u32> = vec![];
        let mut still: Vec<usize> = vec![];
        for (slot, (&r, next)) in active.iter().zip(next).enumerate() {
            seqs[r].push(next);
            if next == eos {
                done[r] = Some(Finish::Eos);
            } else if step + 1 == o.max_new_tokens {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> DecodeOptions {
        DecodeOptions::default()
    }

    #[test]
    fn repetition_penalty_follows_hf() {
        let mut l = vec![2.0f32, -2.0, 1.0, 4.0];
        let o = DecodeOptions {
            repetition_penalty: 2.0,
            ..opts()
        };
        process(&mut l, &[0, 1, 1], 2, 3, &o);
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
        process(&mut l, &[0, 4, 5, 2, 4], 1, 1, &o);
        assert_eq!(l[5], f32::NEG_INFINITY);
        assert_eq!(l[1], f32::NEG_INFINITY); // eos before min_new_tokens
        assert_eq!(l[2], 0.0);
    }

    #[test]
    fn sampling_respects_top_k_top_p_and_seed() {
        let base = vec![5.0f32, 4.9, 0.0, -3.0];
        let o = DecodeOptions {
            do_sample: true,
            top_k: 2,
            ..opts()
        };
        let mut rng = Rng::new(1);
        for _ in 0..200 {
            let t = sample(&mut base.clone(), &o, &mut rng);
            assert!(t == 0 || t == 1);
        }
        let o = DecodeOptions {
            do_sample: true,
            top_p: 0.3,
            ..opts()
        };
        for _ in 0..50 {
            assert_eq!(sample(&mut base.clone(), &o, &mut rng), 0);
        }
        let o = DecodeOptions {
            do_sample: true,
            temperature: 0.7,
            ..opts()
        };
        let a: Vec<u32> = {
            let mut r = Rng::new(9);
            (0..20)
                .map(|_| sample(&mut base.clone(), &o, &mut r))
                .collect()
        };
        let b: Vec<u32> = {
            let mut r = Rng::new(9);
            (0..20)
                .map(|_| sample(&mut base.clone(), &o, &mut r))
                .collect()
        };
        assert_eq!(a, b);
    }

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
