//! What decoding is asked to do, and what it returns for each row.

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
