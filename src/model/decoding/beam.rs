//! Beam search as HF transformers (>= 4.50, vectorized `_beam_search`) does it, row by row:
//! log-softmax, processors on log-probs, top `2 * num_beams` continuations over all beams, finished
//! hypotheses scored `sum_logprobs / generated_len ** length_penalty` when among the top `num_beams`,
//! and HF's early-stop heuristic. A row whose result can no longer change leaves the batch.

use candle_core::Tensor;

use super::batch::encode_rows;
use super::options::{DecodeOptions, Finish, Generated};
use super::processors::{active_mut, process};
use crate::error::Result;
use crate::model::config::Tokens;
use crate::model::ops;
use crate::model::seq2seq::Seq2Seq;

const NEG: f32 = -1.0e9;

#[derive(Clone)]
struct Hyp {
    tokens: Vec<u32>,
    score: f32,
}

/// Per input row: the running beams and the best finished hypotheses.
struct RowState {
    running: Vec<Hyp>,
    finished: Vec<(Hyp, bool)>,
    heuristic_unsatisfied: bool,
    done: bool,
}

fn log_softmax(xs: &mut [f32]) {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = xs.iter().map(|x| (x - max).exp()).sum();
    let lse = max + sum.ln();
    for x in xs.iter_mut() {
        *x -= lse;
    }
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
fn top_k(xs: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..xs.len()).collect();
    let k = k.min(xs.len());
    idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| {
        xs[b].total_cmp(&xs[a]).then(a.cmp(&b))
    });
    idx.truncate(k);
    idx.sort_by(|&a, &b| xs[b].total_cmp(&xs[a]).then(a.cmp(&b)));
    idx
}

pub fn beam_search(
    model: &dyn Seq2Seq,
    rows: &[&[u32]],
    o: &DecodeOptions,
) -> Result<Vec<Generated>> {
    let tokens = model.config().tokens;
    let (eos, start) = (tokens.eos, tokens.decoder_start);
    let nb = o.num_beams;
    let (enc, mask) = encode_rows(model, rows, o.encoder_batch_tokens)?;
    // Every row's encoder output repeated for its beams.
    let expand: Vec<u32> = (0..rows.len() as u32)
        .flat_map(|r| std::iter::repeat_n(r, nb))
        .collect();
    // Cross-attention keys and values are computed once per row; the beams read them through the
    // state's row selection (an index on the CPU, copies elsewhere).
    let mut state = model.start_decoding(&enc, &mask, o.max_new_tokens + 1)?;
    drop(enc);
    state.select_rows(&expand)?;

    let mut rs: Vec<RowState> = (0..rows.len())
        .map(|_| RowState {
            running: (0..nb)
                .map(|b| Hyp {
                    tokens: vec![start],
                    score: if b == 0 { 0.0 } else { NEG },
                })
                .collect(),
            finished: (0..nb)
                .map(|_| {
                    (
                        Hyp {
                            tokens: vec![],
                            score: NEG,
                        },
                        false,
                    )
                })
                .collect(),
            heuristic_unsatisfied: true,
            done: false,
        })
        .collect();
    // Rows still in the model batch, in state order (each holds nb consecutive state rows).
    let mut active: Vec<usize> = (0..rows.len()).collect();
    for step in 0..o.max_new_tokens {
        let last: Vec<u32> = active
            .iter()
            .flat_map(|&r| {
                rs[r]
                    .running
                    .iter()
                    .map(|h| *h.tokens.last().expect("start"))
            })
            .collect();
        let logits = model.decode_step(&mut state, &Tensor::new(last, model.device())?)?;
        let vocab = logits.dims2()?.1;
        // Rows are independent: each chooses its beams on its own thread, reading the logits in place.
        let states = active_mut(&mut rs, &active);
        let chosen: Vec<Option<Vec<u32>>> = ops::with_host_f32(&logits, |flat| {
            use rayon::prelude::*;
            flat.par_chunks(nb * vocab)
                .zip(states.into_par_iter())
                .map(|(l, st)| row_step(st, l, vocab, step, &tokens, o))
                .collect()
        })?;
        let mut select: Vec<u32> = vec![];
        let mut still: Vec<usize> = vec![];
        for (slot, (&r, beams)) in active.iter().zip(chosen).enumerate() {
            if let Some(beams) = beams {
                select.extend(beams.iter().map(|b| (slot * nb) as u32 + b));
                still.push(r);
            }
        }
        if still.is_empty() {
            break;
        }
        state.select_rows(&select)?;
        active = still;
    }
    Ok(rs
        .into_iter()
        .map(|st| {
            let best = st
                .finished
                .into_iter()
                .next()
                .map(|(h, _)| h.tokens)
                .unwrap_or_default();
            let out: Vec<u32> = best.into_iter().skip(1).collect();
            let forced_end = tokens.forced_eos.is_some() && out.len() == o.max_new_tokens;
            let finish = if out.last() == Some(&eos) && !forced_end {
                Finish::Eos
            } else {
                Finish::Length
            };
            Generated {
                tokens: out,
                finish,
            }
        })
        .collect())
}

