//! Hugging Face Hub access through `hf-hub`: listing and downloading dataset parquet files and model
//! files, with the standard environment (`HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_TOKEN`,
//! `HF_HUB_OFFLINE`) and the standard cache layout, so files fetched by Python tools are reused.

use std::io::IsTerminal;
use std::path::PathBuf;

use hf_hub::api::tokio::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// The revision where the Hub keeps its parquet conversion of every dataset.
pub const PARQUET_REVISION: &str = "refs/convert/parquet";

/// How to reach the Hub; `from_env` reads the variables the Python tools read.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub endpoint: String,
    /// The `hub` cache folder (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    pub token: Option<String>,
    pub offline: bool,
    pub progress: bool,
}

impl HubConfig {
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let cache_dir = match (var("HF_HUB_CACHE"), var("HF_HOME")) {
            (Some(c), _) => PathBuf::from(c),
            (None, Some(home)) => PathBuf::from(home).join("hub"),
            (None, None) => Cache::default().path().clone(),
        };
        let token = var("HF_TOKEN").or_else(|| Cache::new(cache_dir.clone()).token());
        let offline = var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);
        HubConfig {
            endpoint: var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".to_string()),
            cache_dir,
            token,
            offline,
            progress: std::io::stderr().is_terminal(),
        }
    }
}

/// A Hub repository: `owner/name` of a kind (model or dataset).
#[derive(Debug, Clone)]
pub struct RepoId {
    pub id: String,
    pub kind: RepoType,
}

impl RepoId {
    pub fn model(id: &str) -> Self {
        RepoId {
            id: id.to_string(),
            kind: RepoType::Model,
        }
    }
    pub fn dataset(id: &str) -> Self {
        RepoId {
            id: id.to_string(),
            kind: RepoType::Dataset,
        }
    }
    pub fn display(&self) -> String {
        match self.kind {
            RepoType::Dataset => format!("hf://datasets/{}", self.id),
            RepoType::Space => format!("hf://spaces/{}", self.id),
            RepoType::Model => self.id.clone(),
        }
    }
    fn repo(&self, revision: &str) -> Repo {
        Repo::with_revision(self.id.clone(), self.kind, revision.to_string())
    }
}

/// Parse `hf://datasets/OWNER/NAME` into the dataset id.
pub fn parse_dataset_uri(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix("hf://datasets/")?;
    let id = rest.trim_end_matches('/');
    let parts: Vec<&str> = id.split('/').collect();
    (parts.len() == 2 && parts.iter().all(|p| !p.is_empty())).then(|| id.to_string())
}

/// Is `s` shaped like a Hub model id (`name` or `owner/name`)?
pub fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    (1..=2).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// A repository to push to must be `OWNER/NAME` (conala does not guess the user's namespace).
pub fn check_push_repo(s: &str) -> std::result::Result<(), String> {
    if looks_like_repo_id(s) && s.contains('/') {
        Ok(())
    } else {
        Err(format!("`{s}`: not a Hub repository id (OWNER/NAME)"))
    }
}

pub struct Hub {
    config: HubConfig,
    api: Option<Api>,
}

