//! An output folder shared by runs and readers: one writer at a time (the lease), resumes only into
//! this plan's output, overwrites that readers see all at once, signals that stop cleanly, readers
//! that see only committed parts, and `conala status` with the `_SUCCESS` commit marker.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use conala::model::init::Family;

/// A generate plan over `repeat` copies of the 500 test rows, written in parts of 256 rows.
fn plan_file(
    dir: &Path,
    model: &Path,
    out: &Path,
    name: &str,
    repeat: u64,
    extra: &str,
) -> PathBuf {
    let plan = gen_plan(
        model,
        out,
        &format!(
            "max_new_tokens: 16, min_new_tokens: 16, window_rows: 256, max_batch_rows: 32{extra}"
        ),
        &format!(", repeat: {repeat}"),
    )
    .replace("rows_per_file: 200", "rows_per_file: 256");
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, plan).unwrap();
    path
}

fn spawn(args: &[&str]) -> Child {
    Command::new(binary())
        .args(args)
        .current_dir(repo_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> (std::process::ExitStatus, String, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn manifest(out: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("_manifest.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn parquet_files(out: &Path) -> usize {
    std::fs::read_dir(out)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".parquet"))
                .count()
        })
        .unwrap_or(0)
}

/// Wait (while `child` runs) until `ready` holds.
fn wait_for(child: &mut Child, what: &str, ready: impl Fn() -> bool) {
    wait_while_running(child, what, Duration::from_millis(20), ready);
}

fn committed_parts(out: &Path) -> usize {
    manifest(out).map_or(0, |m| m["parts"].as_array().map_or(0, |p| p.len()))
}

fn signal(child: &Child, name: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{name}");
}

/// `select count(*), count(distinct row_id)` over the folder, through `conala sql`.
fn counts(out: &Path) -> (String, String) {
    let table = format!("o={}", out.display());
    let (ok, stdout, stderr) = run_cli(
        &[
            "sql",
            "--table",
            &table,
            "--format",
            "csv",
            "select count(*), count(distinct row_id) from o",
        ],
        &[],
        &repo_root(),
    );
    assert!(ok, "{stderr}");
    (stdout.lines().nth(1).unwrap_or("").to_string(), stderr)
}

/// Two runs on one plan and output: the second refuses while the first holds the lease (in either
/// write mode), and the output holds every row once.
#[test]
fn a_second_run_on_the_same_output_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), Family::FlanT5);
    let out = tmp.path().join("out");
    let plan = plan_file(tmp.path(), &model, &out, "p", 10, "");
    let mut first = spawn(&["run", plan.to_str().unwrap()]);
    wait_for(&mut first, "lease", || out.join("_lease.json").exists());
    for set in ["write.mode=auto", "write.mode=overwrite"] {
        let (ok, _, err) = run_cli(
            &["run", plan.to_str().unwrap(), "--set", set],
            &[],
            &repo_root(),
        );
        assert!(!ok, "{set}: the second run must refuse");
        assert!(
            err.contains("is being written by another run") && err.contains("duplicate rows"),
            "{set}: {err}"
        );
    }
    let (status, _, err) = finish(first);
    assert!(status.success(), "{err}");
    assert!(!out.join("_lease.json").exists(), "the lease is released");
    assert_eq!(counts(&out).0, "5000,5000");
}

/// Resuming into a folder whose manifest is another plan's refuses, naming the difference, and
/// changes nothing there.
#[test]
fn resume_refuses_another_plans_output() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), Family::FlanT5);
    let out = tmp.path().join("out");
    let plan = plan_file(tmp.path(), &model, &out, "p", 1, "");
    let (ok, _, err) = run_cli(&["run", plan.to_str().unwrap()], &[], &repo_root());
    assert!(ok, "{err}");
    let before = std::fs::read_to_string(out.join("_manifest.json")).unwrap();
    let (ok, _, err) = run_cli(
        &[
            "run",
            plan.to_str().unwrap(),
            "--set",
            "generate.max_new_tokens=32",
        ],
        &[],
        &repo_root(),
    );
    assert!(!ok);
    assert!(
        err.contains("refusing to resume") && err.contains("max_new_tokens: 16 -> 32"),
        "{err}"
    );
    // A plan without `generate` (another plan's rows, no prediction column).
    let prep = tmp.path().join("prep.yaml");
    std::fs::write(
        &prep,
        format!(
            "name: prep\nsteps:\n  - source: {{ uri: \"{}\", config: curated, split: test }}\n  - write: {{ path: \"{}\", mode: resume }}\n",
            data_dir().display(),
            out.display()
        ),
    )
    .unwrap();
    let (ok, _, err) = run_cli(&["run", prep.to_str().unwrap()], &[], &repo_root());
    assert!(!ok);
    assert!(
        err.contains("refusing to resume") && err.contains("`gen`"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("_manifest.json")).unwrap(),
        before
    );
    // Runtime settings may change between runs: this resumes (nothing left to do).
    let (ok, stdout, err) = run_cli(
        &[
            "run",
            plan.to_str().unwrap(),
            "--set",
            "generate.max_batch_rows=8",
        ],
        &[],
        &repo_root(),
    );
    assert!(ok, "{err}");
    assert!(
        stdout.contains("500 rows kept from earlier runs"),
        "{stdout}"
    );
}

