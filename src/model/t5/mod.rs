//! The T5 encoder-decoder: padded batches with per-row masks, logits for every position (training) or
//! for the newest one (decoding), cross-attention keys/values computed once per sequence, a KV cache
//! appended in place, and rows that can be dropped (or reordered, for beams) mid-generation.

use candle_core::{DType, Device, Tensor};

use super::attention::{causal_bias, padding_bias, Attention};
use super::config::T5Config;
use super::layers::{Ffn, Linear, RmsNorm};
use super::mode::Mode;
use super::ops::{self, model_dropout, residual_dropout};
use super::position_bias::PositionBias;
use crate::error::Result;

mod decode;
mod gradients;
mod load;
mod params;

pub use decode::DecodeState;

#[derive(Clone)]
pub struct Block {
    pub self_attn: Attention,
    pub self_norm: RmsNorm,
    /// Decoder only: cross-attention and its norm.
    pub cross: Option<(Attention, RmsNorm)>,
    pub ffn: Ffn,
    pub ffn_norm: RmsNorm,
}

impl Block {
    /// An encoder block: self-attention, then the feed-forward, each pre-normed with a residual.
    pub fn encode(&self, x: &Tensor, bias: &Tensor, mode: &Mode) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.self_norm.forward(x)?, None, bias, mode)?;
        let x = residual_dropout(x, &h, mode)?;
        let h = self.ffn.forward(&self.ffn_norm.forward(&x)?, mode)?;
        residual_dropout(&x, &h, mode)
    }

    /// A decoder block over a whole target sequence: causal self-attention, cross-attention over the
    /// encoder output `enc`, then the feed-forward.
    pub fn decode(
        &self,
        x: &Tensor,
        enc: &Tensor,
        self_bias: &Tensor,
        cross_bias: &Tensor,
        mode: &Mode,
    ) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.self_norm.forward(x)?, None, self_bias, mode)?;
        let x = residual_dropout(x, &h, mode)?;
        let (ca, cn) = self
            .cross
            .as_ref()
            .expect("decoder blocks have cross-attention");
        let h = ca.forward(&cn.forward(&x)?, Some(enc), cross_bias, mode)?;
        let x = residual_dropout(&x, &h, mode)?;
        let h = self.ffn.forward(&self.ffn_norm.forward(&x)?, mode)?;
        residual_dropout(&x, &h, mode)
    }
}

#[derive(Clone)]
pub struct Stack {
    pub blocks: Vec<Block>,
    pub final_norm: RmsNorm,
    pub bias: PositionBias,
}

#[derive(Clone)]
pub struct T5 {
    pub cfg: T5Config,
    /// (vocab, d_model), shared by both embeddings (and the output layer when tied).
    pub shared: Tensor,
    pub encoder: Stack,
    pub decoder: Stack,
    /// The output layer; `None`: the shared embedding (tied).
    pub lm_head: Option<Linear>,
    /// Inference only: every decoder layer's cross-attention k and v weights stacked
    /// (layers x 2 x inner, d), so one matmul projects the encoder output for all of them.
    pub cross_kv_all: Option<Tensor>,
    /// Inference with a tied output layer, where the kernels prefer transposed weights: the shared
    /// embedding transposed (d, vocab).
    pub tied_head_t: Option<Tensor>,
    pub device: Device,
    pub dtype: DType,
}

