//! Shared test helpers: a local stand-in for the Hugging Face Hub, paths to shipped data, and small
//! builders for contexts and plans.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use conala::context::Context;
use conala::hub::HubConfig;
use conala::model::init::{config, write_random_model, Family, Size};
use sha2::{Digest, Sha256};

mod hub_writes;
#[allow(unused_imports)]
pub use hub_writes::{
    Commit, Fault, FaultKind, Writes, LFS_THRESHOLD, MULTIPART_THRESHOLD, PART_SIZE,
};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn data_dir() -> PathBuf {
    repo_root().join("data/conala")
}

pub fn tokenizer_path() -> PathBuf {
    repo_root().join("data/tokenizer/conala-unigram-8k.json")
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_conala"))
}

/// A context that talks to `endpoint` (or nothing) with its own cache folder.
pub fn context(endpoint: Option<&str>, cache: &Path, offline: bool) -> Context {
    Context::new(HubConfig {
        endpoint: endpoint.unwrap_or("http://127.0.0.1:9").to_string(),
        cache_dir: cache.to_path_buf(),
        token: None,
        offline,
        progress: false,
    })
    .expect("context")
}

pub fn context_with_token(endpoint: &str, cache: &Path, token: &str) -> Context {
    Context::new(HubConfig {
        endpoint: endpoint.to_string(),
        cache_dir: cache.to_path_buf(),
        token: Some(token.to_string()),
        offline: false,
        progress: false,
    })
    .expect("context")
}

/// A request the stand-in saw: method, path, Authorization header.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub auth: Option<String>,
}

/// A stand-in for the Hub on 127.0.0.1, serving repositories laid out as
/// `ROOT/{datasets,models}/ID/REVISION/files…` (a `/` in a revision is written `__` in the folder
/// name). It answers the calls hf-hub makes: `GET /api/{datasets,models}/ID/revision/REV` (the file
/// listing) and `GET [/datasets]/ID/resolve/REV/FILE` with Range support, etag and x-repo-commit. A
/// repo folder with a `.token` file requires `Authorization: Bearer <token>`. Its write side (repo
/// creation, preupload, the LFS batch API with basic and multipart transfers, the NDJSON commit) is
/// in `hub_writes`: what a push commits is served back by the read side.
pub struct HubServer {
    pub endpoint: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// While set, every request gets `503 Service Unavailable` (counted in `refused`).
    pub down: Arc<std::sync::atomic::AtomicBool>,
    pub refused: Arc<std::sync::atomic::AtomicUsize>,
    /// The write side's state: required token, injected faults, what was stored and committed.
    pub writes: Arc<Writes>,
}

impl HubServer {
    pub fn start(root: PathBuf) -> HubServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = Arc::new(Mutex::new(vec![]));
        let s2 = seen.clone();
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (down2, refused2) = (down.clone(), refused.clone());
        let writes = Arc::new(Writes::new(&endpoint));
        let writes2 = writes.clone();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                if down2.load(std::sync::atomic::Ordering::SeqCst) {
                    refused2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let mut line = String::new();
                    let _ = BufReader::new(&stream).read_line(&mut line);
                    let _ = stream.write_all(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    continue;
                }
                let root = root.clone();
                let seen = s2.clone();
                let writes = writes2.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &root, &seen, &writes);
                });
            }
        });
        HubServer {
            endpoint,
            seen,
            down,
            refused,
            writes,
        }
    }
}

/// The commit a revision is at: the last push's, else one derived from the name.
fn commit_of(repo: &Path, id: &str, rev: &str) -> String {
    std::fs::read_to_string(repo.join(".commits").join(rev.replace('/', "__")))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| commit_for(&format!("{id}@{rev}")))
}

fn commit_for(rev: &str) -> String {
    let h = Sha256::digest(rev.as_bytes());
    h.iter().take(20).map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn list_files(dir: &Path, base: &Path, out: &mut Vec<String>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                list_files(&p, base, out);
            } else if let Ok(rel) = p.strip_prefix(base) {
                let rel = rel.to_string_lossy().to_string();
                if !rel.starts_with('.') {
                    out.push(rel);
                }
            }
        }
    }
}