impl Hub {
    pub fn new(config: HubConfig) -> Result<Self> {
        let api = if config.offline {
            None
        } else {
            let api = ApiBuilder::from_cache(Cache::new(config.cache_dir.clone()))
                .with_endpoint(config.endpoint.clone())
                .with_token(config.token.clone())
                .with_progress(config.progress)
                .build()
                .map_err(|e| Error::Hub(format!("setting up the Hub client: {e}")))?;
            Some(api)
        };
        Ok(Hub { config, api })
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    /// Files in `repo` at `revision` (relative paths). Offline: the files present in the cache.
    pub async fn list_files(&self, repo: &RepoId, revision: &str) -> Result<Vec<String>> {
        let Some(api) = &self.api else {
            return self.cached_files(repo, revision);
        };
        let what = format!("{} ({revision})", repo.display());
        let info = with_retries(&what, || {
            let r = api.repo(repo.repo(revision));
            async move { r.info().await }
        })
        .await
        .map_err(|(e, n)| self.explain(repo, revision, None, e, n))?;
        let mut files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        files.sort();
        Ok(files)
    }

    /// Local path of `file`, downloading it into the cache unless it is there already.
    pub async fn fetch(&self, repo: &RepoId, revision: &str, file: &str) -> Result<PathBuf> {
        let cached = Cache::new(self.config.cache_dir.clone())
            .repo(repo.repo(revision))
            .get(file);
        if let Some(p) = cached {
            return Ok(p);
        }
        let Some(api) = &self.api else {
            return Err(Error::Hub(format!(
                "{} ({revision}): `{file}` is not in the cache at {} and HF_HUB_OFFLINE is set; \
                 run once online (or unset HF_HUB_OFFLINE) to download it",
                repo.display(),
                self.config.cache_dir.display()
            )));
        };
        let what = format!("{} ({revision}): `{file}`", repo.display());
        with_retries(&what, || {
            let r = api.repo(repo.repo(revision));
            async move { r.download(file).await }
        })
        .await
        .map_err(|(e, n)| self.explain(repo, revision, Some(file), e, n))
    }

    /// Like [`Hub::fetch`] for a file the repository may not have: `None` when the Hub answers 404
    /// (or, offline, when the cache does not hold it); any other failure (access denied, the Hub
    /// down) is an error, never taken for a missing file.
    pub async fn fetch_optional(
        &self,
        repo: &RepoId,
        revision: &str,
        file: &str,
    ) -> Result<Option<PathBuf>> {
        let cached = Cache::new(self.config.cache_dir.clone())
            .repo(repo.repo(revision))
            .get(file);
        if let Some(p) = cached {
            return Ok(Some(p));
        }
        let Some(api) = &self.api else {
            return Ok(None);
        };
        let what = format!("{} ({revision}): `{file}`", repo.display());
        match with_retries(&what, || {
            let r = api.repo(repo.repo(revision));
            async move { r.download(file).await }
        })
        .await
        {
            Ok(p) => Ok(Some(p)),
            Err((ApiError::RequestError(r), _)) if r.status().map(|s| s.as_u16()) == Some(404) => {
                Ok(None)
            }
            Err((e, n)) => Err(self.explain(repo, revision, Some(file), e, n)),
        }
    }

    /// The parquet files of one configuration and split of a dataset, and the revision they are at:
    /// parquet files in the repo itself when it has them, else the Hub's conversion.
    pub async fn dataset_split_files(
        &self,
        dataset: &str,
        config: Option<&str>,
        split: &str,
        revision: Option<&str>,
    ) -> Result<(String, Vec<String>)> {
        let repo = RepoId::dataset(dataset);
        let candidates: Vec<&str> = match revision {
            Some(r) => vec![r],
            None => vec!["main", PARQUET_REVISION],
        };
        let mut seen = vec![];
        let mut last_error = None;
        for rev in &candidates {
            let files = match self.list_files(&repo, rev).await {
                Ok(f) => f,
                // Offline, only what was downloaded is in the cache: try the next revision.
                Err(e) if self.api.is_none() && candidates.len() > 1 => {
                    last_error = Some(e);
                    continue;
                }
                // The repo may have no parquet conversion; report what main had instead.
                Err(e) if candidates.len() > 1 && *rev == PARQUET_REVISION && !seen.is_empty() => {
                    log::debug!("{e}");
                    break;
                }
                Err(e) => return Err(e),
            };
            let chosen = select_split_files(&files, config, split)
                .map_err(|m| Error::Hub(format!("{} ({rev}): {m}", repo.display())))?;
            if !chosen.is_empty() {
                return Ok((rev.to_string(), chosen));
            }
            seen.extend(files.into_iter().filter(|f| f.ends_with(".parquet")));
        }
        if seen.is_empty() {
            if let Some(e) = last_error {
                return Err(e);
            }
        }
        let found = available_splits(&seen);
        Err(Error::Hub(format!(
            "{}: no parquet files for config `{}` split `{split}` (looked at {}){}{}",
            repo.display(),
            config.unwrap_or("default"),
            candidates.join(" and "),
            if found.is_empty() {
                String::new()
            } else {
                format!("; found: {}", found.join(", "))
            },
            if self.config.offline {
                format!(" (HF_HUB_OFFLINE is set: only files already in the cache at {} were considered)", self.config.cache_dir.display())
            } else {
                String::new()
            }
        )))
    }

    fn cached_files(&self, repo: &RepoId, revision: &str) -> Result<Vec<String>> {
        let folder = self
            .config
            .cache_dir
            .join(repo.repo(revision).folder_name());
        let commit = if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) {
            revision.to_string()
        } else {
            let r = folder.join("refs").join(revision);
            std::fs::read_to_string(&r)
                .map(|s| s.trim().to_string())
                .map_err(|_| {
                    Error::Hub(format!(
                        "{} ({revision}) is not in the cache at {} and HF_HUB_OFFLINE is set; \
                     run once online (or unset HF_HUB_OFFLINE) to download it",
                        repo.display(),
                        self.config.cache_dir.display()
                    ))
                })?
        };
        let snapshot = folder.join("snapshots").join(&commit);
        let mut out = vec![];
        let mut stack = vec![snapshot.clone()];
        while let Some(dir) = stack.pop() {
            let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(dir.display(), e))?;
            for entry in entries {
                let entry = entry.map_err(|e| Error::io(dir.display(), e))?;
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Ok(rel) = path.strip_prefix(&snapshot) {
                    out.push(rel.to_string_lossy().replace('\\', "/"));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn explain(
        &self,
        repo: &RepoId,
        revision: &str,
        file: Option<&str>,
        e: ApiError,
        attempts: u32,
    ) -> Error {
        let what = match file {
            Some(f) => format!("{} ({revision}): `{f}`", repo.display()),
            None => format!("{} ({revision})", repo.display()),
        };
        let status = match &e {
            ApiError::RequestError(r) => r.status().map(|s| s.as_u16()),
            _ => None,
        };
        let connect = matches!(&e, ApiError::RequestError(r) if r.is_connect() || r.is_timeout());
        let hint = match status {
            Some(401) | Some(403) if self.config.token.is_some() => format!(
                "access denied (HTTP {}) although a token is set (HF_TOKEN or the cached login): the \
                 token is invalid or expired, or lacks access to this repository (a gated model needs \
                 its terms accepted on the Hub with this account)",
                status.unwrap_or(401)
            ),
            Some(401) | Some(403) => "access denied: the repository is gated or private; set HF_TOKEN".to_string(),
            Some(404) => match file {
                Some(_) => "not found in the repository".to_string(),
                None => "repository or revision not found (check the id, or set HF_TOKEN for a private one)".to_string(),
            },
            _ if connect => format!(
                "cannot reach {} ({e}); check the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache",
                self.config.endpoint
            ),
            _ => e.to_string(),
        };
        let tried = if attempts > 1 {
            format!(" (gave up after {attempts} attempts)")
        } else {
            String::new()
        };
        Error::Hub(crate::secrets::redact(&format!("{what}: {hint}{tried}")))
    }
}

/// Attempts at a Hub request that fails for a passing reason (`CONALA_HUB_RETRIES`, default 5), with
/// backoff from half a second, doubling, at most 8 s apart.
pub(crate) fn hub_attempts() -> u32 {
    std::env::var("CONALA_HUB_RETRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &u32| n >= 1)
        .unwrap_or(5)
}

/// A failure worth retrying: no connection, a timeout, the server busy or failing (429, 5xx).
fn transient(e: &ApiError) -> bool {
    match e {
        ApiError::RequestError(r) => {
            r.is_connect()
                || r.is_timeout()
                || r.status()
                    .is_some_and(|s| s.is_server_error() || s.as_u16() == 429)
        }
        _ => false,
    }
}

/// `call` until it succeeds, fails for good, or runs out of attempts; the error and the attempts made.
async fn with_retries<T, F, Fut>(what: &str, mut call: F) -> std::result::Result<T, (ApiError, u32)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, ApiError>>,
{
    let attempts = hub_attempts();
    let mut delay = std::time::Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        match call().await {
            Err(e) if attempt < attempts && transient(&e) => {
                log::warn!(
                    "Hub: {what}: {}; retrying in {:.1} s ({attempt}/{attempts})",
                    crate::secrets::redact(&e.to_string()),
                    delay.as_secs_f64()
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(8));
                attempt += 1;
            }
            Err(e) => return Err((e, attempt)),
            Ok(v) => return Ok(v),
        }
    }
}

/// Pick the parquet files of `config`/`split` from a repository listing. Understands the Hub's parquet
/// conversion (`CONFIG/SPLIT/NNNN.parquet`, `CONFIG/partial-SPLIT/…`, older `CONFIG/NAME-SPLIT.parquet`)
/// and the usual repository layouts (`data/SPLIT-00000-of-00001.parquet`, `CONFIG/SPLIT-….parquet`).
/// Errors when no config is given and the matches span several configurations.
pub fn select_split_files(
    files: &[String],
    config: Option<&str>,
    split: &str,
) -> Result<Vec<String>, String> {
    let mut out = vec![];
    for f in files.iter().filter(|f| f.ends_with(".parquet")) {
        let parts: Vec<&str> = f.split('/').collect();
        let (dirs, name) = parts.split_at(parts.len() - 1);
        let stem = name[0].trim_end_matches(".parquet");
        let start = match config {
            Some(c) if c != "default" => match dirs.iter().position(|d| *d == c) {
                Some(i) => i + 1,
                None => continue,
            },
            _ => 0,
        };
        let partial = format!("partial-{split}");
        let dir_match = dirs[start..].iter().any(|d| *d == split || *d == partial);
        let stem_match = stem == split
            || stem.starts_with(&format!("{split}-"))
            || stem.starts_with(&format!("{split}."))
            || stem.ends_with(&format!("-{split}"))
            || stem.contains(&format!("-{split}-"));
        if dir_match || stem_match {
            out.push(f.clone());
        }
    }
    if config.is_none() {
        let mut tops: Vec<&str> = out
            .iter()
            .filter_map(|f| f.split('/').next())
            .filter(|t| !t.ends_with(".parquet"))
            .collect();
        tops.sort();
        tops.dedup();
        if tops.len() > 1 && tops.iter().all(|t| *t != "data") {
            return Err(format!(
                "several configurations have split `{split}` ({}); set `config`",
                tops.join(", ")
            ));
        }
    }
    Ok(out)
}

/// `config/split` pairs visible in a listing, for error messages.
fn available_splits(files: &[String]) -> Vec<String> {
    let mut out: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let parts: Vec<&str> = f.split('/').collect();
            (parts.len() >= 3).then(|| format!("{}/{}", parts[0], parts[1]))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn selects_parquet_conversion_layout() {
        let files = s(&[
            "curated/train/0000.parquet",
            "curated/test/0000.parquet",
            "mined/train/0000.parquet",
            "mined/train/0001.parquet",
            ".gitattributes",
        ]);
        assert_eq!(
            select_split_files(&files, Some("mined"), "train").unwrap(),
            s(&["mined/train/0000.parquet", "mined/train/0001.parquet"])
        );
        assert_eq!(
            select_split_files(&files, Some("curated"), "test").unwrap(),
            s(&["curated/test/0000.parquet"])
        );
        assert!(select_split_files(&files, Some("curated"), "validation")
            .unwrap()
            .is_empty());
        let e = select_split_files(&files, None, "train").unwrap_err();
        assert!(e.contains("curated, mined"), "{e}");
    }

    #[test]
    fn selects_repo_layouts() {
        let files = s(&[
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "data/test-00000-of-00001.parquet",
        ]);
        assert_eq!(select_split_files(&files, None, "train").unwrap().len(), 2);
        assert_eq!(
            select_split_files(&files, Some("default"), "test").unwrap(),
            s(&["data/test-00000-of-00001.parquet"])
        );
        let old = s(&[
            "curated/conala-train.parquet",
            "curated/conala-test.parquet",
        ]);
        assert_eq!(
            select_split_files(&old, Some("curated"), "train").unwrap(),
            s(&["curated/conala-train.parquet"])
        );
        let partial = s(&["big/partial-train/0000.parquet"]);
        assert_eq!(
            select_split_files(&partial, Some("big"), "train")
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn parses_dataset_uris_and_repo_ids() {
        assert_eq!(
            parse_dataset_uri("hf://datasets/neulab/conala").as_deref(),
            Some("neulab/conala")
        );
        assert_eq!(parse_dataset_uri("hf://datasets/neulab"), None);
        assert_eq!(parse_dataset_uri("s3://x/y"), None);
        assert!(looks_like_repo_id("google/flan-t5-base"));
        assert!(looks_like_repo_id("t5-small"));
        assert!(!looks_like_repo_id("./models/x"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("a/b/c"));
    }
}
