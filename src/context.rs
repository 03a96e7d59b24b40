//! What every step of a run shares: the DataFusion session (object stores, SQL), the Hub client,
//! how to report progress, and which shard of the rows this process owns.

use std::io::IsTerminal;
use std::sync::Arc;

use datafusion::prelude::{SessionConfig, SessionContext};

use crate::error::{Error, Result};
use crate::hub::{Hub, HubConfig};

/// This process's share of the rows: those whose row id modulo `count` equals `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl Shard {
    /// Parse `i/n` (0-based index).
    pub fn parse(s: &str) -> Result<Shard> {
        let bad = || {
            Error::Data(format!(
                "--shard {s}: expected I/N with 0 <= I < N, e.g. 0/4"
            ))
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (u64, u64) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    /// The shard from a Slurm array job or a Kubernetes Indexed Job, if this process runs in one.
    pub fn from_env() -> Result<Option<Shard>> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let (Some(i), Some(n)) = (var("SLURM_ARRAY_TASK_ID"), var("SLURM_ARRAY_TASK_COUNT")) {
            // Slurm ids start at SLURM_ARRAY_TASK_MIN (usually 0 or 1).
            let min: u64 = var("SLURM_ARRAY_TASK_MIN")
                .and_then(|m| m.parse().ok())
                .unwrap_or(0);
            let i: u64 = i
                .parse()
                .map_err(|_| Error::Data(format!("SLURM_ARRAY_TASK_ID={i} is not a number")))?;
            return Shard::parse(&format!("{}/{n}", i.saturating_sub(min))).map(Some);
        }
        if let Some(i) = var("JOB_COMPLETION_INDEX") {
            let n = var("CONALA_SHARDS").or_else(|| var("JOB_COMPLETIONS")).ok_or_else(|| {
                Error::Data("JOB_COMPLETION_INDEX is set but neither CONALA_SHARDS nor JOB_COMPLETIONS says how many shards".into())
            })?;
            return Shard::parse(&format!("{i}/{n}")).map(Some);
        }
        Ok(None)
    }

    pub fn owns(&self, row_id: u64) -> bool {
        row_id % self.count == self.index
    }

    /// Label used in part-file names: `s0003of0008`.
    pub fn label(&self) -> String {
        format!("s{:04}of{:04}", self.index, self.count)
    }
}

/// Shared state of one run.
pub struct Context {
    pub session: SessionContext,
    pub hub: Arc<Hub>,
    /// Draw progress bars (a terminal); otherwise log plain lines.
    pub progress_bars: bool,
    pub shard: Option<Shard>,
    /// `conala run --resume`: continue training from the last checkpoint.
    pub resume: bool,
    /// Only build the plan to check it (`conala validate`): devices this machine lacks are allowed
    /// (a plan for eight GPUs can be checked on a laptop); running it is not.
    pub plan_only: bool,
}

impl Context {
    pub fn new(hub: HubConfig) -> Result<Self> {
        let session =
            SessionContext::new_with_config(SessionConfig::new().with_information_schema(true));
        Ok(Context {
            session,
            hub: Arc::new(Hub::new(hub)?),
            progress_bars: std::io::stderr().is_terminal(),
            shard: None,
            resume: false,
            plan_only: false,
        })
    }

    /// A context from the environment (HF_* variables; shard from Slurm / Kubernetes if present).
    pub fn from_env() -> Result<Self> {
        let mut ctx = Context::new(HubConfig::from_env())?;
        ctx.shard = Shard::from_env()?;
        Ok(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_parsing_and_ownership() {
        let s = Shard::parse("1/4").unwrap();
        assert!(s.owns(5) && !s.owns(4));
        assert_eq!(s.label(), "s0001of0004");
        for bad in ["4/4", "1", "a/b", "0/0"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }
}
