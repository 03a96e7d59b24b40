//! Training batches drawn by length buckets: each epoch the examples are shuffled, cut into pools of
//! 50 batches, each pool sorted by length and cut into batches (little padding), and the batches
//! shuffled again — so the order is random but the padding small. The same seed gives the same order.

use crate::rng::Rng;

/// One example: encoder ids and label ids.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input: Vec<u32>,
    pub labels: Vec<u32>,
}

/// The batches (as example indices) of one epoch.
pub fn epoch_batches(
    examples: &[Example],
    batch_size: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let mut rng = Rng::derive(seed, epoch);
    let mut idx: Vec<usize> = (0..examples.len()).collect();
    rng.shuffle(&mut idx);
    let pool = (batch_size * 50).max(1);
    let mut batches: Vec<Vec<usize>> = vec![];
    for chunk in idx.chunks(pool) {
        let mut c = chunk.to_vec();
        c.sort_by_key(|&i| std::cmp::Reverse(examples[i].input.len() + examples[i].labels.len()));
        batches.extend(c.chunks(batch_size.max(1)).map(|b| b.to_vec()));
    }
    rng.shuffle(&mut batches);
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_once_per_epoch_and_deterministic() {
        let ex: Vec<Example> = (0..103)
            .map(|i| Example {
                input: vec![1; 1 + i % 17],
                labels: vec![2; 3],
            })
            .collect();
        let a = epoch_batches(&ex, 8, 5, 0);
        let mut all: Vec<usize> = a.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..103).collect::<Vec<_>>());
        assert_eq!(a, epoch_batches(&ex, 8, 5, 0));
        assert_ne!(a, epoch_batches(&ex, 8, 5, 1));
        // Within a batch lengths are close (sorted pools).
        for b in &a {
            let lens: Vec<usize> = b.iter().map(|&i| ex[i].input.len()).collect();
            assert!(lens.windows(2).all(|w| w[0] >= w[1]));
        }
    }
}
