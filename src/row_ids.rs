//! A compact set of row ids (a bitset): which rows an earlier run already wrote.

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RowIdSet {
    words: Vec<u64>,
    len: usize,
}

impl RowIdSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Insert `id`; returns false if it was already there.
    pub fn insert(&mut self, id: u64) -> bool {
        let (w, b) = ((id / 64) as usize, id % 64);
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        let fresh = self.words[w] & (1 << b) == 0;
        self.words[w] |= 1 << b;
        self.len += usize::from(fresh);
        fresh
    }

    pub fn contains(&self, id: u64) -> bool {
        let w = (id / 64) as usize;
        w < self.words.len() && self.words[w] & (1 << (id % 64)) != 0
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_contains_len() {
        let mut s = RowIdSet::new();
        assert!(s.insert(3));
        assert!(s.insert(700));
        assert!(!s.insert(3));
        assert!(s.contains(3) && s.contains(700) && !s.contains(4) && !s.contains(10_000));
        assert_eq!(s.len(), 2);
    }
}
