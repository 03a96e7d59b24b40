//! Plans against a real S3-protocol server (moto on 127.0.0.1, started by `scripts/s3-server.sh`):
//! parquet in and out of `s3://` with multipart uploads, `conala sql` and `conala status` over it,
//! resume after SIGKILL, and four shard processes killed and restarted that end up exactly equal to
//! one process. Credentials go through the usual AWS variables, and never into anything written.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use conala::model::init::Family;

const SECRET: &str = "conala-aws-Secret-8c1f2e4d";
const TOKEN: &str = "hf_conalaToken9d7e3a1b5c";

struct Env(Vec<(String, String)>);

impl Env {
    fn new(server: &S3Server) -> Env {
        let mut vars = server.env(SECRET);
        vars.push(("HF_TOKEN".into(), TOKEN.into()));
        vars.push(("HF_HUB_OFFLINE".into(), "1".into()));
        Env(vars)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(binary());
        cmd.args(args)
            .current_dir(repo_root())
            .env("NO_PROXY", "127.0.0.1,localhost");
        for (k, v) in &self.0 {
            cmd.env(k, v);
        }
        cmd
    }

    /// Run to the end: (ok, stdout, stderr); every output is kept for the secrets check.
    fn run(&self, args: &[&str], seen: &mut String) -> (bool, String, String) {
        let out = self.command(args).output().unwrap();
        let (o, e) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        seen.push_str(&o);
        seen.push_str(&e);
        (out.status.success(), o, e)
    }

    fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// `query` over `table` (registered as `o`) as CSV, which must succeed.
    fn sql(&self, table: &str, query: &str, seen: &mut String) -> String {
        let (ok, out, err) = self.run(
            &[
                "sql",
                "--table",
                &format!("o={table}"),
                "--format",
                "csv",
                query,
            ],
            seen,
        );
        assert!(ok, "{err}");
        out
    }

    /// Committed rows of each shard (`conala status`), by shard label (`all`, `0/4`, ...).
    fn shard_rows(&self, output: &str) -> Vec<(String, u64)> {
        let out = self.command(&["status", output]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                (w.next()? == "shard").then_some(())?;
                let shard = w.next()?.to_string();
                let _state = w.next()?;
                Some((shard, w.next()?.parse().unwrap_or(0)))
            })
            .collect()
    }
}

fn gen_plan_text(source: &str, out: &str, extra_source: &str, model: &Path) -> String {
    format!(
        r#"name: gen-s3
model: {{ path: "{model}" }}
steps:
  - source: {{ uri: "{source}"{extra_source} }}
  - format: {{ input: "{{intent}}\n{{snippet}}" }}
  - tokenize: {{ input: input, max_input_tokens: 48 }}
  - generate: {{ output: prediction, max_new_tokens: 24, min_new_tokens: 24, window_rows: 250, max_batch_rows: 25 }}
  - write: {{ path: "{out}", rows_per_file: 500, compression: none }}
"#,
        model = model.display()
    )
}

/// `select row_id, prediction ... order by row_id` as CSV.
fn rows_csv(env: &Env, table: &str, seen: &mut String) -> String {
    env.sql(
        table,
        "select row_id, prediction from o order by row_id",
        seen,
    )
}

/// Wait (while `child` runs) until `ready` holds; `ready` runs `conala status`, so poll gently.
fn wait_until(child: &mut Child, what: &str, ready: impl Fn() -> bool) {
    wait_while_running(child, what, Duration::from_millis(150), ready);
}

/// Every object in the bucket, for the secrets check.
async fn bucket_text(server: &S3Server) -> String {
    use futures::TryStreamExt;
    use object_store::{ObjectStore, ObjectStoreExt};
    let store = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(&server.endpoint)
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_bucket_name(S3_BUCKET)
        .with_access_key_id("conala-test-key")
        .with_secret_access_key(SECRET)
        .build()
        .unwrap();
    let metas: Vec<_> = store.list(None).try_collect().await.unwrap();
    assert!(!metas.is_empty());
    let mut all = String::new();
    for m in metas {
        let bytes = store.get(&m.location).await.unwrap().bytes().await.unwrap();
        all.push_str(&String::from_utf8_lossy(&bytes));
    }
    all
}

