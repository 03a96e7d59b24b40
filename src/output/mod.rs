//! An output folder as a unit that many runs and readers share: manifests that commit part files, a
//! lease that keeps one writer per shard, the check that a resumed folder holds this plan's rows, and
//! the `_SUCCESS` marker of a complete output.

pub mod fingerprint;
pub mod lease;
pub mod manifest;
pub mod parts;
pub mod state;
