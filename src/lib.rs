//! `conala`: complete code/natural-language datasets with seq2seq models.
//!
//! Data flows as Arrow record batches from a [`operators::source`] through declarative operators
//! (filter, format, tokenize, generate, evaluate) into a sink (write, train), as described by a YAML
//! [`plans`] file. The model is the project's own T5 on candle ([`model`]).

pub mod context;
pub mod error;
pub mod faults;
pub mod hub;
pub mod interrupt;
pub mod metrics;
pub mod model;
pub mod named;
pub mod operators;
pub mod output;
pub mod plans;
pub mod progress;
pub mod publish;
pub mod reports;
pub mod rng;
pub mod row_ids;
pub mod secrets;
pub mod sql;
pub mod storage;
pub mod tokenizer;
pub mod training;

pub use context::Context;
pub use error::{Error, Result};