impl T5 {
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let dims = ids.dims().to_vec();
        let e = self.shared.index_select(&ids.flatten_all()?, 0)?;
        let mut shape = dims;
        shape.push(self.cfg.d_model);
        Ok(e.reshape(shape)?)
    }

    /// The encoder's attention bias: relative positions plus the rows' padding, (b, heads, s, s).
    fn encoder_bias(&self, s: usize, mask: &Tensor) -> Result<Tensor> {
        Ok(self
            .encoder
            .bias
            .forward(s, s, 0)?
            .to_dtype(self.dtype)?
            .broadcast_add(&padding_bias(mask, self.dtype)?)?)
    }

    /// The decoder's biases: self-attention (relative positions, causal) and cross-attention (the
    /// encoder rows' padding).
    fn decoder_biases(&self, t: usize, enc_mask: &Tensor) -> Result<(Tensor, Tensor)> {
        let self_bias = self
            .decoder
            .bias
            .forward(t, t, 0)?
            .to_dtype(self.dtype)?
            .broadcast_add(&causal_bias(t, self.dtype, &self.device)?)?;
        Ok((self_bias, padding_bias(enc_mask, self.dtype)?))
    }

    /// Token embeddings, with dropout in training.
    fn embed_dropout(&self, ids: &Tensor, mode: &Mode) -> Result<Tensor> {
        model_dropout(&self.embed(ids)?, mode)
    }

    /// A stack's final norm, with dropout in training.
    fn final_dropout(stack: &Stack, x: &Tensor, mode: &Mode) -> Result<Tensor> {
        model_dropout(&stack.final_norm.forward(x)?, mode)
    }

    /// Encoder hidden states (b, s, d) for ids (b, s) with a 0/1 mask (b, s).
    pub fn encode(&self, ids: &Tensor, mask: &Tensor, mode: &Mode) -> Result<Tensor> {
        let mut x = self.embed_dropout(ids, mode)?;
        let bias = self.encoder_bias(ids.dims2()?.1, mask)?;
        for b in &self.encoder.blocks {
            x = b.encode(&x, &bias, mode)?;
        }
        Self::final_dropout(&self.encoder, &x, mode)
    }

    /// Decoder hidden states for a whole target sequence (teacher forcing), causal.
    pub fn decode_full(
        &self,
        dec_ids: &Tensor,
        enc: &Tensor,
        enc_mask: &Tensor,
        mode: &Mode,
    ) -> Result<Tensor> {
        let mut x = self.embed_dropout(dec_ids, mode)?;
        let (self_bias, cross_bias) = self.decoder_biases(dec_ids.dims2()?.1, enc_mask)?;
        for b in &self.decoder.blocks {
            x = b.decode(&x, enc, &self_bias, &cross_bias, mode)?;
        }
        Self::final_dropout(&self.decoder, &x, mode)
    }

    /// Logits (…, vocab) in f32 from decoder hidden states (…, d).
    pub fn logits(&self, hidden: &Tensor, mode: &Mode) -> Result<Tensor> {
        let hidden = if self.cfg.scales_logits() {
            (hidden * (self.cfg.d_model as f64).powf(-0.5))?
        } else {
            hidden.clone()
        };
        let l = match (&self.lm_head, &self.tied_head_t) {
            (Some(h), _) => h.forward(&hidden, mode)?,
            (None, Some(wt)) => Linear {
                weight: wt.t()?,
                lora: None,
                weight_t: Some(wt.clone()),
            }
            .forward(&hidden, mode)?,
            (None, None) => Linear::new(self.shared.clone()).forward(&hidden, mode)?,
        };
        Ok(l.to_dtype(DType::F32)?)
    }

    /// Teacher-forced logits for every target position: (b, t, vocab).
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        dec_ids: &Tensor,
        mode: &Mode,
    ) -> Result<Tensor> {
        let enc = self.encode(ids, mask, mode)?;
        let h = self.decode_full(dec_ids, &enc, mask, mode)?;
        self.logits(&h, mode)
    }

    /// Ready the model for generation only: fold any LoRA adapters into their weights and stack the
    /// attention projections (one matmul for q, k, v). The model can no longer be trained after this.
    pub fn prepare_for_inference(&mut self) -> Result<()> {
        for (_, lin) in self.linears_mut() {
            if lin.lora.is_some() {
                lin.weight = lin.merged_weight()?;
                lin.lora = None;
            }
        }
        for stack in [&mut self.encoder, &mut self.decoder] {
            for b in &mut stack.blocks {
                b.self_attn.fuse(true)?;
                if let Some((c, _)) = &mut b.cross {
                    c.fuse(false)?;
                }
                b.ffn.fuse()?;
            }
        }
        self.stack_cross_kv()?;
        // The decoder's per-step products see few rows: transposed weights (CPU, f32).
        for b in &mut self.decoder.blocks {
            b.self_attn.transpose_for_decoding()?;
            if let Some((c, _)) = &mut b.cross {
                c.transpose_for_decoding()?;
            }
            b.ffn.transpose_for_decoding()?;
        }
        match &mut self.lm_head {
            Some(h) => h.transpose_for_inference()?,
            None if ops::prefers_transposed_weights(&self.shared) => {
                // Tied: the embedding keeps its (vocab, d) rows for lookups; the output layer gets
                // its own transposed copy.
                self.tied_head_t = Some(self.shared.t()?.contiguous()?);
            }
            None => {}
        }
        Ok(())
    }

    /// Stack every decoder layer's cross-attention k, v weights into `cross_kv_all`; the layers keep
    /// views of it (no second copy of the weights).
    fn stack_cross_kv(&mut self) -> Result<()> {
        let mut parts = vec![];
        for b in &self.decoder.blocks {
            match b.cross.as_ref().and_then(|(ca, _)| ca.kv.as_ref()) {
                Some(w) => parts.push(w.weight.clone()),
                None => return Ok(()), // an unmerged adapter: keep the per-layer path
            }
        }
        if parts.is_empty() {
            return Ok(());
        }
        let all = Tensor::cat(&parts, 0)?;
        let rows = parts[0].dims()[0];
        for (l, b) in self.decoder.blocks.iter_mut().enumerate() {
            if let Some((ca, _)) = &mut b.cross {
                let w = all.narrow(0, l * rows, rows)?;
                ca.k.weight = w.narrow(0, 0, rows / 2)?;
                ca.v.weight = w.narrow(0, rows / 2, rows / 2)?;
                ca.kv = Some(Linear::new(w));
            }
        }
        self.cross_kv_all = Some(all);
        Ok(())
    }
}
