//! Publishing against the Hub stand-in: a generated output pushed as a dataset and a trained model
//! pushed from its plan, both read back through conala's own Hub download and compared byte for
//! byte and row for row; a push cut mid-file resumed by rerunning (only what is missing is sent,
//! one commit); the refusals (401/403/404/409/413/429, incomplete outputs) naming the repo with the
//! token masked; cards the Hub and `datasets` read; TensorBoard event files of a training run.
//! Python checks (`datasets`, `transformers`, `tensorboard`) run when Python has those packages.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use conala::model::init::Family;

const TOKEN: &str = "hf_PushTokenSecret0123456789";

/// The environment of a command that talks to the stand-in with the write token.
fn hub_env<'a>(server: &'a HubServer, home: &'a Path) -> Vec<(&'a str, &'a str)> {
    vec![
        ("HF_ENDPOINT", server.endpoint.as_str()),
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_TOKEN", TOKEN),
    ]
}

fn started(tmp: &Path) -> (HubServer, PathBuf) {
    let root = tmp.join("hub");
    std::fs::create_dir_all(&root).unwrap();
    let server = HubServer::start(root.clone());
    server.writes.require_token(TOKEN);
    (server, root)
}

fn run_ok(args: &[&str], env: &[(&str, &str)]) -> String {
    let (ok, stdout, stderr) = run_cli(args, env, &repo_root());
    assert!(ok, "conala {args:?} failed\n{stdout}\n{stderr}");
    format!("{stdout}\n{stderr}")
}

/// Generate over the shipped test rows into `out` (`rows_per_file` rows per part; `write` more keys
/// of the write step); what the run printed.
fn generate_with(
    tmp: &Path,
    out: &Path,
    rows_per_file: usize,
    shard: Option<&str>,
    write: &str,
    env: &[(&str, &str)],
) -> String {
    let model = tiny_model(tmp, Family::FlanT5);
    let plan = tmp.join(format!(
        "gen-{}.yaml",
        out.file_name().unwrap().to_string_lossy()
    ));
    let yaml = gen_plan(&model, out, "max_new_tokens: 4", "").replace(
        "rows_per_file: 200",
        &format!("rows_per_file: {rows_per_file}{write}"),
    );
    std::fs::write(&plan, yaml).unwrap();
    let mut args = vec!["run", plan.to_str().unwrap()];
    if let Some(s) = shard {
        args.extend(["--shard", s]);
    }
    run_ok(&args, env)
}

fn generate(tmp: &Path, out: &Path, rows_per_file: usize, shard: Option<&str>) {
    generate_with(
        tmp,
        out,
        rows_per_file,
        shard,
        "",
        &[("HF_HUB_OFFLINE", "1")],
    );
}

/// The parts the manifests (one per shard) commit, in order.
fn committed_parts(out: &Path) -> Vec<PathBuf> {
    let mut parts = vec![];
    for e in std::fs::read_dir(out).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !(name.starts_with("_manifest") && name.ends_with(".json")) {
            continue;
        }
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(e.path()).unwrap()).unwrap();
        for p in m["parts"].as_array().unwrap() {
            parts.push(out.join(p["file"].as_str().unwrap()));
        }
    }
    parts.sort();
    parts
}

/// Rows of a parquet folder as CSV, in row order.
fn rows(folder: &Path, columns: &str) -> String {
    let table = format!("o={}", folder.display());
    let query = format!("select {columns} from o order by row_id");
    let (ok, stdout, stderr) = run_cli(
        &["sql", "--table", &table, "--format", "csv", &query],
        &[],
        &repo_root(),
    );
    assert!(ok, "{stderr}");
    stdout
}

