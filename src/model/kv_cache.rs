//! Decoding state kept between steps: the decoder's self-attention cache (appended in place), the
//! cross-attention keys and values (computed once per sequence), and the index through which rows
//! read them after rows finish or beams reorder.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Which key/value row each query row reads, and how many of its leading keys count.
///
/// Cross-attention keys and values are computed once per batch; when rows finish (or beams reorder)
/// only this small map changes instead of copying every layer's keys and values. Keys past a row's
/// length are padding: their softmax weight is exactly zero (a bias of -1e9), so skipping them gives
/// the same result with less memory traffic.
#[derive(Clone, Debug, PartialEq)]
pub struct KvIndex {
    /// Key/value row of each query row.
    pub rows: Vec<u32>,
    /// Keys that count for each query row (0: all of them).
    pub lens: Vec<u32>,
}

impl KvIndex {
    /// Identity map for `rows` rows of the 0/1 `mask` (rows, len): each row's length is the position
    /// after its last kept token.
    pub fn from_mask(mask: &Tensor) -> Result<KvIndex> {
        let m: Vec<Vec<u8>> = mask.to_dtype(DType::U8)?.to_vec2()?;
        Ok(KvIndex {
            rows: (0..m.len() as u32).collect(),
            lens: m
                .iter()
                .map(|r| r.iter().rposition(|&x| x != 0).map_or(0, |p| p as u32 + 1))
                .collect(),
        })
    }

    /// Keep query rows `idx` (in that order; repeats allowed).
    pub fn select(&mut self, idx: &[u32]) {
        self.rows = idx.iter().map(|&i| self.rows[i as usize]).collect();
        self.lens = idx.iter().map(|&i| self.lens[i as usize]).collect();
    }
}

/// Self-attention keys and values of the decoder, preallocated for the whole generation and written
/// in place step by step.
#[derive(Clone)]
pub struct KvCache {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl KvCache {
    pub fn new(
        rows: usize,
        heads: usize,
        max_len: usize,
        d_kv: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (rows, heads, max_len, d_kv);
        let (k, v) = (uninit(shape, dtype, device)?, uninit(shape, dtype, device)?);
        Ok(KvCache { k, v, len: 0 })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append (rows, heads, t, d_kv) and return views of everything cached so far.
    pub(crate) fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dims()[2];
        let cap = self.k.dims()[2];
        if self.len + t > cap {
            // Grow (rarely: only when a caller decodes past the length it planned for).
            let new_cap = (self.len + t).max(cap * 2);
            self.k = refill(&self.k, self.len, new_cap, None)?;
            self.v = refill(&self.v, self.len, new_cap, None)?;
        }
        self.k.slice_set(&k.contiguous()?, 2, self.len)?;
        self.v.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len += t;
        Ok((
            self.k.narrow(2, 0, self.len)?,
            self.v.narrow(2, 0, self.len)?,
        ))
    }

    /// Keep rows `idx` (in that order; repeats allowed, for beams), copying only the filled prefix of
    /// each into a fresh cache of the same capacity.
    pub fn select(&mut self, idx: &Tensor) -> Result<()> {
        let cap = self.k.dims()[2];
        self.k = refill(&self.k, self.len, cap, Some(idx))?;
        self.v = refill(&self.v, self.len, cap, Some(idx))?;
        Ok(())
    }
}

/// An uninitialized cache tensor.
fn uninit(shape: (usize, usize, usize, usize), dtype: DType, device: &Device) -> Result<Tensor> {
    // SAFETY: a cache's positions at and past its `len` are never read (views stop at `len`, and
    // `refill` copies only the filled prefix), so it need not be zeroed: zeroing cost a pass over
    // memory the size of the whole cache before the first step.
    Ok(unsafe { Tensor::empty(shape, dtype, device)? })
}

/// A cache tensor of capacity `cap` holding the first `len` positions of `x` (of its rows `idx`, when
/// given); the rest uninitialized.
fn refill(x: &Tensor, len: usize, cap: usize, idx: Option<&Tensor>) -> Result<Tensor> {
    let (rows, h, _, d) = x.dims4()?;
    let rows = match idx {
        Some(i) => i.dims1()?,
        None => rows,
    };
    let out = uninit((rows, h, cap, d), x.dtype(), x.device())?;
    if len > 0 {
        let filled = x.narrow(2, 0, len)?.contiguous()?;
        let filled = match idx {
            Some(i) => filled.index_select(i, 0)?,
            None => filled,
        };
        out.slice_set(&filled, 2, 0)?;
    }
    Ok(out)
}

/// Cross-attention keys and values over the encoder output, computed once per sequence.
#[derive(Clone)]
pub struct CrossKv {
    pub k: Tensor,
    pub v: Tensor,
}

impl CrossKv {
    pub fn select_rows(&mut self, idx: &Tensor) -> Result<()> {
        self.k = self.k.index_select(idx, 0)?;
        self.v = self.v.index_select(idx, 0)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_cache_appends_in_place_grows_and_selects_rows() {
        let dev = Device::Cpu;
        let mut c = KvCache::new(2, 1, 2, 3, DType::F32, &dev).unwrap();
        // Row r at step s holds 10 * s + r.
        let step_kv = |s: usize, rows: &[usize]| {
            let vals: Vec<f32> = rows
                .iter()
                .flat_map(|&r| [(10 * s + r) as f32; 3])
                .collect();
            Tensor::from_vec(vals, (rows.len(), 1, 1, 3), &dev).unwrap()
        };
        for step in 0..3 {
            let k = step_kv(step, &[0, 1]);
            let (kk, _) = c.append(&k, &k).unwrap();
            assert_eq!(kk.dims(), &[2, 1, step + 1, 3]);
        }
        let firsts = |c: &KvCache| -> Vec<Vec<f32>> {
            let k = c.k.narrow(2, 0, c.len()).unwrap().contiguous().unwrap();
            (0..k.dims()[0])
                .map(|r| {
                    k.get(r)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                        .chunks(3)
                        .map(|c| c[0])
                        .collect()
                })
                .collect()
        };
        assert_eq!(firsts(&c), vec![vec![0., 10., 20.], vec![1., 11., 21.]]);
        // Keep row 1 twice (beams); the filled prefix moves, appending goes on.
        c.select(&Tensor::new(&[1u32, 1], &dev).unwrap()).unwrap();
        let k = step_kv(3, &[5, 6]);
        c.append(&k, &k).unwrap();
        assert_eq!(
            firsts(&c),
            vec![vec![1., 11., 21., 35.], vec![1., 11., 21., 36.]]
        );
    }

    #[test]
    fn index_follows_masks_and_row_selections() {
        let dev = Device::Cpu;
        let mask = Tensor::new(
            &[[1u8, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]],
            &dev,
        )
        .unwrap();
        let mut index = KvIndex::from_mask(&mask).unwrap();
        assert_eq!(index.lens, vec![6, 2, 4]);
        index.select(&[2, 1, 1]);
        assert_eq!(
            (index.rows.clone(), index.lens.clone()),
            (vec![2, 1, 1], vec![4, 2, 2])
        );
    }
}
