//! What model work costs in device memory, so batches can be sized before they run: the memory a
//! decoding batch holds per input token and per row, and the token budget (`batch_tokens: auto`) that
//! fills a device's free memory with it.

use candle_core::DType;

use super::config::{ModelConfig, Role};
use super::lora::{LoraSettings, TargetModules};

/// Input-token budget of a decoding batch on the CPU (and with `batch_tokens: auto` where free memory
/// cannot be read): large enough to keep the cores busy, small enough to keep caches warm.
pub const CPU_BATCH_TOKENS: usize = 16384;

/// The fraction of free device memory a decoding batch may take (the rest covers the allocator's
/// rounding and fragmentation, and other work on the device).
const USABLE: f64 = 0.85;

/// Longest input the encoder reserve assumes (T5's usual maximum).
const ENCODER_MAX_LEN: u64 = 512;

/// A config's sizes as `u64`, the unit every count below is in.
struct Dims {
    d: u64,
    inner: u64,
    ff: u64,
    heads: u64,
    vocab: u64,
    gated: bool,
}

impl Dims {
    fn of(cfg: &ModelConfig) -> Dims {
        let s = &cfg.shape;
        Dims {
            d: s.d_model as u64,
            inner: s.inner_dim() as u64,
            ff: s.d_ff as u64,
            heads: s.heads as u64,
            vocab: cfg.vocab_size as u64,
            gated: s.gated,
        }
    }
}

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
        cfg: &ModelConfig,
        dtype: DType,
        max_new_tokens: usize,
        num_beams: usize,
        encoder_batch_tokens: usize,
    ) -> DecodeFootprint {
        let b = dtype.size_in_bytes() as u64;
        let Dims {
            d,
            inner,
            ff: d_ff,
            heads,
            vocab,
            ..
        } = Dims::of(cfg);
        let layers = cfg.shape.decoder_layers as u64;
        let per_input_token = (d + 2 * layers * inner) * b;
        let cache = 2 * layers * inner * (max_new_tokens as u64 + 1) * b;
        let logits = 2 * vocab * 4;
        let per_row = num_beams.max(1) as u64 * (cache + logits);
        let chunk = encoder_batch_tokens as u64;
        let scores = heads * ENCODER_MAX_LEN * 4;
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

/// The shape of a training step: rows, and the padded lengths of inputs and targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainShape {
    pub batch: usize,
    pub input_len: usize,
    pub target_len: usize,
}

/// What a training step holds on its device, by part (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrainFootprint {
    /// The model's weights in its dtype (frozen under LoRA; f32 master weights in full fine-tuning).
    pub weights: u64,
    /// The adapter's weights (f32).
    pub lora: u64,
    /// AdamW's two moments for every trained weight (f32).
    pub optimizer: u64,
    /// The trained weights' gradients (f32).
    pub gradients: u64,
    /// What the forward pass keeps for the backward pass: every op's output, or with checkpointing
    /// each block's input plus one block's activations and the output layer's.
    pub activations: u64,
    /// The backward pass's working set on top of the activations: the gradients of the tensors
    /// being differentiated, and their sums.
    pub backward: u64,
}

/// The backward pass's working set as a share of the activations it differentiates, measured: a
/// step's peak of live memory was 1.55-1.68 times the activations counted below, over ten shapes of
/// three families with and without checkpointing (`conala bench memory`; README).
const BACKWARD_SHARE: f64 = 0.6;

impl TrainFootprint {
    pub fn total(&self) -> u64 {
        self.weights + self.lora + self.optimizer + self.step()
    }

    /// What a step adds to the weights, adapter and optimizer state at its peak.
    pub fn step(&self) -> u64 {
        self.gradients + self.activations + self.backward
    }

