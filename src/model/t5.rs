//! The T5 encoder-decoder: padded batches with per-row masks, logits for every position (training) or
//! for the newest one (decoding), cross-attention keys/values computed once per sequence, a KV cache
//! appended in place, and rows that can be dropped (or reordered, for beams) mid-generation.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};

use super::attention::{
    causal_bias, padding_bias, Attention, BucketTable, CrossKv, KvCache, PositionBias,
};
use super::config::T5Config;
use super::cpu_attention::KvIndex;
use super::fused_residual::residual_dropout;
use super::layers::{model_dropout, Ffn, Linear, Mode, RmsNorm};
use super::weights::Weights;
use crate::error::{Error, Result};

#[derive(Clone)]
pub struct Block {
    pub self_attn: Attention,
    pub self_norm: RmsNorm,
    /// Decoder only: cross-attention and its norm.
    pub cross: Option<(Attention, RmsNorm)>,
    pub ffn: Ffn,
    pub ffn_norm: RmsNorm,
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
    /// Inference on the CPU with a tied output layer: the shared embedding transposed (d, vocab).
    pub tied_head_t: Option<Tensor>,
    pub device: Device,
    pub dtype: DType,
}

/// Everything decoding needs to carry from step to step for a batch of rows.
pub struct DecodeState {
    cross: Vec<CrossKv>,
    /// Fused CPU path: the cross K/V above are strided views of one projection of the encoder output,
    /// read through this index (rows that finish or reorder only change the index).
    cross_index: Option<KvIndex>,
    caches: Vec<KvCache>,
    /// (rows, 1, 1, src_len) padding bias of the encoder output.
    cross_bias: Tensor,
    step: usize,
}

impl DecodeState {
    pub fn rows(&self) -> usize {
        self.cross_bias.dims()[0]
    }

    pub fn step(&self) -> usize {
        self.step
    }

    /// Keep rows `idx` (in that order; repeats allowed, for beam search) in every cache.
    pub fn select_rows(&mut self, idx: &[u32]) -> Result<()> {
        let dev = self.cross_bias.device().clone();
        let t = Tensor::new(idx, &dev)?;
        match &mut self.cross_index {
            Some(ix) => ix.select(idx),
            None => {
                for c in &mut self.cross {
                    c.select_rows(&t)?;
                }
            }
        }
        for c in &mut self.caches {
            c.select(&t)?;
        }
        self.cross_bias = self.cross_bias.index_select(&t, 0)?;
        Ok(())
    }
}

fn attention(w: &Weights, prefix: &str, cfg: &T5Config) -> Result<Attention> {
    let (d, inner) = (cfg.d_model, cfg.inner_dim());
    Ok(Attention::new(
        Linear::new(w.get(&format!("{prefix}.q.weight"), &[inner, d])?),
        Linear::new(w.get(&format!("{prefix}.k.weight"), &[inner, d])?),
        Linear::new(w.get(&format!("{prefix}.v.weight"), &[inner, d])?),
        Linear::new(w.get(&format!("{prefix}.o.weight"), &[d, inner])?),
        cfg.num_heads,
        cfg.d_kv,
    ))
}

fn norm(w: &Weights, name: &str, cfg: &T5Config) -> Result<RmsNorm> {
    Ok(RmsNorm {
        weight: w.get(name, &[cfg.d_model])?,
        eps: cfg.layer_norm_epsilon,
    })
}

fn ffn(w: &Weights, prefix: &str, cfg: &T5Config) -> Result<Ffn> {
    let kind = cfg.feed_forward()?;
    let (d, f) = (cfg.d_model, cfg.d_ff);
    let get = |n: &str, shape: &[usize]| w.get(&format!("{prefix}.{n}.weight"), shape);
    Ok(if kind.gated {
        Ffn {
            kind,
            wi: Linear::new(get("wi_0", &[f, d])?),
            wi_1: Some(Linear::new(get("wi_1", &[f, d])?)),
            wo: Linear::new(get("wo", &[d, f])?),
            gate_stacked: None,
        }
    } else {
        Ffn {
            kind,
            wi: Linear::new(get("wi", &[f, d])?),
            wi_1: None,
            wo: Linear::new(get("wo", &[d, f])?),
            gate_stacked: None,
        }
    })
}

