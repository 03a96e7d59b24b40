//! One training step's loss and the trainable variables' gradients, for any family's [`Layers`]:
//! plainly (the whole graph kept for one backward pass), or with activation checkpointing, where each encoder and decoder block keeps
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

use super::mode::Mode;
use super::seq2seq::{forward, Batch, Layers, LossOf};
use crate::error::{Error, Result};

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

/// The loss `loss(logits)` of a batch and the gradient of each of `vars` (`None`: the loss does not
/// depend on it). `checkpointed` recomputes each block's activations in the backward pass instead of
/// keeping them: the same loss and gradients (up to float rounding) for less memory.
pub fn gradients<L: Layers>(
    m: &L,
    (ids, mask, dec_ids): Batch,
    mode: &Mode,
    vars: &[Var],
    checkpointed: bool,
    loss: LossOf,
) -> Result<(Tensor, Vec<Option<Tensor>>)> {
    let mut acc = Accumulated::new(vars);
    if !checkpointed {
        let l = loss(&forward(m, ids, mask, dec_ids, mode)?)?;
        acc.add(&l.backward()?)?;
        return Ok((l.detach(), acc.grads));
    }

    // Forward: every block's input (a value, no graph) and the generator's state before it.
    let enc_bias = m.encoder_bias(ids, mask)?;
    let dec_bias = m.decoder_bias(dec_ids, mask)?;
    let before_enc_embed = mode.rng_state();
    let mut x = m.embed_encoder(ids, mode)?.detach();
    let mut enc_in = Vec::with_capacity(m.encoder_layers());
    for i in 0..m.encoder_layers() {
        enc_in.push((x.clone(), mode.rng_state()));
        x = m.encoder_layer(i, &x, &enc_bias, mode)?.detach();
    }
    let (enc_last, before_enc_final) = (x, mode.rng_state());
    let enc = m.finish_encoder(&enc_last, mode)?.detach();
    let before_dec_embed = mode.rng_state();
    let mut y = m.embed_decoder(dec_ids, mode)?.detach();
    let mut dec_in = Vec::with_capacity(m.decoder_layers());
    for i in 0..m.decoder_layers() {
        dec_in.push((y.clone(), mode.rng_state()));
        y = m.decoder_layer(i, &y, &enc, &dec_bias, mode)?.detach();
    }

    // The head with its graph: the decoder's final norm, the logits, the loss.
    let yv = Var::from_tensor(&y)?;
    let logits = m.head(yv.as_tensor(), mode)?;
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
    for (i, (input, rng)) in dec_in.iter().enumerate().rev() {
        mode.set_rng_state(rng);
        let xv = Var::from_tensor(input)?;
        let out = m.decoder_layer(i, xv.as_tensor(), encv.as_tensor(), &dec_bias, mode)?;
        let store = backward_through(&out, &g)?;
        acc.add(&store)?;
        g = grad_of(&store, &xv, "a decoder block's input")?;
        let ge = grad_of(&store, &encv, "the encoder output")?;
        g_enc = Some(match g_enc {
            None => ge,
            Some(a) => (a + ge)?,
        });
    }
    embedding_gradients(
        || m.embed_decoder(dec_ids, mode),
        &g,
        &before_dec_embed,
        mode,
        &mut acc,
    )?;

    // The encoder: its final stage, then its blocks, last first.
    let g_enc = g_enc.ok_or_else(|| Error::model("a decoder without blocks"))?;
    mode.set_rng_state(&before_enc_final);
    let lv = Var::from_tensor(&enc_last)?;
    let store = backward_through(&m.finish_encoder(lv.as_tensor(), mode)?, &g_enc)?;
    acc.add(&store)?;
    let mut g = grad_of(&store, &lv, "the encoder's last block output")?;
    drop(store);
    for (i, (input, rng)) in enc_in.iter().enumerate().rev() {
        mode.set_rng_state(rng);
        let xv = Var::from_tensor(input)?;
        let store = backward_through(&m.encoder_layer(i, xv.as_tensor(), &enc_bias, mode)?, &g)?;
        acc.add(&store)?;
        g = grad_of(&store, &xv, "an encoder block's input")?;
    }
    embedding_gradients(
        || m.embed_encoder(ids, mode),
        &g,
        &before_enc_embed,
        mode,
        &mut acc,
    )?;
    mode.set_rng_state(&after_forward);
    Ok((l.detach(), acc.grads))
}

/// The embeddings' share (full fine-tuning trains them; with LoRA nothing here is trained).
fn embedding_gradients(
    embed: impl Fn() -> Result<Tensor>,
    g: &Tensor,
    rng: &Option<crate::rng::Rng>,
    mode: &Mode,
    acc: &mut Accumulated,
) -> Result<()> {
    mode.set_rng_state(rng);
    let e = embed()?;
    if e.track_op() {
        acc.add(&backward_through(&e, g)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    /// The vendored candle-core stores the first gradient reaching a node as is and adds from the
    /// second on (vendor/candle-core/PATCHED.md): fan-in, subtraction and a gradient that arrives as
    /// a strided view must still sum exactly as before.
    #[test]
    fn backward_sums_every_path_into_a_node() {
        let dev = Device::Cpu;
        let x = Var::from_vec(vec![1f32, -2.0, 3.0, 0.5, 4.0, -1.0], (2, 3), &dev).unwrap();
        let y = Var::from_vec(vec![2f32, 1.0, -1.0, 3.0, 0.0, 5.0], (2, 3), &dev).unwrap();
        let (xt, yt) = (x.as_tensor(), y.as_tensor());
        // d/dx (x*x + x - y + xᵀᵀ*y) = 2x + 1 + y; d/dy = -1 + x.
        let xtt = xt.t().unwrap().t().unwrap();
        let f = ((xt * xt).unwrap() + xt).unwrap();
        let f = (f - yt).unwrap();
        let f = (f + (xtt * yt).unwrap()).unwrap();
        let grads = f.sum_all().unwrap().backward().unwrap();
        let gx = grads.get(xt).unwrap().to_vec2::<f32>().unwrap();
        let gy = grads.get(yt).unwrap().to_vec2::<f32>().unwrap();
        let (xv, yv) = (xt.to_vec2::<f32>().unwrap(), yt.to_vec2::<f32>().unwrap());
        for i in 0..2 {
            for j in 0..3 {
                assert_eq!(gx[i][j], 2.0 * xv[i][j] + 1.0 + yv[i][j]);
                assert_eq!(gy[i][j], -1.0 + xv[i][j]);
            }
        }
        // A gradient that reaches a variable only through a transpose comes back in its shape.
        let z = Var::from_vec(vec![1f32, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3), &dev).unwrap();
        let w = Tensor::new(&[[1f32, 0.0], [0.0, 2.0], [1.0, 1.0]], &dev).unwrap();
        let g = (z.as_tensor().t().unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gz = g.get(z.as_tensor()).unwrap();
        assert_eq!(gz.dims(), &[2, 3]);
        assert_eq!(
            gz.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 0.0, 1.0], vec![0.0, 2.0, 1.0]]
        );
    }
}
