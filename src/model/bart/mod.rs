//! The BART family (bart, mbart, plbart): learned positions offset by 2, embeddings scaled by
//! sqrt(d_model) where `scale_embedding` says so and layer-normed, attention scaled by 1/sqrt(head
//! dim) with biases on every projection, a GELU feed-forward, tied embeddings and a
//! `final_logits_bias`. BART and PLBART normalize after each residual; mBART before each sublayer,
//! with a final norm after each stack. Written on the same shared modules as T5 (attention, KV
//! caches, Linear + LoRA, ops).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};

use super::attention::{causal_bias, padding_bias, Attention};
use super::config::ModelConfig;
use super::decode_state::{stack_cross_kv, DecodeState};
use super::layers::{Ffn, LayerNorm, Linear};
use super::mode::Mode;
use super::ops::{model_dropout, residual_dropout};
use super::seq2seq::{self, Batch, Layers, LossOf, Seq2Seq};
use crate::error::{Error, Result};

mod config;
mod decode;
mod load;
mod params;

pub use config::{build, parse_config, BartConfig, Norms};

/// One encoder or decoder layer.
#[derive(Clone)]
pub struct Layer {
    pub self_attn: Attention,
    pub self_norm: LayerNorm,
    /// Decoder only: cross-attention (`encoder_attn`) and its norm.
    pub cross: Option<(Attention, LayerNorm)>,
    /// `fc1`, the activation, `fc2`.
    pub ffn: Ffn,
    pub ffn_norm: LayerNorm,
}

impl Layer {
    /// `x + sublayer(x)`, normed where the family norms: after the sum (post) or before the
    /// sublayer (pre).
    fn residual(
        x: &Tensor,
        norm: &LayerNorm,
        norms: Norms,
        mode: &Mode,
        sublayer: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        match norms {
            Norms::Post => norm.forward(&residual_dropout(x, &sublayer(x)?, mode)?),
            Norms::Pre => residual_dropout(x, &sublayer(&norm.forward(x)?)?, mode),
        }
    }

    pub fn encode(&self, x: &Tensor, bias: &Tensor, norms: Norms, mode: &Mode) -> Result<Tensor> {
        let x = Self::residual(x, &self.self_norm, norms, mode, |h| {
            self.self_attn.forward(h, None, bias, mode)
        })?;
        Self::residual(&x, &self.ffn_norm, norms, mode, |h| {
            self.ffn.forward(h, mode)
        })
    }

    pub fn decode(
        &self,
        x: &Tensor,
        enc: &Tensor,
        (own, cross): (&Tensor, &Tensor),
        norms: Norms,
        mode: &Mode,
    ) -> Result<Tensor> {
        let x = Self::residual(x, &self.self_norm, norms, mode, |h| {
            self.self_attn.forward(h, None, own, mode)
        })?;
        let (ca, cn) = self
            .cross
            .as_ref()
            .expect("decoder layers have cross-attention");
        let x = Self::residual(&x, cn, norms, mode, |h| {
            ca.forward(h, Some(enc), cross, mode)
        })?;
        Self::residual(&x, &self.ffn_norm, norms, mode, |h| {
            self.ffn.forward(h, mode)
        })
    }
}

/// An encoder or a decoder: learned positions, the embedding norm, layers, and (mBART) a final norm.
#[derive(Clone)]
pub struct Stack {
    /// (max_position_embeddings + 2, d_model); row `POSITION_OFFSET + p` is position p.
    pub positions: Tensor,
    pub embed_norm: LayerNorm,
    pub layers: Vec<Layer>,
    pub final_norm: Option<LayerNorm>,
}

#[derive(Clone)]
pub struct Bart {
    pub cfg: BartConfig,
    pub config: ModelConfig,
    /// (vocab, d_model), shared by both embeddings and (tied) the output layer.
    pub shared: Tensor,
    pub encoder: Stack,
    pub decoder: Stack,
    /// An untied output layer (`tie_word_embeddings: false`); `None`: the shared embedding.
    pub lm_head: Option<Linear>,
    /// (vocab,): added to every logit.
    pub final_logits_bias: Tensor,
    /// Inference only: the output layer as used (tied, transposed where the kernels prefer it,
    /// with `final_logits_bias` as its bias).
    pub head_for_inference: Option<Linear>,
    /// Inference only: every decoder layer's cross-attention k and v stacked.
    pub cross_kv_all: Option<Linear>,
    pub device: Device,
    pub dtype: DType,
}

