//! LFS objects to the Hub through the Git LFS batch API: `basic` is one PUT of the object to a
//! presigned URL (then `verify` when offered), `multipart` a PUT per part to the part URLs the batch
//! answer lists under `header` (with `chunk_size`), then a completion POST of the parts' etags, as
//! huggingface_hub's `lfs.py` does. Objects stream from disk; an object the Hub already stores gets
//! no actions and is not sent again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use super::client::{HubWriter, Target};
use super::files::{Source, UploadFile};
use crate::error::{Error, Result};

const LFS_JSON: &str = "application/vnd.git-lfs+json";
/// Bytes per read when streaming a file to the Hub.
const READ_CHUNK: usize = 1 << 20;
/// Objects in flight at once: parallel streams fill a fast link without flooding the Hub.
const PARALLEL_OBJECTS: usize = 4;

/// One LFS object's instructions from the batch API (no `actions`: the Hub already stores it).
#[derive(Debug, Clone, Deserialize)]
struct BatchObject {
    oid: String,
    #[serde(default)]
    actions: Option<BatchActions>,
    #[serde(default)]
    error: Option<BatchError>,
}

#[derive(Debug, Clone, Deserialize)]
struct BatchActions {
    upload: Option<Action>,
    verify: Option<Action>,
}

#[derive(Debug, Clone, Deserialize)]
struct Action {
    href: String,
    #[serde(default)]
    header: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
struct BatchError {
    code: i64,
    message: String,
}

impl HubWriter {
    /// Send the LFS objects the Hub does not store yet; returns (objects sent, bytes sent). An
    /// object the batch API answers without actions is already stored (an earlier, interrupted
    /// push sent it) and is not sent again.
    pub async fn upload_lfs(
        &self,
        t: &Target,
        files: &[&UploadFile],
        sent: &Arc<AtomicU64>,
    ) -> Result<(usize, u64)> {
        if files.is_empty() {
            return Ok((0, 0));
        }
        #[derive(Deserialize)]
        struct Batch {
            objects: Vec<BatchObject>,
        }
        let url = format!(
            "{}/{}.git/info/lfs/objects/batch",
            self.endpoint,
            t.git_path()
        );
        let body = json!({
            "operation": "upload",
            "transfers": ["basic", "multipart"],
            "objects": files.iter().map(|f| json!({"oid": f.sha256, "size": f.size})).collect::<Vec<_>>(),
            "hash_algo": "sha256",
            "ref": {"name": t.revision},
        });
        let resp = self
            .send_ok(t, "ask the LFS batch API where to upload", || {
                self.authed(self.http.post(&url))
                    .header("Accept", LFS_JSON)
                    .header("Content-Type", LFS_JSON)
                    .body(body.to_string())
            })
            .await?;
        let batch: Batch = self.json(t, "LFS batch", resp).await?;
        let mut jobs = vec![];
        for f in files {
            let Some(obj) = batch.objects.iter().find(|o| o.oid == f.sha256) else {
                return Err(Error::Hub(format!(
                    "{}: the LFS batch API did not answer for `{}` (oid {})",
                    t.display(),
                    f.path_in_repo,
                    f.sha256
                )));
            };
            if let Some(e) = &obj.error {
                return Err(Error::Hub(format!(
                    "{}: the Hub refused `{}`: {} (LFS error {})",
                    t.display(),
                    f.path_in_repo,
                    self.mask(&e.message),
                    e.code
                )));
            }
            if let Some(actions) = &obj.actions {
                if let Some(up) = &actions.upload {
                    jobs.push((*f, up.clone(), actions.verify.clone()));
                }
            }
        }
        let (count, bytes) = (jobs.len(), jobs.iter().map(|(f, _, _)| f.size).sum());
        use futures::StreamExt as _;
        let mut futs: Vec<futures::future::BoxFuture<'_, Result<()>>> = vec![];
        for (f, up, verify) in jobs {
            futs.push(Box::pin(async move {
                self.upload_object(t, f, &up, sent).await?;
                if let Some(v) = verify {
                    self.verify(t, f, &v).await?;
                }
                log::info!(
                    "push: sent `{}` ({})",
                    f.path_in_repo,
                    crate::progress::human_bytes(f.size)
                );
                Ok(())
            }));
        }
        let mut uploads = futures::stream::iter(futs).buffer_unordered(PARALLEL_OBJECTS);
        while let Some(r) = uploads.next().await {
            r?;
        }
        Ok((count, bytes))
    }