fn local_text(dir: &Path, out: &mut String) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            local_text(&p, out);
        } else if let Ok(b) = std::fs::read(&p) {
            out.push_str(&String::from_utf8_lossy(&b));
        }
    }
}

#[test]
fn s3_plans_round_trip_resume_after_sigkill_and_keep_secrets() {
    let tmp = tempfile::tempdir().unwrap();
    let server = S3Server::start(tmp.path());
    let env = Env::new(&server);
    let mut seen = String::new();
    let model = tiny_model(tmp.path(), Family::FlanT5);
    // Input rows into S3: 16 copies of the 500 test rows, written by a plan (without their row ids:
    // the generate plan numbers the rows it reads).
    let prep = tmp.path().join("prep.yaml");
    std::fs::write(
        &prep,
        format!(
            "name: prep\nsteps:\n  - source: {{ uri: \"{}\", config: curated, split: test, repeat: 16 }}\n  - write: {{ path: \"s3://{S3_BUCKET}/input\", rows_per_file: 2000, drop: [row_id] }}\n",
            data_dir().display()
        ),
    )
    .unwrap();
    let (ok, out, err) = env.run(&["run", prep.to_str().unwrap()], &mut seen);
    assert!(ok, "{err}");
    assert!(out.contains("wrote 8000 rows"), "{out}");
    // Generate from S3 into S3; killed once it has committed two parts, then resumed.
    let output = format!("s3://{S3_BUCKET}/out");
    let plan = tmp.path().join("gen.yaml");
    std::fs::write(
        &plan,
        gen_plan_text(&format!("s3://{S3_BUCKET}/input"), &output, "", &model),
    )
    .unwrap();
    let mut child = env.spawn(&["run", plan.to_str().unwrap()]);
    wait_until(&mut child, "two committed parts", || {
        env.shard_rows(&output)
            .first()
            .is_some_and(|(_, rows)| *rows >= 1000)
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let (ok, stdout, err) = env.run(&["status", &output], &mut seen);
    assert!(!ok && stdout.contains("incomplete"), "{stdout}{err}");
    let (ok, out, err) = env.run(&["run", plan.to_str().unwrap()], &mut seen);
    assert!(ok, "{err}");
    assert!(out.contains("rows kept from earlier runs"), "{out}");
    let out = env.sql(
        &output,
        "select count(*), count(distinct row_id), count(prediction) from o",
        &mut seen,
    );
    assert_eq!(out.lines().nth(1), Some("8000,8000,8000"), "{out}");
    let (ok, stdout, err) = env.run(&["status", &output], &mut seen);
    assert!(ok, "{err}");
    assert!(stdout.contains("committed (_SUCCESS)"), "{stdout}");
    // Parts bigger than the multipart chunk went up as multipart uploads.
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(
        log.contains("uploads") && log.contains("uploadId"),
        "no multipart upload"
    );
    // No secret anywhere: the bucket, the local files, the commands' output.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut everything = rt.block_on(bucket_text(&server));
    local_text(tmp.path(), &mut everything);
    everything.push_str(&seen);
    for secret in [SECRET, TOKEN] {
        assert!(
            !everything.contains(secret),
            "{secret} was written somewhere"
        );
    }
}

/// Four shard processes into one `s3://` output, two of them SIGKILLed at random points and
/// restarted: the union holds every row once and equals one process's output row for row.
#[test]
fn four_shards_killed_and_restarted_equal_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let server = S3Server::start(tmp.path());
    let env = Env::new(&server);
    let mut seen = String::new();
    let model = tiny_model(tmp.path(), Family::FlanT5);
    let source = data_dir().display().to_string();
    let extra = ", config: curated, split: test, repeat: 6";
    let single = tmp.path().join("single");
    let single_plan = tmp.path().join("single.yaml");
    std::fs::write(
        &single_plan,
        gen_plan_text(&source, &single.display().to_string(), extra, &model),
    )
    .unwrap();
    let (ok, _, err) = env.run(&["run", single_plan.to_str().unwrap()], &mut seen);
    assert!(ok, "{err}");
    let output = format!("s3://{S3_BUCKET}/sharded");
    let plan = tmp.path().join("sharded.yaml");
    std::fs::write(&plan, gen_plan_text(&source, &output, extra, &model)).unwrap();
    let shard_args = |i: usize| {
        vec![
            "run".to_string(),
            plan.display().to_string(),
            "--shard".into(),
            format!("{i}/4"),
        ]
    };
    let spawn = |i: usize| {
        let a = shard_args(i);
        env.spawn(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let mut children: Vec<Child> = (0..4).map(spawn).collect();
    // Which two die, and how long after their first commit: from the clock, so runs differ.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as usize;
    let first = nanos % 4;
    let victims = [first, (first + 1 + (nanos / 4) % 3) % 4];
    for (k, &v) in victims.iter().enumerate() {
        let label = format!("{v}/4");
        wait_until(&mut children[v], &format!("shard {label} commits"), || {
            env.shard_rows(&output)
                .iter()
                .any(|(s, rows)| *s == label && *rows > 0)
        });
        std::thread::sleep(Duration::from_millis(((nanos >> (8 * k)) % 400) as u64));
        children[v].kill().unwrap(); // SIGKILL
        children[v].wait().unwrap();
    }
    for &v in &victims {
        children[v] = spawn(v);
    }
    for (i, c) in children.iter_mut().enumerate() {
        assert!(c.wait().unwrap().success(), "shard {i}/4 failed");
    }
    let (ok, stdout, err) = env.run(&["status", &output], &mut seen);
    assert!(ok, "{stdout}{err}");
    assert!(
        stdout.contains("4 of 4 shards complete, 3000 rows, committed (_SUCCESS)"),
        "{stdout}"
    );
    let want = rows_csv(&env, &single.display().to_string(), &mut seen);
    let got = rows_csv(&env, &output, &mut seen);
    assert_eq!(want.lines().count(), 3001);
    assert!(got == want, "the sharded output differs from one process's");
}

/// The store goes away mid-run: the run retries with backoff, a bounded number of times, then fails
/// naming the object; the store comes back and the rerun completes the output exactly.
#[test]
fn a_store_that_goes_away_fails_after_bounded_retries_and_the_rerun_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let server = S3Server::start(tmp.path());
    let port: u16 = server.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let outage = Outage::start(port);
    let mut env = Env::new(&server);
    for (k, v) in [
        ("AWS_ENDPOINT", outage.endpoint.as_str()),
        ("CONALA_STORE_RETRIES", "3"),
        ("CONALA_STORE_RETRY_SECONDS", "5"),
    ] {
        env.0.retain(|(name, _)| name != k);
        env.0.push((k.to_string(), v.to_string()));
    }
    let model = tiny_model(tmp.path(), Family::FlanT5);
    let output = format!("s3://{S3_BUCKET}/flaky");
    let plan = tmp.path().join("flaky.yaml");
    let source = data_dir().display().to_string();
    std::fs::write(
        &plan,
        gen_plan_text(
            &source,
            &output,
            ", config: curated, split: test, repeat: 16",
            &model,
        ),
    )
    .unwrap();
    let mut child = env
        .command(&["run", plan.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(&mut child, "two committed parts", || {
        env.shard_rows(&output)
            .first()
            .is_some_and(|(_, rows)| *rows >= 1000)
    });
    outage.down();
    let went_down = Instant::now();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the run must fail: {stderr}");
    assert!(
        went_down.elapsed() < Duration::from_secs(90),
        "retries are bounded"
    );
    assert!(
        stderr.contains(&format!("s3://{S3_BUCKET}/flaky")) && stderr.contains("retries"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    outage.up();
    let mut seen = String::new();
    let (ok, out, err) = env.run(&["run", plan.to_str().unwrap()], &mut seen);
    assert!(ok, "{err}");
    assert!(out.contains("rows kept from earlier runs"), "{out}");
    let out = env.sql(
        &output,
        "select count(*), count(distinct row_id) from o",
        &mut seen,
    );
    assert_eq!(out.lines().nth(1), Some("8000,8000"), "{out}");
}
