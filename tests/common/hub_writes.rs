//! The stand-in Hub's write side, as huggingface_hub's `hf_api.py`, `_commit_api.py` and `lfs.py`
//! talk to the Hub: `POST /api/repos/create` (409 when it exists), `POST /api/{type}s/ID/preupload/REV`
//! (upload mode and the id of the file the revision has), the Git LFS batch API at
//! `[datasets/]ID.git/info/lfs/objects/batch` (an object already stored gets no actions; `basic` is
//! one PUT to a presigned URL, `multipart` a PUT per part then a completion POST) and the NDJSON
//! commit `POST /api/{type}s/ID/commit/REV`.
//!
//! It is strict where the Hub is: blobs are stored by sha256 and the hash is checked at upload, a
//! commit's `lfsFile` must name a stored object of that size, writes need the token when one is
//! set. Thresholds are small, so tests hit regular files, basic and multipart transfers. Faults
//! (`Fault`) answer a status or cut the connection mid-body, a given number of times.

use std::io::{BufRead, BufReader, Read};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use base64::Engine as _;
use serde_json::{json, Value};
use sha1::Digest as _;
use sha2::Sha256;

use super::respond;

/// Preupload answers `lfs` for binary samples (a NUL byte) and for text of this size or more (the
/// Hub's threshold is 10 MB; small here so a large text file goes LFS too).
pub const LFS_THRESHOLD: u64 = 64 * 1024;
/// The batch API answers `multipart` for objects over this size.
pub const MULTIPART_THRESHOLD: u64 = 64 * 1024;
/// Bytes per multipart part.
pub const PART_SIZE: u64 = 32 * 1024;

/// An injected failure for requests whose path contains `path`, `times` times.
#[derive(Debug, Clone)]
pub struct Fault {
    pub path: String,
    pub kind: FaultKind,
    pub times: usize,
}

#[derive(Debug, Clone)]
pub enum FaultKind {
    /// Answer this HTTP status.
    Status(u16),
    /// Read this many bytes of the body, then close the connection.
    Cut(usize),
}

/// A commit the stand-in made.
#[derive(Debug, Clone)]
pub struct Commit {
    pub repo: String,
    pub revision: String,
    pub summary: String,
    /// Paths written inline, as LFS pointers, and deleted.
    pub files: Vec<String>,
    pub lfs: Vec<String>,
    pub deleted: Vec<String>,
}

/// The write side's state, shared by every connection.
pub struct Writes {
    endpoint: String,
    /// When set, every write endpoint requires `Authorization: Bearer <token>`.
    pub token: Mutex<Option<String>>,
    pub faults: Mutex<Vec<Fault>>,
    /// sha256 of every LFS object stored, in order (an object sent twice appears twice).
    pub stored: Mutex<Vec<String>>,
    /// Bytes of LFS bodies received (basic PUTs and parts, cut ones included).
    pub body_bytes: AtomicU64,
    pub commits: Mutex<Vec<Commit>>,
}

impl Writes {
    pub fn new(endpoint: &str) -> Writes {
        Writes {
            endpoint: endpoint.to_string(),
            token: Mutex::new(None),
            faults: Mutex::new(vec![]),
            stored: Mutex::new(vec![]),
            body_bytes: AtomicU64::new(0),
            commits: Mutex::new(vec![]),
        }
    }

    pub fn require_token(&self, token: &str) {
        *self.token.lock().unwrap() = Some(token.to_string());
    }

    pub fn inject(&self, path: &str, kind: FaultKind, times: usize) {
        self.faults.lock().unwrap().push(Fault {
            path: path.to_string(),
            kind,
            times,
        });
    }

    /// Take one use of the first fault that matches `path`.
    fn take_fault(&self, path: &str) -> Option<FaultKind> {
        let mut faults = self.faults.lock().unwrap();
        let f = faults
            .iter_mut()
            .find(|f| f.times > 0 && path.contains(&f.path))?;
        f.times -= 1;
        Some(f.kind.clone())
    }

