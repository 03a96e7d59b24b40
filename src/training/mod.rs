//! Fine-tuning: the [`trainer`] loop and its parts — labelled rows and batch tensors ([`examples`]),
//! length buckets ([`batching`]), AdamW ([`optimizer`]), several devices ([`replicas`]), schedules,
//! checkpoints, evaluation, the metrics log and the loss plot. The `train` operator feeds it rows; the loss itself is
//! [`crate::model::ops::cross_entropy`].

pub mod batching;
pub mod checkpoint;
pub mod evaluation;
pub mod examples;
pub mod metrics_log;
pub mod optimizer;
pub mod plot;
pub mod replicas;
pub mod schedule;
pub mod tensorboard;
pub mod trainer;

pub use trainer::{TrainData, TrainFiles, TrainSummary, Trainer};