fn sha256(path: &Path) -> String {
    use sha2::Digest as _;
    let h = sha2::Sha256::digest(std::fs::read(path).unwrap());
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// A Python snippet's stdout, or `None` when Python lacks `module`.
fn python_with(module: &str, script: &str, envs: &[(&str, &str)]) -> Option<String> {
    let probe = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .ok()?;
    if !probe.status.success() {
        eprintln!("python3 has no `{module}`: skipping that check");
        return None;
    }
    let out = Command::new("python3")
        .args(["-c", script])
        .envs(envs.iter().copied())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn every_file_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// No file the stand-in stored holds the token.
fn assert_no_token_stored(root: &Path) {
    for f in every_file_under(root) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(TOKEN),
            "the token was written to {}",
            f.display()
        );
    }
}

#[test]
fn a_generated_output_is_pushed_as_a_dataset_and_reads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, root) = started(tmp.path());
    let home = tmp.path().join("hf-home");
    let out = tmp.path().join("out");
    generate(tmp.path(), &out, 200, None);
    let parts = committed_parts(&out);
    assert_eq!(parts.len(), 3, "500 rows in parts of 200");

    let env = hub_env(&server, &home);
    let said = run_ok(&["push", out.to_str().unwrap(), "me/conala-gen"], &env);
    assert!(said.contains("repository created"), "{said}");
    assert!(!said.contains(TOKEN), "{said}");
    let commits = server.writes.commits.lock().unwrap().clone();
    assert_eq!(commits.len(), 1, "{commits:?}");
    assert_eq!(commits[0].repo, "datasets/me/conala-gen");
    assert_eq!(commits[0].files, ["README.md"], "the card is small: inline");
    // Each committed part, byte for byte, under the Hub's split naming; LFS through `basic`.
    let repo = root.join("datasets/me/conala-gen/main");
    for (i, p) in parts.iter().enumerate() {
        let name = format!("data/train-{i:05}-of-00003.parquet");
        assert!(commits[0].lfs.contains(&name), "{commits:?}");
        assert_eq!(sha256(&repo.join(&name)), sha256(p), "{name}");
    }
    assert_eq!(server.writes.stored.lock().unwrap().len(), 3);

    // The card: what the Hub and `datasets` read, and what made the rows.
    let card = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let fm = conala::publish::cards::front_matter(&card).expect("front matter");
    assert_eq!(fm["license"].as_str(), Some("cc-by-sa-4.0"), "{card}");
    assert_eq!(fm["source_datasets"][0].as_str(), Some("neulab/conala"));
    assert_eq!(fm["size_categories"][0].as_str(), Some("n<1K"));
    assert_eq!(
        fm["task_categories"][0].as_str(),
        Some("text2text-generation")
    );
    let files = &fm["configs"][0]["data_files"][0];
    assert_eq!(
        (files["split"].as_str(), files["path"].as_str()),
        (Some("train"), Some("data/train-*"))
    );
    assert!(card.contains("500 rows in 3 parquet file(s)"), "{card}");
    assert!(card.contains("| length limit |"), "{card}");
    assert!(
        card.contains("name: gen"),
        "the plan is on the card\n{card}"
    );

    // Read back through conala's own Hub download: the same rows.
    let back = tmp.path().join("back");
    let plan = tmp.path().join("read.yaml");
    std::fs::write(
        &plan,
        format!(
            "name: read\nsteps:\n  - source: {{ uri: hf://datasets/me/conala-gen, split: train, row_id: read_id }}\n  - write: {{ path: \"{}\" }}\n",
            back.display()
        ),
    )
    .unwrap();
    run_ok(&["run", plan.to_str().unwrap()], &env);
    let cols = "row_id, intent, prediction, finish_reason";
    let want = rows(&out, cols);
    assert_eq!(want.lines().count(), 501, "{want}");
    assert_eq!(rows(&back, cols), want);

    // Pushing again changes nothing: no commit, no object sent.
    let sent = server
        .writes
        .body_bytes
        .load(std::sync::atomic::Ordering::SeqCst);
    let said = run_ok(&["push", out.to_str().unwrap(), "me/conala-gen"], &env);
    assert!(said.contains("nothing to commit"), "{said}");
    assert_eq!(server.writes.commits.lock().unwrap().len(), 1);
    assert_eq!(
        server
            .writes
            .body_bytes
            .load(std::sync::atomic::Ordering::SeqCst),
        sent
    );
    assert_no_token_stored(&root);

    // `datasets` loads the pushed layout, by its card's configs.
    let script = format!(
        "import datasets\nds = datasets.load_dataset({:?}, split='train')\nprint(ds.num_rows, sorted(ds.column_names))",
        repo.display().to_string()
    );
    let cache = tmp.path().join("ds-cache");
    if let Some(said) = python_with(
        "datasets",
        &script,
        &[
            ("HF_DATASETS_OFFLINE", "1"),
            ("HF_HUB_OFFLINE", "1"),
            ("HF_HOME", cache.to_str().unwrap()),
        ],
    ) {
        assert!(said.starts_with("500 "), "{said}");
        assert!(said.contains("'prediction'"), "{said}");
    }
}

