//! The T5 family (t5, t5 v1.1 / flan-t5, UL2, mT5, umT5): padded batches with per-row masks, logits for every position (training) or
//! for the newest one (decoding), cross-attention keys/values computed once per sequence, a KV cache
//! appended in place, and rows that can be dropped (or reordered, for beams) mid-generation.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;

use super::attention::{causal_bias, padding_bias, Attention};
use super::config::ModelConfig;
use super::decode_state::{stack_cross_kv, DecodeState};
use super::layers::{Ffn, Linear, RmsNorm};
use super::mode::Mode;
use super::ops::{self, model_dropout, residual_dropout};
use super::position_bias::PositionBias;
use super::seq2seq::{self, Batch, Layers, LossOf, Seq2Seq};
use crate::error::{Error, Result};

mod config;
mod decode;
mod load;
mod params;

pub use config::{build, T5Config};

/// The registry's reader of T5-family configs (t5, mt5, umt5).
pub fn parse_config(v: &Value, origin: &str) -> Result<ModelConfig> {
    let cfg: T5Config = serde_json::from_value(v.clone())
        .map_err(|e| Error::model(format!("{origin}: not a T5 config.json: {e}")))?;
    cfg.validate(origin)?;
    Ok(cfg.model_config())
}

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
    /// The learned relative position bias: one shared by every block (T5, mT5), or one per block
    /// (umT5).
    pub biases: Vec<PositionBias>,
}

impl Stack {
    /// Each block's share of `per_bias` (one value per [`Stack::biases`] entry).
    fn of<T>(per_bias: &[T], block: usize) -> &T {
        &per_bias[block.min(per_bias.len() - 1)]
    }
}

#[derive(Clone)]
pub struct T5 {
    pub cfg: T5Config,
    pub config: ModelConfig,
    /// (vocab, d_model), shared by both embeddings (and the output layer when tied).
    pub shared: Tensor,
    pub encoder: Stack,
    pub decoder: Stack,
    /// The output layer; `None`: the shared embedding (tied).
    pub lm_head: Option<Linear>,
    /// Inference only: every decoder layer's cross-attention k and v weights stacked
    /// (layers x 2 x inner, d), so one matmul projects the encoder output for all of them.
    pub cross_kv_all: Option<Linear>,
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

    /// A stack's final norm, with dropout in training.
    fn final_dropout(stack: &Stack, x: &Tensor, mode: &Mode) -> Result<Tensor> {
        model_dropout(&stack.final_norm.forward(x)?, mode)
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
                weight_t: Some(wt.clone()),
                ..Linear::new(wt.t()?)
            }
            .forward(&hidden, mode)?,
            (None, None) => Linear::new(self.shared.clone()).forward(&hidden, mode)?,
        };
        Ok(l.to_dtype(DType::F32)?)
    }
}

impl Layers for T5 {
    /// Per position bias: relative positions plus the rows' padding, (b, heads, s, s).
    type EncoderBias = Vec<Tensor>;
    /// Per position bias: self-attention (relative positions, causal); cross-attention (padding).
    type DecoderBias = (Vec<Tensor>, Tensor);

    fn encoder_bias(&self, ids: &Tensor, mask: &Tensor) -> Result<Vec<Tensor>> {
        let s = ids.dims2()?.1;
        let pad = padding_bias(mask, self.dtype)?;
        self.encoder
            .biases
            .iter()
            .map(|b| {
                Ok(b.forward(s, s, 0)?
                    .to_dtype(self.dtype)?
                    .broadcast_add(&pad)?)
            })
            .collect()
    }

    fn embed_encoder(&self, ids: &Tensor, mode: &Mode) -> Result<Tensor> {
        model_dropout(&self.embed(ids)?, mode)
    }

    fn encoder_layers(&self) -> usize {
        self.encoder.blocks.len()
    }

    fn encoder_layer(
        &self,
        i: usize,
        x: &Tensor,
        bias: &Vec<Tensor>,
        mode: &Mode,
    ) -> Result<Tensor> {
        self.encoder.blocks[i].encode(x, Stack::of(bias, i), mode)
    }

