//! What model work costs in device memory, so batches can be sized before they run: the memory a
//! decoding batch holds per input token and per row, and the token budget (`batch_tokens: auto`) that
//! fills a device's free memory with it.

use candle_core::DType;

use super::config::T5Config;

/// Input-token budget of a decoding batch on the CPU (and with `batch_tokens: auto` where free memory
/// cannot be read): large enough to keep the cores busy, small enough to keep caches warm.
pub const CPU_BATCH_TOKENS: usize = 16384;

/// The fraction of free device memory a decoding batch may take (the rest covers the allocator's
/// rounding and fragmentation, and other work on the device).
const USABLE: f64 = 0.85;

/// Longest input the encoder reserve assumes (T5's usual maximum).
const ENCODER_MAX_LEN: u64 = 512;

/// Bytes a decoding batch holds while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeFootprint {
    /// Per padded input token, for the whole batch's life: the encoder output and every decoder
    /// layer's cross-attention keys and values.
    pub per_input_token: u64,
    /// Per row (per beam): the self-attention cache for every new token, and the step's logits (f32,
    /// and a working copy).
    pub per_row: u64,
    /// While the encoder runs on one chunk of `encoder_batch_tokens`: the attention scores and the
    /// feed-forward and attention activations of a layer.
    pub encoder_reserve: u64,
}

impl DecodeFootprint {
    pub fn new(
        cfg: &T5Config,
        dtype: DType,
        max_new_tokens: usize,
        num_beams: usize,
        encoder_batch_tokens: usize,
    ) -> DecodeFootprint {
        let b = dtype.size_in_bytes() as u64;
        let (d, inner, d_ff) = (cfg.d_model as u64, cfg.inner_dim() as u64, cfg.d_ff as u64);
        let layers = cfg.decoder_layers() as u64;
        let per_input_token = (d + 2 * layers * inner) * b;
        let cache = 2 * layers * inner * (max_new_tokens as u64 + 1) * b;
        let logits = 2 * cfg.vocab_size as u64 * 4;
        let per_row = num_beams.max(1) as u64 * (cache + logits);
        let chunk = encoder_batch_tokens as u64;
        let scores = cfg.num_heads as u64 * ENCODER_MAX_LEN * 4;
        let encoder_reserve = chunk * (scores + (3 * d_ff + 8 * d) * b);
        DecodeFootprint {
            per_input_token,
            per_row,
            encoder_reserve,
        }
    }

    /// Bytes a batch of `tokens` padded input tokens in `rows` rows holds at its peak.
    pub fn bytes(&self, tokens: usize, rows: usize) -> u64 {
        tokens as u64 * self.per_input_token + rows as u64 * self.per_row + self.encoder_reserve
    }

    /// The largest token budget whose batches fit `free` bytes, with up to `max_rows` rows decoding
    /// at once (rows never exceed tokens: each has at least one). At least one row's worth.
    pub fn batch_tokens(&self, free: u64, max_rows: usize) -> usize {
        let usable = (free as f64 * USABLE) as u64;
        let left = usable.saturating_sub(self.encoder_reserve);
        // tokens * per_token + min(tokens, max_rows) * per_row <= left
        let with_all_rows =
            left.saturating_sub(max_rows as u64 * self.per_row) / self.per_input_token;
        let tokens = if with_all_rows >= max_rows as u64 {
            with_all_rows
        } else {
            // Fewer tokens than the row cap: every token may be its own row.
            left / (self.per_input_token + self.per_row)
        };
        tokens.max(1) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init::{config, Family, Size};

    #[test]
    fn footprint_counts_caches_logits_and_the_encoder() {
        let cfg = config(Family::FlanT5, Size::Base, 32128);
        // d 768, 12 decoder layers of 12 x 64, d_ff 2048, bf16.
        let f = DecodeFootprint::new(&cfg, DType::BF16, 100, 1, 4096);
        assert_eq!(f.per_input_token, (768 + 2 * 12 * 768) * 2);
        assert_eq!(f.per_row, 2 * 12 * 768 * 101 * 2 + 2 * 32128 * 4);
        assert_eq!(
            f.encoder_reserve,
            4096 * (12 * 512 * 4 + (3 * 2048 + 8 * 768) * 2)
        );
        // Beams multiply what each row holds, not what each input token holds.
        let beams = DecodeFootprint::new(&cfg, DType::BF16, 100, 4, 4096);
        assert_eq!(beams.per_row, 4 * f.per_row);
        assert_eq!(beams.per_input_token, f.per_input_token);
        assert_eq!(
            f.bytes(1000, 10),
            1000 * f.per_input_token + 10 * f.per_row + f.encoder_reserve
        );
    }

    #[test]
    fn the_budget_fills_free_memory_and_no_more() {
        let cfg = config(Family::FlanT5, Size::Base, 32128);
        let f = DecodeFootprint::new(&cfg, DType::BF16, 100, 1, 4096);
        let free = 100u64 << 30; // 100 GiB, an H200 after the weights
        let tokens = f.batch_tokens(free, 512);
        let usable = (free as f64 * USABLE) as u64;
        assert!(f.bytes(tokens, 512) <= usable);
        assert!(f.bytes(tokens + 1, 512) > usable);
        // About 2.4 M tokens: ~37 KB each plus 512 rows of ~4 MB.
        assert!((2_000_000..3_000_000).contains(&tokens), "{tokens}");
        // Little memory: fewer tokens than the row cap, each possibly a row, still within it.
        let small = f.batch_tokens(300 << 20, 512);
        assert!(small < 512 && f.bytes(small, small) <= (300u64 << 20));
        // Nothing free: one row's worth, never zero.
        assert_eq!(f.batch_tokens(0, 512), 1);
    }
}
