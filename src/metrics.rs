//! Text metrics for generated columns: sacreBLEU-compatible corpus BLEU (13a tokenization, exp
//! smoothing), the CoNaLa benchmark's BLEU-4 (its code-aware tokenizer; smoothed at sentence level) and
//! exact match. One implementation serves the `evaluate` step and `train`'s evaluation.

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::Regex;

const MAX_ORDER: usize = 4;

/// sacreBLEU's default `13a` tokenizer (mteval-v13a).
pub fn tokenize_13a(line: &str) -> Vec<String> {
    static RES: OnceLock<[Regex; 3]> = OnceLock::new();
    let res = RES.get_or_init(|| {
        [
            Regex::new(r"([^0-9])([\.,])").expect("static regex"),
            Regex::new(r"([\.,])([^0-9])").expect("static regex"),
            Regex::new(r"([0-9])(-)").expect("static regex"),
        ]
    });
    let mut line = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if line.contains('&') {
        line = line
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    // Punctuation and symbols: `{-~`, `[-\``, ` -&`, `(-+`, `:-@`, `/`.
    let mut spaced = String::with_capacity(line.len() * 2 + 2);
    spaced.push(' ');
    for c in line.chars() {
        let sym = matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/');
        if sym {
            spaced.push(' ');
            spaced.push(c);
            spaced.push(' ');
        } else {
            spaced.push(c);
        }
    }
    spaced.push(' ');
    let s = res[0].replace_all(&spaced, "$1 $2 ");
    let s = res[1].replace_all(&s, " $1 $2");
    let s = res[2].replace_all(&s, "$1 $2 ");
    s.split_whitespace().map(str::to_string).collect()
}

/// The CoNaLa benchmark's tokenizer for BLEU (`tokenize_for_bleu_eval`): symbols split off, camelCase
/// split, quotes unified to a backtick.
pub fn tokenize_conala(code: &str) -> Vec<String> {
    static RES: OnceLock<[Regex; 3]> = OnceLock::new();
    let res = RES.get_or_init(|| {
        [
            Regex::new(r"([^A-Za-z0-9_])").expect("static regex"),
            Regex::new(r"([a-z])([A-Z])").expect("static regex"),
            Regex::new(r"\s+").expect("static regex"),
        ]
    });
    let s = res[0].replace_all(code, " $1 ");
    let s = res[1].replace_all(&s, "$1 $2");
    let s = res[2].replace_all(&s, " ");
    let s = s.replace(['"', '\''], "`");
    s.split(' ')
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

fn ngram_counts(tokens: &[String]) -> HashMap<&[String], usize> {
    let mut m = HashMap::new();
    for n in 1..=MAX_ORDER {
        for w in tokens.windows(n) {
            *m.entry(w).or_insert(0) += 1;
        }
    }
    m
}

/// Sufficient statistics of BLEU over a corpus: clipped n-gram matches, n-gram totals, lengths.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BleuStats {
    pub matches: [u64; MAX_ORDER],
    pub totals: [u64; MAX_ORDER],
    pub hyp_len: u64,
    pub ref_len: u64,
}

impl BleuStats {
    pub fn of(hyp: &[String], reference: &[String]) -> BleuStats {
        let h = ngram_counts(hyp);
        let r = ngram_counts(reference);
        let mut s = BleuStats {
            hyp_len: hyp.len() as u64,
            ref_len: reference.len() as u64,
            ..Default::default()
        };
        for (g, c) in &h {
            let m = (*c).min(r.get(g).copied().unwrap_or(0));
            s.matches[g.len() - 1] += m as u64;
        }
        for n in 1..=MAX_ORDER {
            s.totals[n - 1] = (hyp.len() + 1).saturating_sub(n) as u64;
        }
        s
    }

    pub fn add(&mut self, o: &BleuStats) {
        for i in 0..MAX_ORDER {
            self.matches[i] += o.matches[i];
            self.totals[i] += o.totals[i];
        }
        self.hyp_len += o.hyp_len;
        self.ref_len += o.ref_len;
    }

    /// sacreBLEU's corpus score (0-100): `exp` smoothing, no effective order.
    pub fn sacrebleu(&self) -> f64 {
        let mut precisions = [0.0f64; MAX_ORDER];
        let mut smooth = 1.0;
        for (n, p) in precisions.iter_mut().enumerate() {
            if self.totals[n] == 0 {
                break;
            }
            if self.matches[n] == 0 {
                smooth *= 2.0;
                *p = 100.0 / (smooth * self.totals[n] as f64);
            } else {
                *p = 100.0 * self.matches[n] as f64 / self.totals[n] as f64;
            }
        }
        let log = |p: f64| if p == 0.0 { -9_999_999_999.0 } else { p.ln() };
        let bp = if self.hyp_len > self.ref_len {
            1.0
        } else if self.hyp_len > 0 {
            (1.0 - self.ref_len as f64 / self.hyp_len as f64).exp()
        } else {
            0.0
        };
        bp * (precisions.iter().map(|p| log(*p)).sum::<f64>() / MAX_ORDER as f64).exp()
    }

    /// BLEU-4 as in the CoNaLa benchmark's `compute_bleu` (0-1); `smooth` adds one to every count.
    pub fn conala(&self, smooth: bool) -> f64 {
        let mut precisions = [0.0f64; MAX_ORDER];
        for (i, p) in precisions.iter_mut().enumerate() {
            *p = if smooth {
                (self.matches[i] as f64 + 1.0) / (self.totals[i] as f64 + 1.0)
            } else if self.totals[i] > 0 {
                self.matches[i] as f64 / self.totals[i] as f64
            } else {
                0.0
            };
        }
        let geo = if precisions.iter().all(|p| *p > 0.0) {
            precisions
                .iter()
                .map(|p| p.ln() / MAX_ORDER as f64)
                .sum::<f64>()
                .exp()
        } else {
            0.0
        };
        let ratio = if self.ref_len > 0 {
            self.hyp_len as f64 / self.ref_len as f64
        } else {
            0.0
        };
        let bp = if ratio > 1.0 {
            1.0
        } else if ratio > 0.0 {
            (1.0 - 1.0 / ratio).exp()
        } else {
            0.0
        };
        geo * bp
    }
}

/// Smoothed sentence-level BLEU-4 of one prediction, CoNaLa tokenization (0-1).
pub fn sentence_bleu(prediction: &str, reference: &str) -> f64 {
    BleuStats::of(&tokenize_conala(prediction), &tokenize_conala(reference)).conala(true)
}

/// Corpus metrics accumulated row by row.
#[derive(Debug, Clone, Default)]
pub struct Scorer {
    sacre: BleuStats,
    conala: BleuStats,
    sentence_sum: f64,
    exact: u64,
    rows: u64,
}

/// The metrics of a corpus, on the scales people quote (BLEU 0-100, exact match 0-1).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Scores {
    pub rows: u64,
    /// sacreBLEU corpus BLEU (13a).
    pub bleu: f64,
    /// CoNaLa benchmark corpus BLEU-4 (code tokenizer, unsmoothed), x100.
    pub conala_bleu: f64,
    /// Mean smoothed sentence-level BLEU-4 (CoNaLa tokenizer), x100.
    pub sentence_bleu: f64,
    pub exact_match: f64,
}

