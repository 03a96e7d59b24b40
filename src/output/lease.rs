//! One writer per output (per shard of it): a run holds a lease object in the folder while it writes.
//!
//! The lease is created with a conditional put (`If-None-Match: *` on S3, a hard link locally), so of
//! two runs started at once exactly one gets it; the other refuses with a message naming the holder.
//! The holder renews it while it runs; a crashed holder's lease expires (or, on the same host, is seen
//! to belong to a process that no longer exists), so a restart is never blocked for good.

use std::time::Duration;

use bytes::Bytes;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::storage::Location;

/// How long a lease lasts without renewal (`CONALA_LEASE_SECONDS` overrides; renewed every third).
const DEFAULT_TTL_SECONDS: u64 = 120;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Holder {
    host: String,
    pid: u32,
    run_id: String,
    acquired_at: String,
    /// Unix seconds.
    expires_at: u64,
}

impl Holder {
    /// Still holding: not expired, and (on this host) its process still exists.
    fn alive(&self, now: u64) -> bool {
        if self.expires_at <= now {
            return false;
        }
        if self.host == host_name() && std::path::Path::new("/proc/self").exists() {
            return std::path::Path::new(&format!("/proc/{}", self.pid)).exists();
        }
        true
    }
}

impl Holder {
    /// A holder on another host cannot be asked whether its process lives: watch the lease until it is
    /// renewed (alive: `false`) or expires (dead: `true`). A restarted worker (a requeued Slurm task, a
    /// retried pod on another node) so takes over within one lease period instead of failing.
    async fn stale_elsewhere(&self, loc: &Location, ttl: Duration, what: &str) -> Result<bool> {
        if self.host == host_name() {
            return Ok(false); // `alive` already asked the process table
        }
        log::info!(
            "{what}: run {} on host {} holds the writer's lease; waiting up to {} s to see whether it \
             is alive",
            self.run_id,
            self.host,
            self.expires_at.saturating_sub(unix_now())
        );
        let poll = (ttl / 12).max(Duration::from_millis(250));
        loop {
            tokio::time::sleep(poll).await;
            match read_holder(loc).await? {
                None => return Ok(true),
                Some(h) if h.run_id != self.run_id || h.expires_at != self.expires_at => {
                    return Ok(false)
                }
                Some(h) if h.expires_at <= unix_now() => return Ok(true),
                Some(_) => {}
            }
        }
    }
}

/// A held lease; renewed in the background until [`Lease::release`].
pub struct Lease {
    loc: Location,
    renewal: JoinHandle<()>,
}