    /// The footprint of a step of `shape` for `cfg` in `dtype`, with LoRA `lora` (`None`: full
    /// fine-tuning) and with or without gradient checkpointing. `fused_attention`: the step runs
    /// the fused training attention (CPU, f32; [`crate::model::ops::fused_training_attention`]),
    /// which keeps no score tensors and reads the heads in place.
    ///
    /// Activations are counted tensor by tensor as candle's autograd keeps them: each op's output
    /// lives until the backward pass is done (see the counts below; checked against measured peaks by
    /// `conala bench memory`).
    pub fn new(
        cfg: &ModelConfig,
        dtype: DType,
        lora: Option<&LoraSettings>,
        shape: TrainShape,
        checkpointing: bool,
        fused_attention: bool,
    ) -> TrainFootprint {
        let e = dtype.size_in_bytes() as u64;
        let (b, s, t) = (
            shape.batch as u64,
            shape.input_len as u64,
            shape.target_len as u64,
        );
        let Dims {
            d,
            inner,
            ff: f,
            heads: h,
            vocab,
            gated,
        } = Dims::of(cfg);
        let (enc_layers, dec_layers) = (
            cfg.shape.encoder_layers as u64,
            cfg.shape.decoder_layers as u64,
        );
        let params = cfg.parameter_count();
        // Which projections carry an adapter, and its rank.
        let modules = lora.map(|l| TargetModules::Names(l.targets_for(cfg)));
        let adapted: Vec<Role> = cfg
            .linears()
            .into_iter()
            .filter(|l| {
                modules
                    .as_ref()
                    .is_some_and(|m| m.matches(&l.name).unwrap_or(false))
            })
            .map(|l| l.role)
            .collect();
        let targets = |role: Role| adapted.contains(&role);
        let r = lora.map_or(0, |l| l.r as u64);
        let adapter_params = match &modules {
            Some(m) => adapter_parameter_count(cfg, m, r),
            None => 0,
        };

        // One attention sublayer: `q` query tokens over `kv` key tokens in `b` rows of `ql` x `kl`.
        let attention = |q: u64, kv: u64, ql: u64, kl: u64| -> u64 {
            let norm = 3 * q * d * 4;
            let proj = |role: Role, tokens: u64| {
                tokens * inner * e
                    + if targets(role) {
                        3 * tokens * inner * 4 + tokens * r * 4
                    } else {
                        0
                    }
            };
            let projections = proj(Role::Query, q) + proj(Role::Key, kv) + proj(Role::Value, kv);
            let (heads, scores) = if fused_attention {
                // Heads read in place; only the dropout mask over the weights (f32) is kept (the
                // backward recomputes the weights from q and k).
                (0, b * h * ql * kl * 4)
            } else {
                // Split into heads: contiguous copies; q k^T, + bias, softmax, dropout (its mask
                // and the product), in the model's dtype.
                ((q + 2 * kv) * inner * e, 5 * b * h * ql * kl * e)
            };
            // The weighted values, copied back out of heads; the output projection.
            let lora_o = if targets(Role::Output) {
                3 * q * d * 4 + q * r * 4
            } else {
                0
            };
            let context = 2 * q * inner * e + q * d * e + lora_o;
            let residual = 2 * q * d * 4; // the sum and its dropout mask
            norm + projections + heads + scores + context + residual
        };
        let feed_forward = |tokens: u64| -> u64 {
            let norm = 3 * tokens * d * 4;
            let inputs = if gated { 2 } else { 1 };
            let hidden = tokens * f * e * (inputs + 1 + 2); // wi(s), the activation, dropout
            norm + hidden + tokens * d * e + 2 * tokens * d * 4
        };
        let enc_block = attention(b * s, b * s, s, s) + feed_forward(b * s);
        let dec_block =
            attention(b * t, b * t, t, t) + attention(b * t, b * s, t, s) + feed_forward(b * t);
        // The output layer: logits (f32), their gradient while the loss backpropagates.
        let head = 3 * b * t * vocab * 4;
        let embeddings = 2 * (b * s + b * t) * d * e;
        // The attention biases, made once per stack (T5: per layer in umT5, but each is freed with its
        // layer's graph only at the end, like the activations): the encoder's per row (positions +
        // padding), the decoder's self-attention one for all rows (positions + causal). Without
        // position biases (BART) the masks are (b, 1, 1, s) and (1, 1, t, t).
        let biases = if cfg.shape.position_bias {
            (b * s * s + t * t) * h * e
        } else {
            (b * s + t * t) * e
        };
        let activations = if checkpointing {
            // Each block's input (and its copy as a variable), one block's activations at a time.
            let inputs = 2 * (enc_layers * b * s + dec_layers * b * t) * d * e;
            inputs + embeddings + biases + enc_block.max(dec_block) + head
        } else {
            embeddings + biases + enc_layers * enc_block + dec_layers * dec_block + head
        };
        let trained = if lora.is_some() {
            adapter_params
        } else {
            params
        };
        TrainFootprint {
            weights: params * if lora.is_some() { e } else { 4 },
            lora: adapter_params * 4,
            optimizer: 2 * trained * 4,
            gradients: trained * 4,
            activations,
            backward: (activations as f64 * BACKWARD_SHARE) as u64,
        }
    }
}