/// SIGTERM: the rows in flight are written and committed, the process exits 143 saying how to
/// resume, the output is marked incomplete, and the rerun completes it exactly.
#[test]
fn sigterm_stops_cleanly_and_the_rerun_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), Family::FlanT5);
    let out = tmp.path().join("out");
    let plan = plan_file(tmp.path(), &model, &out, "p", 8, "");
    let mut child = spawn(&["run", plan.to_str().unwrap()]);
    wait_for(&mut child, "two committed parts", || {
        committed_parts(&out) >= 2
    });
    signal(&child, "TERM");
    let (status, _, err) = finish(child);
    assert_eq!(status.code(), Some(143), "{err}");
    assert!(err.contains("SIGTERM received"), "{err}");
    assert!(
        err.contains("stopped by SIGTERM") && err.contains("run the same command again"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let m = manifest(&out).unwrap();
    assert_eq!(m["complete"], false);
    assert_eq!(parquet_files(&out), committed_parts(&out), "no stray part");
    let (ok, stdout, err) = run_cli(&["status", out.to_str().unwrap()], &[], &repo_root());
    assert!(!ok, "an incomplete output is not a success");
    assert!(
        stdout.contains("incomplete") && err.contains("is incomplete"),
        "{stdout}{err}"
    );
    let (rows, warning) = counts(&out);
    let (n, distinct) = rows.split_once(',').unwrap();
    assert_eq!(n, distinct);
    assert!(warning.contains("the output is incomplete"), "{warning}");
    let (ok, _, err) = run_cli(&["run", plan.to_str().unwrap()], &[], &repo_root());
    assert!(ok, "{err}");
    assert_eq!(counts(&out).0, "4000,4000");
    let (ok, stdout, err) = run_cli(&["status", out.to_str().unwrap()], &[], &repo_root());
    assert!(ok, "{err}");
    assert!(
        stdout.contains("1 of 1 shards complete, 4000 rows, committed (_SUCCESS)"),
        "{stdout}"
    );
}

/// `mode: overwrite` stopped part-way (SIGTERM, then SIGKILL): readers see the old output whole, never
/// a mix, and a default-mode rerun keeps no stray of the stopped runs.
#[test]
fn an_interrupted_overwrite_leaves_the_old_output_to_readers() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), Family::FlanT5);
    let out = tmp.path().join("out");
    let plan = plan_file(tmp.path(), &model, &out, "p", 6, "");
    let (ok, _, err) = run_cli(&["run", plan.to_str().unwrap()], &[], &repo_root());
    assert!(ok, "{err}");
    let old = parquet_files(&out);
    for (sig, code) in [("TERM", Some(143)), ("KILL", None)] {
        let mut child = spawn(&[
            "run",
            plan.to_str().unwrap(),
            "--set",
            "write.mode=overwrite",
        ]);
        wait_for(&mut child, "a new part", || parquet_files(&out) >= old + 2);
        signal(&child, sig);
        let (status, _, err) = finish(child);
        assert_eq!(status.code(), code, "{err}");
        if sig == "TERM" {
            assert!(err.contains("the earlier output is unchanged"), "{err}");
        }
        assert_eq!(counts(&out).0, "3000,3000", "after SIG{sig}");
    }
    assert!(parquet_files(&out) > old, "SIGKILL left strays behind");
    let (ok, stdout, err) = run_cli(&["run", plan.to_str().unwrap()], &[], &repo_root());
    assert!(ok, "{err}");
    assert!(
        stdout.contains("3000 rows kept from earlier runs"),
        "{stdout}"
    );
    assert_eq!(parquet_files(&out), old, "the strays are gone");
    assert_eq!(counts(&out).0, "3000,3000");
}