/// One row's step of beam search: its `nb` beams' logits (`nb * vocab`, in beam order) scored,
/// its finished hypotheses and running beams updated. The beams (0..nb) the next step continues,
/// in order, or `None` when the row is done and leaves the batch.
fn row_step(
    st: &mut RowState,
    logits: &[f32],
    vocab: usize,
    step: usize,
    tokens: &Tokens,
    o: &DecodeOptions,
) -> Option<Vec<u32>> {
    let (eos, nb) = (tokens.eos, o.num_beams);
    let keep_k = 2 * nb; // max(2, 1 + number of eos tokens) * num_beams, with one eos token
    let lp = o.length_penalty as f32;
    let gen_len = step + 1; // generated tokens including this step's
    let mut select: Vec<u32> = Vec::with_capacity(nb);
    // Accumulated scores over all beams of this row: (nb * vocab).
    let mut acc = Vec::with_capacity(nb * vocab);
    for (b, hyp) in st.running.iter().enumerate() {
        let mut lpb = logits[b * vocab..(b + 1) * vocab].to_vec();
        log_softmax(&mut lpb);
        process(&mut lpb, &hyp.tokens, step, tokens, o);
        acc.extend(lpb.iter().map(|x| x + hyp.score));
    }
    let top = top_k(&acc, keep_k);
    let cands: Vec<(usize, u32, f32)> = top
        .iter()
        .map(|&i| (i / vocab, (i % vocab) as u32, acc[i]))
        .collect();
    let hits: Vec<bool> = cands
        .iter()
        .map(|&(_, t, _)| t == eos || gen_len >= o.max_new_tokens)
        .collect();

    // Finished hypotheses: only candidates ranked within the top nb may finish.
    let all_finished = st.finished.iter().all(|(_, f)| *f);
    let mut merged: Vec<(Hyp, bool)> = st.finished.clone();
    for (rank, (&(b, t, s), &hit)) in cands.iter().zip(&hits).enumerate() {
        let mut score = s / (gen_len as f32).powf(lp);
        if all_finished && o.early_stopping {
            score += NEG;
        }
        if !st.heuristic_unsatisfied {
            score += NEG;
        }
        let just_finished = hit && rank < nb;
        if !just_finished {
            score += NEG;
        }
        let mut tokens = st.running[b].tokens.clone();
        tokens.push(t);
        merged.push((Hyp { tokens, score }, just_finished));
    }
    let scores: Vec<f32> = merged.iter().map(|(h, _)| h.score).collect();
    st.finished = top_k(&scores, nb)
        .into_iter()
        .map(|i| merged[i].clone())
        .collect();

    // Running beams for the next step: the best nb candidates that did not stop.
    let run_scores: Vec<f32> = cands
        .iter()
        .zip(&hits)
        .map(|(&(_, _, s), &h)| if h { s + NEG } else { s })
        .collect();
    let chosen = top_k(&run_scores, nb);
    let mut next = Vec::with_capacity(nb);
    for &c in &chosen {
        let (b, t, _) = cands[c];
        let mut tokens = st.running[b].tokens.clone();
        tokens.push(t);
        next.push(Hyp {
            tokens,
            score: run_scores[c],
        });
        select.push(b as u32);
    }
    st.running = next;

    // HF's early-stop heuristic (best running score with the current length vs worst finished).
    let best_len = if gen_len == 0 { 1 } else { gen_len } as f32;
    let best_possible = st.running[0].score / best_len.powf(lp);
    let min_finished = st
        .finished
        .iter()
        .map(|(h, _)| h.score)
        .fold(f32::INFINITY, f32::min);
    let improvable = st
        .finished
        .iter()
        .any(|(_, f)| best_possible > if *f { min_finished } else { NEG });
    st.heuristic_unsatisfied &= improvable;
    let all_done = st.finished.iter().all(|(_, f)| *f) && o.early_stopping;
    let no_continuation = hits.iter().all(|h| *h);
    if !st.heuristic_unsatisfied || all_done || no_continuation {
        st.done = true;
        None // the row leaves the batch
    } else {
        Some(select)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_and_breaks_ties_by_index() {
        assert_eq!(top_k(&[0.1, 0.5, 0.5, -1.0, 0.3], 3), vec![1, 2, 4]);
        let mut l = vec![1.0f32, 2.0, 3.0];
        log_softmax(&mut l);
        let s: f32 = l.iter().map(|x| x.exp()).sum();
        assert!((s - 1.0).abs() < 1e-6);
    }
}