    async fn upload_object(
        &self,
        t: &Target,
        f: &UploadFile,
        up: &Action,
        sent: &Arc<AtomicU64>,
    ) -> Result<()> {
        let what = format!("upload `{}`", f.path_in_repo);
        let Some(chunk) = up.header.get("chunk_size") else {
            // basic: one PUT of the whole object.
            self.send_ok(t, &what, || {
                self.http
                    .put(&up.href)
                    .header("Content-Length", f.size)
                    .body(body(f, 0, f.size, sent.clone()))
            })
            .await?;
            return Ok(());
        };
        let chunk_size: u64 = match chunk {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.parse().ok(),
            _ => None,
        }
        .filter(|&c| c > 0)
        .ok_or_else(|| {
            Error::Hub(format!(
                "{}: malformed multipart answer for `{}`: chunk_size {chunk}",
                t.display(),
                f.path_in_repo
            ))
        })?;
        let mut parts: Vec<(u64, String)> = up
            .header
            .iter()
            .filter_map(|(k, v)| Some((k.parse::<u64>().ok()?, v.as_str()?.to_string())))
            .collect();
        parts.sort();
        if parts.len() as u64 != f.size.div_ceil(chunk_size) {
            return Err(Error::Hub(format!(
                "{}: the Hub offered {} part URLs for `{}` ({} bytes in parts of {chunk_size})",
                t.display(),
                parts.len(),
                f.path_in_repo,
                f.size
            )));
        }
        let mut etags = vec![];
        for (i, (number, href)) in parts.iter().enumerate() {
            let offset = i as u64 * chunk_size;
            let len = chunk_size.min(f.size - offset);
            let part_what = format!("{what}: part {number} of {}", parts.len());
            let resp = self
                .send_ok(t, &part_what, || {
                    self.http.put(href).header("Content-Length", len).body(body(
                        f,
                        offset,
                        len,
                        sent.clone(),
                    ))
                })
                .await?;
            let etag = resp
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    Error::Hub(format!(
                        "{}: {part_what}: no etag in the answer",
                        t.display()
                    ))
                })?
                .to_string();
            etags.push(json!({"partNumber": number, "etag": etag}));
        }
        let done = json!({"oid": f.sha256, "parts": etags});
        self.send_ok(t, &format!("{what}: complete"), || {
            self.http
                .post(&up.href)
                .header("Accept", LFS_JSON)
                .header("Content-Type", LFS_JSON)
                .body(done.to_string())
        })
        .await?;
        Ok(())
    }

    async fn verify(&self, t: &Target, f: &UploadFile, v: &Action) -> Result<()> {
        let what = format!("verify `{}`", f.path_in_repo);
        let body = json!({"oid": f.sha256, "size": f.size});
        self.send_ok(t, &what, || {
            let mut rb = self.authed(self.http.post(&v.href)).json(&body);
            for (k, val) in &v.header {
                if let Some(s) = val.as_str() {
                    rb = rb.header(k, s);
                }
            }
            rb
        })
        .await?;
        Ok(())
    }
}

/// `len` bytes of `f` from `offset`, streamed from disk (never whole in memory); `sent` counts them.
fn body(f: &UploadFile, offset: u64, len: u64, sent: Arc<AtomicU64>) -> reqwest::Body {
    match &f.source {
        Source::Bytes(b) => {
            let slice = Bytes::copy_from_slice(&b[offset as usize..(offset + len) as usize]);
            sent.fetch_add(len, Ordering::Relaxed);
            reqwest::Body::from(slice)
        }
        Source::Disk(path) => {
            let path = path.clone();
            let stream =
                futures::stream::try_unfold((None::<tokio::fs::File>, len), move |(file, left)| {
                    let (path, sent) = (path.clone(), sent.clone());
                    async move {
                        if left == 0 {
                            return Ok(None);
                        }
                        let mut file = match file {
                            Some(f) => f,
                            None => {
                                let mut f = tokio::fs::File::open(&path).await?;
                                f.seek(std::io::SeekFrom::Start(offset)).await?;
                                f
                            }
                        };
                        let mut buf = vec![0u8; READ_CHUNK.min(left as usize)];
                        let n = file.read(&mut buf).await?;
                        if n == 0 {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                format!("{} shrank while it was being sent", path.display()),
                            ));
                        }
                        buf.truncate(n);
                        sent.fetch_add(n as u64, Ordering::Relaxed);
                        Ok::<_, std::io::Error>(Some((
                            Bytes::from(buf),
                            (Some(file), left - n as u64),
                        )))
                    }
                });
            reqwest::Body::wrap_stream(stream)
        }
    }
}
