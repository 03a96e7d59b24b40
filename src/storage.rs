//! Local paths and object-store URLs behind one interface.
//!
//! Every location resolves to an `ObjectStore` registered in the DataFusion session (so `conala sql` and
//! the operators see the same stores) plus a path inside it. Cloud stores are built from the usual
//! environment variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`) on first use; `memory://` stores live for the
//! process (tests, in-process pipelines).

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart,
};
use url::Url;

use crate::error::{Error, Result};

/// A resolved location: the store, the URL that names the store (`file:///`, `s3://bucket`), and the
/// path inside it.
#[derive(Clone)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    pub store_url: Url,
    pub path: Path,
    /// What the user wrote, for messages.
    pub display: String,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Location({})", self.display)
    }
}

impl Location {
    /// The full URL of `path` (for DataFusion table registration).
    pub fn url(&self) -> String {
        let base = self.store_url.as_str().trim_end_matches('/');
        format!("{base}/{}", self.path)
    }

    pub fn child(&self, name: &str) -> Location {
        Location {
            store: self.store.clone(),
            store_url: self.store_url.clone(),
            path: self.path.clone().join(name),
            display: format!("{}/{name}", self.display.trim_end_matches('/')),
        }
    }

    pub fn is_local(&self) -> bool {
        self.store_url.scheme() == "file"
    }

    /// The local filesystem path, for `file://` locations.
    pub fn local_path(&self) -> Option<PathBuf> {
        self.is_local()
            .then(|| PathBuf::from(format!("/{}", self.path)))
    }

    /// The object at exactly this path, if there is one.
    pub async fn head(&self) -> Result<Option<ObjectMeta>> {
        if let Some(p) = self.local_path() {
            if p.is_dir() {
                return Ok(None);
            }
        }
        match self.store.head(&self.path).await {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::object_store(&self.display, e)),
        }
    }

    /// All objects under this path (recursively), sorted by path.
    pub async fn list(&self) -> Result<Vec<ObjectMeta>> {
        if let Some(p) = self.local_path() {
            if !p.exists() {
                return Ok(vec![]);
            }
        }
        let mut all: Vec<ObjectMeta> = self
            .store
            .list(Some(&self.path))
            .try_collect()
            .await
            .map_err(|e| Error::object_store(&self.display, e))?;
        all.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(all)
    }

    /// The whole object.
    pub async fn read(&self) -> Result<Bytes> {
        self.store
            .get(&self.path)
            .await
            .map_err(|e| Error::object_store(&self.display, e))?
            .bytes()
            .await
            .map_err(|e| Error::object_store(&self.display, e))
    }

    /// Store `bytes` as this object, whole or not at all: one `put`, or for a large object on a
    /// remote store a multipart upload (which the store makes visible only when it completes, and
    /// which is aborted on failure).
    pub async fn put_whole(&self, bytes: Vec<u8>) -> Result<()> {
        let fail = |e| Error::object_store(&self.display, e);
        let chunk = multipart_chunk_bytes();
        if self.is_local() || bytes.len() <= chunk {
            self.store
                .put(&self.path, PutPayload::from(Bytes::from(bytes)))
                .await
                .map_err(fail)?;
            return Ok(());
        }
        let upload = self.store.put_multipart(&self.path).await.map_err(fail)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, chunk);
        writer.write(&bytes);
        writer.finish().await.map_err(fail)?;
        Ok(())
    }

    /// This object if it exists, else the objects under it.
    pub async fn files(&self) -> Result<Vec<ObjectMeta>> {
        match self.head().await? {
            Some(m) => Ok(vec![m]),
            None => self.list().await,
        }
    }
}