fn stack(w: &Weights, cfg: &T5Config, decoder: bool) -> Result<Stack> {
    let (name, layers) = if decoder {
        ("decoder", cfg.decoder_layers())
    } else {
        ("encoder", cfg.num_layers)
    };
    let mut blocks = Vec::with_capacity(layers);
    for i in 0..layers {
        let p = format!("{name}.block.{i}.layer");
        let self_attn = attention(w, &format!("{p}.0.SelfAttention"), cfg)?;
        let self_norm = norm(w, &format!("{p}.0.layer_norm.weight"), cfg)?;
        let (cross, ff_layer) = if decoder {
            let a = attention(w, &format!("{p}.1.EncDecAttention"), cfg)?;
            (
                Some((a, norm(w, &format!("{p}.1.layer_norm.weight"), cfg)?)),
                2,
            )
        } else {
            (None, 1)
        };
        blocks.push(Block {
            self_attn,
            self_norm,
            cross,
            ffn: ffn(w, &format!("{p}.{ff_layer}.DenseReluDense"), cfg)?,
            ffn_norm: norm(w, &format!("{p}.{ff_layer}.layer_norm.weight"), cfg)?,
        });
    }
    let bias_w = w.get(
        &format!("{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
        &[cfg.relative_attention_num_buckets, cfg.num_heads],
    )?;
    Ok(Stack {
        blocks,
        final_norm: norm(w, &format!("{name}.final_layer_norm.weight"), cfg)?,
        bias: PositionBias {
            weight: bias_w,
            table: BucketTable::new(
                !decoder,
                cfg.relative_attention_num_buckets,
                cfg.relative_attention_max_distance,
                &w.device,
            )?,
        },
    })
}

impl T5 {
    /// Build the model from checkpoint tensors (HF names); errors name the missing or misshapen tensor.
    pub fn load(cfg: &T5Config, w: &Weights) -> Result<T5> {
        let (v, d) = (cfg.vocab_size, cfg.d_model);
        let shared_name = [
            "shared.weight",
            "encoder.embed_tokens.weight",
            "decoder.embed_tokens.weight",
        ]
        .into_iter()
        .find(|n| w.contains(n))
        .unwrap_or("shared.weight");
        let shared = w.get(shared_name, &[v, d])?;
        // The checkpoint's own output layer when it has one (untied v1.1 / flan / UL2 models do; tied
        // ones either omit it or store a copy of `shared`), else the shared embedding.
        let lm_head = if w.contains("lm_head.weight") {
            Some(Linear::new(w.get("lm_head.weight", &[v, d])?))
        } else {
            None
        };
        Ok(T5 {
            cfg: cfg.clone(),
            shared,
            encoder: stack(w, cfg, false)?,
            decoder: stack(w, cfg, true)?,
            lm_head,
            cross_kv_all: None,
            tied_head_t: None,
            device: w.device.clone(),
            dtype: w.dtype,
        })
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let dims = ids.dims().to_vec();
        let e = self.shared.index_select(&ids.flatten_all()?, 0)?;
        let mut shape = dims;
        shape.push(self.cfg.d_model);
        Ok(e.reshape(shape)?)
    }

    /// Encoder hidden states (b, s, d) for ids (b, s) with a 0/1 mask (b, s).
    pub fn encode(&self, ids: &Tensor, mask: &Tensor, mode: &Mode) -> Result<Tensor> {
        let (_, s) = ids.dims2()?;
        let mut x = model_dropout(&self.embed(ids)?, mode)?;
        let bias = self
            .encoder
            .bias
            .forward(s, s, 0)?
            .to_dtype(self.dtype)?
            .broadcast_add(&padding_bias(mask, self.dtype)?)?;
        for b in &self.encoder.blocks {
            let h = b
                .self_attn
                .forward(&b.self_norm.forward(&x)?, None, &bias, mode)?;
            x = residual_dropout(&x, &h, mode)?;
            let h = b.ffn.forward(&b.ffn_norm.forward(&x)?, mode)?;
            x = residual_dropout(&x, &h, mode)?;
        }
        model_dropout(&self.encoder.final_norm.forward(&x)?, mode)
    }

    /// Decoder hidden states for a whole target sequence (teacher forcing), causal.
    pub fn decode_full(
        &self,
        dec_ids: &Tensor,
        enc: &Tensor,
        enc_mask: &Tensor,
        mode: &Mode,
    ) -> Result<Tensor> {
        let (_, t) = dec_ids.dims2()?;
        let mut x = model_dropout(&self.embed(dec_ids)?, mode)?;
        let self_bias = self
            .decoder
            .bias
            .forward(t, t, 0)?
            .to_dtype(self.dtype)?
            .broadcast_add(&causal_bias(t, self.dtype, &self.device)?)?;
        let cross_bias = padding_bias(enc_mask, self.dtype)?;
        for b in &self.decoder.blocks {
            let h = b
                .self_attn
                .forward(&b.self_norm.forward(&x)?, None, &self_bias, mode)?;
            x = residual_dropout(&x, &h, mode)?;
            let (ca, cn) = b
                .cross
                .as_ref()
                .expect("decoder blocks have cross-attention");
            let h = ca.forward(&cn.forward(&x)?, Some(enc), &cross_bias, mode)?;
            x = residual_dropout(&x, &h, mode)?;
            let h = b.ffn.forward(&b.ffn_norm.forward(&x)?, mode)?;
            x = residual_dropout(&x, &h, mode)?;
        }
        model_dropout(&self.decoder.final_norm.forward(&x)?, mode)
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

    /// Prepare to decode up to `max_len` tokens for encoded rows: cross-attention K/V of every layer
    /// are computed here, once.
    pub fn start_decoding(
        &self,
        enc: &Tensor,
        enc_mask: &Tensor,
        max_len: usize,
    ) -> Result<DecodeState> {
        let rows = enc.dims()[0];
        let (cross, cross_index) = self.cross_kv(enc, enc_mask)?;
        let caches = (0..self.decoder.blocks.len())
            .map(|_| {
                KvCache::new(
                    rows,
                    self.cfg.num_heads,
                    max_len.max(1),
                    self.cfg.d_kv,
                    self.dtype,
                    &self.device,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DecodeState {
            cross,
            cross_index,
            caches,
            cross_bias: padding_bias(enc_mask, self.dtype)?,
            step: 0,
        })
    }

    /// Cross-attention keys and values of every decoder layer for encoder output `enc`. On the CPU
    /// in f32 (with the stacked weight): one matmul for all layers, handed out as strided views, no
    /// per-layer copies into head-major layout, and an index over the rows. Elsewhere, per layer.
    fn cross_kv(&self, enc: &Tensor, enc_mask: &Tensor) -> Result<(Vec<CrossKv>, Option<KvIndex>)> {
        let layers = self.decoder.blocks.len();
        let (heads, d_kv) = (self.cfg.num_heads, self.cfg.d_kv);
        if let Some(w) = self
            .cross_kv_all
            .as_ref()
            .filter(|_| super::cpu_attention::applies(enc))
        {
            let (rows, s, _) = enc.dims3()?;
            let y = Linear::new(w.clone())
                .forward(enc, &Mode::INFER)?
                .reshape((rows, s, layers * 2 * heads, d_kv))?;
            let view = |i: usize| -> Result<Tensor> {
                Ok(y.narrow(2, i * heads, heads)?.transpose(1, 2)?)
            };
            let cross = (0..layers)
                .map(|l| {
                    Ok(CrossKv {
                        k: view(2 * l)?,
                        v: view(2 * l + 1)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            return Ok((cross, Some(KvIndex::from_mask(enc_mask)?)));
        }
        let cross = self
            .decoder
            .blocks
            .iter()
            .map(|b| {
                let (ca, _) = b
                    .cross
                    .as_ref()
                    .expect("decoder blocks have cross-attention");
                ca.cross_kv(enc)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((cross, None))
    }

    /// One decoding step: `tokens` (rows,) are the newest tokens; returns next-token logits (rows, vocab).
    pub fn decode_step(&self, st: &mut DecodeState, tokens: &Tensor) -> Result<Tensor> {
        let rows = tokens.dims1()?;
        if rows != st.rows() {
            return Err(Error::model(format!(
                "decode_step: {rows} tokens for {} rows",
                st.rows()
            )));
        }
        let mut x = self.embed(&tokens.reshape((rows, 1))?)?;
        let pos = st.step;
        let self_bias = self
            .decoder
            .bias
            .forward(1, pos + 1, pos)?
            .to_dtype(self.dtype)?;
        for (i, b) in self.decoder.blocks.iter().enumerate() {
            let h = b.self_attn.forward_cached(
                &b.self_norm.forward(&x)?,
                &mut st.caches[i],
                &self_bias,
            )?;
            x = (x + h)?;
            let (ca, cn) = b
                .cross
                .as_ref()
                .expect("decoder blocks have cross-attention");
            let h = ca.forward_cross(
                &cn.forward(&x)?,
                &st.cross[i],
                &st.cross_bias,
                st.cross_index.as_ref(),
            )?;
            x = (x + h)?;
            let h = b.ffn.forward(&b.ffn_norm.forward(&x)?, &Mode::INFER)?;
            x = (x + h)?;
        }
        st.step += 1;
        let h = self.decoder.final_norm.forward(&x)?;
        Ok(self.logits(&h, &Mode::INFER)?.squeeze(1)?)
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
            None if self.shared.device().is_cpu() && self.dtype == DType::F32 => {
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

    /// Every Linear with its HF name (without `.weight`), for LoRA and merging.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out: Vec<(String, &mut Linear)> = vec![];
        for (stack_name, stack) in [
            ("encoder", &mut self.encoder),
            ("decoder", &mut self.decoder),
        ] {
            for (i, b) in stack.blocks.iter_mut().enumerate() {
                let p = format!("{stack_name}.block.{i}.layer");
                let ff_layer = if b.cross.is_some() { 2 } else { 1 };
                let a = &mut b.self_attn;
                out.push((format!("{p}.0.SelfAttention.q"), &mut a.q));
                out.push((format!("{p}.0.SelfAttention.k"), &mut a.k));
                out.push((format!("{p}.0.SelfAttention.v"), &mut a.v));
                out.push((format!("{p}.0.SelfAttention.o"), &mut a.o));
                if let Some((c, _)) = &mut b.cross {
                    out.push((format!("{p}.1.EncDecAttention.q"), &mut c.q));
                    out.push((format!("{p}.1.EncDecAttention.k"), &mut c.k));
                    out.push((format!("{p}.1.EncDecAttention.v"), &mut c.v));
                    out.push((format!("{p}.1.EncDecAttention.o"), &mut c.o));
                }
                let f = &mut b.ffn;
                let gated = f.wi_1.is_some();
                out.push((
                    format!(
                        "{p}.{ff_layer}.DenseReluDense.{}",
                        if gated { "wi_0" } else { "wi" }
                    ),
                    &mut f.wi,
                ));
                if let Some(w1) = &mut f.wi_1 {
                    out.push((format!("{p}.{ff_layer}.DenseReluDense.wi_1"), w1));
                }
                out.push((format!("{p}.{ff_layer}.DenseReluDense.wo"), &mut f.wo));
            }
        }
        if let Some(h) = &mut self.lm_head {
            out.push(("lm_head".to_string(), h));
        }
        out
    }

    /// Every weight tensor with its HF name (LoRA folded in), as a checkpoint stores them.
    pub fn state_dict(&mut self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        out.insert("shared.weight".to_string(), self.shared.clone());
        out.insert(
            "encoder.embed_tokens.weight".to_string(),
            self.shared.clone(),
        );
        out.insert(
            "decoder.embed_tokens.weight".to_string(),
            self.shared.clone(),
        );
        for (name, lin) in self.linears_mut() {
            out.insert(format!("{name}.weight"), lin.merged_weight()?);
        }
        for (stack_name, stack) in [("encoder", &self.encoder), ("decoder", &self.decoder)] {
            for (i, b) in stack.blocks.iter().enumerate() {
                let p = format!("{stack_name}.block.{i}.layer");
                let ff_layer = if b.cross.is_some() { 2 } else { 1 };
                out.insert(
                    format!("{p}.0.layer_norm.weight"),
                    b.self_norm.weight.clone(),
                );
                if let Some((_, n)) = &b.cross {
                    out.insert(format!("{p}.1.layer_norm.weight"), n.weight.clone());
                }
                out.insert(
                    format!("{p}.{ff_layer}.layer_norm.weight"),
                    b.ffn_norm.weight.clone(),
                );
            }
            out.insert(
                format!("{stack_name}.final_layer_norm.weight"),
                stack.final_norm.weight.clone(),
            );
            out.insert(
                format!(
                    "{stack_name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
                ),
                stack.bias.weight.clone(),
            );
        }
        Ok(out)
    }

    /// Make every weight trainable (full fine-tuning); returns the variables by name.
    pub fn make_all_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        let mut vars = vec![];
        let mut wrap = |name: String, t: &mut Tensor| -> Result<()> {
            let v = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
            *t = v.as_tensor().clone();
            vars.push((name, v));
            Ok(())
        };
        wrap("shared.weight".into(), &mut self.shared)?;
        for (stack_name, stack) in [
            ("encoder", &mut self.encoder),
            ("decoder", &mut self.decoder),
        ] {
            wrap(
                format!(
                    "{stack_name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
                ),
                &mut stack.bias.weight,
            )?;
            wrap(
                format!("{stack_name}.final_layer_norm.weight"),
                &mut stack.final_norm.weight,
            )?;
            for (i, b) in stack.blocks.iter_mut().enumerate() {
                let p = format!("{stack_name}.block.{i}.layer");
                let ff_layer = if b.cross.is_some() { 2 } else { 1 };
                wrap(format!("{p}.0.layer_norm.weight"), &mut b.self_norm.weight)?;
                if let Some((_, n)) = &mut b.cross {
                    wrap(format!("{p}.1.layer_norm.weight"), &mut n.weight)?;
                }
                wrap(
                    format!("{p}.{ff_layer}.layer_norm.weight"),
                    &mut b.ffn_norm.weight,
                )?;
            }
        }
        for (name, lin) in self.linears_mut() {
            wrap(format!("{name}.weight"), &mut lin.weight)?;
        }
        Ok(vars)
    }
}
