//! `write`: parquet part files plus a manifest, to a local folder or an object store.
//!
//! Every part is written whole or not at all: it is encoded in memory and stored with one `put`, which
//! object stores make atomic and the local store implements as write-to-temporary-name then rename. A
//! part is committed when the manifest that lists it is stored; readers and resumed runs see only
//! committed parts, so a run killed between the two leaves a stray that the next run removes.
//!
//! Modes: `overwrite` commits this run's parts in place of the earlier ones once it has succeeded (on
//! failure this run's parts are removed and the old output stays, for readers too); `resume` keeps the
//! committed parts, the runner skips their row ids, and each new part is committed as it is stored;
//! `error` refuses a folder that already holds output; `auto` is `resume` for plans that generate
//! (expensive work is never thrown away) and `overwrite` otherwise. A run holds the folder's (shard's)
//! lease while it writes, so two runs never write one output at once.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use futures::future::BoxFuture;
use futures::StreamExt;
use object_store::{ObjectStoreExt, PutPayload};
use tokio::task::JoinHandle;

use super::{require_column, runtime, Exec, Sink, SinkReport, StepError, StepResult};
use crate::context::Shard;
use crate::error::{from_stream_error, Error, Result};
use crate::output::fingerprint::plan_difference;
use crate::output::lease::Lease;
use crate::output::manifest::{now_rfc3339, versions, Manifest, PartInfo};
use crate::output::parts::{read_row_ids, store_part};
use crate::output::state::{commit_if_complete, manifest_name, uncommit, OutputState, SUCCESS};
use crate::plans::spec::{Compression as CompressionSetting, WriteMode, WriteSpec};
use crate::reports::RunStats;
use crate::row_ids::RowIdSet;
use crate::storage::{resolve, Location};

pub const MANIFEST: &str = "_manifest.json";

/// What `prepare` found and holds for the run: the lease, and the parts earlier runs left.
struct Prepared {
    lease: Lease,
    /// Parts earlier runs committed that this run keeps (resume).
    kept: Vec<PartInfo>,
    /// Parts this run replaces once it succeeds (overwrite).
    replaced: Vec<String>,
}

/// This run, for its manifests.
struct RunRecord<'a> {
    started: Instant,
    started_at: String,
    stats: &'a RunStats,
    kept: &'a [PartInfo],
}

/// What `write` does with earlier output, `auto` resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Overwrite,
    Resume,
    Error,
}

/// What the manifest says produced the output.
#[derive(Debug, Clone)]
pub struct Provenance {
    pub plan_name: String,
    /// The resolved plan (after `--set` and defaults).
    pub plan: serde_json::Value,
}

pub struct Write {
    spec: WriteSpec,
    pub loc: Location,
    projection: Vec<usize>,
    schema: SchemaRef,
    mode: Mode,
    compression: Compression,
    row_id: String,
    shard: Option<Shard>,
    run_id: String,
    provenance: Provenance,
    /// Where `push:` sends the output (the run's Hub settings).
    hub: crate::hub::HubConfig,
    prepared: std::sync::Mutex<Option<Prepared>>,
}

/// What a finished write produced.
#[derive(Debug, Clone)]
pub struct WriteSummary {
    pub location: String,
    pub rows_written: u64,
    pub rows_resumed: u64,
    pub parts: Vec<PartInfo>,
    pub seconds: f64,
    /// What `write.push` did (the output went to the Hub as a dataset).
    pub pushed: Option<crate::publish::PushReport>,
}

