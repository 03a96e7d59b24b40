//! The model seam: one seq2seq interface that decoding, training, `generate`, `merge` and the
//! benchmarks use, whatever the family. Each family (`t5/`, `bart/`) implements [`Seq2Seq`]; the
//! passes every family shares (the teacher-forced forward, gradients with or without checkpointing)
//! are written once over [`Layers`], the family's network cut into embeddings, blocks and a head.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};

use super::config::ModelConfig;
use super::decode_state::DecodeState;
use super::layers::Linear;
use super::mode::Mode;
use crate::error::Result;

/// A batch of a training step: encoder ids and their 0/1 mask (b, s), decoder inputs (b, t).
pub type Batch<'a> = (&'a Tensor, &'a Tensor, &'a Tensor);

/// A loss of logits (b, t, vocab): a scalar tensor.
pub type LossOf<'a> = &'a dyn Fn(&Tensor) -> Result<Tensor>;

/// An encoder-decoder model of any family.
pub trait Seq2Seq: Send + Sync {
    fn config(&self) -> &ModelConfig;
    fn device(&self) -> &Device;
    fn dtype(&self) -> DType;

    /// Encoder hidden states (b, s, d) for ids (b, s) with a 0/1 mask (b, s).
    fn encode(&self, ids: &Tensor, mask: &Tensor, mode: &Mode) -> Result<Tensor>;

    /// Teacher-forced logits (b, t, vocab) in f32 for every target position.
    fn forward(&self, ids: &Tensor, mask: &Tensor, dec_ids: &Tensor, mode: &Mode)
        -> Result<Tensor>;

    /// The loss of a batch and the gradient of each of `vars` (`None`: the loss does not depend on
    /// it); `checkpointed` recomputes each block's activations in the backward pass instead of
    /// keeping them (see the `checkpointing` module).
    fn gradients(
        &self,
        batch: Batch,
        mode: &Mode,
        vars: &[Var],
        checkpointed: bool,
        loss: LossOf,
    ) -> Result<(Tensor, Vec<Option<Tensor>>)>;

    /// Prepare to decode up to `max_len` tokens for encoded rows: every decoder layer's
    /// cross-attention keys and values are computed here, once.
    fn start_decoding(
        &self,
        enc: &Tensor,
        enc_mask: &Tensor,
        max_len: usize,
    ) -> Result<DecodeState>;

    /// One decoding step: `tokens` (rows,) are the newest tokens; returns next-token logits (rows,
    /// vocab).
    fn decode_step(&self, st: &mut DecodeState, tokens: &Tensor) -> Result<Tensor>;

    /// Ready the model for generation only: fold LoRA adapters into their weights, stack projections,
    /// transpose weights where the kernels prefer it. The model can no longer be trained after this.
    fn prepare_for_inference(&mut self) -> Result<()>;

    /// Every linear layer with its HF module name (without `.weight`), for LoRA and merging, in the
    /// order of [`super::config::Architecture::linears`].
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)>;

    /// Every weight with its HF name (LoRA folded in), as the family's checkpoints store them.
    fn state_dict(&mut self) -> Result<BTreeMap<String, Tensor>>;

    /// Make every weight trainable (full fine-tuning); returns the variables by HF name.
    fn make_all_trainable(&mut self) -> Result<Vec<(String, Var)>>;

    /// A copy sharing the weights (replicas, tests).
    fn boxed_clone(&self) -> Box<dyn Seq2Seq>;
}

impl Clone for Box<dyn Seq2Seq> {
    fn clone(&self) -> Self {
        self.boxed_clone()
    }
}

/// A family's network as the generic passes see it: embeddings, encoder blocks, the encoder's last
/// stage, embeddings and blocks of the decoder, and the head. Each piece includes its dropout.
pub trait Layers {
    /// What every encoder block reads besides its input (its attention bias).
    type EncoderBias;
    /// What every decoder block reads besides its input and the encoder output.
    type DecoderBias;

    fn encoder_bias(&self, ids: &Tensor, mask: &Tensor) -> Result<Self::EncoderBias>;
    fn embed_encoder(&self, ids: &Tensor, mode: &Mode) -> Result<Tensor>;
    fn encoder_layers(&self) -> usize;
    fn encoder_layer(
        &self,
        i: usize,
        x: &Tensor,
        bias: &Self::EncoderBias,
        mode: &Mode,
    ) -> Result<Tensor>;
    /// After the last encoder block (a final norm, dropout).
    fn finish_encoder(&self, x: &Tensor, mode: &Mode) -> Result<Tensor>;

    fn decoder_bias(&self, dec_ids: &Tensor, enc_mask: &Tensor) -> Result<Self::DecoderBias>;
    fn embed_decoder(&self, dec_ids: &Tensor, mode: &Mode) -> Result<Tensor>;
    fn decoder_layers(&self) -> usize;
    fn decoder_layer(
        &self,
        i: usize,
        y: &Tensor,
        enc: &Tensor,
        bias: &Self::DecoderBias,
        mode: &Mode,
    ) -> Result<Tensor>;
    /// After the last decoder block: final norm, dropout, the output layer; logits in f32.
    fn head(&self, y: &Tensor, mode: &Mode) -> Result<Tensor>;
}

/// Encoder hidden states through the pieces.
pub fn encode<L: Layers>(m: &L, ids: &Tensor, mask: &Tensor, mode: &Mode) -> Result<Tensor> {
    let bias = m.encoder_bias(ids, mask)?;
    let mut x = m.embed_encoder(ids, mode)?;
    for i in 0..m.encoder_layers() {
        x = m.encoder_layer(i, &x, &bias, mode)?;
    }
    m.finish_encoder(&x, mode)
}

/// Teacher-forced logits through the pieces.
pub fn forward<L: Layers>(
    m: &L,
    ids: &Tensor,
    mask: &Tensor,
    dec_ids: &Tensor,
    mode: &Mode,
) -> Result<Tensor> {
    let enc = encode(m, ids, mask, mode)?;
    let bias = m.decoder_bias(dec_ids, mask)?;
    let mut y = m.embed_decoder(dec_ids, mode)?;
    for i in 0..m.decoder_layers() {
        y = m.decoder_layer(i, &y, &enc, &bias, mode)?;
    }
    m.head(&y, mode)
}
