//! One decoding step of the T5: the newest tokens through every decoder layer, reading the
//! cross-attention keys and values computed once per sequence and appending to the self-attention
//! cache in place.

use candle_core::Tensor;

use super::{Stack, T5};
use crate::error::{Error, Result};
use crate::model::decode_state::DecodeState;
use crate::model::mode::Mode;

impl T5 {
    /// `tokens` (rows,) are the newest tokens; returns next-token logits (rows, vocab).
    pub(super) fn step(&self, st: &mut DecodeState, tokens: &Tensor) -> Result<Tensor> {
        let rows = tokens.dims1()?;
        if rows != st.rows() {
            return Err(Error::model(format!(
                "decode_step: {rows} tokens for {} rows",
                st.rows()
            )));
        }
        let mut x = self.embed(&tokens.reshape((rows, 1))?)?;
        let pos = st.step;
        // This step's row of the generation's position bias (a view), or computed for a state
        // that was not started with it.
        let self_bias = match st.self_bias.first().map(|b| b.dims()[2]) {
            Some(len) if pos < len => st
                .self_bias
                .iter()
                .map(|b| Ok(b.narrow(2, pos, 1)?.narrow(3, 0, pos + 1)?))
                .collect::<Result<Vec<_>>>()?,
            _ => self
                .decoder
                .biases
                .iter()
                .map(|b| Ok(b.forward(1, pos + 1, pos)?.to_dtype(self.dtype)?))
                .collect::<Result<Vec<_>>>()?,
        };
        for (i, b) in self.decoder.blocks.iter().enumerate() {
            let h = b.self_attn.forward_cached(
                &b.self_norm.forward(&x)?,
                &mut st.caches[i],
                Stack::of(&self_bias, i),
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
}