/// A train plan with `push:` sends its merged model, with a model card, through both LFS transfers
/// (a dropped part is sent again); `model.path: OWNER/NAME` then generates what the local model
/// does; the run's TensorBoard events hold its metrics.
#[test]
fn a_trained_model_is_pushed_by_its_plan_and_loads_back_by_id() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, root) = started(tmp.path());
    let home = tmp.path().join("hf-home");
    let env = hub_env(&server, &home);
    let base = tiny_model(tmp.path(), Family::FlanT5);
    // The first part of a multipart object is answered 500 once: it is retried.
    server
        .writes
        .inject("/_lfs/part/", FaultKind::Status(500), 1);
    let run = tmp.path().join("run");
    let plan = tmp.path().join("train.yaml");
    let train = "lora: { r: 4, alpha: 8, targets: [q, v] }\n      max_steps: 6\n      batch_size: 8\n      \
                 learning_rate: 1.0e-2\n      log_every: 2\n      eval_every: 3\n      save_every: 6\n      \
                 push: { repo: me/tiny-conala }";
    std::fs::write(&plan, train_plan(&base, &run, train)).unwrap();
    let said = run_ok(&["run", plan.to_str().unwrap()], &env);
    assert!(said.contains("pushed to me/tiny-conala"), "{said}");
    assert!(!said.contains(TOKEN));
    let commits = server.writes.commits.lock().unwrap().clone();
    assert_eq!(commits.len(), 1, "{commits:?}");
    assert!(commits[0].lfs.contains(&"model.safetensors".to_string()));
    assert!(commits[0].files.contains(&"config.json".to_string()));
    let repo = root.join("models/me/tiny-conala/main");
    for f in ["model.safetensors", "config.json", "tokenizer.json"] {
        assert_eq!(
            sha256(&repo.join(f)),
            sha256(&run.join("model").join(f)),
            "{f}"
        );
    }
    let weights = std::fs::metadata(run.join("model/model.safetensors"))
        .unwrap()
        .len();
    assert!(weights > MULTIPART_THRESHOLD, "the weights go multipart");
    assert!(
        server
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path.contains("/_lfs/part/"))
            .count() as u64
            > weights.div_ceil(PART_SIZE),
        "the dropped part was sent again"
    );

    // The model card.
    let card = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let fm = conala::publish::cards::front_matter(&card).expect("front matter");
    assert_eq!(fm["library_name"].as_str(), Some("transformers"), "{card}");
    assert_eq!(fm["datasets"][0].as_str(), Some("neulab/conala"), "{card}");
    assert_eq!(fm["license"].as_str(), Some("cc-by-sa-4.0"), "{card}");
    assert!(card.contains("A LoRA adapter (r=4"), "{card}");
    assert!(card.contains("| steps | 6 |"), "{card}");
    assert!(card.contains("| BLEU (sacreBLEU) |"), "{card}");
    assert_no_token_stored(&root);

    // Generation from the pushed id gives the local model's rows.
    let local = tmp.path().join("gen-local");
    let hub = tmp.path().join("gen-hub");
    for (model, out) in [
        (run.join("model"), &local),
        (PathBuf::from("me/tiny-conala"), &hub),
    ] {
        let p = tmp.path().join(format!(
            "{}.yaml",
            out.file_name().unwrap().to_string_lossy()
        ));
        std::fs::write(&p, gen_plan(&model, out, "max_new_tokens: 6", "")).unwrap();
        run_ok(&["run", p.to_str().unwrap()], &env);
    }
    let cols = "row_id, prediction";
    assert_eq!(rows(&hub, cols), rows(&local, cols));

    // TensorBoard reads what metrics.jsonl holds.
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let losses = metrics.lines().filter(|l| l.contains("\"loss\"")).count();
    let bleus = metrics
        .lines()
        .filter(|l| l.contains("\"eval_bleu\""))
        .count();
    assert!(losses >= 3 && bleus >= 1, "{metrics}");
    let events = conala::training::tensorboard::event_files(&run.join("tensorboard"));
    assert_eq!(events.len(), 1, "{events:?}");
    let script = format!(
        "from tensorboard.backend.event_processing import event_accumulator as ea\n\
         acc = ea.EventAccumulator({:?}); acc.Reload()\n\
         tags = acc.Tags()['scalars']\n\
         print(len(acc.Scalars('train/loss')), len(acc.Scalars('eval/bleu')), 'train/learning_rate' in tags or 'train/lr' in tags, acc.Scalars('train/loss')[-1].step)",
        run.join("tensorboard").display().to_string()
    );
    if let Some(said) = python_with("tensorboard", &script, &[]) {
        let last_step = metrics
            .lines()
            .rfind(|l| l.contains("\"loss\""))
            .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .and_then(|v| v["step"].as_u64())
            .unwrap();
        assert_eq!(said, format!("{losses} {bleus} True {last_step}"));
    }

    // transformers loads the pushed repo as it is stored (the weights when it has torch).
    let script = format!(
        "from transformers import AutoConfig, AutoTokenizer\n\
         p = {:?}\n\
         c = AutoConfig.from_pretrained(p); t = AutoTokenizer.from_pretrained(p)\n\
         print(c.model_type, len(t('x = 1').input_ids) > 0)\n\
         try:\n    import torch\nexcept ImportError:\n    print('no torch')\nelse:\n\
         \x20   from transformers import AutoModelForSeq2SeqLM\n\
         \x20   print('model', AutoModelForSeq2SeqLM.from_pretrained(p).num_parameters() > 0)",
        repo.display().to_string()
    );
    if let Some(said) = python_with("transformers", &script, &[("HF_HUB_OFFLINE", "1")]) {
        let lines: Vec<&str> = said
            .lines()
            .filter(|l| !l.contains("PyTorch was not found"))
            .collect();
        assert_eq!(lines.first(), Some(&"t5 True"), "{said}");
        assert!(
            matches!(lines.last(), Some(&"no torch") | Some(&"model True")),
            "{said}"
        );
    }
}