impl Bart {
    /// Token embeddings (scaled) plus the positions from `start`, layer-normed, with dropout.
    fn embed(&self, stack: &Stack, ids: &Tensor, start: usize, mode: &Mode) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let max = self.cfg.max_position_embeddings;
        if start + t > max {
            return Err(Error::model(format!(
                "a sequence of {} tokens is longer than this model's max_position_embeddings {max}",
                start + t
            )));
        }
        let d = self.cfg.d_model;
        let e = self
            .shared
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        let scale = self.cfg.embed_scale();
        let e = if scale == 1.0 { e } else { (e * scale)? };
        let pos = stack
            .positions
            .narrow(0, config::POSITION_OFFSET + start, t)?;
        let x = e.broadcast_add(&pos.unsqueeze(0)?)?;
        model_dropout(&stack.embed_norm.forward(&x)?, mode)
    }

    /// The final norm of a stack, where the family has one (mBART).
    fn finish(stack: &Stack, x: &Tensor) -> Result<Tensor> {
        match &stack.final_norm {
            Some(n) => n.forward(x),
            None => Ok(x.clone()),
        }
    }

    /// Logits (…, vocab) in f32 from decoder hidden states (…, d): the output layer and
    /// `final_logits_bias`.
    fn logits(&self, hidden: &Tensor, mode: &Mode) -> Result<Tensor> {
        let l = match (&self.head_for_inference, &self.lm_head) {
            (Some(h), _) => h.forward(hidden, mode)?,
            (None, Some(h)) => h
                .forward(hidden, mode)?
                .broadcast_add(&self.final_logits_bias.to_dtype(self.dtype)?)?,
            (None, None) => {
                Linear::with_bias(self.shared.clone(), Some(self.final_logits_bias.clone()))
                    .forward(hidden, mode)?
            }
        };
        Ok(l.to_dtype(DType::F32)?)
    }

    fn norms(&self) -> Norms {
        self.cfg.norms()
    }
}

impl Layers for Bart {
    /// The rows' padding, (b, 1, 1, s).
    type EncoderBias = Tensor;
    /// Causal (1, 1, t, t) for self-attention; the encoder rows' padding for cross-attention.
    type DecoderBias = (Tensor, Tensor);

    fn encoder_bias(&self, _ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        padding_bias(mask, self.dtype)
    }

    fn embed_encoder(&self, ids: &Tensor, mode: &Mode) -> Result<Tensor> {
        self.embed(&self.encoder, ids, 0, mode)
    }

    fn encoder_layers(&self) -> usize {
        self.encoder.layers.len()
    }

    fn encoder_layer(&self, i: usize, x: &Tensor, bias: &Tensor, mode: &Mode) -> Result<Tensor> {
        self.encoder.layers[i].encode(x, bias, self.norms(), mode)
    }

    fn finish_encoder(&self, x: &Tensor, _mode: &Mode) -> Result<Tensor> {
        Self::finish(&self.encoder, x)
    }

    fn decoder_bias(&self, dec_ids: &Tensor, enc_mask: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = dec_ids.dims2()?.1;
        Ok((
            causal_bias(t, self.dtype, &self.device)?,
            padding_bias(enc_mask, self.dtype)?,
        ))
    }

    fn embed_decoder(&self, dec_ids: &Tensor, mode: &Mode) -> Result<Tensor> {
        self.embed(&self.decoder, dec_ids, 0, mode)
    }

    fn decoder_layers(&self) -> usize {
        self.decoder.layers.len()
    }

    fn decoder_layer(
        &self,
        i: usize,
        y: &Tensor,
        enc: &Tensor,
        (own, cross): &(Tensor, Tensor),
        mode: &Mode,
    ) -> Result<Tensor> {
        self.decoder.layers[i].decode(y, enc, (own, cross), self.norms(), mode)
    }

    fn head(&self, y: &Tensor, mode: &Mode) -> Result<Tensor> {
        self.logits(&Self::finish(&self.decoder, y)?, mode)
    }
}

impl Seq2Seq for Bart {
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
        let attns: Vec<&Attention> = self
            .decoder
            .layers
            .iter()
            .map(|l| {
                &l.cross
                    .as_ref()
                    .expect("decoder layers have cross-attention")
                    .0
            })
            .collect();
        DecodeState::start(&attns, self.cross_kv_all.as_ref(), enc, enc_mask, max_len)
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
            for l in &mut stack.layers {
                l.self_attn.fuse(true)?;
                if let Some((c, _)) = &mut l.cross {
                    c.fuse(false)?;
                }
            }
        }
        let mut cross: Vec<&mut Attention> = self
            .decoder
            .layers
            .iter_mut()
            .filter_map(|l| l.cross.as_mut().map(|(a, _)| a))
            .collect();
        self.cross_kv_all = stack_cross_kv(&mut cross)?;
        // The decoder's per-step products see few rows: transposed weights (CPU, f32).
        for l in &mut self.decoder.layers {
            l.self_attn.transpose_for_decoding()?;
            if let Some((c, _)) = &mut l.cross {
                c.transpose_for_decoding()?;
            }
            l.ffn.transpose_for_decoding()?;
        }
        let bias = Some(self.final_logits_bias.to_dtype(self.dtype)?);
        let mut head = match &self.lm_head {
            Some(h) => Linear::with_bias(h.weight.clone(), bias),
            None => Linear::with_bias(self.shared.clone(), bias),
        };
        // Tied, the embedding keeps its (vocab, d) rows for lookups; the output layer gets its own
        // transposed copy where the kernels prefer one.
        head.transpose_for_inference()?;
        self.head_for_inference = Some(head);
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
