//! The `conala` command line: arguments ([`args`]), one module per group of commands, what a run
//! prints ([`report`]), and the benchmarks ([`bench`]). Library errors become `anyhow` here.

pub mod args;
pub mod bench;
pub mod logging;
pub mod memory;
pub mod output;
mod push;
mod report;
mod run;
pub mod signals;
mod status;
mod tools;

use anyhow::Result;

use args::{BenchCommand, Cli, Command, ModelCommand, TokenizerCommand};
use conala::context::Context;

/// Run the command the arguments name.
pub async fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(a) => run::run(a).await,
        Command::Validate(a) => run::validate(a).await,
        Command::Sql(a) => tools::sql(a).await,
        Command::Status(a) => status::status(a).await,
        Command::Tokenizer(TokenizerCommand::Train(a)) => tools::tokenizer_train(a).await,
        Command::Model(ModelCommand::Init(a)) => tools::model_init(a).await,
        Command::Merge(a) => tools::merge(a).await,
        Command::Push(a) => push::push(a).await,
        Command::Bench(BenchCommand::Prep(a)) => {
            Ok(bench::prep::run(&a, &Context::from_env()?).await?)
        }
        Command::Bench(BenchCommand::Generate(a)) => {
            Ok(bench::generate::run(&a, &Context::from_env()?).await?)
        }
        Command::Bench(BenchCommand::Train(a)) => {
            Ok(bench::train::run(&a, &Context::from_env()?).await?)
        }
        Command::Bench(BenchCommand::Load(a)) => {
            Ok(bench::load::run(&a, &Context::from_env()?).await?)
        }
        Command::Bench(BenchCommand::Gpu(a)) => {
            Ok(bench::gpu::run(&a, &Context::from_env()?).await?)
        }
        Command::Bench(BenchCommand::Memory(a)) => Ok(bench::memory::run(&a)?),
    }
}