/// A push cut mid-file fails naming the repo; the rerun sends only the objects the Hub lacks and
/// commits once.
#[test]
fn a_cut_push_resumes_sending_only_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, _root) = started(tmp.path());
    let home = tmp.path().join("hf-home");
    let out = tmp.path().join("out");
    generate(tmp.path(), &out, 50, None);
    let parts = committed_parts(&out);
    assert_eq!(parts.len(), 10);
    let oids: BTreeSet<String> = parts.iter().map(|p| sha256(p)).collect();
    // The last part's upload is cut after 200 bytes; one attempt per request.
    let last = sha256(parts.last().unwrap());
    server
        .writes
        .inject(&format!("/_lfs/put/{last}"), FaultKind::Cut(200), 1);
    let mut env = hub_env(&server, &home);
    env.push(("CONALA_HUB_RETRIES", "1"));
    let (ok, stdout, err) = run_cli(
        &["push", out.to_str().unwrap(), "me/cut"],
        &env,
        &repo_root(),
    );
    assert!(!ok, "{stdout}");
    assert!(
        err.contains("hf://datasets/me/cut: upload `data/train-00009-of-00010.parquet`"),
        "{err}"
    );
    assert!(err.contains("rerun"), "{err}");
    assert!(
        server.writes.commits.lock().unwrap().is_empty(),
        "nothing committed"
    );
    let first: Vec<String> = server.writes.stored.lock().unwrap().clone();
    assert!(first.len() >= 6, "the first parts were stored: {first:?}");
    assert!(!first.contains(&last));

    // The rerun: the stored objects are not sent again.
    let said = run_ok(&["push", out.to_str().unwrap(), "me/cut"], &env);
    assert!(!said.contains("repository created"), "{said}");
    let all: Vec<String> = server.writes.stored.lock().unwrap().clone();
    let second = &all[first.len()..];
    assert!(
        second.iter().all(|o| !first.contains(o)),
        "{first:?} then {second:?}"
    );
    let union: BTreeSet<String> = all.iter().cloned().collect();
    assert_eq!(union, oids);
    assert_eq!(all.len(), oids.len(), "each object stored once");
    assert!(
        said.contains(&format!("{} already stored", first.len())),
        "{said}"
    );
    let commits = server.writes.commits.lock().unwrap().clone();
    assert_eq!(commits.len(), 1);
    assert_eq!(commits[0].lfs.len(), 10);
}

