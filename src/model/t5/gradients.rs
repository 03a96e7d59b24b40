//! One training step's loss and the trainable variables' gradients: plainly (the whole graph kept for
//! one backward pass), or with activation checkpointing, where each encoder and decoder block keeps
//! only its input during the forward pass and recomputes its activations during the backward pass,
//! with the same dropout masks (the generator is put back to its state before the block). Memory then
//! holds one block's activations at a time instead of every block's, for about one more forward pass.
//!
//! The backward pass goes block by block, last first: with `g` the gradient of the loss with respect
//! to a block's output, the block is recomputed from its input (a variable) and `sum(output * g)` is
//! differentiated, which gives the block's weights their share of the gradient and `g` for the block
//! before. Decoder blocks also pass a share of the gradient to the encoder output, summed over them.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::T5;
use crate::error::{Error, Result};
use crate::model::mode::Mode;

/// Gradients of a step by variable, summed as parts of the backward pass deliver them.
struct Accumulated<'a> {
    vars: &'a [Var],
    grads: Vec<Option<Tensor>>,
}

impl<'a> Accumulated<'a> {
    fn new(vars: &'a [Var]) -> Self {
        Accumulated {
            vars,
            grads: vec![None; vars.len()],
        }
    }

    fn add(&mut self, store: &GradStore) -> Result<()> {
        for (slot, v) in self.grads.iter_mut().zip(self.vars) {
            if let Some(g) = store.get(v.as_tensor()) {
                *slot = Some(match slot.take() {
                    None => g.clone(),
                    Some(acc) => (acc + g)?,
                });
            }
        }
        Ok(())
    }
}

/// d sum(out * g) by everything `out` depends on.
fn backward_through(out: &Tensor, g: &Tensor) -> Result<GradStore> {
    Ok((out * g)?.sum_all()?.backward()?)
}

/// The gradient a store holds for `v` (a segment's input, which the segment's output depends on).
fn grad_of(store: &GradStore, v: &Var, what: &str) -> Result<Tensor> {
    store
        .get(v.as_tensor())
        .cloned()
        .ok_or_else(|| Error::model(format!("checkpointed backward: no gradient for {what}")))
}

impl T5 {
    /// The loss `loss(logits)` of a batch (ids and 0/1 mask (b, s), decoder inputs (b, t)) and the
    /// gradient of each of `vars` (`None`: the loss does not depend on it). `checkpointed` recomputes
    /// each block's activations in the backward pass instead of keeping them: the same loss and
    /// gradients (up to float rounding) for less memory.
    pub fn gradients(
        &self,
        (ids, mask, dec_ids): (&Tensor, &Tensor, &Tensor),
        mode: &Mode,
        vars: &[Var],
        checkpointed: bool,
        loss: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Vec<Option<Tensor>>)> {
        let mut acc = Accumulated::new(vars);
        if !checkpointed {
            let l = loss(&self.forward(ids, mask, dec_ids, mode)?)?;
            acc.add(&l.backward()?)?;
            return Ok((l.detach(), acc.grads));
        }

        // Forward: every block's input (a value, no graph) and the generator's state before it.
        let (s, t) = (ids.dims2()?.1, dec_ids.dims2()?.1);
        let enc_bias = self.encoder_bias(s, mask)?;
        let (self_bias, cross_bias) = self.decoder_biases(t, mask)?;
        let before_enc_embed = mode.rng_state();
        let mut x = self.embed_dropout(ids, mode)?.detach();
        let mut enc_in = Vec::with_capacity(self.encoder.blocks.len());
        for b in &self.encoder.blocks {
            enc_in.push((x.clone(), mode.rng_state()));
            x = b.encode(&x, &enc_bias, mode)?.detach();
        }
        let (enc_last, before_enc_final) = (x, mode.rng_state());
        let enc = Self::final_dropout(&self.encoder, &enc_last, mode)?.detach();
        let before_dec_embed = mode.rng_state();
        let mut y = self.embed_dropout(dec_ids, mode)?.detach();
        let mut dec_in = Vec::with_capacity(self.decoder.blocks.len());
        for b in &self.decoder.blocks {
            dec_in.push((y.clone(), mode.rng_state()));
            y = b.decode(&y, &enc, &self_bias, &cross_bias, mode)?.detach();
        }

        // The head with its graph: the decoder's final norm, the logits, the loss.
        let yv = Var::from_tensor(&y)?;
        let logits = self.logits(
            &Self::final_dropout(&self.decoder, yv.as_tensor(), mode)?,
            mode,
        )?;
        let l = loss(&logits)?;
        drop(logits);
        let store = l.backward()?;
        acc.add(&store)?;
        let mut g = grad_of(&store, &yv, "the decoder output")?;
        drop(store);
        let after_forward = mode.rng_state();

        // The decoder's blocks, last first; each passes a share of the gradient to the encoder output.
        let encv = Var::from_tensor(&enc)?;
        let mut g_enc: Option<Tensor> = None;
        for (b, (input, rng)) in self.decoder.blocks.iter().zip(&dec_in).rev() {
            mode.set_rng_state(rng);
            let xv = Var::from_tensor(input)?;
            let out = b.decode(
                xv.as_tensor(),
                encv.as_tensor(),
                &self_bias,
                &cross_bias,
                mode,
            )?;
            let store = backward_through(&out, &g)?;
            acc.add(&store)?;
            g = grad_of(&store, &xv, "a decoder block's input")?;
            let ge = grad_of(&store, &encv, "the encoder output")?;
            g_enc = Some(match g_enc {
                None => ge,
                Some(a) => (a + ge)?,
            });
        }
        self.embedding_gradients(dec_ids, &g, &before_dec_embed, mode, &mut acc)?;

        // The encoder: its final norm, then its blocks, last first.
        let g_enc = g_enc.ok_or_else(|| Error::model("a decoder without blocks"))?;
        mode.set_rng_state(&before_enc_final);
        let lv = Var::from_tensor(&enc_last)?;
        let store = backward_through(
            &Self::final_dropout(&self.encoder, lv.as_tensor(), mode)?,
            &g_enc,
        )?;
        acc.add(&store)?;
        let mut g = grad_of(&store, &lv, "the encoder's last block output")?;
        drop(store);
        for (b, (input, rng)) in self.encoder.blocks.iter().zip(&enc_in).rev() {
            mode.set_rng_state(rng);
            let xv = Var::from_tensor(input)?;
            let store = backward_through(&b.encode(xv.as_tensor(), &enc_bias, mode)?, &g)?;
            acc.add(&store)?;
            g = grad_of(&store, &xv, "an encoder block's input")?;
        }
        self.embedding_gradients(ids, &g, &before_enc_embed, mode, &mut acc)?;
        mode.set_rng_state(&after_forward);
        Ok((l.detach(), acc.grads))
    }

    /// The embeddings' share (full fine-tuning trains them; with LoRA nothing here is trained).
    fn embedding_gradients(
        &self,
        ids: &Tensor,
        g: &Tensor,
        rng: &Option<crate::rng::Rng>,
        mode: &Mode,
        acc: &mut Accumulated,
    ) -> Result<()> {
        mode.set_rng_state(rng);
        let e = self.embed_dropout(ids, mode)?;
        if e.track_op() {
            acc.add(&backward_through(&e, g)?)?;
        }
        Ok(())
    }
}