fn ttl() -> Duration {
    let s = std::env::var("CONALA_LEASE_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&s: &u64| s >= 3)
        .unwrap_or(DEFAULT_TTL_SECONDS);
    Duration::from_secs(s)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".to_string())
}

fn payload(holder: &Holder) -> Result<PutPayload> {
    let json = serde_json::to_vec_pretty(holder).map_err(|e| Error::json("lease", e))?;
    Ok(PutPayload::from(Bytes::from(json)))
}

impl Lease {
    /// Take the lease at `loc` for run `run_id`, or fail naming who holds it. `what` names the output
    /// (and shard) in messages.
    pub async fn acquire(loc: Location, run_id: &str, what: &str) -> Result<Lease> {
        let ttl = ttl();
        let holder = |now: u64| Holder {
            host: host_name(),
            pid: std::process::id(),
            run_id: run_id.to_string(),
            acquired_at: crate::output::manifest::now_rfc3339(),
            expires_at: now + ttl.as_secs(),
        };
        // Twice at most: once, and once more after removing a dead holder's lease.
        for _ in 0..2 {
            let now = unix_now();
            let opts = PutOptions::from(PutMode::Create);
            match loc
                .store
                .put_opts(&loc.path, payload(&holder(now))?, opts)
                .await
            {
                Ok(_) => {
                    let renewal = tokio::spawn(renew(loc.clone(), holder(now), ttl));
                    return Ok(Lease { loc, renewal });
                }
                Err(object_store::Error::AlreadyExists { .. }) => {}
                Err(e) => {
                    return Err(Error::object_store(
                        format!("{}: taking the writer's lease", loc.display),
                        e,
                    ))
                }
            }
            match read_holder(&loc).await? {
                Some(h) if h.alive(now) && !h.stale_elsewhere(&loc, ttl, what).await? => {
                    return Err(Error::Data(format!(
                        "{what} is being written by another run (host {}, pid {}, run {}, since {}); \
                         two runs writing one output would duplicate rows. Wait for it to finish; if \
                         that run is dead, its lease {} expires in {} s",
                        h.host,
                        h.pid,
                        h.run_id,
                        h.acquired_at,
                        loc.display,
                        h.expires_at.saturating_sub(unix_now())
                    )))
                }
                Some(h) => log::info!(
                    "{what}: taking over the lease of run {} (host {}, pid {}), which stopped \
                     without releasing it",
                    h.run_id,
                    h.host,
                    h.pid
                ),
                None => {}
            }
            match loc.store.delete(&loc.path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(Error::object_store(&loc.display, e)),
            }
        }
        Err(Error::Data(format!(
            "{what}: another run took the writer's lease {} at the same moment; only one may write",
            loc.display
        )))
    }

    /// Stop renewing and remove the lease.
    pub async fn release(self) {
        self.renewal.abort();
        // The renewal may have been mid-put: wait for it to stop before deleting.
        let _ = self.renewal.await;
        if let Err(e) = self.loc.store.delete(&self.loc.path).await {
            log::warn!(
                "could not remove the lease {}: {e} (it expires on its own)",
                self.loc.display
            );
        }
    }
}

async fn read_holder(loc: &Location) -> Result<Option<Holder>> {
    match loc.store.get(&loc.path).await {
        Ok(r) => {
            let bytes = r
                .bytes()
                .await
                .map_err(|e| Error::object_store(&loc.display, e))?;
            // An unreadable lease (half-written by a foreign tool) counts as expired.
            Ok(serde_json::from_slice(&bytes).ok())
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(Error::object_store(&loc.display, e)),
    }
}

/// Push the expiry forward every third of the lease's life. A failed renewal is logged and retried:
/// the run goes on, and if the lease does lapse another run may take the output over.
async fn renew(loc: Location, mut holder: Holder, ttl: Duration) {
    loop {
        tokio::time::sleep(ttl / 3).await;
        holder.expires_at = unix_now() + ttl.as_secs();
        let put = match payload(&holder) {
            Ok(p) => loc.store.put(&loc.path, p).await.map(|_| ()),
            Err(_) => Ok(()),
        };
        if let Err(e) = put {
            log::warn!("renewing the lease {}: {e}", loc.display);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    #[tokio::test]
    async fn one_holder_at_a_time_and_a_dead_holder_is_replaced() {
        let ctx = SessionContext::new();
        let loc = crate::storage::resolve(&ctx, "memory://b/out/_lease.json").unwrap();
        let first = Lease::acquire(loc.clone(), "run-1", "out").await.unwrap();
        let e = Lease::acquire(loc.clone(), "run-2", "out")
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("another run") && e.contains("run-1") && e.contains("duplicate"),
            "{e}"
        );
        first.release().await;
        let second = Lease::acquire(loc.clone(), "run-2", "out").await.unwrap();
        second.renewal.abort();
        // A holder on this host whose process is gone (no pid is u32::MAX) does not block.
        let dead = Holder {
            host: host_name(),
            pid: u32::MAX,
            run_id: "dead".into(),
            acquired_at: "then".into(),
            expires_at: unix_now() + 1000,
        };
        loc.store
            .put(&loc.path, payload(&dead).unwrap())
            .await
            .unwrap();
        let third = Lease::acquire(loc.clone(), "run-3", "out").await.unwrap();
        assert_eq!(read_holder(&loc).await.unwrap().unwrap().run_id, "run-3");
        // An expired holder elsewhere does not block either.
        third.renewal.abort();
        let expired = Holder {
            host: "elsewhere".into(),
            expires_at: unix_now() - 1,
            ..dead
        };
        loc.store
            .put(&loc.path, payload(&expired).unwrap())
            .await
            .unwrap();
        Lease::acquire(loc.clone(), "run-4", "out")
            .await
            .unwrap()
            .release()
            .await;
        // A live holder on another host renews its lease: the newcomer sees that and refuses.
        std::env::set_var("CONALA_LEASE_SECONDS", "3");
        let elsewhere = Holder {
            host: "elsewhere".into(),
            expires_at: unix_now() + 3,
            run_id: "remote".into(),
            ..expired
        };
        loc.store
            .put(&loc.path, payload(&elsewhere).unwrap())
            .await
            .unwrap();
        let renewer = tokio::spawn(renew(loc.clone(), elsewhere, Duration::from_secs(3)));
        let e = Lease::acquire(loc.clone(), "run-5", "out")
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("remote"), "{e}");
        // Once it stops renewing, its lease expires and the newcomer takes over.
        renewer.abort();
        let _ = renewer.await;
        Lease::acquire(loc, "run-6", "out")
            .await
            .unwrap()
            .release()
            .await;
    }
}
