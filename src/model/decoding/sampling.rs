//! HF's sampling warpers (temperature, top-k, top-p) and the draw, without sorting the vocabulary.
//!
//! The reference (`sample_sorted`, what conala did before) sorts every logit of the row, sums the
//! kept probabilities in that order, cuts the nucleus and walks it with the draw. `sample` sorts only
//! the candidates that can change any of those numbers: a logit more than 40 below the row's max has
//! `exp(d) < 4.3e-18`, under half an ulp of any f64 sum that already holds the max's `exp(0) = 1`,
//! and it sorts after every candidate; adding it changes nothing, so the total, the nucleus and the
//! draw are the reference's bit for bit. Where the candidates do not settle the draw (a nucleus or a
//! walk that runs past them, a NaN, an infinite max), the reference decides. On a 32K vocabulary at
//! temperature 0.2 that is a few dozen candidates instead of a 32K-element sort per row per step.

use super::options::DecodeOptions;
use crate::rng::Rng;

/// Below `max + CUTOFF` a logit adds nothing to the sums (see the module doc).
const CUTOFF: f32 = -40.0;

/// HF's warpers and a draw from the result: one uniform from `rng`, as the reference takes it.
pub fn sample(logits: &mut [f32], o: &DecodeOptions, rng: &mut Rng) -> u32 {
    temperature(logits, o);
    let u = rng.next_f64();
    sample_candidates(logits, o, u).unwrap_or_else(|| sample_sorted(logits, o, u))
}

fn temperature(logits: &mut [f32], o: &DecodeOptions) {
    if o.temperature > 0.0 && o.temperature != 1.0 {
        let t = o.temperature as f32;
        for x in logits.iter_mut() {
            *x /= t;
        }
    }
}

/// Descending by value (`total_cmp`), ties by ascending index: the order a stable descending sort gives.
fn descending(logits: &[f32], a: u32, b: u32) -> std::cmp::Ordering {
    logits[b as usize]
        .total_cmp(&logits[a as usize])
        .then(a.cmp(&b))
}

/// The reference: the whole row sorted. `u` is the uniform draw in [0, 1).
fn sample_sorted(logits: &[f32], o: &DecodeOptions, u: f64) -> u32 {
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| descending(logits, a, b));
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
    let mut u = u * mass;
    for (i, p) in probs[..keep].iter().enumerate() {
        if u < *p {
            return order[i];
        }
        u -= p;
    }
    order[keep - 1]
}

/// The reference's answer from the candidates alone, or `None` where they do not settle it.
fn sample_candidates(logits: &[f32], o: &DecodeOptions, u: f64) -> Option<u32> {
    // The reference's first element: the greatest by total_cmp, the lowest index among equals.
    let mut best = 0;
    for (i, x) in logits.iter().enumerate().skip(1) {
        if x.total_cmp(&logits[best]).is_gt() {
            best = i;
        }
    }
    let max = logits[best];
    if !max.is_finite() {
        return None;
    }
    let mut cand = Vec::new();
    for (i, &x) in logits.iter().enumerate() {
        let d = x - max;
        if d >= CUTOFF {
            cand.push(i as u32);
        } else if d.is_nan() {
            return None;
        }
    }
    cand.sort_unstable_by(|&a, &b| descending(logits, a, b));
    let keep_all = match o.top_k {
        0 => logits.len(),
        k => logits.len().min(k),
    };
    // Past the candidates every probability is below half an ulp of the running sum (>= 1).
    let m = keep_all.min(cand.len());
    let probs: Vec<f64> = cand[..m]
        .iter()
        .map(|&i| ((logits[i as usize] - max) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    let mut keep = keep_all;
    if o.top_p < 1.0 {
        let mut cum = 0.0;
        let mut k = 0;
        let mut reached = false;
        while k < m {
            cum += probs[k] / total;
            k += 1;
            if cum >= o.top_p {
                reached = true;
                break;
            }
        }
        if !reached && m < keep_all {
            return None; // the reference's cut lies past the candidates
        }
        keep = k.max(1);
    }
    let mass: f64 = probs[..keep.min(m)].iter().sum();
    let mut u = u * mass;
    for (i, p) in probs[..keep.min(m)].iter().enumerate() {
        if u < *p {
            return Some(cand[i]);
        }
        u -= p;
    }
    (keep <= m).then(|| cand[keep - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(top_k: usize, top_p: f64, temperature: f64) -> DecodeOptions {
        DecodeOptions {
            do_sample: true,
            top_k,
            top_p,
            temperature,
            ..DecodeOptions::default()
        }
    }

    #[test]
    fn sampling_respects_top_k_top_p_and_seed() {
        let base = vec![5.0f32, 4.9, 0.0, -3.0];
        let mut rng = Rng::new(1);
        for _ in 0..200 {
            let t = sample(&mut base.clone(), &opts(2, 1.0, 1.0), &mut rng);
            assert!(t == 0 || t == 1);
        }
        for _ in 0..50 {
            assert_eq!(sample(&mut base.clone(), &opts(0, 0.3, 1.0), &mut rng), 0);
        }
        let draw = |seed| {
            let mut r = Rng::new(seed);
            (0..20)
                .map(|_| sample(&mut base.clone(), &opts(0, 1.0, 0.7), &mut r))
                .collect::<Vec<u32>>()
        };
        assert_eq!(draw(9), draw(9));
    }

    /// The candidates' answer is the full sort's on every row and draw: peaked and flat rows, ties,
    /// banned (-inf) tokens, NaN, top-k on either side of the candidate count, nuclei up to 1.
    #[test]
    fn candidates_choose_what_the_full_sort_chooses() {
        let mut rng = Rng::new(7);
        let mut settled = 0;
        let mut cases = 0;
        for row in 0..400 {
            let vocab = [5, 64, 1000, 4096][row % 4];
            let spread = [0.5f32, 3.0, 12.0, 60.0][(row / 4) % 4];
            let mut logits: Vec<f32> = (0..vocab)
                .map(|_| (rng.next_f32() - 0.5) * spread)
                .collect();
            if row % 5 == 0 {
                for x in logits.iter_mut().step_by(3) {
                    *x = x.round(); // ties
                }
            }
            if row % 7 == 0 {
                for x in logits.iter_mut().step_by(2) {
                    *x = f32::NEG_INFINITY;
                }
            }
            if row % 97 == 0 {
                logits[vocab / 2] = f32::NAN;
            }
            for o in [
                opts(0, 1.0, 1.0),
                opts(0, 0.9, 0.2),
                opts(0, 0.95, 1.0),
                opts(3, 1.0, 0.5),
                opts(50, 0.9, 1.0),
                opts(2000, 0.999_999_999_999, 1.0),
                opts(0, 1.0 - 1e-17, 0.2),
            ] {
                let mut scaled = logits.clone();
                temperature(&mut scaled, &o);
                for _ in 0..5 {
                    let u = rng.next_f64();
                    let want = sample_sorted(&scaled, &o, u);
                    if let Some(got) = sample_candidates(&scaled, &o, u) {
                        assert_eq!(got, want, "row {row} {o:?} u {u}");
                        settled += 1;
                    }
                    cases += 1;
                }
            }
        }
        // The fast path decides almost every draw (the fallback is for edge cases).
        assert!(settled * 10 > cases * 9, "{settled} of {cases}");
    }
}
