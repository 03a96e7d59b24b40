//! One decoding step of BART: the newest tokens at their position, through every decoder layer,
//! reading the cross-attention keys and values computed once per sequence and appending to the
//! self-attention cache in place.

use candle_core::Tensor;

use super::{Bart, Layer};
use crate::error::{Error, Result};
use crate::model::decode_state::DecodeState;
use crate::model::mode::Mode;

impl Bart {
    /// `tokens` (rows,) are the newest tokens; returns next-token logits (rows, vocab).
    pub(super) fn step(&self, st: &mut DecodeState, tokens: &Tensor) -> Result<Tensor> {
        let rows = tokens.dims1()?;
        if rows != st.rows() {
            return Err(Error::model(format!(
                "decode_step: {rows} tokens for {} rows",
                st.rows()
            )));
        }
        let pos = st.step;
        let mut x = self.embed(
            &self.decoder,
            &tokens.reshape((rows, 1))?,
            pos,
            &Mode::INFER,
        )?;
        // Every cached key is in the past of the new token: nothing to mask.
        let own = Tensor::zeros((1, 1, 1, pos + 1), self.dtype, &self.device)?;
        let norms = self.norms();
        let infer = &Mode::INFER;
        for (i, l) in self.decoder.layers.iter().enumerate() {
            let cache = &mut st.caches[i];
            x = Layer::residual(&x, &l.self_norm, norms, infer, |h| {
                l.self_attn.forward_cached(h, cache, &own)
            })?;
            let (ca, cn) = l
                .cross
                .as_ref()
                .expect("decoder layers have cross-attention");
            x = Layer::residual(&x, cn, norms, infer, |h| {
                ca.forward_cross(h, &st.cross[i], &st.cross_bias, st.cross_index.as_ref())
            })?;
            x = Layer::residual(&x, &l.ffn_norm, norms, infer, |h| l.ffn.forward(h, infer))?;
        }
        st.step += 1;
        let h = Self::finish(&self.decoder, &x)?;
        Ok(self.logits(&h, infer)?.squeeze(1)?)
    }
}
