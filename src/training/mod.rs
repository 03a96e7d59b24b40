//! The machinery of the `train` operator: batches by length, the loss, AdamW, schedules, checkpoints
//! and the loss plot.

pub mod batching;
pub mod checkpoint;
pub mod loss;
pub mod optimizer;
pub mod plot;
pub mod schedule;
