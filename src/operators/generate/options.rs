//! Decoding options from a `generate` step's settings, checked: a bad value fails at validation, naming
//! its key.

use crate::model::decoding::DecodeOptions;
use crate::operators::{at_most, StepError, StepResult, MAX_SEQUENCE_TOKENS};
use crate::plans::spec::{BatchTokens, GenerateSpec};

const MAX_BEAMS: usize = 256;
const MAX_BATCH_ROWS: usize = 1 << 16;
const MAX_WINDOW_ROWS: usize = 1 << 22;
const MAX_BATCH_TOKENS: usize = 1 << 26;

/// Decoding settings from a plan step (sampling is on when asked for, or when a sampling parameter is
/// given without `do_sample`).
pub fn decode_options(spec: &GenerateSpec) -> StepResult<DecodeOptions> {
    let sampling_params =
        spec.temperature.is_some() || spec.top_p.is_some() || spec.top_k.is_some();
    let do_sample = spec.do_sample.unwrap_or(sampling_params);
    if spec.max_new_tokens == 0 {
        return Err(StepError::at("max_new_tokens", "must be at least 1"));
    }
    // Caches are sized from these: an absurd value must fail here, not as a huge allocation later.
    at_most("max_new_tokens", spec.max_new_tokens, MAX_SEQUENCE_TOKENS)?;
    at_most("num_beams", spec.num_beams, MAX_BEAMS)?;
    at_most("max_batch_rows", spec.max_batch_rows, MAX_BATCH_ROWS)?;
    at_most("window_rows", spec.window_rows, MAX_WINDOW_ROWS)?;
    if let BatchTokens::Fixed(n) = spec.batch_tokens {
        at_most("batch_tokens", n, MAX_BATCH_TOKENS)?;
    }
    if spec.min_new_tokens > spec.max_new_tokens {
        return Err(StepError::at(
            "min_new_tokens",
            format!(
                "{} is more than max_new_tokens {}",
                spec.min_new_tokens, spec.max_new_tokens
            ),
        ));
    }
    if let Some(t) = spec.temperature {
        if t <= 0.0 {
            return Err(StepError::at(
                "temperature",
                "must be positive (use do_sample: false for greedy decoding)",
            ));
        }
    }
    if let Some(p) = spec.top_p {
        if !(0.0 < p && p <= 1.0) {
            return Err(StepError::at("top_p", "must be in (0, 1]"));
        }
    }
    if spec.repetition_penalty <= 0.0 {
        return Err(StepError::at(
            "repetition_penalty",
            "must be positive (1.0 = off)",
        ));
    }
    if spec.num_beams == 0 {
        return Err(StepError::at("num_beams", "must be at least 1"));
    }
    if spec.num_beams > 1 && do_sample {
        return Err(StepError::at(
            "num_beams",
            "beam search samples nothing: set do_sample: false (or num_beams: 1)",
        ));
    }
    if spec.batch_tokens == BatchTokens::Fixed(0)
        || spec.max_batch_rows == 0
        || spec.window_rows == 0
    {
        return Err(StepError::at(
            "batch_tokens",
            "batch_tokens, max_batch_rows and window_rows must be positive",
        ));
    }
    Ok(DecodeOptions {
        max_new_tokens: spec.max_new_tokens,
        min_new_tokens: spec.min_new_tokens,
        do_sample,
        temperature: spec.temperature.unwrap_or(1.0),
        top_k: spec.top_k.unwrap_or(0),
        top_p: spec.top_p.unwrap_or(1.0),
        repetition_penalty: spec.repetition_penalty,
        no_repeat_ngram_size: spec.no_repeat_ngram_size,
        num_beams: spec.num_beams,
        length_penalty: spec.length_penalty,
        early_stopping: spec.early_stopping,
        encoder_batch_tokens: spec.encoder_batch_tokens.max(1),
    })
}
