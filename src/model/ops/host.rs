//! What crosses from the device to the host when the next token is chosen: as little as the choice
//! needs. On the CPU the logits are read in place. Off it, greedy decoding without processors takes
//! each row's argmax on the device (a token per row crosses, not the vocabulary), and everything
//! else copies the logits in their own dtype (bf16 logits cross as half the bytes of f32) and widens
//! them on the host, where widening is exact: the values are the ones the device computed.

use std::sync::Mutex;

use candle_core::{DType, Device, Storage, Tensor};

use super::cpu;
use crate::error::{Error, Result};

/// Call `f` with the elements of `x` as host f32 values, row-major: in place for contiguous f32 on
/// the CPU, copied otherwise ([`host_f32`]).
pub fn with_host_f32<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if x.device().is_cpu() {
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        if let Storage::Cpu(s) = &*storage {
            return Ok(f(cpu::contiguous_f32(s, layout, "host values")?));
        }
    }
    Ok(f(&host_f32(x)?))
}

/// `x` on the host as f32: copied in its own dtype, then widened (bf16 and f16 widen exactly).
fn host_f32(x: &Tensor) -> Result<Vec<f32>> {
    let x = x.flatten_all()?;
    Ok(match x.dtype() {
        DType::BF16 => x
            .to_vec1::<half::bf16>()?
            .into_iter()
            .map(f32::from)
            .collect(),
        DType::F16 => x
            .to_vec1::<half::f16>()?
            .into_iter()
            .map(f32::from)
            .collect(),
        _ => x.to_dtype(DType::F32)?.to_vec1()?,
    })
}

/// Each row's argmax, the first of equal maxima (as HF's `torch.argmax` and conala's host argmax
/// choose), computed where `logits` (rows, vocab) are. candle's own argmax does not promise the
/// first of equals (its threads reduce in their order), so: the row max, the positions equal to it
/// weighted `vocab - i`, and the largest weight, `vocab - first`. Five kernels; `rows` u32 cross.
pub fn first_argmax(logits: &Tensor) -> Result<Vec<u32>> {
    let (_, vocab) = logits.dims2()?;
    let max = logits.max_keepdim(1)?;
    let hits = logits.broadcast_eq(&max)?.to_dtype(DType::U32)?;
    let weights = hits.broadcast_mul(&descending_positions(logits.device(), vocab)?)?;
    let best: Vec<u32> = weights.max(1)?.to_vec1()?;
    best.into_iter()
        .map(|w| match w as usize {
            w @ 1.. if w <= vocab => Ok((vocab - w) as u32),
            _ => Err(Error::model(
                "argmax: a row of logits equals no maximum (NaN logits: the model's weights or dtype are broken)",
            )),
        })
        .collect()
}

/// `[vocab, vocab - 1, ..., 1]` as u32 on `device`, made once per device and vocabulary (not
/// uploaded at every step).
fn descending_positions(device: &Device, vocab: usize) -> Result<Tensor> {
    static MADE: Mutex<Vec<(Device, usize, Tensor)>> = Mutex::new(Vec::new());
    let mut made = MADE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, _, t)) = made
        .iter()
        .find(|(d, v, _)| *v == vocab && d.same_device(device))
    {
        return Ok(t.clone());
    }
    let t = Tensor::from_vec(
        (0..vocab).map(|i| (vocab - i) as u32).collect::<Vec<u32>>(),
        vocab,
        device,
    )?;
    made.push((device.clone(), vocab, t.clone()));
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// `t`'s values widened to f32 by candle (the reference for the host copies).
    fn widened(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn host_argmax(row: &[f32]) -> u32 {
        let mut best = 0;
        for (i, &x) in row.iter().enumerate() {
            if x > row[best] {
                best = i;
            }
        }
        best as u32
    }

    /// The device-side argmax is the host's, ties to the first, in f32 and bf16 (where equal maxima
    /// are common), on the CPU backend that runs the same candle ops as a GPU.
    #[test]
    fn first_argmax_is_the_first_of_equal_maxima() {
        let mut rng = Rng::new(5);
        let (rows, vocab) = (37, 3000);
        let mut v: Vec<f32> = (0..rows * vocab)
            .map(|_| (rng.next_f32() * 8.0).round() / 2.0)
            .collect();
        v[5 * vocab + 2999] = 100.0; // a maximum at the last position
        v[6 * vocab] = 100.0; // and at the first
        for dtype in [DType::F32, DType::BF16] {
            let t = Tensor::from_vec(v.clone(), (rows, vocab), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let host = widened(&t);
            let want: Vec<u32> = host.chunks(vocab).map(host_argmax).collect();
            assert_eq!(first_argmax(&t).unwrap(), want, "{dtype:?}");
            let tied = host
                .chunks(vocab)
                .filter(|row| {
                    let max = row[host_argmax(row) as usize];
                    row.iter().filter(|&&x| x == max).count() > 1
                })
                .count();
            assert!(tied > rows / 2, "rows with equal maxima: {tied} of {rows}");
        }
    }

    #[test]
    fn host_copies_keep_the_devices_values() {
        let t = Tensor::new(&[[1.5f32, -2.25, 3.0e-3], [7.0, 0.1, -0.0]], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let want = widened(&t);
        assert_eq!(host_f32(&t).unwrap(), want);
        assert_eq!(with_host_f32(&t, |v| v.to_vec()).unwrap(), want);
    }
}