    fn finish_encoder(&self, x: &Tensor, mode: &Mode) -> Result<Tensor> {
        Self::final_dropout(&self.encoder, x, mode)
    }

    fn decoder_bias(&self, dec_ids: &Tensor, enc_mask: &Tensor) -> Result<(Vec<Tensor>, Tensor)> {
        let t = dec_ids.dims2()?.1;
        let causal = causal_bias(t, self.dtype, &self.device)?;
        let own = self
            .decoder
            .biases
            .iter()
            .map(|b| {
                Ok(b.forward(t, t, 0)?
                    .to_dtype(self.dtype)?
                    .broadcast_add(&causal)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((own, padding_bias(enc_mask, self.dtype)?))
    }

    fn embed_decoder(&self, dec_ids: &Tensor, mode: &Mode) -> Result<Tensor> {
        model_dropout(&self.embed(dec_ids)?, mode)
    }

    fn decoder_layers(&self) -> usize {
        self.decoder.blocks.len()
    }

    fn decoder_layer(
        &self,
        i: usize,
        y: &Tensor,
        enc: &Tensor,
        (own, cross): &(Vec<Tensor>, Tensor),
        mode: &Mode,
    ) -> Result<Tensor> {
        self.decoder.blocks[i].decode(y, enc, Stack::of(own, i), cross, mode)
    }

    fn head(&self, y: &Tensor, mode: &Mode) -> Result<Tensor> {
        self.logits(&Self::final_dropout(&self.decoder, y, mode)?, mode)
    }
}

impl Seq2Seq for T5 {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn encode(&self, ids: &Tensor, mask: &Tensor, mode: &Mode) -> Result<Tensor> {
        seq2seq::encode(self, ids, mask, mode)
    }

    fn forward(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        dec_ids: &Tensor,
        mode: &Mode,
    ) -> Result<Tensor> {
        seq2seq::forward(self, ids, mask, dec_ids, mode)
    }

    fn gradients(
        &self,
        batch: Batch,
        mode: &Mode,
        vars: &[Var],
        checkpointed: bool,
        loss: LossOf,
    ) -> Result<(Tensor, Vec<Option<Tensor>>)> {
        super::checkpointing::gradients(self, batch, mode, vars, checkpointed, loss)
    }

    fn start_decoding(
        &self,
        enc: &Tensor,
        enc_mask: &Tensor,
        max_len: usize,
    ) -> Result<DecodeState> {
        let attns: Vec<&Attention> = self.cross_attentions().collect();
        let mut st =
            DecodeState::start(&attns, self.cross_kv_all.as_ref(), enc, enc_mask, max_len)?;
        let len = max_len.max(1);
        st.self_bias = self
            .decoder
            .biases
            .iter()
            .map(|b| Ok(b.forward(len, len, 0)?.to_dtype(self.dtype)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(st)
    }

    fn decode_step(&self, st: &mut DecodeState, tokens: &Tensor) -> Result<Tensor> {
        self.step(st, tokens)
    }

    fn prepare_for_inference(&mut self) -> Result<()> {
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
        let mut cross: Vec<&mut Attention> = self
            .decoder
            .blocks
            .iter_mut()
            .filter_map(|b| b.cross.as_mut().map(|(a, _)| a))
            .collect();
        self.cross_kv_all = stack_cross_kv(&mut cross)?;
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

    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        self.named_linears()
    }

    fn state_dict(&mut self) -> Result<BTreeMap<String, Tensor>> {
        self.weights_by_name()
    }

    fn make_all_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        self.trainable_weights()
    }

    fn boxed_clone(&self) -> Box<dyn Seq2Seq> {
        Box::new(self.clone())
    }
}

impl T5 {
    /// The decoder layers' cross-attention, in order.
    fn cross_attentions(&self) -> impl Iterator<Item = &Attention> {
        self.decoder.blocks.iter().map(|b| {
            &b.cross
                .as_ref()
                .expect("decoder blocks have cross-attention")
                .0
        })
    }
}