/// A stray parquet file (another schema, null row ids) in an output folder does not break readers:
/// they read the parts the manifest commits.
#[test]
fn a_stray_parquet_file_is_not_read() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), Family::FlanT5);
    let out = tmp.path().join("out");
    let plan = plan_file(tmp.path(), &model, &out, "p", 1, "");
    let (ok, _, err) = run_cli(&["run", plan.to_str().unwrap()], &[], &repo_root());
    assert!(ok, "{err}");
    let (ok, _, err) = run_cli(
        &[
            "sql",
            "--table",
            &format!("o={}", out.display()),
            "--format",
            "parquet",
            "--output",
            out.join("stray.parquet").to_str().unwrap(),
            "select cast(null as bigint) as row_id, 'x' as other from o limit 3",
        ],
        &[],
        &repo_root(),
    );
    assert!(ok, "{err}");
    assert_eq!(counts(&out).0, "500,500");
}

/// Shards write into one folder; `conala status` lists them complete, incomplete or missing; the
/// worker that completes the last one commits the output; a run with another shard count refuses.
#[test]
fn status_follows_the_shards_to_the_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), Family::FlanT5);
    let out = tmp.path().join("out");
    let plan = plan_file(tmp.path(), &model, &out, "p", 1, "");
    let run_shard = |shard: &str| {
        run_cli(
            &["run", plan.to_str().unwrap(), "--shard", shard],
            &[],
            &repo_root(),
        )
    };
    for shard in ["0/3", "2/3"] {
        let (ok, _, err) = run_shard(shard);
        assert!(ok, "{err}");
    }
    let (ok, stdout, err) = run_cli(&["status", out.to_str().unwrap()], &[], &repo_root());
    assert!(!ok);
    assert!(stdout.contains("shard 1/3       missing"), "{stdout}");
    assert!(stdout.contains("2 of 3 shards complete"), "{stdout}");
    assert!(err.contains("shard 1/3 missing"), "{err}");
    assert!(!out.join("_SUCCESS").exists());
    let (ok, _, err) = run_shard("1/2");
    assert!(!ok);
    assert!(err.contains("written as 3 shards"), "{err}");
    let (ok, _, err) = run_shard("1/3");
    assert!(ok, "{err}");
    assert!(err.contains("committed the output"), "{err}");
    let (ok, stdout, err) = run_cli(&["status", out.to_str().unwrap()], &[], &repo_root());
    assert!(ok, "{err}");
    assert!(
        stdout.contains("3 of 3 shards complete, 500 rows, committed (_SUCCESS)"),
        "{stdout}"
    );
    assert_eq!(counts(&out).0, "500,500");
}

/// The disk fills up while writing (a small tmpfs): the run fails naming the file, every part file
/// there is whole and committed, and after space is freed the rerun completes the output exactly.
/// Mounting needs root (as in CI); where mounting is not allowed the test says so and checks nothing.
#[test]
fn a_full_disk_keeps_whole_parts_and_the_rerun_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), Family::FlanT5);
    let disk = tmp.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let mounted = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=400k",
            "tmpfs",
            disk.to_str().unwrap(),
        ])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("a_full_disk_keeps_whole_parts_and_the_rerun_completes: cannot mount a tmpfs here (needs root); not run");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(disk.clone());
    let out = disk.join("out");
    let plan = plan_file(tmp.path(), &model, &out, "p", 4, "");
    let plan_text = std::fs::read_to_string(&plan).unwrap().replace(
        "rows_per_file: 256",
        "rows_per_file: 256, compression: none",
    );
    std::fs::write(&plan, plan_text).unwrap();
    let (ok, _, err) = run_cli(&["run", plan.to_str().unwrap()], &[], &repo_root());
    assert!(!ok, "the disk is too small for the output");
    assert!(
        err.contains("No space left on device") && err.contains(&out.display().to_string()),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // Whatever is there is committed, and reads whole.
    let committed = committed_parts(&out);
    assert_eq!(
        parquet_files(&out),
        committed,
        "a partial or stray part is visible"
    );
    if committed > 0 {
        let (rows, _) = counts(&out);
        let (n, distinct) = rows.split_once(',').unwrap();
        assert_eq!(n, distinct);
    }
    // More space, and the rerun completes the output.
    let ok = Command::new("mount")
        .args(["-o", "remount,size=64m", disk.to_str().unwrap()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "remount");
    let (ok, _, err) = run_cli(&["run", plan.to_str().unwrap()], &[], &repo_root());
    assert!(ok, "{err}");
    assert_eq!(counts(&out).0, "2000,2000");
}