pub(crate) fn respond(
    stream: &mut TcpStream,
    status: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

fn serve(
    mut stream: TcpStream,
    root: &Path,
    seen: &Mutex<Vec<Seen>>,
    writes: &Writes,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    let mut range: Option<(u64, Option<u64>)> = None;
    let mut auth = None;
    let mut headers = vec![];
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("range: bytes=") {
            let (a, b) = v.trim().split_once('-').unwrap_or(("0", ""));
            range = Some((a.parse().unwrap_or(0), b.parse().ok()));
        }
        if lower.starts_with("authorization:") {
            auth = Some(line["authorization:".len()..].trim().to_string());
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let method = first.split_whitespace().next().unwrap_or("GET").to_string();
    let path = first.split_whitespace().nth(1).unwrap_or("/").to_string();
    seen.lock().unwrap().push(Seen {
        method: method.clone(),
        path: path.clone(),
        auth: auth.clone(),
    });
    if method != "GET" && method != "HEAD" {
        return hub_writes::handle(
            &method,
            &path,
            &headers,
            &mut reader,
            &mut stream,
            root,
            writes,
        );
    }
    if let Some(status) = writes.fault_status(&path) {
        return respond(&mut stream, &status, &[], b"{\"error\":\"injected fault\"}");
    }
    let not_found = |s: &mut TcpStream| {
        respond(
            s,
            "404 Not Found",
            &[],
            b"{\"error\":\"Repository not found\"}",
        )
    };

    // Which repo, revision and file?
    let (kind, rest) = if let Some(r) = path.strip_prefix("/api/datasets/") {
        ("datasets", format!("api:{r}"))
    } else if let Some(r) = path.strip_prefix("/api/models/") {
        ("models", format!("api:{r}"))
    } else if let Some(r) = path.strip_prefix("/datasets/") {
        ("datasets", r.to_string())
    } else {
        ("models", path.trim_start_matches('/').to_string())
    };
    let (id, rev, file) = if let Some(r) = rest.strip_prefix("api:") {
        let Some((id, rev)) = r.split_once("/revision/") else {
            return not_found(&mut stream);
        };
        (
            id.to_string(),
            decode(rev.split('?').next().unwrap_or("")),
            None,
        )
    } else {
        let Some((id, tail)) = rest.split_once("/resolve/") else {
            return not_found(&mut stream);
        };
        let Some((rev, file)) = tail.split_once('/') else {
            return not_found(&mut stream);
        };
        (id.to_string(), decode(rev), Some(decode(file)))
    };
    let repo = root.join(kind).join(&id);
    if let Ok(token) = std::fs::read_to_string(repo.join(".token")) {
        if auth.as_deref() != Some(&format!("Bearer {}", token.trim())) {
            return respond(
                &mut stream,
                "401 Unauthorized",
                &[],
                b"{\"error\":\"gated\"}",
            );
        }
    }
    let dir = repo.join(rev.replace('/', "__"));
    if !dir.is_dir() {
        return not_found(&mut stream);
    }
    let commit = commit_of(&repo, &id, &rev);
    match file {
        None => {
            let mut files = vec![];
            list_files(&dir, &dir, &mut files);
            files.sort();
            let siblings: Vec<String> = files
                .iter()
                .map(|f| format!("{{\"rfilename\":\"{f}\"}}"))
                .collect();
            let body = format!(
                "{{\"id\":\"{id}\",\"sha\":\"{commit}\",\"siblings\":[{}]}}",
                siblings.join(",")
            );
            respond(
                &mut stream,
                "200 OK",
                &[("Content-Type".into(), "application/json".into())],
                body.as_bytes(),
            )
        }
        Some(f) => {
            let Ok(bytes) = std::fs::read(dir.join(&f)) else {
                return not_found(&mut stream);
            };
            let etag = format!(
                "\"{}\"",
                Sha256::digest(&bytes)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            );
            let total = bytes.len() as u64;
            let mut headers = vec![
                ("ETag".to_string(), etag),
                ("X-Repo-Commit".to_string(), commit),
            ];
            match range {
                Some((a, b)) if total > 0 => {
                    let end = b.unwrap_or(total - 1).min(total - 1);
                    headers.push(("Content-Range".into(), format!("bytes {a}-{end}/{total}")));
                    respond(
                        &mut stream,
                        "206 Partial Content",
                        &headers,
                        &bytes[a as usize..=end as usize],
                    )
                }
                _ => respond(&mut stream, "200 OK", &headers, &bytes),
            }
        }
    }
}

/// Lay out a dataset repo for the stand-in: `files` are (path in repo, source file) at `revision`.
pub fn put_repo_file(root: &Path, kind: &str, id: &str, revision: &str, path: &str, src: &Path) {
    let dst = root
        .join(kind)
        .join(id)
        .join(revision.replace('/', "__"))
        .join(path);
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    std::fs::copy(src, &dst).unwrap();
}

pub fn put_repo_bytes(root: &Path, kind: &str, id: &str, revision: &str, path: &str, bytes: &[u8]) {
    let dst = root
        .join(kind)
        .join(id)
        .join(revision.replace('/', "__"))
        .join(path);
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    std::fs::write(&dst, bytes).unwrap();
}

/// Run the `conala` binary; returns (status ok, stdout, stderr).
pub fn run_cli(args: &[&str], envs: &[(&str, &str)], cwd: &Path) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(binary());
    cmd.args(args)
        .current_dir(cwd)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env_remove("HF_TOKEN");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run conala");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A tiny random model of `family` with the shipped tokenizer, in `dir`.
pub fn tiny_model(dir: &Path, family: Family) -> PathBuf {
    let vocab = conala::tokenizer::load(&tokenizer_path())
        .unwrap()
        .get_vocab_size(true);
    tiny_model_with_vocab(dir, family, vocab)
}

/// A tiny random model whose vocabulary is `vocab` (the shipped tokenizer goes with it regardless).
pub fn tiny_model_with_vocab(dir: &Path, family: Family, vocab: usize) -> PathBuf {
    let out = dir.join(format!("model-{family:?}-{vocab}"));
    write_random_model(
        &config(family, Size::Tiny, vocab),
        3,
        &tokenizer_path(),
        &out,
    )
    .unwrap();
    out
}

/// A generate plan over the shipped test rows into `out`.
pub fn gen_plan(model: &Path, out: &Path, generate: &str, extra_source: &str) -> String {
    format!(
        r#"name: gen
model: {{ path: "{model}" }}
steps:
  - source: {{ uri: "{data}", config: curated, split: test{extra_source} }}
  - format: {{ input: "{{intent}}\n{{snippet}}" }}
  - tokenize: {{ input: input, max_input_tokens: 48 }}
  - generate: {{ output: prediction, {generate} }}
  - write: {{ path: "{out}", rows_per_file: 200 }}
"#,
        model = model.display(),
        data = data_dir().display(),
        out = out.display()
    )
}

/// A train plan on 300 shipped curated rows (eval on 40 test rows) writing to `out`; `train` is more
/// keys of the train step, each line indented by six spaces.
pub fn train_plan(model: &Path, out: &Path, train: &str) -> String {
    format!(
        r#"name: train
model: {{ path: "{model}" }}
steps:
  - source: {{ uri: "{data}", config: curated, split: train, limit: 300 }}
  - filter: "intent IS NOT NULL AND rewritten_intent IS NOT NULL"
  - format: {{ input: "{{intent}}\n{{snippet}}" }}
  - tokenize: {{ input: input, target: rewritten_intent, max_input_tokens: 48, max_target_tokens: 24 }}
  - train:
      eval: {{ source: {{ uri: "{data}", config: curated, split: test, limit: 40 }} }}
      output: "{out}"
      {train}
"#,
        model = model.display(),
        data = data_dir().display(),
        out = out.display()
    )
}

/// A real S3-protocol server (moto, installed by `scripts/s3-server.sh`) on 127.0.0.1 with bucket
/// `conala-test`; stopped when dropped. Multipart parts may be as small as 64 KiB, so small test
/// outputs exercise multipart uploads.
pub struct S3Server {
    pub endpoint: String,
    pub log: PathBuf,
    child: std::process::Child,
}

pub const S3_BUCKET: &str = "conala-test";

impl S3Server {
    pub fn start(dir: &Path) -> S3Server {
        let script = repo_root().join("scripts/s3-server.sh");
        let ok = std::process::Command::new(&script)
            .arg("install")
            .status()
            .expect("scripts/s3-server.sh install")
            .success();
        assert!(ok, "installing the S3 server failed");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = dir.join("s3-server.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(&script)
            .args(["serve", &port.to_string()])
            .env("S3_UPLOAD_PART_MIN_SIZE", "65536")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start the S3 server");
        let server = S3Server {
            endpoint: format!("http://127.0.0.1:{port}"),
            log,
            child,
        };
        let started = std::time::Instant::now();
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                let req = format!(
                    "PUT /{S3_BUCKET} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                s.write_all(req.as_bytes()).unwrap();
                let mut status = String::new();
                BufReader::new(s).read_line(&mut status).unwrap();
                assert!(status.contains(" 200 "), "creating the bucket: {status}");
                return server;
            }
            assert!(
                started.elapsed().as_secs() < 60,
                "the S3 server did not start; see {}",
                server.log.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// The AWS environment a process needs to reach this server.
    pub fn env(&self, secret: &str) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", self.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", "conala-test-key"),
            ("AWS_SECRET_ACCESS_KEY", secret),
            ("CONALA_MULTIPART_CHUNK_BYTES", "65536"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP forwarder to a server on 127.0.0.1 that can be switched off (new connections are closed at
/// once, open ones cut) and on again on the same port: a store that goes away mid-run and comes back.
pub struct Outage {
    pub endpoint: String,
    up: Arc<std::sync::atomic::AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Outage {
    pub fn start(target_port: u16) -> Outage {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let up = Arc::new(AtomicBool::new(true));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(vec![]));
        let (up2, open2) = (up.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if !up2.load(Ordering::SeqCst) {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else {
                    continue;
                };
                let mut open = open2.lock().unwrap();
                for s in [&client, &server] {
                    if let Ok(c) = s.try_clone() {
                        open.push(c);
                    }
                }
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Outage { endpoint, up, open }
    }

    /// The server is unreachable: open connections are cut, new ones closed.
    pub fn down(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn up(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Poll `ready` every `poll` while `child` runs; fails if the child ends first or 300 s pass.
pub fn wait_while_running(
    child: &mut std::process::Child,
    what: &str,
    poll: std::time::Duration,
    ready: impl Fn() -> bool,
) {
    let started = std::time::Instant::now();
    while !ready() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(300),
            "{what}: timed out"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "{what}: the run ended first"
        );
        std::thread::sleep(poll);
    }
}