    /// An injected status for a read request, as `"503 Injected"`.
    pub fn fault_status(&self, path: &str) -> Option<String> {
        match self.take_fault(path)? {
            FaultKind::Status(s) => Some(format!("{s} Injected")),
            FaultKind::Cut(_) => Some("500 Injected".into()),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The id git gives a file's content: sha1 of `blob LEN\0CONTENT`.
pub fn git_blob_id(bytes: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    hex(&h.finalize())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The request body: by Content-Length, or chunked.
fn read_body(
    headers: &[(String, String)],
    reader: &mut BufReader<TcpStream>,
) -> std::io::Result<Vec<u8>> {
    if let Some(n) = header(headers, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        let mut body = vec![0u8; n];
        reader.read_exact(&mut body)?;
        return Ok(body);
    }
    let mut body = vec![];
    if header(headers, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            let mut chunk = vec![0u8; n + 2];
            reader.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    Ok(body)
}

fn json_reply(stream: &mut TcpStream, status: &str, v: &Value) -> std::io::Result<()> {
    respond(
        stream,
        status,
        &[("Content-Type".into(), "application/json".into())],
        v.to_string().as_bytes(),
    )
}

fn error(stream: &mut TcpStream, status: &str, message: &str) -> std::io::Result<()> {
    json_reply(stream, status, &json!({ "error": message }))
}

/// Handle one write request (any method but GET/HEAD).
pub fn handle(
    method: &str,
    path: &str,
    headers: &[(String, String)],
    reader: &mut BufReader<TcpStream>,
    stream: &mut TcpStream,
    root: &Path,
    w: &Writes,
) -> std::io::Result<()> {
    match w.take_fault(path) {
        Some(FaultKind::Status(s)) => {
            let _ = read_body(headers, reader);
            return error(stream, &format!("{s} Injected"), "injected fault");
        }
        Some(FaultKind::Cut(n)) => {
            let mut buf = vec![0u8; n];
            let mut got = 0;
            while got < n {
                match reader.read(&mut buf[got..]) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => got += k,
                }
            }
            w.body_bytes.fetch_add(got as u64, Ordering::SeqCst);
            let _ = stream.shutdown(Shutdown::Both);
            return Ok(());
        }
        None => {}
    }
    let body = read_body(headers, reader)?;
    // Presigned LFS URLs carry their own authorization; everything else (verify too, as
    // huggingface_hub sends it with the token) needs the token.
    if !path.starts_with("/_lfs/") || path == "/_lfs/verify" {
        if let Some(token) = w.token.lock().unwrap().clone() {
            let auth = header(headers, "authorization").unwrap_or("");
            if auth != format!("Bearer {token}") {
                // The Hub echoes nothing secret, but a careless proxy might: clients must mask.
                return error(
                    stream,
                    "401 Unauthorized",
                    &format!("Invalid credentials in Authorization header ({auth})"),
                );
            }
        }
    }
    match (method, path) {
        ("POST", "/api/repos/create") => create_repo(&body, stream, root),
        ("PUT", p) if p.starts_with("/_lfs/put/") => {
            put_object(&p["/_lfs/put/".len()..], &body, stream, root, w)
        }
        ("PUT", p) if p.starts_with("/_lfs/part/") => {
            put_part(&p["/_lfs/part/".len()..], &body, stream, root, w)
        }
        ("POST", p) if p.starts_with("/_lfs/complete/") => {
            complete(&p["/_lfs/complete/".len()..], &body, stream, root, w)
        }
        ("POST", "/_lfs/verify") => verify(&body, stream, root),
        ("POST", p) if p.ends_with(".git/info/lfs/objects/batch") => {
            batch(p, headers, &body, stream, root, w)
        }
        ("POST", p) if p.starts_with("/api/") && p.contains("/preupload/") => {
            preupload(p, &body, stream, root)
        }
        ("POST", p) if p.starts_with("/api/") && p.contains("/commit/") => {
            commit(p, headers, &body, stream, root, w)
        }
        _ => error(
            stream,
            "404 Not Found",
            &format!("no route {method} {path}"),
        ),
    }
}

/// `/api/{models,datasets}/ID/WHAT/REV` -> (kind folder, id, revision).
fn api_target(path: &str, what: &str) -> Option<(&'static str, String, String)> {
    let (kind, rest) = if let Some(r) = path.strip_prefix("/api/datasets/") {
        ("datasets", r)
    } else {
        ("models", path.strip_prefix("/api/models/")?)
    };
    let (id, rev) = rest.split_once(&format!("/{what}/"))?;
    Some((kind, id.to_string(), super::decode(rev.split('?').next()?)))
}

fn repo_dir(root: &Path, kind: &str, id: &str) -> PathBuf {
    root.join(kind).join(id)
}

fn rev_dir(root: &Path, kind: &str, id: &str, rev: &str) -> PathBuf {
    repo_dir(root, kind, id).join(rev.replace('/', "__"))
}

fn blob_path(root: &Path, oid: &str) -> PathBuf {
    root.join(".lfs").join(oid)
}

/// 404 with the Hub's wording when the repo or revision is missing.
fn missing(
    stream: &mut TcpStream,
    root: &Path,
    kind: &str,
    id: &str,
    rev: &str,
) -> Option<std::io::Result<()>> {
    if !repo_dir(root, kind, id).is_dir() {
        return Some(error(stream, "404 Not Found", "Repository not found"));
    }
    if !rev_dir(root, kind, id, rev).is_dir() {
        return Some(error(
            stream,
            "404 Not Found",
            &format!("Invalid rev id: {rev}"),
        ));
    }
    None
}

fn create_repo(body: &[u8], stream: &mut TcpStream, root: &Path) -> std::io::Result<()> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return error(stream, "400 Bad Request", "malformed JSON");
    };
    let Some(name) = v["name"].as_str() else {
        return error(stream, "400 Bad Request", "name is required");
    };
    let id = match v["organization"].as_str() {
        Some(org) => format!("{org}/{name}"),
        None => format!("me/{name}"),
    };
    let kind = match v["type"].as_str() {
        Some("dataset") => "datasets",
        Some("model") | None => "models",
        Some(other) => return error(stream, "400 Bad Request", &format!("type {other}")),
    };
    let dir = repo_dir(root, kind, &id);
    if dir.is_dir() {
        return json_reply(
            stream,
            "409 Conflict",
            &json!({"error": "You already created this repo", "url": id}),
        );
    }
    let main = dir.join("main");
    std::fs::create_dir_all(&main)?;
    std::fs::write(
        main.join(".gitattributes"),
        "*.parquet filter=lfs diff=lfs merge=lfs -text\n",
    )?;
    if v["private"].as_bool() == Some(true) {
        std::fs::write(dir.join(".private"), "")?;
    }
    json_reply(stream, "200 OK", &json!({ "url": id, "name": id }))
}

fn preupload(path: &str, body: &[u8], stream: &mut TcpStream, root: &Path) -> std::io::Result<()> {
    let Some((kind, id, rev)) = api_target(path, "preupload") else {
        return error(stream, "404 Not Found", "bad preupload path");
    };
    if let Some(r) = missing(stream, root, kind, &id, &rev) {
        return r;
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return error(stream, "400 Bad Request", "malformed JSON");
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let dir = rev_dir(root, kind, &id, &rev);
    let mut answers = vec![];
    for f in v["files"].as_array().into_iter().flatten() {
        let (Some(p), Some(size), Some(sample)) =
            (f["path"].as_str(), f["size"].as_u64(), f["sample"].as_str())
        else {
            return error(
                stream,
                "400 Bad Request",
                "each file needs path, size, sample",
            );
        };
        let Ok(sample) = b64.decode(sample) else {
            return error(stream, "400 Bad Request", "sample is not base64");
        };
        let lfs = size >= LFS_THRESHOLD || sample.contains(&0);
        let mut answer = json!({
            "path": p, "uploadMode": if lfs { "lfs" } else { "regular" }, "shouldIgnore": false,
        });
        if let Ok(have) = std::fs::read(dir.join(p)) {
            answer["oid"] = json!(if lfs {
                sha256_hex(&have)
            } else {
                git_blob_id(&have)
            });
        }
        answers.push(answer);
    }
    json_reply(stream, "200 OK", &json!({ "files": answers }))
}

fn batch(
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
    stream: &mut TcpStream,
    root: &Path,
    w: &Writes,
) -> std::io::Result<()> {
    let lfs_json = "application/vnd.git-lfs+json";
    if header(headers, "accept") != Some(lfs_json)
        || header(headers, "content-type") != Some(lfs_json)
    {
        return error(
            stream,
            "406 Not Acceptable",
            "the LFS batch API speaks application/vnd.git-lfs+json",
        );
    }
    let git = path
        .trim_start_matches('/')
        .trim_end_matches(".git/info/lfs/objects/batch");
    let (kind, id) = match git.strip_prefix("datasets/") {
        Some(id) => ("datasets", id),
        None => ("models", git),
    };
    if !repo_dir(root, kind, id).is_dir() {
        return error(stream, "404 Not Found", "Repository not found");
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return error(stream, "400 Bad Request", "malformed JSON");
    };
    if v["operation"] != "upload" || v["hash_algo"] != "sha256" {
        return error(
            stream,
            "422 Unprocessable Entity",
            "operation upload, hash_algo sha256",
        );
    }
    let multipart_ok = v["transfers"]
        .as_array()
        .is_some_and(|t| t.iter().any(|x| x == "multipart"));
    let mut objects = vec![];
    for o in v["objects"].as_array().into_iter().flatten() {
        let (Some(oid), Some(size)) = (o["oid"].as_str(), o["size"].as_u64()) else {
            return error(
                stream,
                "422 Unprocessable Entity",
                "each object needs oid and size",
            );
        };
        if oid.len() != 64 || !oid.bytes().all(|b| b.is_ascii_hexdigit()) {
            objects.push(
                json!({"oid": oid, "size": size, "error": {"code": 422, "message": "invalid oid"}}),
            );
            continue;
        }
        let stored = std::fs::metadata(blob_path(root, oid)).ok();
        if stored.is_some_and(|m| m.len() == size) {
            objects.push(json!({"oid": oid, "size": size}));
            continue;
        }
        std::fs::create_dir_all(root.join(".lfs-pending"))?;
        std::fs::write(root.join(".lfs-pending").join(oid), size.to_string())?;
        let base = &w.endpoint;
        if multipart_ok && size > MULTIPART_THRESHOLD {
            let mut header = serde_json::Map::new();
            header.insert("chunk_size".into(), json!(PART_SIZE.to_string()));
            for n in 1..=size.div_ceil(PART_SIZE) {
                header.insert(n.to_string(), json!(format!("{base}/_lfs/part/{oid}/{n}")));
            }
            objects.push(json!({"oid": oid, "size": size, "actions": {
                "upload": {"href": format!("{base}/_lfs/complete/{oid}"), "header": header},
            }}));
        } else {
            objects.push(json!({"oid": oid, "size": size, "actions": {
                "upload": {"href": format!("{base}/_lfs/put/{oid}")},
                "verify": {"href": format!("{base}/_lfs/verify"), "header": {}},
            }}));
        }
    }
    respond(
        stream,
        "200 OK",
        &[("Content-Type".into(), lfs_json.into())],
        json!({"transfer": "basic", "objects": objects})
            .to_string()
            .as_bytes(),
    )
}

/// The size the batch API was told for `oid`.
fn pending_size(root: &Path, oid: &str) -> Option<u64> {
    std::fs::read_to_string(root.join(".lfs-pending").join(oid))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Store `bytes` as the object `oid` if they hash to it and have the announced size.
fn store(root: &Path, oid: &str, bytes: &[u8], w: &Writes) -> Result<(), String> {
    if pending_size(root, oid) != Some(bytes.len() as u64) {
        return Err(format!("{oid}: size {} was not announced", bytes.len()));
    }
    let got = sha256_hex(bytes);
    if got != oid {
        return Err(format!("sha256 mismatch: expected {oid}, got {got}"));
    }
    let dir = root.join(".lfs");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join(oid), bytes).map_err(|e| e.to_string())?;
    w.stored.lock().unwrap().push(oid.to_string());
    Ok(())
}

fn put_object(
    oid: &str,
    body: &[u8],
    stream: &mut TcpStream,
    root: &Path,
    w: &Writes,
) -> std::io::Result<()> {
    w.body_bytes.fetch_add(body.len() as u64, Ordering::SeqCst);
    match store(root, oid, body, w) {
        Ok(()) => respond(stream, "200 OK", &[], b""),
        Err(m) => error(stream, "400 Bad Request", &m),
    }
}

fn put_part(
    rest: &str,
    body: &[u8],
    stream: &mut TcpStream,
    root: &Path,
    w: &Writes,
) -> std::io::Result<()> {
    w.body_bytes.fetch_add(body.len() as u64, Ordering::SeqCst);
    let Some((oid, n)) = rest.split_once('/') else {
        return error(stream, "404 Not Found", "bad part URL");
    };
    let dir = root.join(".lfs-parts").join(oid);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(n), body)?;
    let etag = format!("\"{}\"", &sha256_hex(body)[..32]);
    respond(stream, "200 OK", &[("ETag".into(), etag)], b"")
}

fn complete(
    oid: &str,
    body: &[u8],
    stream: &mut TcpStream,
    root: &Path,
    w: &Writes,
) -> std::io::Result<()> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return error(stream, "400 Bad Request", "malformed JSON");
    };
    if v["oid"] != oid {
        return error(
            stream,
            "400 Bad Request",
            "the completion names another oid",
        );
    }
    let Some(size) = pending_size(root, oid) else {
        return error(
            stream,
            "404 Not Found",
            "no upload in progress for this oid",
        );
    };
    let parts = v["parts"].as_array().cloned().unwrap_or_default();
    if parts.len() as u64 != size.div_ceil(PART_SIZE) {
        return error(
            stream,
            "400 Bad Request",
            &format!(
                "{} parts, expected {}",
                parts.len(),
                size.div_ceil(PART_SIZE)
            ),
        );
    }
    let mut whole = vec![];
    for (i, p) in parts.iter().enumerate() {
        let n = i + 1;
        if p["partNumber"].as_u64() != Some(n as u64) {
            return error(stream, "400 Bad Request", "parts out of order");
        }
        let Ok(bytes) = std::fs::read(root.join(".lfs-parts").join(oid).join(n.to_string())) else {
            return error(
                stream,
                "400 Bad Request",
                &format!("part {n} was not uploaded"),
            );
        };
        let etag = format!("\"{}\"", &sha256_hex(&bytes)[..32]);
        if p["etag"].as_str() != Some(etag.as_str()) {
            return error(
                stream,
                "400 Bad Request",
                &format!("part {n}: etag mismatch"),
            );
        }
        whole.extend_from_slice(&bytes);
    }
    match store(root, oid, &whole, w) {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(root.join(".lfs-parts").join(oid));
            json_reply(stream, "200 OK", &json!({"oid": oid, "size": size}))
        }
        Err(m) => error(stream, "400 Bad Request", &m),
    }
}

