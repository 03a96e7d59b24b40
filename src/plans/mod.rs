//! Plans: the YAML schema ([`spec`]), reading and overriding it ([`load`]), and turning it into a
//! running chain of operators ([`runner`]).

pub mod load;
pub mod runner;
pub mod spec;

pub use load::{load_file, load_str};
pub use runner::{build, Pipeline, RunSummary};
pub use spec::Plan;