/// `247.6 M parameters`, `19.46 B parameters`.
pub fn parameters_text(cfg: &ModelConfig) -> String {
    match cfg.parameter_count() as f64 {
        n if n >= 1e9 => format!("{:.2} B parameters", n / 1e9),
        n => format!("{:.1} M parameters", n / 1e6),
    }
}

/// Parameters of a LoRA adapter of rank `r` on the linear layers `targets` matches: (rank x in) +
/// (out x rank) each.
fn adapter_parameter_count(cfg: &ModelConfig, targets: &TargetModules, r: u64) -> u64 {
    cfg.linears()
        .iter()
        .filter(|l| targets.matches(&l.name).unwrap_or(false))
        .map(|l| r * (l.inputs + l.outputs) as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init::{Family, Size};

    fn config(family: Family, size: Size, vocab: usize) -> ModelConfig {
        crate::model::init::config(family, size, vocab).model_config()
    }

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

    #[test]
    fn parameter_counts_match_hugging_face() {
        // As transformers' num_parameters() and PEFT's print_trainable_parameters() report them.
        let base = config(Family::FlanT5, Size::Base, 32128);
        assert_eq!(base.parameter_count(), 247_577_856);
        let small = config(Family::T5, Size::Small, 32128);
        assert_eq!(small.parameter_count(), 60_506_624);
        let qv = TargetModules::Names(vec!["q".into(), "v".into()]);
        assert_eq!(adapter_parameter_count(&base, &qv, 8), 884_736);
    }

    #[test]
    fn checkpointing_keeps_block_inputs_not_activations() {
        let cfg = config(Family::FlanT5, Size::Base, 32128);
        let lora = LoraSettings::default();
        let shape = TrainShape {
            batch: 8,
            input_len: 512,
            target_len: 128,
        };
        let plain = TrainFootprint::new(&cfg, DType::F32, Some(&lora), shape, false, false);
        let ck = TrainFootprint::new(&cfg, DType::F32, Some(&lora), shape, true, false);
        // Same weights, adapter, optimizer and gradients; far fewer activations.
        assert_eq!((plain.weights, plain.lora), (ck.weights, ck.lora));
        assert_eq!(
            (plain.optimizer, plain.gradients),
            (ck.optimizer, ck.gradients)
        );
        assert_eq!(plain.optimizer, 2 * plain.lora);
        assert!(ck.activations * 5 < plain.activations);
        assert_eq!(
            plain.total(),
            plain.weights + plain.lora + plain.optimizer + plain.step()
        );
        // Activations grow with the batch, weights do not; bf16 halves the frozen weights.
        let twice = TrainFootprint::new(
            &cfg,
            DType::F32,
            Some(&lora),
            TrainShape { batch: 16, ..shape },
            false,
            false,
        );
        assert!(twice.activations > 19 * plain.activations / 10 && twice.weights == plain.weights);
        let bf16 = TrainFootprint::new(&cfg, DType::BF16, Some(&lora), shape, false, false);
        assert_eq!(bf16.weights * 2, plain.weights);
        assert_eq!(bf16.optimizer, plain.optimizer); // AdamW state stays f32
                                                     // Full fine-tuning: f32 master weights, every weight trained.
                                                     // The fused CPU attention keeps no score tensors: fewer activations, the rest the same.
        let fused = TrainFootprint::new(&cfg, DType::F32, Some(&lora), shape, false, true);
        let scores = 5 * 8 * 12 * (512 * 512 + 128 * 128 + 128 * 512) * 4 * 12;
        let masks = scores / 5;
        assert!(plain.activations - fused.activations >= scores - masks);
        assert_eq!(
            (fused.weights, fused.gradients),
            (plain.weights, plain.gradients)
        );
        let full = TrainFootprint::new(&cfg, DType::F32, None, shape, false, false);
        assert_eq!(full.gradients, cfg.parameter_count() * 4);
        assert_eq!(full.optimizer, 2 * full.gradients);
    }
}