/// Refusals name the repository and say what to do, with the token masked; nothing is committed.
#[test]
fn refused_pushes_name_the_repo_and_mask_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, root) = started(tmp.path());
    let home = tmp.path().join("hf-home");
    let model = tiny_model(tmp.path(), Family::FlanT5);
    let m = model.to_str().unwrap();
    let env = hub_env(&server, &home);
    let failed = |args: &[&str], env: &[(&str, &str)]| {
        let (ok, stdout, err) = run_cli(args, env, &repo_root());
        assert!(!ok, "conala {args:?} succeeded\n{stdout}");
        for secret in [TOKEN, "hf_WrongTokenValue98765"] {
            assert!(!err.contains(secret) && !stdout.contains(secret), "{err}");
        }
        err
    };
    let base = [
        ("HF_ENDPOINT", server.endpoint.as_str()),
        ("HF_HOME", home.to_str().unwrap()),
    ];

    // A refused token (the stand-in echoes it back: masked) and no token at all.
    let mut wrong = base.to_vec();
    wrong.push(("HF_TOKEN", "hf_WrongTokenValue98765"));
    let err = failed(&["push", m, "me/refused"], &wrong);
    assert!(
        err.contains("me/refused") && err.contains("HTTP 401"),
        "{err}"
    );
    assert!(
        err.contains("does not accept the token") && err.contains("***"),
        "{err}"
    );
    let err = failed(&["push", m, "me/refused"], &base);
    assert!(
        err.contains("HTTP 401") && err.contains("set HF_TOKEN"),
        "{err}"
    );

    // 403 at creation, a branch that does not exist, 413 and 409 at the commit.
    server
        .writes
        .inject("/api/repos/create", FaultKind::Status(403), 1);
    let err = failed(&["push", m, "org/theirs"], &env);
    assert!(
        err.contains("org/theirs") && err.contains("HTTP 403") && err.contains("write access"),
        "{err}"
    );
    run_ok(&["push", m, "me/model"], &env);
    let err = failed(&["push", m, "me/model", "--revision", "nope"], &env);
    assert!(
        err.contains("me/model@nope") && err.contains("HTTP 404") && err.contains("branch `nope`"),
        "{err}"
    );
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(model.join("config.json"), other.join("config.json")).unwrap();
    std::fs::write(other.join("notes.txt"), "changed").unwrap();
    server.writes.inject("/commit/", FaultKind::Status(413), 1);
    let err = failed(&["push", other.to_str().unwrap(), "me/model"], &env);
    assert!(
        err.contains("HTTP 413") && err.contains("too large"),
        "{err}"
    );
    server.writes.inject("/commit/", FaultKind::Status(409), 1);
    let err = failed(&["push", other.to_str().unwrap(), "me/model"], &env);
    assert!(err.contains("HTTP 409") && err.contains("rerun"), "{err}");

    // 429 is retried, then reported.
    server
        .writes
        .inject("/preupload/", FaultKind::Status(429), 2);
    let mut retries = env.clone();
    retries.push(("CONALA_HUB_RETRIES", "2"));
    let err = failed(&["push", other.to_str().unwrap(), "me/model"], &retries);
    assert!(
        err.contains("HTTP 429") && err.contains("rate limited"),
        "{err}"
    );
    assert_eq!(
        server.writes.commits.lock().unwrap().len(),
        1,
        "only the good push committed"
    );
    // With the fault spent, the same push goes through.
    run_ok(&["push", other.to_str().unwrap(), "me/model"], &env);

    // Inputs conala refuses before any request.
    let err = failed(&["push", m, "no-owner"], &env);
    assert!(err.contains("`no-owner`: not a Hub repository id"), "{err}");
    let err = failed(
        &["push", tmp.path().join("missing").to_str().unwrap(), "me/x"],
        &env,
    );
    assert!(err.contains("no such folder"), "{err}");
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = failed(&["push", empty.to_str().unwrap(), "me/x"], &env);
    assert!(err.contains("neither a model folder"), "{err}");
    assert_no_token_stored(&root);
}

