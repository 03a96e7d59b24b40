//! T5's learned relative position bias: bidirectional buckets in the encoder, unidirectional in the
//! decoder (HF's rule, with its f32 arithmetic), computed once per forward on the device and shared by
//! every layer of a stack.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// HF's `_relative_position_bucket` for one relative position (memory - query), with the same f32
/// arithmetic, so buckets match transformers exactly (checked against it in the parity fixtures).
pub fn bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> u32 {
    let mut nb = num_buckets as i64;
    let mut ret = 0i64;
    let mut rel = relative_position;
    if bidirectional {
        nb /= 2;
        if rel > 0 {
            ret += nb;
        }
        rel = rel.abs();
    } else {
        rel = -rel.min(0);
    }
    let max_exact = nb / 2;
    if rel < max_exact {
        return (ret + rel) as u32;
    }
    let log_ratio = ((rel as f32) / (max_exact as f32)).ln();
    let denom = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
    let large = max_exact + ((log_ratio / denom) * ((nb - max_exact) as f32)) as i64;
    (ret + large.min(nb - 1)) as u32
}

/// The bucket of every clamped relative position, uploaded once, so a forward pass computes its bucket
/// matrix with a gather on the device.
#[derive(Clone)]
pub struct BucketTable {
    /// `table[r + max_distance]` = bucket of relative position r, for r in [-max_distance, max_distance].
    table: Tensor,
    max_distance: usize,
}

impl BucketTable {
    pub fn new(
        bidirectional: bool,
        num_buckets: usize,
        max_distance: usize,
        device: &Device,
    ) -> Result<Self> {
        let md = max_distance as i64;
        let values: Vec<u32> = (-md..=md)
            .map(|r| bucket(r, bidirectional, num_buckets, max_distance))
            .collect();
        Ok(BucketTable {
            table: Tensor::new(values, device)?,
            max_distance,
        })
    }

    /// (q_len, k_len) buckets for queries at positions offset..offset+q_len over keys 0..k_len.
    pub fn buckets(&self, q_len: usize, k_len: usize, offset: usize) -> Result<Tensor> {
        let dev = self.table.device();
        let md = self.max_distance as f64;
        let mem = Tensor::arange(0u32, k_len as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((1, k_len))?;
        let ctx = Tensor::arange(offset as u32, (offset + q_len) as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((q_len, 1))?;
        let idx = mem
            .broadcast_sub(&ctx)?
            .clamp(-md, md)?
            .affine(1.0, md)?
            .to_dtype(DType::U32)?;
        Ok(self
            .table
            .index_select(&idx.flatten_all()?, 0)?
            .reshape((q_len, k_len))?)
    }
}

/// Learned relative position bias, (1, heads, q_len, k_len); computed once per forward and shared by
/// every layer of the stack.
#[derive(Clone)]
pub struct PositionBias {
    /// (num_buckets, heads)
    pub weight: Tensor,
    pub table: BucketTable,
}

impl PositionBias {
    pub fn forward(&self, q_len: usize, k_len: usize, offset: usize) -> Result<Tensor> {
        let b = self.table.buckets(q_len, k_len, offset)?;
        let heads = self.weight.dims()[1];
        let bias = self.weight.index_select(&b.flatten_all()?, 0)?; // (q*k, heads)
        Ok(bias
            .reshape((q_len, k_len, heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_hf_rules() {
        // Bidirectional, 32 buckets, max distance 128: exact for |r| < 8, sign split at 16.
        assert_eq!(bucket(0, true, 32, 128), 0);
        assert_eq!(bucket(-3, true, 32, 128), 3);
        assert_eq!(bucket(3, true, 32, 128), 19);
        assert_eq!(bucket(-1000, true, 32, 128), 15);
        assert_eq!(bucket(1000, true, 32, 128), 31);
        // Unidirectional: future positions (r > 0) all share bucket 0.
        assert_eq!(bucket(5, false, 32, 128), 0);
        assert_eq!(bucket(-5, false, 32, 128), 5);
        assert_eq!(bucket(-1000, false, 32, 128), 31);
        // Monotone in distance.
        let b: Vec<u32> = (0..300).map(|r| bucket(-r, false, 32, 128)).collect();
        assert!(b.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn device_bucket_matrix_matches_scalar_rule() {
        let t = BucketTable::new(true, 32, 128, &Device::Cpu).unwrap();
        let m: Vec<Vec<u32>> = t.buckets(5, 300, 2).unwrap().to_vec2().unwrap();
        for (i, row) in m.iter().enumerate() {
            for (j, b) in row.iter().enumerate() {
                assert_eq!(
                    *b,
                    bucket(j as i64 - (i as i64 + 2), true, 32, 128),
                    "q {i} k {j}"
                );
            }
        }
    }
}
