//! The Hub's upload protocol, on the HTTP client conala already builds (reqwest): create the repo,
//! ask preupload how each file is stored and whether the repo has it, send LFS objects through the
//! Git LFS batch API (`lfs.rs`), and commit everything in one NDJSON request. Shapes follow huggingface_hub's
//! `hf_api.py`, `_commit_api.py` and `lfs.py`.
//!
//! Why not hf-hub's upload API: it uploads through Xet only (anything else inline as base64, whole
//! in memory) and brings ~225 crates; these five endpoints are a few hundred lines on reqwest.

use std::time::Duration;

use base64::Engine as _;
use hf_hub::RepoType;
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::files::UploadFile;
use crate::error::{Error, Result};
use crate::hub::{HubConfig, RepoId};

/// Files per preupload request (huggingface_hub sends 256).
const PREUPLOAD_CHUNK: usize = 256;

/// Where a push goes: a repository and a branch.
#[derive(Debug, Clone)]
pub struct Target {
    pub repo: RepoId,
    pub revision: String,
}

impl Target {
    fn kind(&self) -> &'static str {
        match self.repo.kind {
            RepoType::Dataset => "dataset",
            RepoType::Space => "space",
            RepoType::Model => "model",
        }
    }
    /// `ID` for models, `datasets/ID` for datasets: the prefix of git and LFS URLs.
    pub(super) fn git_path(&self) -> String {
        match self.repo.kind {
            RepoType::Model => self.repo.id.clone(),
            _ => format!("{}s/{}", self.kind(), self.repo.id),
        }
    }
    fn api(&self, endpoint: &str, what: &str) -> String {
        format!(
            "{endpoint}/api/{}s/{}/{what}/{}",
            self.kind(),
            self.repo.id,
            quote(&self.revision)
        )
    }
    /// `hf://datasets/ID` or `ID` (@revision unless main), for messages.
    pub fn display(&self) -> String {
        let base = self.repo.display();
        if self.revision == "main" {
            base
        } else {
            format!("{base}@{}", self.revision)
        }
    }
}

/// How preupload says a file is stored, and the id the repo has for it now.
#[derive(Debug, Clone, Deserialize)]
pub struct Preupload {
    pub path: String,
    #[serde(rename = "uploadMode")]
    pub upload_mode: String,
    #[serde(rename = "shouldIgnore", default)]
    pub should_ignore: bool,
    #[serde(default)]
    pub oid: Option<String>,
}