impl Scorer {
    /// Add one row; returns its smoothed sentence BLEU (0-1) and whether it matches exactly.
    pub fn add(&mut self, prediction: &str, reference: &str) -> (f64, bool) {
        self.sacre.add(&BleuStats::of(
            &tokenize_13a(prediction),
            &tokenize_13a(reference),
        ));
        let c = BleuStats::of(&tokenize_conala(prediction), &tokenize_conala(reference));
        self.conala.add(&c);
        let s = c.conala(true);
        self.sentence_sum += s;
        let exact = prediction.trim() == reference.trim();
        self.exact += u64::from(exact);
        self.rows += 1;
        (s, exact)
    }

    pub fn scores(&self) -> Scores {
        let n = self.rows.max(1) as f64;
        Scores {
            rows: self.rows,
            bleu: self.sacre.sacrebleu(),
            conala_bleu: 100.0 * self.conala.conala(false),
            sentence_bleu: 100.0 * self.sentence_sum / n,
            exact_match: self.exact as f64 / n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference values from sacrebleu 2.x and the CoNaLa benchmark's bleu_score.py (see
    // scripts/reference_bleu.py).
    const HYPS: [&str; 5] = [
        "Concatenate elements of a list x of multiple integers to a single integer",
        "sort list `l` by key",
        "",
        "hello world, it is 3.5 - or 4-5 &amp; \"quoted\" text",
        "getValue of dict d",
    ];
    const REFS: [&str; 5] = [
        "Concatenate elements of a list 'x' of multiple integers to a single integer",
        "sort a list `l` in place",
        "nothing here",
        "hello world , it is 3.5 - or 4 - 5 & \"quoted\" text",
        "get value of dict `d`",
    ];

    #[test]
    fn tokenizers_match_reference_implementations() {
        assert_eq!(tokenize_13a(HYPS[1]).join(" "), "sort list ` l ` by key");
        assert_eq!(
            tokenize_13a(HYPS[3]).join(" "),
            "hello world , it is 3.5 - or 4 - 5 & \" quoted \" text"
        );
        assert_eq!(
            tokenize_conala(HYPS[4]),
            vec!["get", "Value", "of", "dict", "d"]
        );
        assert_eq!(
            tokenize_conala(HYPS[3]).join(" "),
            "hello world , it is 3 . 5 - or 4 - 5 & amp ; ` quoted ` text"
        );
    }

    #[test]
    fn corpus_bleu_matches_sacrebleu() {
        let mut s = Scorer::default();
        for (h, r) in HYPS.iter().zip(REFS) {
            s.add(h, r);
        }
        assert!(
            (s.scores().bleu - 67.9475240891803).abs() < 1e-9,
            "{}",
            s.scores().bleu
        );
        let mut s2 = Scorer::default();
        for (h, r) in HYPS.iter().zip(REFS).take(2) {
            s2.add(h, r);
        }
        assert!((s2.scores().bleu - 62.953549886043426).abs() < 1e-9);
    }

    #[test]
    fn conala_bleu_matches_benchmark_code() {
        let expected = [
            0.6835014686773141,
            0.46905226098954195,
            0.0,
            0.8137489370974955,
            0.2736570128577077,
        ];
        for ((h, r), e) in HYPS.iter().zip(REFS).zip(expected) {
            assert!(
                (sentence_bleu(h, r) - e).abs() < 1e-12,
                "{h}: {} vs {e}",
                sentence_bleu(h, r)
            );
        }
        let mut s = Scorer::default();
        for (h, r) in HYPS.iter().zip(REFS) {
            s.add(h, r);
        }
        assert!((s.scores().conala_bleu - 62.82081568799018).abs() < 1e-9);
        assert_eq!(s.scores().exact_match, 0.0);
        let mut s = Scorer::default();
        s.add("a b", "a b");
        assert_eq!(s.scores().exact_match, 1.0);
    }
}