/// Objects larger than this go up in parts of this size (`CONALA_MULTIPART_CHUNK_BYTES`; S3 needs at
/// least 5 MiB except for the last part).
fn multipart_chunk_bytes() -> usize {
    std::env::var("CONALA_MULTIPART_CHUNK_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n >= 1024)
        .unwrap_or(16 << 20)
}

/// Resolve a local path or URL into a [`Location`], registering the store in `ctx` if needed.
pub fn resolve(ctx: &SessionContext, uri: &str) -> Result<Location> {
    if let Some(url) = parse_url(uri) {
        if url.scheme() == "file" {
            let p = url
                .to_file_path()
                .map_err(|_| Error::Data(format!("{uri}: not a valid file:// URL")))?;
            return local(ctx, &p, uri);
        }
        let store_url = Url::parse(&format!(
            "{}://{}",
            url.scheme(),
            url.host_str().unwrap_or("")
        ))
        .map_err(|e| Error::Data(format!("{uri}: {e}")))?;
        let store = match ctx.runtime_env().object_store(
            ObjectStoreUrl::parse(store_url.as_str()).map_err(|e| Error::datafusion(uri, e))?,
        ) {
            Ok(s) => s,
            Err(_) => {
                let s = build_store(&url, uri)?;
                ctx.register_object_store(&store_url, s.clone());
                s
            }
        };
        let path =
            Path::from_url_path(url.path()).map_err(|e| Error::Data(format!("{uri}: {e}")))?;
        return Ok(Location {
            store,
            store_url,
            path,
            display: uri.to_string(),
        });
    }
    local(ctx, FsPath::new(uri), uri)
}

fn parse_url(uri: &str) -> Option<Url> {
    let (scheme, _) = uri.split_once("://")?;
    if scheme.len() < 2 {
        return None; // Windows drive letters
    }
    Url::parse(uri).ok()
}

fn local(ctx: &SessionContext, p: &FsPath, display: &str) -> Result<Location> {
    let abs = std::path::absolute(p).map_err(|e| Error::io(display, e))?;
    let store_url = Url::parse("file:///").expect("static URL");
    let store = ctx
        .runtime_env()
        .object_store(ObjectStoreUrl::local_filesystem())
        .map_err(|e| Error::datafusion("local filesystem store", e))?;
    let path =
        Path::from_absolute_path(&abs).map_err(|e| Error::Data(format!("{display}: {e}")))?;
    Ok(Location {
        store,
        store_url,
        path,
        display: display.to_string(),
    })
}

/// Retries of a failed object-store request: bounded in number and time, with exponential backoff
/// (`CONALA_STORE_RETRIES`, default 10; `CONALA_STORE_RETRY_SECONDS`, default 120). A store that stays
/// down fails the run with the last error; the committed parts stay, and a rerun resumes.
fn retry_config() -> RetryConfig {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: var("CONALA_STORE_RETRIES").unwrap_or(10) as usize,
        retry_timeout: std::time::Duration::from_secs(
            var("CONALA_STORE_RETRY_SECONDS").unwrap_or(120),
        ),
    }
}

fn build_store(url: &Url, uri: &str) -> Result<Arc<dyn ObjectStore>> {
    let ctx =
        |e: object_store::Error| Error::object_store(format!("{uri}: configuring the store"), e);
    let store: Arc<dyn ObjectStore> = match url.scheme() {
        "s3" | "s3a" => Arc::new(
            object_store::aws::AmazonS3Builder::from_env().with_url(url.as_str()).with_retry(retry_config()).build().map_err(ctx)?,
        ),
        "gs" => Arc::new(
            object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(url.as_str()).with_retry(retry_config()).build().map_err(ctx)?,
        ),
        "az" | "azure" | "abfs" | "abfss" | "adl" => Arc::new(
            object_store::azure::MicrosoftAzureBuilder::from_env().with_url(url.as_str()).with_retry(retry_config()).build().map_err(ctx)?,
        ),
        "memory" => Arc::new(object_store::memory::InMemory::new()),
        other => {
            return Err(Error::Data(format!(
                "{uri}: unsupported URL scheme `{other}` (use a local path, file://, s3://, gs://, az://, memory:// or hf://)"
            )))
        }
    };
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::PutPayload;

    #[tokio::test]
    async fn memory_store_is_shared_within_a_session() {
        let ctx = SessionContext::new();
        let a = resolve(&ctx, "memory://bucket/data").unwrap();
        a.child("x.txt")
            .store
            .put(&a.child("x.txt").path, PutPayload::from_static(b"hi"))
            .await
            .unwrap();
        let b = resolve(&ctx, "memory://bucket/data").unwrap();
        let files = b.files().await.unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].location.as_ref(), "data/x.txt");
    }

    #[tokio::test]
    async fn local_paths_resolve_to_file_urls() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.json"), "[]").unwrap();
        let ctx = SessionContext::new();
        let loc = resolve(&ctx, dir.path().to_str().unwrap()).unwrap();
        assert!(loc.is_local());
        assert_eq!(
            loc.local_path().unwrap(),
            std::fs::canonicalize(dir.path()).unwrap_or(dir.path().into())
        );
        let files = loc.files().await.unwrap();
        assert_eq!(files.len(), 1);
        let url = format!("file://{}", dir.path().join("a.json").display());
        let one = resolve(&ctx, &url).unwrap();
        assert_eq!(one.files().await.unwrap().len(), 1);
        assert!(resolve(&ctx, "ftp://x/y").is_err());
    }
}
