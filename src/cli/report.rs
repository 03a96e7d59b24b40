//! What `conala run` prints when a plan finishes.

use crate::cli::output::out;
use conala::plans::spec::Step;
use conala::plans::{Plan, RunSummary};

pub fn print_summary(plan: &Plan, summary: &RunSummary) {
    let flow: Vec<String> = summary
        .rows_per_step
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    out!(
        "plan `{}` finished in {:.1}s",
        summary.plan_name,
        summary.seconds
    );
    out!("  rows out of each step: {}", flow.join(" -> "));
    if let Some(w) = &summary.write {
        out!(
            "  wrote {} rows to {} ({} part files{})",
            w.rows_written,
            w.location,
            w.parts.len(),
            if w.rows_resumed > 0 {
                format!(", {} rows kept from earlier runs", w.rows_resumed)
            } else {
                String::new()
            }
        );
        if let Some(p) = &w.pushed {
            print_push(p);
        }
        let table = summary.plan_name.replace('-', "_");
        out!(
            "  query it: conala sql --table {table}={} \"select count(*) from {table}\"",
            w.location
        );
    }
    let reports = &summary.reports;
    if let Some(t) = &reports.train {
        out!(
            "  trained {} steps on {} examples in {:.1}s ({:.1} samples/s); final eval loss {}",
            t.steps,
            t.train_examples,
            t.train_seconds,
            t.samples_per_second,
            t.final_eval_loss
                .map(|l| format!("{l:.3}"))
                .unwrap_or_else(|| "-".into())
        );
        if let Some(p) = &t.pushed {
            print_push(p);
        }
        if let Some(s) = &t.eval_scores {
            out!(
                "  eval ({} rows): BLEU {:.2}, CoNaLa BLEU {:.2}, exact match {:.1}%",
                s.rows,
                s.bleu,
                s.conala_bleu,
                100.0 * s.exact_match
            );
        }
        if let Some(b) = &t.baseline_scores {
            out!(
                "  baseline (copy the `{}` column): BLEU {:.2}, CoNaLa BLEU {:.2}",
                baseline_column(plan),
                b.bleu,
                b.conala_bleu
            );
        }
        out!(
            "  model: {} (adapter and checkpoints in {})",
            t.model_dir,
            t.output
        );
    }
    if let Some(g) = &reports.generate {
        let f = &g.finish_reason;
        out!(
            "  generated {} rows ({} tokens) at {:.1} rows/s, {:.1} tokens/s; finish reasons eos {}, length {}, error {}",
            g.rows, g.generated_tokens, g.rows_per_second, g.tokens_per_second, f.eos, f.length, f.error
        );
    }
    if let Some(e) = &reports.evaluate {
        out!(
            "  evaluate ({} rows): BLEU {:.2}, CoNaLa BLEU {:.2}, mean sentence BLEU {:.2}, exact match {:.1}%",
            e.rows,
            e.bleu,
            e.conala_bleu,
            e.sentence_bleu,
            100.0 * e.exact_match
        );
    }
}

/// The column `train` scored as a baseline.
fn baseline_column(plan: &Plan) -> String {
    plan.steps
        .iter()
        .find_map(|s| match s {
            Step::Train(t) => t.baseline.clone(),
            _ => None,
        })
        .unwrap_or_default()
}

fn print_push(p: &conala::publish::PushReport) {
    match &p.commit {
        Some(c) => out!(
            "  pushed to {} (commit {c}; {} of {} files changed, {} sent): {}",
            p.repo,
            p.files - p.unchanged,
            p.files,
            conala::progress::human_bytes(p.bytes_sent),
            p.url
        ),
        None => out!(
            "  {} already has every file: nothing pushed ({})",
            p.repo,
            p.url
        ),
    }
}