impl Write {
    /// The sink for `spec`; the run's session, shard and Hub settings come from `ctx`.
    pub fn new(
        spec: &WriteSpec,
        input: SchemaRef,
        ctx: &crate::context::Context,
        has_generate: bool,
        row_id: &str,
        provenance: Provenance,
    ) -> StepResult<Write> {
        let (shard, hub) = (ctx.shard, ctx.hub.config().clone());
        let loc = resolve(&ctx.session, &spec.path).map_err(|e| StepError::at("path", e))?;
        if let Some(p) = &spec.push {
            crate::hub::check_push_repo(&p.repo).map_err(|m| StepError::at("push.repo", m))?;
            if loc.local_path().is_none() {
                return Err(StepError::at("push", "conala pushes local outputs: write to a local folder, or copy it here and run `conala push`"));
            }
        }
        if let Some(p) = loc.local_path() {
            if p.is_file() {
                return Err(StepError::at(
                    "path",
                    format!("`{}` is a file; `write` needs a folder", spec.path),
                ));
            }
        }
        let mode = match spec.mode {
            WriteMode::Auto if has_generate => Mode::Resume,
            WriteMode::Auto | WriteMode::Overwrite => Mode::Overwrite,
            WriteMode::Resume => Mode::Resume,
            WriteMode::Error => Mode::Error,
        };
        let compression = match spec.compression {
            CompressionSetting::Zstd => {
                Compression::ZSTD(ZstdLevel::try_new(3).map_err(StepError::general)?)
            }
            CompressionSetting::Snappy => Compression::SNAPPY,
            CompressionSetting::None => Compression::UNCOMPRESSED,
        };
        if spec.rows_per_file == 0 || spec.row_group_rows == 0 {
            return Err(StepError::at(
                "rows_per_file",
                "rows_per_file and row_group_rows must be at least 1",
            ));
        }
        let mut projection: Vec<usize> = match &spec.columns {
            Some(cols) => {
                let mut v = vec![];
                for c in cols {
                    require_column(&input, "columns", c)?;
                    v.push(input.index_of(c).expect("checked"));
                }
                v
            }
            None => (0..input.fields().len()).collect(),
        };
        for d in &spec.drop {
            require_column(&input, "drop", d)?;
            let i = input.index_of(d).expect("checked");
            projection.retain(|&j| j != i);
        }
        if mode == Mode::Resume && !projection.iter().any(|&i| input.field(i).name() == row_id) {
            return Err(StepError::at(
                "columns",
                format!("resuming needs the row id column `{row_id}` in the output; keep it"),
            ));
        }
        let schema = Arc::new(input.project(&projection).map_err(StepError::general)?);
        let run_id = format!(
            "{}-{:04x}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S%3f"),
            std::process::id() & 0xffff
        );
        Ok(Write {
            spec: spec.clone(),
            loc,
            projection,
            schema,
            mode,
            compression,
            row_id: row_id.to_string(),
            shard,
            run_id,
            provenance,
            hub,
            prepared: std::sync::Mutex::new(None),
        })
    }

    /// The output (and shard) in messages.
    fn what(&self) -> String {
        match self.shard {
            Some(s) => format!("{} (shard {}/{})", self.spec.path, s.index, s.count),
            None => self.spec.path.clone(),
        }
    }

    fn part_prefix(&self) -> String {
        match self.shard {
            Some(s) => format!("part-{}-", s.label()),
            None => "part-".to_string(),
        }
    }

    /// The output's columns as the manifest records them.
    fn columns(&self) -> Vec<String> {
        self.schema
            .fields()
            .iter()
            .map(|f| format!("{}: {}", f.name(), f.data_type()))
            .collect()
    }

    /// Part files in the folder that belong to this output (or shard), committed or not.
    async fn existing_parts(&self) -> Result<Vec<String>> {
        let prefix = self.part_prefix();
        let base = self.loc.path.as_ref().to_string();
        let sharded = self.shard.is_some();
        Ok(self
            .loc
            .list()
            .await?
            .into_iter()
            .filter_map(|m| {
                let rel = m
                    .location
                    .as_ref()
                    .strip_prefix(&base)?
                    .trim_start_matches('/')
                    .to_string();
                // Unsharded part names go on with the run id's date; shards' with `s`.
                let ours = rel
                    .strip_prefix(&prefix)
                    .is_some_and(|rest| sharded || rest.starts_with(|c: char| c.is_ascii_digit()));
                (!rel.contains('/') && ours && rel.ends_with(".parquet")).then_some(rel)
            })
            .collect())
    }

    /// Take the lease and look at the folder before any work: `error` mode refuses existing output;
    /// `resume` checks that the folder holds this plan's output and collects the row ids already
    /// committed (to be skipped by the source); `overwrite` notes the parts it will replace.
    async fn check_folder(&self) -> Result<(Prepared, Option<Arc<RowIdSet>>)> {
        let lease_name = match self.shard {
            Some(s) => format!("_lease-{}.json", s.label()),
            None => "_lease.json".to_string(),
        };
        let lease = Lease::acquire(self.loc.child(&lease_name), &self.run_id, &self.what()).await?;
        match self.inspect_folder().await {
            Ok((kept, replaced, done)) => Ok((
                Prepared {
                    lease,
                    kept,
                    replaced,
                },
                done,
            )),
            Err(e) => {
                lease.release().await;
                Err(e)
            }
        }
    }

    async fn inspect_folder(&self) -> Result<(Vec<PartInfo>, Vec<String>, Option<Arc<RowIdSet>>)> {
        let path = &self.spec.path;
        let existing = self.existing_parts().await?;
        let mut mine = None;
        if let Some(state) = OutputState::read(&self.loc).await? {
            let count = state.shard_count(path)?;
            let ours = self.shard.map(|s| s.count);
            if count != ours {
                let layout = |c: Option<u64>| match c {
                    Some(n) => format!("as {n} shards"),
                    None => "without shards".to_string(),
                };
                return Err(Error::Data(format!(
                    "{path}: holds an output written {}, and this run writes {}: their rows would \
                     overlap; use the same shard count, or another folder",
                    layout(count),
                    layout(ours)
                )));
            }
            let name = manifest_name(self.shard);
            mine = state.manifests.into_iter().find(|(n, _)| *n == name);
        }
        match self.mode {
            Mode::Error if mine.is_some() || !existing.is_empty() => Err(Error::Data(format!(
                "{}: already holds output ({} part files); use `mode: overwrite` or `mode: resume`",
                self.what(),
                existing.len()
            ))),
            Mode::Resume => {
                let Some((_, manifest)) = mine else {
                    if existing.is_empty() {
                        return Ok((vec![], vec![], None));
                    }
                    return Err(Error::Data(format!(
                        "{}: holds {} part files that no manifest commits (another tool's, or an \
                         older conala's); move them away, or use `mode: overwrite`",
                        self.what(),
                        existing.len()
                    )));
                };
                self.check_same_plan(&manifest)?;
                let (kept, gone): (Vec<PartInfo>, Vec<PartInfo>) = manifest
                    .parts
                    .into_iter()
                    .partition(|p| existing.contains(&p.file));
                for p in &gone {
                    log::warn!(
                        "{}: committed part {} is gone; its {} rows are made again",
                        self.what(),
                        p.file,
                        p.rows
                    );
                }
                let strays: Vec<&String> = existing
                    .iter()
                    .filter(|f| !kept.iter().any(|p| &p.file == *f))
                    .collect();
                if !strays.is_empty() {
                    log::info!(
                        "{}: removing {} part files of an interrupted run that no manifest committed",
                        self.what(),
                        strays.len()
                    );
                }
                for f in strays {
                    self.delete(f).await?;
                }
                let mut set = RowIdSet::new();
                for p in &kept {
                    for id in read_row_ids(&self.loc.child(&p.file), &self.row_id).await? {
                        set.insert(id);
                    }
                }
                let done = (!kept.is_empty()).then(|| Arc::new(set));
                Ok((kept, vec![], done))
            }
            _ => Ok((vec![], existing, None)),
        }
    }

    /// Resuming adds rows to the folder's: they must be this plan's rows.
    fn check_same_plan(&self, manifest: &Manifest) -> Result<()> {
        let refuse = |difference: String| {
            Err(Error::Data(format!(
                "{}: refusing to resume: the output there was written by plan `{}`, which differs \
                 from this one ({difference}); use another folder, or `mode: overwrite` to replace it",
                self.what(),
                manifest.plan_name
            )))
        };
        if let Some(d) = plan_difference(&manifest.plan, &self.provenance.plan) {
            return refuse(d);
        }
        let columns = self.columns();
        if !manifest.columns.is_empty() && manifest.columns != columns {
            return refuse(format!(
                "columns [{}] -> [{}]",
                manifest.columns.join(", "),
                columns.join(", ")
            ));
        }
        Ok(())
    }

    async fn delete(&self, name: &str) -> Result<()> {
        let part = self.loc.child(name);
        match part.store.delete(&part.path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::object_store(
                format!("{}: removing {name}", self.what()),
                e,
            )),
        }
    }

    /// Store the manifest listing `parts`: this commits them.
    async fn commit(&self, parts: &[PartInfo], complete: bool, run: &RunRecord<'_>) -> Result<()> {
        let kept: u64 = run.kept.iter().map(|p| p.rows).sum();
        let manifest = Manifest {
            plan_name: self.provenance.plan_name.clone(),
            plan: self.provenance.plan.clone(),
            versions: versions(),
            started_at: run.started_at.clone(),
            finished_at: now_rfc3339(),
            seconds: run.started.elapsed().as_secs_f64(),
            shard: self.shard.map(|s| format!("{}/{}", s.index, s.count)),
            complete,
            run_id: self.run_id.clone(),
            columns: self.columns(),
            rows_per_step: run.stats.rows(),
            rows_written: parts.iter().map(|p| p.rows).sum(),
            rows_resumed: kept,
            parts: parts.to_vec(),
            extra: run.stats.reports(),
        };
        let json =
            serde_json::to_string_pretty(&manifest).map_err(|e| Error::json("manifest", e))?;
        let json = crate::secrets::redact(&json);
        let mpath = self.loc.child(&manifest_name(self.shard));
        mpath
            .store
            .put(&mpath.path, PutPayload::from(Bytes::from(json)))
            .await
            .map_err(|e| Error::object_store(&mpath.display, e))?;
        Ok(())
    }

    /// Remove what a run that is not kept wrote (best effort: a part left behind is a stray that no
    /// manifest lists, removed by the next run).
    async fn remove_partial(&self, written: &[PartInfo]) {
        for p in written {
            if let Err(e) = self.delete(&p.file).await {
                log::warn!("write: could not remove the partial part: {e}");
            }
        }
    }

    /// A signal stopped the input early: resuming, the parts are committed and the output stays
    /// incomplete; otherwise this run's parts go and the earlier output stays as it was.
    async fn interrupted(&self, signal: crate::interrupt::Signal, written: &[PartInfo]) -> Error {
        let rows: u64 = written.iter().map(|p| p.rows).sum();
        let message = if self.mode == Mode::Resume {
            format!(
                "{}: stopped by {}: the {rows} rows this run wrote are committed and the output is \
                 marked incomplete; run the same command again to resume where it stopped",
                self.what(),
                signal.name()
            )
        } else {
            self.remove_partial(written).await;
            format!(
                "{}: stopped by {} before this `mode: overwrite` run finished: nothing of it is kept \
                 and the earlier output is unchanged; run the same command again to redo it",
                self.what(),
                signal.name()
            )
        };
        Error::Interrupted { signal, message }
    }

    /// Consume the stream, writing parts as they fill, and commit them.
    pub async fn write(
        &self,
        mut input: SendableRecordBatchStream,
        stats: &RunStats,
    ) -> Result<WriteSummary> {
        let taken = self.prepared.lock().ok().and_then(|mut p| p.take());
        let prepared = match taken {
            Some(p) => p,
            None => self.check_folder().await?.0,
        };
        let run = RunRecord {
            started: Instant::now(),
            started_at: now_rfc3339(),
            stats,
            kept: &prepared.kept,
        };
        let result = self.write_and_commit(&mut input, &prepared, &run).await;
        let what = self.what();
        prepared.lease.release().await;
        let (written, parts) = result?;
        let committed_now = commit_if_complete(&self.loc, &self.run_id).await?;
        if committed_now {
            log::info!("{what}: every shard is complete; committed the output ({SUCCESS})");
        }
        let pushed = match &self.spec.push {
            Some(p) => {
                // The worker that commits the output pushes it; a whole-output rerun pushes again
                // (a push of what the repo has commits nothing).
                let done = committed_now
                    || (self.shard.is_none() && self.loc.child(SUCCESS).head().await?.is_some());
                crate::publish::push_output(&self.loc, p, done, &self.hub).await?
            }
            None => None,
        };
        Ok(WriteSummary {
            location: self.spec.path.clone(),
            rows_written: written.iter().map(|p| p.rows).sum(),
            rows_resumed: prepared.kept.iter().map(|p| p.rows).sum(),
            parts,
            seconds: run.started.elapsed().as_secs_f64(),
            pushed,
        })
    }

    /// Write the parts and commit them: this run's parts, and all the output's. On failure, what was
    /// committed stays (resume) or this run's parts are removed (the other modes).
    async fn write_and_commit(
        &self,
        input: &mut SendableRecordBatchStream,
        prepared: &Prepared,
        run: &RunRecord<'_>,
    ) -> Result<(Vec<PartInfo>, Vec<PartInfo>)> {
        let resume = self.mode == Mode::Resume;
        if resume {
            // The output is about to change: no longer committed until it completes again.
            uncommit(&self.loc).await?;
            self.commit(&prepared.kept, false, run).await?;
        }
        let mut written: Vec<PartInfo> = vec![];
        let result = self.write_parts(input, &mut written, resume, run).await;
        if let Err(e) = result {
            if !resume {
                // Leave no partial output: remove what this run wrote.
                self.remove_partial(&written).await;
                return Err(e);
            }
            if written.is_empty() {
                return Err(e);
            }
            return Err(Error::Resumable {
                rows_kept: written.iter().map(|p| p.rows).sum(),
                source: Box::new(e),
            });
        }
        if let Some(signal) = crate::interrupt::requested() {
            return Err(self.interrupted(signal, &written).await);
        }
        let mut parts = prepared.kept.clone();
        parts.extend(written.iter().cloned());
        parts.sort_by(|a, b| a.file.cmp(&b.file));
        self.commit(&parts, true, run).await?;
        // Readers now see the new parts only; the replaced ones can go.
        for name in prepared
            .replaced
            .iter()
            .filter(|n| !written.iter().any(|p| &p.file == *n))
        {
            self.delete(name).await?;
        }
        Ok((written, parts))
    }

    async fn write_parts(
        &self,
        input: &mut SendableRecordBatchStream,
        written: &mut Vec<PartInfo>,
        commit_each: bool,
        run: &RunRecord<'_>,
    ) -> Result<()> {
        // Resuming: each part is committed as soon as it is stored, so a kill loses at most the parts
        // in flight.
        let stored = |written: &mut Vec<PartInfo>, part: PartInfo| {
            written.push(part);
            let mut parts = run.kept.to_vec();
            parts.extend(written.iter().cloned());
            async move {
                if commit_each {
                    self.commit(&parts, false, run).await?;
                }
                Ok::<(), Error>(())
            }
        };
        let mut buffer: Vec<RecordBatch> = vec![];
        let mut buffered = 0usize;
        let mut seq = 0usize;
        let mut in_flight: Option<JoinHandle<Result<PartInfo>>> = None;
        loop {
            let next = input.next().await;
            let end = next.is_none();
            if let Some(batch) = next {
                let batch = batch.map_err(from_stream_error)?;
                let batch = batch
                    .project(&self.projection)
                    .map_err(|e| Error::arrow("write", e))?;
                buffered += batch.num_rows();
                buffer.push(batch);
            }
            while buffered >= self.spec.rows_per_file || (end && buffered > 0) {
                let all =
                    concat_batches(&self.schema, &buffer).map_err(|e| Error::arrow("write", e))?;
                let take = all.num_rows().min(self.spec.rows_per_file);
                let part = all.slice(0, take);
                let rest = all.slice(take, all.num_rows() - take);
                buffered = rest.num_rows();
                buffer = if buffered > 0 { vec![rest] } else { vec![] };
                // One part encodes while the next fills.
                if let Some(h) = in_flight.take() {
                    let part = runtime::join("write: part encoder", h).await?;
                    stored(written, part).await?;
                }
                let name = format!("{}{}-{seq:05}.parquet", self.part_prefix(), self.run_id);
                seq += 1;
                in_flight = Some(tokio::spawn(store_part(
                    self.loc.child(&name),
                    name,
                    part,
                    self.props(),
                )));
            }
            if end {
                break;
            }
        }
        if let Some(h) = in_flight.take() {
            let part = runtime::join("write: part encoder", h).await?;
            stored(written, part).await?;
        }
        Ok(())
    }

    fn props(&self) -> WriterProperties {
        WriterProperties::builder()
            .set_compression(self.compression)
            .set_max_row_group_row_count(Some(self.spec.row_group_rows))
            .build()
    }
}

impl Sink for Write {
    fn name(&self) -> &'static str {
        "write"
    }

    fn schema(&self) -> Option<SchemaRef> {
        Some(self.schema.clone())
    }

    fn prepare(&self) -> BoxFuture<'_, Result<Option<Arc<RowIdSet>>>> {
        Box::pin(async move {
            let (prepared, done) = self.check_folder().await?;
            if let Ok(mut slot) = self.prepared.lock() {
                *slot = Some(prepared);
            }
            if let Some(d) = &done {
                log::info!("resuming: {} rows already in {}", d.len(), self.loc.display);
            }
            Ok(done)
        })
    }

    fn run<'a>(
        &'a mut self,
        input: SendableRecordBatchStream,
        exec: &'a Exec,
    ) -> BoxFuture<'a, Result<SinkReport>> {
        Box::pin(async move { Ok(SinkReport::Write(self.write(input, &exec.stats).await?)) })
    }
}