fn verify(body: &[u8], stream: &mut TcpStream, root: &Path) -> std::io::Result<()> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return error(stream, "400 Bad Request", "malformed JSON");
    };
    let (Some(oid), Some(size)) = (v["oid"].as_str(), v["size"].as_u64()) else {
        return error(stream, "400 Bad Request", "oid and size");
    };
    match std::fs::metadata(blob_path(root, oid)) {
        Ok(m) if m.len() == size => json_reply(stream, "200 OK", &json!({"oid": oid})),
        _ => error(stream, "404 Not Found", "object not stored"),
    }
}

fn commit(
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
    stream: &mut TcpStream,
    root: &Path,
    w: &Writes,
) -> std::io::Result<()> {
    let Some((kind, id, rev)) = api_target(path, "commit") else {
        return error(stream, "404 Not Found", "bad commit path");
    };
    if let Some(r) = missing(stream, root, kind, &id, &rev) {
        return r;
    }
    if header(headers, "content-type") != Some("application/x-ndjson") {
        return error(
            stream,
            "415 Unsupported Media Type",
            "a commit is application/x-ndjson",
        );
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut summary = None;
    // Checked whole before anything is written: a commit lands entirely or not at all.
    let mut writes: Vec<(String, Vec<u8>)> = vec![];
    let (mut files, mut lfs, mut deleted) = (vec![], vec![], vec![]);
    for (i, line) in body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            return error(
                stream,
                "400 Bad Request",
                &format!("line {}: not JSON", i + 1),
            );
        };
        let value = &v["value"];
        match (i, v["key"].as_str()) {
            (0, Some("header")) => summary = value["summary"].as_str().map(str::to_string),
            (0, _) | (_, Some("header")) => {
                return error(
                    stream,
                    "400 Bad Request",
                    "the header must be the first line, once",
                )
            }
            (_, Some("file")) => {
                let (Some(p), Some(c)) = (value["path"].as_str(), value["content"].as_str()) else {
                    return error(stream, "400 Bad Request", "file needs path and content");
                };
                if value["encoding"] != "base64" {
                    return error(stream, "400 Bad Request", "file encoding must be base64");
                }
                let Ok(bytes) = b64.decode(c) else {
                    return error(stream, "400 Bad Request", &format!("{p}: bad base64"));
                };
                files.push(p.to_string());
                writes.push((p.to_string(), bytes));
            }
            (_, Some("lfsFile")) => {
                let (Some(p), Some(oid), Some(size)) = (
                    value["path"].as_str(),
                    value["oid"].as_str(),
                    value["size"].as_u64(),
                ) else {
                    return error(stream, "400 Bad Request", "lfsFile needs path, oid, size");
                };
                if value["algo"] != "sha256" {
                    return error(stream, "400 Bad Request", "lfsFile algo must be sha256");
                }
                let Ok(bytes) = std::fs::read(blob_path(root, oid)) else {
                    return error(
                        stream,
                        "422 Unprocessable Entity",
                        &format!("{p}: LFS object {oid} is not stored"),
                    );
                };
                if bytes.len() as u64 != size || sha256_hex(&bytes) != oid {
                    return error(
                        stream,
                        "422 Unprocessable Entity",
                        &format!("{p}: LFS object {oid} has another size"),
                    );
                }
                lfs.push(p.to_string());
                writes.push((p.to_string(), bytes));
            }
            (_, Some("deletedFile")) => match value["path"].as_str() {
                Some(p) => deleted.push(p.to_string()),
                None => return error(stream, "400 Bad Request", "deletedFile needs path"),
            },
            (_, k) => return error(stream, "400 Bad Request", &format!("unknown key {k:?}")),
        }
    }
    let Some(summary) = summary else {
        return error(stream, "400 Bad Request", "no header");
    };
    let dir = rev_dir(root, kind, &id, &rev);
    for p in &deleted {
        let _ = std::fs::remove_file(dir.join(p));
    }
    for (p, bytes) in &writes {
        let dst = dir.join(p);
        std::fs::create_dir_all(dst.parent().unwrap_or(&dir))?;
        std::fs::write(dst, bytes)?;
    }
    let mut commits = w.commits.lock().unwrap();
    let oid = hex(&Sha256::digest(format!("{id}@{rev}#{}", commits.len()).as_bytes())[..20]);
    let log = repo_dir(root, kind, &id).join(".commits");
    std::fs::create_dir_all(&log)?;
    std::fs::write(log.join(rev.replace('/', "__")), &oid)?;
    commits.push(Commit {
        repo: format!("{kind}/{id}"),
        revision: rev.clone(),
        summary,
        files,
        lfs,
        deleted,
    });
    let base = &w.endpoint;
    json_reply(
        stream,
        "200 OK",
        &json!({"success": true, "commitOid": oid, "commitUrl": format!("{base}/{id}/commit/{oid}")}),
    )
}
