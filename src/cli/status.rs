//! `conala status OUTPUT`: is an output complete, shard by shard.

use anyhow::{bail, Result};

use super::args::StatusArgs;
use crate::cli::output::out;
use conala::context::Context;
use conala::output::state::{OutputState, Progress, SUCCESS};
use conala::storage::resolve;

pub async fn status(a: StatusArgs) -> Result<()> {
    let ctx = Context::from_env()?;
    let loc = resolve(&ctx.session, &a.output)?;
    let Some(state) = OutputState::read(&loc).await? else {
        bail!(
            "{}: no manifest there: nothing written yet, or not a conala output",
            a.output
        );
    };
    let shards = state.shards(&a.output)?;
    let rows: u64 = shards.iter().map(|s| s.rows).sum();
    let done = shards
        .iter()
        .filter(|s| s.progress == Progress::Complete)
        .count();
    for s in &shards {
        let (what, detail) = match s.progress {
            Progress::Complete => ("complete", format!("{} rows in {} parts", s.rows, s.parts)),
            Progress::Incomplete => (
                "incomplete",
                format!("{} rows so far in {} parts", s.rows, s.parts),
            ),
            Progress::Missing => ("missing", "no manifest yet".to_string()),
        };
        out!("shard {:<9} {what:<10}  {detail}", s.shard);
    }
    let committed = if state.committed {
        format!("committed ({SUCCESS})")
    } else {
        "not committed".to_string()
    };
    out!(
        "{}: {done} of {} shards complete, {rows} rows, {committed}",
        a.output,
        shards.len()
    );
    if let Some(open) = state.incomplete(&a.output)? {
        bail!("{} is incomplete: {open}", a.output);
    }
    Ok(())
}