/// A line of the NDJSON commit.
pub enum CommitOp<'a> {
    /// A small file, inline.
    Regular(&'a UploadFile),
    /// A file stored as an LFS object (uploaded before the commit).
    Lfs(&'a UploadFile),
    Delete(String),
}

/// What the Hub answered to a commit.
#[derive(Debug, Clone, Deserialize)]
pub struct CommitInfo {
    #[serde(rename = "commitUrl", default)]
    pub url: String,
    #[serde(rename = "commitOid", default)]
    pub oid: String,
}

/// An authenticated client for the Hub's write endpoints.
pub struct HubWriter {
    pub(super) http: reqwest::Client,
    pub(super) endpoint: String,
    pub(super) token: Option<String>,
    pub(super) attempts: u32,
}

impl HubWriter {
    pub fn new(config: &HubConfig) -> Result<HubWriter> {
        if config.offline {
            return Err(Error::Hub(
                "HF_HUB_OFFLINE is set: pushing needs the Hub (unset it)".into(),
            ));
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("conala/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| Error::Hub(format!("cannot build an HTTP client: {e}")))?;
        Ok(HubWriter {
            http,
            endpoint: config.endpoint.trim_end_matches('/').to_string(),
            token: config.token.clone(),
            attempts: crate::hub::hub_attempts(),
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The repo's web address.
    pub fn repo_url(&self, t: &Target) -> String {
        format!("{}/{}", self.endpoint, t.git_path())
    }

    pub(super) fn authed(&self, rb: RequestBuilder) -> RequestBuilder {
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// Create the repository; `false` when it already exists (409).
    pub async fn create_repo(&self, t: &Target, private: bool) -> Result<bool> {
        let (org, name) = match t.repo.id.split_once('/') {
            Some((o, n)) => (Some(o.to_string()), n.to_string()),
            None => (None, t.repo.id.clone()),
        };
        let body = json!({
            "name": name, "organization": org, "type": t.kind(), "private": private,
            "visibility": if private { "private" } else { "public" },
        });
        let url = format!("{}/api/repos/create", self.endpoint);
        let resp = self
            .send(t, "create the repository", || {
                self.authed(self.http.post(&url)).json(&body)
            })
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::CONFLICT => Ok(false),
            _ => Err(self.refused(t, "create the repository", resp).await),
        }
    }

    /// The files the revision holds now (empty for a repo without commits).
    pub async fn list_files(&self, t: &Target) -> Result<Vec<String>> {
        #[derive(Deserialize)]
        struct Sibling {
            rfilename: String,
        }
        #[derive(Deserialize)]
        struct Info {
            #[serde(default)]
            siblings: Vec<Sibling>,
        }
        let url = t.api(&self.endpoint, "revision");
        let resp = self
            .send_ok(t, "list its files", || self.authed(self.http.get(&url)))
            .await?;
        let info: Info = self.json(t, "list its files", resp).await?;
        Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
    }

    /// How each file is stored (`lfs` or `regular`) and the id the repo has for its path.
    pub async fn preupload(&self, t: &Target, files: &[UploadFile]) -> Result<Vec<Preupload>> {
        #[derive(Deserialize)]
        struct Answer {
            files: Vec<Preupload>,
        }
        let url = t.api(&self.endpoint, "preupload");
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut out = vec![];
        for chunk in files.chunks(PREUPLOAD_CHUNK) {
            let body = json!({ "files": chunk.iter().map(|f| json!({
                "path": f.path_in_repo, "sample": b64.encode(&f.sample), "size": f.size,
            })).collect::<Vec<_>>() });
            let resp = self
                .send_ok(t, "preupload", || {
                    self.authed(self.http.post(&url)).json(&body)
                })
                .await?;
            let a: Answer = self.json(t, "preupload", resp).await?;
            out.extend(a.files);
        }
        for f in files {
            if !out.iter().any(|p| p.path == f.path_in_repo) {
                return Err(Error::Hub(format!(
                    "{}: preupload did not answer for `{}`",
                    t.display(),
                    f.path_in_repo
                )));
            }
        }
        Ok(out)
    }

    /// One commit of every operation. Not retried: a commit whose answer was lost would be made
    /// twice; a rerun finds what landed and commits only the rest.
    pub async fn commit(
        &self,
        t: &Target,
        summary: &str,
        description: &str,
        ops: &[CommitOp<'_>],
    ) -> Result<CommitInfo> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut payload = Vec::new();
        let mut line = |v: serde_json::Value| {
            payload.extend_from_slice(v.to_string().as_bytes());
            payload.push(b'\n');
        };
        line(json!({"key": "header", "value": {"summary": summary, "description": description}}));
        for op in ops {
            match op {
                CommitOp::Regular(f) => line(json!({"key": "file", "value": {
                    "content": b64.encode(f.read_all()?), "path": f.path_in_repo, "encoding": "base64",
                }})),
                CommitOp::Lfs(f) => line(json!({"key": "lfsFile", "value": {
                    "path": f.path_in_repo, "algo": "sha256", "oid": f.sha256, "size": f.size,
                }})),
                CommitOp::Delete(p) => line(json!({"key": "deletedFile", "value": {"path": p}})),
            }
        }
        let url = t.api(&self.endpoint, "commit");
        let resp = self
            .authed(self.http.post(&url))
            .header("Content-Type", "application/x-ndjson")
            .body(payload)
            .send()
            .await
            .map_err(|e| self.unreachable(t, "commit", e, 1))?;
        let resp = self.ok(t, "commit", resp).await?;
        self.json(t, "commit", resp).await
    }

    /// [`Self::send`], then [`Self::ok`].
    pub(super) async fn send_ok(
        &self,
        t: &Target,
        what: &str,
        make: impl Fn() -> RequestBuilder,
    ) -> Result<Response> {
        let resp = self.send(t, what, make).await?;
        self.ok(t, what, resp).await
    }

    /// A success answer as it is; any other as [`Self::refused`]'s error.
    pub(super) async fn ok(&self, t: &Target, what: &str, resp: Response) -> Result<Response> {
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(self.refused(t, what, resp).await)
        }
    }

    /// `make()` sent until it gets an answer that is not a passing failure (no connection, a cut,
    /// 429, 5xx), with backoff from half a second; the last answer, whatever its status.
    pub(super) async fn send(
        &self,
        t: &Target,
        what: &str,
        make: impl Fn() -> RequestBuilder,
    ) -> Result<Response> {
        let mut delay = Duration::from_millis(500);
        for attempt in 1..=self.attempts {
            let last = attempt == self.attempts;
            // Without the URL: a presigned upload URL carries a signature.
            match make().send().await.map_err(reqwest::Error::without_url) {
                Ok(r) if !last && (r.status().is_server_error() || r.status() == 429) => {
                    log::warn!(
                        "push {}: {what}: HTTP {}; retrying in {:.1} s ({attempt}/{})",
                        t.display(),
                        r.status().as_u16(),
                        delay.as_secs_f64(),
                        self.attempts
                    );
                }
                Ok(r) => return Ok(r),
                Err(e) if !last => log::warn!(
                    "push {}: {what}: {}; retrying in {:.1} s ({attempt}/{})",
                    t.display(),
                    self.mask(&e.to_string()),
                    delay.as_secs_f64(),
                    self.attempts
                ),
                Err(e) => {
                    return Err(Error::Hub(format!(
                        "{}: {what}: {} (gave up after {attempt} attempt(s); rerun to go on: what \
                         the Hub has is not sent again)",
                        t.display(),
                        self.mask(&error_chain(&e))
                    )))
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(8));
        }
        unreachable!("attempts >= 1")
    }

    pub(super) async fn json<T: serde::de::DeserializeOwned>(
        &self,
        t: &Target,
        what: &str,
        resp: Response,
    ) -> Result<T> {
        let text = resp
            .text()
            .await
            .map_err(|e| self.unreachable(t, what, e, 1))?;
        serde_json::from_str(&text).map_err(|e| {
            Error::Hub(format!(
                "{}: {what}: unexpected answer from {} ({e}): {}",
                t.display(),
                self.endpoint,
                self.mask(&text.chars().take(300).collect::<String>())
            ))
        })
    }

    fn unreachable(&self, t: &Target, what: &str, e: reqwest::Error, attempts: u32) -> Error {
        Error::Hub(format!(
            "{}: {what}: {} ({attempts} attempt(s))",
            t.display(),
            self.mask(&error_chain(&e))
        ))
    }

    /// An error answer as a message that names the repo and says what to do; the token masked.
    pub(super) async fn refused(&self, t: &Target, what: &str, resp: Response) -> Error {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let said = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| text.chars().take(300).collect());
        let hint = match status.as_u16() {
            401 if self.token.is_some() => {
                "the Hub does not accept the token (HF_TOKEN or the saved login): it is invalid or expired".to_string()
            }
            401 => "not logged in: set HF_TOKEN to a token with write access".to_string(),
            403 => "the token may not write here (it needs write access to this repository or its organization)".to_string(),
            404 => format!(
                "not found: check the repository id and that the branch `{}` exists",
                t.revision
            ),
            409 => "conflict: the branch moved on or the request clashes with the repository's state; rerun".to_string(),
            413 => "too large for the Hub (a file or the request is over its limits)".to_string(),
            429 => "rate limited by the Hub; wait and rerun (what it already has is not sent again)".to_string(),
            _ => "the Hub refused the request".to_string(),
        };
        let said = if said.trim().is_empty() {
            String::new()
        } else {
            format!(" ({})", said.trim())
        };
        Error::Hub(crate::secrets::redact(&self.mask(&format!(
            "{}: {what}: HTTP {}: {hint}{said}",
            t.display(),
            status.as_u16()
        ))))
    }

    /// `s` with the token masked (it may come from the token file, which `secrets` does not know).
    pub(super) fn mask(&self, s: &str) -> String {
        match &self.token {
            Some(t) if t.len() >= 4 => s.replace(t.as_str(), "***"),
            _ => s.to_string(),
        }
    }
}

/// An error and its causes (reqwest's Display leaves out why a connection failed).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// A revision in a URL path: everything but unreserved characters percent-encoded (`/` too).
fn quote(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_are_quoted_whole() {
        assert_eq!(quote("main"), "main");
        assert_eq!(quote("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(quote("a b"), "a%20b");
    }

    #[test]
    fn urls_follow_the_hub_layout() {
        let t = Target {
            repo: RepoId::dataset("me/data"),
            revision: "v1/x".into(),
        };
        assert_eq!(
            t.api("http://h", "preupload"),
            "http://h/api/datasets/me/data/preupload/v1%2Fx"
        );
        assert_eq!(t.git_path(), "datasets/me/data");
        let m = Target {
            repo: RepoId::model("me/m"),
            revision: "main".into(),
        };
        assert_eq!(m.git_path(), "me/m");
        assert_eq!(m.display(), "me/m");
        assert_eq!(t.display(), "hf://datasets/me/data@v1/x");
    }
}
