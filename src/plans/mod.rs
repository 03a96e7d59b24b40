//! Plans: the YAML schema ([`spec`]), reading it ([`load`]) with `--set` overrides ([`overrides`]),
//! and turning it into a running chain of operators ([`runner`]).

pub mod load;
pub mod overrides;
pub mod runner;
pub mod spec;

pub use load::{load_file, load_plans, load_str};
pub use runner::{build, Pipeline, RunSummary};
pub use spec::Plan;
