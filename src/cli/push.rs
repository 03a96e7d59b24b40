//! `conala push PATH OWNER/NAME`.

use anyhow::Result;

use super::args::PushArgs;
use crate::cli::output::out;
use conala::hub::HubConfig;
use conala::publish::{push as push_folder, PushOptions};

pub async fn push(a: PushArgs) -> Result<()> {
    let opts = PushOptions {
        revision: Some(a.revision),
        private: a.private,
        message: a.message,
        allow_incomplete: a.allow_incomplete,
        license: a.license,
    };
    let hub = HubConfig::from_env();
    let bars = hub.progress;
    let r = push_folder(&a.path, &a.repo_id, &opts, &hub, bars).await?;
    match &r.commit {
        Some(c) => out!(
            "pushed {} -> {} (commit {c}): {} files, {} unchanged, {} LFS object(s) sent ({}), {} already stored, {} removed{}",
            a.path.display(),
            r.repo,
            r.files,
            r.unchanged,
            r.lfs_sent,
            conala::progress::human_bytes(r.bytes_sent),
            r.lfs_already_stored,
            r.deleted,
            if r.created { "; repository created" } else { "" }
        ),
        None => out!(
            "{} already has all {} files of {}: nothing to commit",
            r.repo,
            r.files,
            a.path.display()
        ),
    }
    out!("  {}", r.url);
    Ok(())
}