/// One shard of two: the push is refused as incomplete, or sends the committed part with
/// `--allow-incomplete`, its card saying so.
#[test]
fn an_incomplete_output_is_refused_unless_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, root) = started(tmp.path());
    let home = tmp.path().join("hf-home");
    let env = hub_env(&server, &home);
    let out = tmp.path().join("out");
    generate(tmp.path(), &out, 500, Some("0/2"));
    let o = out.to_str().unwrap();
    let (ok, _, err) = run_cli(&["push", o, "me/half"], &env, &repo_root());
    assert!(!ok);
    assert!(
        err.contains("incomplete")
            && err.contains("shard 1/2 missing")
            && err.contains("--allow-incomplete"),
        "{err}"
    );
    assert!(server.writes.commits.lock().unwrap().is_empty());
    run_ok(&["push", o, "me/half", "--allow-incomplete"], &env);
    let card = std::fs::read_to_string(root.join("datasets/me/half/main/README.md")).unwrap();
    assert!(card.contains("**Incomplete**"), "{card}");
    assert!(root
        .join("datasets/me/half/main/data/train-00000-of-00001.parquet")
        .is_file());
}

/// `write.push` on a sharded plan: the worker that completes the output pushes it, every shard's
/// parts in one commit; the others push nothing.
#[test]
fn the_worker_that_completes_a_sharded_output_pushes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, root) = started(tmp.path());
    let home = tmp.path().join("hf-home");
    let env = hub_env(&server, &home);
    let out = tmp.path().join("sharded");
    let push = ", push: { repo: me/sharded, message: \"conala-mined, rewritten\" }";
    let said = generate_with(tmp.path(), &out, 100, Some("0/2"), push, &env);
    assert!(
        said.contains("the worker that completes it pushes it"),
        "{said}"
    );
    assert!(server.writes.commits.lock().unwrap().is_empty());
    let said = generate_with(tmp.path(), &out, 100, Some("1/2"), push, &env);
    assert!(
        said.contains("pushed to hf://datasets/me/sharded"),
        "{said}"
    );
    let commits = server.writes.commits.lock().unwrap().clone();
    assert_eq!(commits.len(), 1, "{commits:?}");
    assert_eq!(commits[0].summary, "conala-mined, rewritten");
    let parts = committed_parts(&out);
    assert_eq!(commits[0].lfs.len(), parts.len());
    let card = std::fs::read_to_string(root.join("datasets/me/sharded/main/README.md")).unwrap();
    assert!(
        card.contains("500 rows") && card.contains("written by 2 shards"),
        "{card}"
    );
    assert!(!card.contains("**Incomplete**"), "{card}");
}
