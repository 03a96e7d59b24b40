//! End-to-end tests of plans over the shipped CoNaLa data: sources (local, JSON, object stores, the Hub
//! stand-in), filter / format / tokenize / write, SQL over outputs, and bad input.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use conala::error::Error;
use conala::plans;
use datafusion::arrow::array::{Array, Float64Array, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::parquet::arrow::ArrowWriter;

async fn run_plan(yaml: &str, ctx: &conala::Context) -> conala::Result<plans::RunSummary> {
    let plan = plans::load_str(yaml, "test.yaml", &[])?;
    plans::build(&plan, ctx).await?.run(ctx).await
}

async fn count(ctx: &conala::Context, table: &str, path: &str, filter: &str) -> i64 {
    conala::sql::register_table(ctx, table, path).await.unwrap();
    let b = conala::sql::query(ctx, &format!("select count(*) as n from {table} {filter}"))
        .await
        .unwrap();
    b[0].column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap()
        .value(0)
}

fn prep_plan(source: &str, out: &Path) -> String {
    format!(
        r#"name: prep
steps:
  - source: {source}
  - filter: "intent IS NOT NULL AND rewritten_intent IS NOT NULL"
  - format: {{ input: "{{intent}}\n{{snippet}}" }}
  - tokenize: {{ input: input, target: rewritten_intent, max_input_tokens: 64, max_target_tokens: 32, tokenizer: "{tok}" }}
  - write: {{ path: "{out}", rows_per_file: 1000 }}
"#,
        tok = tokenizer_path().display(),
        out = out.display()
    )
}

#[tokio::test]
async fn offline_plan_prepares_2299_training_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(None, tmp.path(), true);
    let out = tmp.path().join("out");
    let source = format!(
        "{{ uri: \"{}\", config: curated, split: train }}",
        data_dir().display()
    );
    let s = run_plan(&prep_plan(&source, &out), &ctx).await.unwrap();
    assert_eq!(s.rows_per_step[0], ("1:source".to_string(), 2378));
    assert_eq!(s.rows_per_step[1].1, 2299);
    let w = s.write.unwrap();
    assert_eq!(w.rows_written, 2299);
    assert_eq!(w.parts.len(), 3, "1000 rows per part");
    assert_eq!(count(&ctx, "prep", out.to_str().unwrap(), "").await, 2299);
    // Token ids and lengths agree, every row ends with </s>, and ids stay within the limit.
    let b = conala::sql::query(
        &ctx,
        "select count(*) from prep where array_length(input_ids) <> n_input_tokens or n_input_tokens > 64 \
         or input_ids[n_input_tokens] <> 1 or labels[n_label_tokens] <> 1 or error is not null",
    )
    .await
    .unwrap();
    assert_eq!(
        b[0].column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .value(0),
        0
    );
    // The manifest records the plan, counts and versions.
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("_manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["rows_written"], 2299);
    assert_eq!(m["plan_name"], "prep");
    assert_eq!(m["rows_per_step"]["2:filter"], 2299);
    assert!(m["versions"]["conala"].is_string());
    assert_eq!(m["parts"].as_array().unwrap().len(), 3);
    // Row ids are the source ordinals: stable, unique.
    let b = conala::sql::query(
        &ctx,
        "select count(distinct row_id), min(row_id), max(row_id) from prep",
    )
    .await
    .unwrap();
    assert_eq!(
        b[0].column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .value(0),
        2299
    );
}

#[tokio::test]
async fn rerun_overwrites_and_leaves_one_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(None, tmp.path(), true);
    let out = tmp.path().join("out");
    let source = format!(
        "{{ uri: \"{}\", config: curated, split: test }}",
        data_dir().display()
    );
    run_plan(&prep_plan(&source, &out), &ctx).await.unwrap();
    run_plan(&prep_plan(&source, &out), &ctx).await.unwrap();
    let parts = std::fs::read_dir(&out)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".parquet")
        })
        .count();
    assert_eq!(parts, 1);
    assert_eq!(count(&ctx, "t", out.to_str().unwrap(), "").await, 477);
}

/// JSON array and JSON-lines files (written from the shipped rows) read like parquet.
#[tokio::test]
async fn json_and_jsonl_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(None, tmp.path(), true);
    let rows = vec![
        serde_json::json!({"question_id": 1, "intent": "sort a list", "rewritten_intent": "sort list `l`", "snippet": "sorted(l)"}),
        serde_json::json!({"question_id": 2, "intent": "reverse", "rewritten_intent": null, "snippet": "l[::-1]"}),
        serde_json::json!({"question_id": 3, "intent": "join", "rewritten_intent": "join `a`", "snippet": "''.join(a)"}),
    ];
    let dir = tmp.path().join("in");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.json"), serde_json::to_string(&rows).unwrap()).unwrap();
    let lines: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    std::fs::write(tmp.path().join("b.jsonl"), lines.join("\n")).unwrap();
    for (src, name) in [(dir.clone(), "a"), (tmp.path().join("b.jsonl"), "b")] {
        let out = tmp.path().join(format!("out-{name}"));
        let s = run_plan(
            &prep_plan(&format!("{{ uri: \"{}\" }}", src.display()), &out),
            &ctx,
        )
        .await
        .unwrap();
        assert_eq!(s.write.unwrap().rows_written, 2, "{name}");
        let b = conala::sql::query(&ctx, "select 1").await.unwrap();
        assert_eq!(b.len(), 1);
    }
}

/// A local folder through a file:// URL, and an in-memory object store (write then SQL).
#[tokio::test]
async fn object_store_sources_and_sinks() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(None, tmp.path(), true);
    // file:// source
    let out = tmp.path().join("out-file");
    let uri = format!(
        "{{ uri: \"file://{}\", config: curated, split: test }}",
        data_dir().display()
    );
    let s = run_plan(&prep_plan(&uri, &out), &ctx).await.unwrap();
    assert_eq!(s.write.unwrap().rows_written, 477);
    // memory:// sink, then memory:// source, then SQL over memory://
    let copy = "name: copy\nsteps:\n  - source: { uri: DATA, config: curated, split: test }\n  - write: { path: \"memory://bucket/curated-test\", rows_per_file: 200 }\n"
        .replace("DATA", &data_dir().display().to_string());
    let s = run_plan(&copy, &ctx).await.unwrap();
    assert_eq!(s.write.unwrap().parts.len(), 3);
    let again = "name: again\nsteps:\n  - source: { uri: \"memory://bucket/curated-test\", row_id: rid }\n  - filter: \"rewritten_intent IS NULL\"\n  - write: { path: \"memory://bucket/nulls\" }\n";
    let s = run_plan(again, &ctx).await.unwrap();
    assert_eq!(s.write.unwrap().rows_written, 23);
    assert_eq!(count(&ctx, "nulls", "memory://bucket/nulls", "").await, 23);
    assert_eq!(
        count(
            &ctx,
            "mem",
            "memory://bucket/curated-test",
            "where rewritten_intent is not null"
        )
        .await,
        477
    );
}

fn write_parquet(path: &Path, batch: &RecordBatch) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = std::fs::File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

/// A small file with the schema of CoNaLa's mined config.
fn mined_sample(n: usize) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("question_id", DataType::Int64, true),
        Field::new("parent_answer_post_id", DataType::Int64, true),
        Field::new("prob", DataType::Float64, true),
        Field::new("snippet", DataType::Utf8, true),
        Field::new("intent", DataType::Utf8, true),
        Field::new("id", DataType::Utf8, true),
    ]));
    let intents: Vec<Option<String>> = (0..n)
        .map(|i| {
            if i == 3 {
                None
            } else {
                Some(format!("how to sort list number {i}"))
            }
        })
        .collect();
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from((0..n as i64).collect::<Vec<_>>())),
            Arc::new(Int64Array::from((100..100 + n as i64).collect::<Vec<_>>())),
            Arc::new(Float64Array::from(vec![0.5; n])),
            Arc::new(StringArray::from(
                (0..n).map(|i| format!("sorted(x{i})")).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(intents)),
            Arc::new(StringArray::from(
                (0..n)
                    .map(|i| format!("{i}_{}", i + 100))
                    .collect::<Vec<_>>(),
            )),
        ],
    )
    .unwrap()
}

/// Lay out the Hub stand-in: neulab/conala with curated in the parquet conversion only, and the mined
/// config; a model repo with a tokenizer (and a tiny model config); a gated dataset.
fn hub_root(root: &Path) {
    let curated = data_dir().join("curated");
    for split in ["train", "test"] {
        put_repo_file(
            root,
            "datasets",
            "neulab/conala",
            "refs/convert/parquet",
            &format!("curated/{split}/0000.parquet"),
            &curated.join(split).join("0000.parquet"),
        );
    }
    let tmp = root.join("_scratch");
    write_parquet(&tmp.join("mined.parquet"), &mined_sample(40));
    put_repo_file(
        root,
        "datasets",
        "neulab/conala",
        "refs/convert/parquet",
        "mined/train/0000.parquet",
        &tmp.join("mined.parquet"),
    );
    put_repo_bytes(
        root,
        "datasets",
        "neulab/conala",
        "main",
        "README.md",
        b"# conala (no parquet on main)\n",
    );
    // A repo with parquet files on main.
    put_repo_file(
        root,
        "datasets",
        "someone/pq",
        "main",
        "data/test-00000-of-00001.parquet",
        &curated.join("test/0000.parquet"),
    );
    // A gated one.
    put_repo_file(
        root,
        "datasets",
        "private/gated",
        "main",
        "data/train-00000-of-00001.parquet",
        &curated.join("test/0000.parquet"),
    );
    std::fs::write(root.join("datasets/private/gated/.token"), "hf_secret").unwrap();
}

#[tokio::test]
async fn hub_datasets_through_the_stand_in_server() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("hub");
    hub_root(&root);
    let server = HubServer::start(root);
    let cache = tmp.path().join("cache");
    let ctx = context(Some(&server.endpoint), &cache, false);

    // Parquet conversion fallback (main has no parquet files).
    let out = tmp.path().join("o1");
    let s = run_plan(
        &prep_plan(
            "{ uri: hf://datasets/neulab/conala, config: curated, split: test }",
            &out,
        ),
        &ctx,
    )
    .await
    .unwrap();
    assert_eq!(s.rows_per_step[0].1, 500);
    assert_eq!(s.write.unwrap().rows_written, 477);
    let paths: Vec<String> = server
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.path.clone())
        .collect();
    assert!(
        paths
            .iter()
            .any(|p| p.contains("/api/datasets/neulab/conala/revision/main")),
        "{paths:?}"
    );
    assert!(
        paths
            .iter()
            .any(|p| p.contains("resolve/refs%2Fconvert%2Fparquet/curated/test/0000.parquet")),
        "{paths:?}"
    );
    // Files land in the standard cache layout.
    assert!(cache
        .join("datasets--neulab--conala/refs/refs/convert/parquet")
        .is_file());

    // Parquet files on main are used directly.
    let out = tmp.path().join("o2");
    let plan = "name: pq\nsteps:\n  - source: { uri: hf://datasets/someone/pq, split: test }\n  - write: { path: OUT }\n".replace("OUT", out.to_str().unwrap());
    assert_eq!(
        run_plan(&plan, &ctx)
            .await
            .unwrap()
            .write
            .unwrap()
            .rows_written,
        500
    );

    // Unknown split: the error lists what exists.
    let plan = "name: bad\nsteps:\n  - source: { uri: hf://datasets/neulab/conala, config: curated, split: validation }\n  - write: { path: OUT }\n".replace("OUT", tmp.path().join("o3").to_str().unwrap());
    let e = run_plan(&plan, &ctx).await.unwrap_err().to_string();
    assert!(
        e.contains("step 1 (source)")
            && e.contains("split `validation`")
            && e.contains("curated/test"),
        "{e}"
    );
    assert!(!tmp.path().join("o3").exists());

    // Gated: refused without a token, served with one.
    let plan = "name: g\nsteps:\n  - source: { uri: hf://datasets/private/gated }\n  - write: { path: OUT }\n".replace("OUT", tmp.path().join("o4").to_str().unwrap());
    let e = run_plan(&plan, &ctx).await.unwrap_err().to_string();
    assert!(e.contains("HF_TOKEN"), "{e}");
    let authed = context_with_token(&server.endpoint, &tmp.path().join("cache2"), "hf_secret");
    assert_eq!(
        run_plan(&plan, &authed)
            .await
            .unwrap()
            .write
            .unwrap()
            .rows_written,
        500
    );

    // Offline: the cache alone serves what was downloaded; what was not is a clear error.
    let offline = context(None, &cache, true);
    let out = tmp.path().join("o5");
    let s = run_plan(
        &prep_plan(
            "{ uri: hf://datasets/neulab/conala, config: curated, split: test }",
            &out,
        ),
        &offline,
    )
    .await
    .unwrap();
    assert_eq!(s.write.unwrap().rows_written, 477);
    let e = run_plan(
        &prep_plan(
            "{ uri: hf://datasets/neulab/conala, config: curated, split: train }",
            &tmp.path().join("o6"),
        ),
        &offline,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("HF_HUB_OFFLINE"), "{e}");
}

/// The mined plan from the issue validates as written against the stand-in (dataset and model).
#[test]
fn mined_plan_validates_as_written_with_hf_env() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("hub");
    hub_root(&root);
    // google/flan-t5-base stand-in: a tiny flan-t5 with the shipped tokenizer.
    let model = tmp.path().join("model");
    let (ok, _, err) = run_cli(
        &[
            "model",
            "init",
            "--family",
            "flan-t5",
            "--size",
            "tiny",
            "--vocab",
            tokenizer_path().to_str().unwrap(),
            "--out",
            model.to_str().unwrap(),
        ],
        &[],
        &repo_root(),
    );
    assert!(ok, "{err}");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        put_repo_file(
            &root,
            "models",
            "google/flan-t5-base",
            "main",
            f,
            &model.join(f),
        );
    }
    let server = HubServer::start(root);
    let home = tmp.path().join("hf-home");
    let env = [
        ("HF_ENDPOINT", server.endpoint.as_str()),
        ("HF_HOME", home.to_str().unwrap()),
    ];
    let (ok, out, err) = run_cli(
        &["validate", "pipelines/conala-mined.yaml"],
        &env,
        &repo_root(),
    );
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("valid plan `conala-mined`"), "{out}");
    assert!(
        out.contains("rewritten_intent: Utf8") && out.contains("finish_reason"),
        "{out}"
    );
    // HF_HOME is honoured: the files are in $HF_HOME/hub.
    assert!(home.join("hub/datasets--neulab--conala").is_dir());
    assert!(home.join("hub/models--google--flan-t5-base").is_dir());
    // The training preparation plan runs end to end through the Hub and the model's tokenizer.
    let out_dir = tmp.path().join("prep");
    let (ok, out, err) = run_cli(
        &[
            "run",
            "pipelines/conala-train-prep.yaml",
            "--set",
            &format!("write.path={}", out_dir.display()),
        ],
        &env,
        &repo_root(),
    );
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("wrote 2299 rows"), "{out}");
    // The seed's training plan validates as written (LoRA on the model, eval split through the same steps).
    let (ok, out, err) = run_cli(
        &[
            "validate",
            "pipelines/conala-train.yaml",
            "--device-memory",
            "80GiB",
        ],
        &env,
        &repo_root(),
    );
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("valid plan `conala-train`"), "{out}");
    // ... and says what its training step needs per device, with and without checkpointing.
    assert!(out.contains("estimated peak memory per device"), "{out}");
    assert!(
        out.contains("16 rows x 2048 in / 2048 out per device"),
        "{out}"
    );
    assert!(
        out.contains("5:train") && out.contains("LoRA r 8 on q, v"),
        "{out}"
    );
    assert!(out.contains("(with gradient_checkpointing: true)"), "{out}");
    assert!(out.contains("fits:"), "{out}");
    assert!(
        !repo_root().join("runs/flan-t5-base-conala").exists(),
        "validate must not create outputs"
    );
    // Offline with HF_HUB_OFFLINE, nothing reachable: validation still works from the cache.
    let env_off = [
        ("HF_ENDPOINT", "http://127.0.0.1:9"),
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_HUB_OFFLINE", "1"),
    ];
    let (ok, out, err) = run_cli(
        &["validate", "pipelines/conala-mined.yaml"],
        &env_off,
        &repo_root(),
    );
    assert!(ok, "{out}\n{err}");
}

/// The UL2 plan validates as written against the stand-in, which holds UL2's real config and a tokenizer
/// but no weights (validation fetches metadata only): with checkpointing a device needs about 55 GiB,
/// which fits 80 GiB; without, about 480 GiB, and the error names the step and the fix.
#[test]
fn ul2_plan_fits_80gb_devices_only_with_checkpointing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("hub");
    hub_root(&root);
    let config = repo_root().join("tests/fixtures/hub/google-ul2/config.json");
    put_repo_file(
        &root,
        "models",
        "google/ul2",
        "main",
        "config.json",
        &config,
    );
    let tok = tokenizer_path();
    put_repo_file(
        &root,
        "models",
        "google/ul2",
        "main",
        "tokenizer.json",
        &tok,
    );
    let server = HubServer::start(root);
    let home = tmp.path().join("hf-home");
    let env = [
        ("HF_ENDPOINT", server.endpoint.as_str()),
        ("HF_HOME", home.to_str().unwrap()),
    ];
    let plan = "pipelines/conala-train-ul2.yaml";
    let gib = |out: &str, label: &str| -> f64 {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no `{label}` line in\n{out}"));
        let number = line
            .split_whitespace()
            .rev()
            .find_map(|w| w.parse::<f64>().ok());
        number.unwrap_or_else(|| panic!("no number in `{line}`"))
    };
    let (ok, out, err) = run_cli(
        &["validate", plan, "--device-memory", "80GiB"],
        &env,
        &repo_root(),
    );
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("valid plan `conala-train-ul2`"), "{out}");
    assert!(out.contains("19.59 B parameters) in BF16"), "{out}");
    assert!(
        out.contains("2 rows x 2048 in / 2048 out per device"),
        "{out}"
    );
    assert!(
        out.contains("on each of cuda:0,") && out.contains("cuda:7"),
        "{out}"
    );
    // bf16 weights: 19.59 B x 2 bytes.
    let weights = gib(&out, "weights");
    assert!((weights - 36.49).abs() < 0.01, "{out}");
    let peak = gib(&out, "peak");
    assert!(peak > weights + 5.0 && peak < 80.0, "{out}");
    assert!(out.contains("fits:"), "{out}");
    assert!(
        !home
            .join("hub/models--google--ul2/blobs")
            .read_dir()
            .unwrap()
            .any(|e| { e.unwrap().metadata().unwrap().len() > 10_000_000 }),
        "validation must not download weights"
    );
    let (ok, out, err) = run_cli(
        &[
            "validate",
            plan,
            "--device-memory",
            "80GiB",
            "--set",
            "train.gradient_checkpointing=false",
        ],
        &env,
        &repo_root(),
    );
    assert!(!ok, "{out}");
    assert!(gib(&out, "peak") > 400.0, "{out}");
    assert!(out.contains("does NOT fit"), "{out}");
    assert!(
        err.contains("step 5:train needs about")
            && err.contains("with gradient_checkpointing: true it needs"),
        "{err}"
    );
    // On 2 devices (8 rows each) nothing fits 80 GiB: the usual levers, bf16 not among them (it is bf16).
    let (ok, out, err) = run_cli(
        &[
            "validate",
            plan,
            "--device-memory",
            "80GiB",
            "--set",
            "train.devices=2",
        ],
        &env,
        &repo_root(),
    );
    assert!(!ok, "{out}");
    assert!(
        err.contains("use more devices (train.devices)") && !err.contains("bf16"),
        "{err}"
    );
}

#[tokio::test]
async fn sql_over_plan_outputs_in_every_format() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let (ok, stdout, err) = run_cli(
        &[
            "run",
            "pipelines/conala-offline.yaml",
            "--set",
            &format!("write.path={}", out.display()),
        ],
        &[],
        &repo_root(),
    );
    assert!(ok, "{err}");
    assert!(stdout.contains("wrote 2299 rows"), "{stdout}");
    let plan_path = tmp.path().join("p.yaml");
    std::fs::write(
        &plan_path,
        std::fs::read_to_string(repo_root().join("pipelines/conala-offline.yaml"))
            .unwrap()
            .replace("out/conala-offline", out.to_str().unwrap()),
    )
    .unwrap();
    let (ok, stdout, err) = run_cli(
        &[
            "sql",
            "--plan",
            plan_path.to_str().unwrap(),
            "select count(*) as n from conala_offline",
        ],
        &[],
        &repo_root(),
    );
    assert!(ok, "{err}");
    assert!(stdout.contains("2299"), "{stdout}");
    let table = format!("t={}", out.display());
    let csv = tmp.path().join("r.csv");
    let (ok, _, err) = run_cli(
        &[
            "sql",
            "--table",
            &table,
            "--format",
            "csv",
            "--output",
            csv.to_str().unwrap(),
            "select row_id, intent from t order by row_id limit 3",
        ],
        &[],
        &repo_root(),
    );
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(text.lines().count(), 4);
    assert!(text.starts_with("row_id,intent"));
    let (ok, stdout, _) = run_cli(
        &[
            "sql",
            "--table",
            &table,
            "--format",
            "json",
            "select count(*) as n from t",
        ],
        &[],
        &repo_root(),
    );
    assert!(ok && stdout.trim() == "{\"n\":2299}", "{stdout}");
    let pq = tmp.path().join("r.parquet");
    let (ok, _, err) = run_cli(
        &[
            "sql",
            "--table",
            &table,
            "--format",
            "parquet",
            "--output",
            pq.to_str().unwrap(),
            "select * from t where row_id < 10",
        ],
        &[],
        &repo_root(),
    );
    assert!(ok, "{err}");
    let (ok, stdout, _) = run_cli(
        &[
            "sql",
            "--table",
            &format!("r={}", pq.display()),
            "--format",
            "csv",
            "select count(*) from r",
        ],
        &[],
        &repo_root(),
    );
    assert!(ok && stdout.lines().nth(1) == Some("10"), "{stdout}");
    let (ok, _, err) = run_cli(
        &["sql", "--table", &table, "select nope from t"],
        &[],
        &repo_root(),
    );
    assert!(!ok && err.contains("nope"), "{err}");
}

fn expect_plan_error(r: conala::Result<plans::RunSummary>) -> conala::error::PlanError {
    match r {
        Err(Error::Plan(p)) => *p,
        other => panic!("expected a plan error, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_input_fails_clearly_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(None, tmp.path(), true);
    let out = tmp.path().join("out");
    let data = format!(
        "{{ uri: \"{}\", config: curated, split: test }}",
        data_dir().display()
    );

    // Malformed YAML.
    let e = run_plan("name: x\nsteps: [ { source: ", &ctx)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("test.yaml: malformed YAML"), "{e}");
    // Unknown key, with a suggestion.
    let e = expect_plan_error(
        run_plan(
            &prep_plan(&data, &out).replace("rows_per_file", "rows_per_fille"),
            &ctx,
        )
        .await,
    );
    assert_eq!(
        (
            e.at.step.clone().unwrap().1.as_str(),
            e.at.key.as_deref(),
            e.suggestion.as_deref()
        ),
        ("write", Some("rows_per_fille"), Some("rows_per_file"))
    );
    // Missing column, named with the input's columns.
    let e = expect_plan_error(
        run_plan(
            &prep_plan(&data, &out).replace("{snippet}", "{snipet}"),
            &ctx,
        )
        .await,
    );
    assert_eq!(e.at.step, Some((2, "format".into())));
    assert!(
        e.message.contains("missing column `snipet`") && e.suggestion.as_deref() == Some("snippet"),
        "{e}"
    );
    // Missing file.
    let e = expect_plan_error(run_plan(&prep_plan("{ uri: /no/such/folder }", &out), &ctx).await);
    assert_eq!(e.at.key.as_deref(), Some("uri"));
    assert!(e.message.contains("no such file"), "{e}");
    // Corrupt parquet: found before any work.
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("0000.parquet"), b"PAR1 this is not parquet").unwrap();
    let e = run_plan(
        &prep_plan(&format!("{{ uri: \"{}\" }}", bad.display()), &out),
        &ctx,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("0000.parquet") && e.contains("not a readable parquet file"),
        "{e}"
    );
    // Non-UTF-8 bytes in JSON.
    let j = tmp.path().join("bad.json");
    std::fs::write(
        &j,
        b"[{\"intent\": \"ok\", \"rewritten_intent\": \"x\", \"snippet\": \"\xff\xfe\"}]",
    )
    .unwrap();
    let e = run_plan(
        &prep_plan(&format!("{{ uri: \"{}\" }}", j.display()), &out),
        &ctx,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("bad.json") && e.contains("invalid JSON"), "{e}");
    // Null fields with `on_null: error`: the row is named, and no partial output is left.
    let strict = prep_plan(&data, &out).replace("filter: \"intent IS NOT NULL AND rewritten_intent IS NOT NULL\"", "filter: \"true\"").replace(
        "format: { input: \"{intent}\\n{snippet}\" }",
        "format: { input: \"{intent}\\n{snippet}\", target2: \"{rewritten_intent}\", on_null: error }",
    );
    let e = run_plan(&strict, &ctx).await.unwrap_err().to_string();
    assert!(e.contains("is null") && e.contains("row_id ="), "{e}");
    let leftovers = std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0);
    assert_eq!(leftovers, 0, "no partial output");
    // A plan whose --set names nothing.
    let plan = plans::load_str(
        &prep_plan(&data, &out),
        "test.yaml",
        &["sink.path=x".into()],
    );
    let e = plan.unwrap_err().to_string();
    assert!(
        e.contains("--set sink.path=x") && e.contains("names nothing"),
        "{e}"
    );
    // Wrong order of steps.
    let e = run_plan(
        "name: x\nsteps:\n  - filter: \"true\"\n  - write: { path: o }\n",
        &ctx,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("first step must be a `source`"), "{e}");
    assert!(!out.exists() || std::fs::read_dir(&out).unwrap().count() == 0);
}

#[test]
fn cli_errors_name_file_step_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("plan.yaml");
    std::fs::write(
        &p,
        std::fs::read_to_string(repo_root().join("pipelines/conala-offline.yaml"))
            .unwrap()
            .replace("max_input_tokens", "max_input_token"),
    )
    .unwrap();
    let (ok, _, err) = run_cli(&["validate", p.to_str().unwrap()], &[], &repo_root());
    assert!(!ok);
    assert!(
        err.contains("plan.yaml: step 4 (tokenize): key `max_input_token`: unknown key"),
        "{err}"
    );
    assert!(err.contains("did you mean `max_input_tokens`"), "{err}");
    let (ok, _, err) = run_cli(&["run", "--set", "wirte.path=x"], &[], &repo_root());
    assert!(
        !ok && err.contains("names nothing") && err.contains("did you mean `write`"),
        "{err}"
    );
}

#[tokio::test]
async fn shard_and_limit_select_rows_by_id() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ctx = context(None, tmp.path(), true);
    let data = data_dir().display().to_string();
    let mut total = 0;
    for i in 0..3 {
        ctx.shard = Some(conala::context::Shard { index: i, count: 3 });
        let out = tmp.path().join(format!("s{i}"));
        let plan = format!("name: s\nsteps:\n  - source: {{ uri: \"{data}\", config: curated, split: test }}\n  - write: {{ path: \"{}\" }}\n", out.display());
        total += run_plan(&plan, &ctx)
            .await
            .unwrap()
            .write
            .unwrap()
            .rows_written;
        let c = count(
            &ctx,
            &format!("s{i}"),
            out.to_str().unwrap(),
            &format!("where row_id % 3 <> {i}"),
        )
        .await;
        assert_eq!(c, 0);
    }
    assert_eq!(total, 500);
    ctx.shard = None;
    let out = tmp.path().join("lim");
    let plan = format!("name: l\nsteps:\n  - source: {{ uri: \"{data}\", config: curated, split: train, limit: 10, repeat: 3 }}\n  - write: {{ path: \"{}\" }}\n", out.display());
    assert_eq!(
        run_plan(&plan, &ctx)
            .await
            .unwrap()
            .write
            .unwrap()
            .rows_written,
        10
    );
    let out = tmp.path().join("rep");
    let plan = format!("name: r\nsteps:\n  - source: {{ uri: \"{data}\", config: curated, split: test, repeat: 3 }}\n  - write: {{ path: \"{}\" }}\n", out.display());
    assert_eq!(
        run_plan(&plan, &ctx)
            .await
            .unwrap()
            .write
            .unwrap()
            .rows_written,
        1500
    );
    assert_eq!(
        count(&ctx, "rep", out.to_str().unwrap(), "where row_id >= 1000").await,
        500
    );
}

/// The shipped Slurm and Kubernetes examples stay consistent with the CLI: the Indexed Job's shard count
/// matches `CONALA_SHARDS`, both run the mined plan, and every `--set` key they pass names a key of it.
#[test]
fn deploy_examples_match_the_cli() {
    let root = repo_root();
    let job: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(root.join("deploy/kubernetes/conala-mined-job.yaml")).unwrap(),
    )
    .unwrap();
    let spec = &job["spec"];
    assert_eq!(spec["completionMode"].as_str(), Some("Indexed"));
    let container = &spec["template"]["spec"]["containers"][0];
    let shards = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"].as_str() == Some("CONALA_SHARDS"))
        .and_then(|e| e["value"].as_str())
        .unwrap();
    assert_eq!(
        shards.parse::<u64>().unwrap(),
        spec["completions"].as_u64().unwrap()
    );
    let command: Vec<&str> = container["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(command, ["conala", "run", "pipelines/conala-mined.yaml"]);
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let sbatch = std::fs::read_to_string(root.join("deploy/slurm/conala-mined.sbatch")).unwrap();
    assert!(
        sbatch.contains(r#"PLAN="${PLAN:-pipelines/conala-mined.yaml}""#)
            && sbatch.contains(r#"run "$PLAN""#),
        "{sbatch}"
    );
    // A variable's default as the script writes it: `NAME="${NAME:-default}"`.
    let default_of = |name: &str| {
        sbatch.lines().find_map(|l| {
            l.strip_prefix(&format!("{name}=\"${{{name}:-"))
                .and_then(|rest| rest.split_once("}\"").map(|(d, _)| d.to_string()))
        })
    };
    // The overrides as the examples write them; a shell variable stands for any path.
    let mut sets: Vec<String> = args
        .iter()
        .filter(|a| a.contains('='))
        .map(|a| a.to_string())
        .collect();
    sets.extend(
        sbatch
            .lines()
            .filter_map(|l| {
                l.trim()
                    .trim_end_matches('\\')
                    .trim()
                    .strip_prefix("--set ")
            })
            .map(|a| {
                let (k, v) = a.split_once('=').unwrap();
                let v = match v.strip_prefix("\"$") {
                    Some(var) => {
                        default_of(var.trim_end_matches('"')).unwrap_or_else(|| "x".into())
                    }
                    None => v.to_string(),
                };
                format!("{k}={v}")
            }),
    );
    assert!(sets.len() >= 5, "{sets:?}");
    // Each override is accepted by the plan loader.
    let yaml = std::fs::read_to_string(root.join("pipelines/conala-mined.yaml")).unwrap();
    for set in sets {
        let r = conala::plans::load_str(&yaml, "conala-mined.yaml", std::slice::from_ref(&set));
        assert!(r.is_ok(), "{set}: {:?}", r.err().map(|e| e.to_string()));
    }
}

/// The offline training plans shipped in pipelines/ validate as written (their `model.init` models are
/// made, elsewhere, by `--set`): the default (LoRA on a copy prior) and the from-scratch comparison.
#[test]
fn offline_training_plans_validate() {
    let tmp = tempfile::tempdir().unwrap();
    for (plan, name, init) in [
        ("conala-offline-train", "conala-offline-train", "prior"),
        (
            "conala-offline-train-scratch",
            "conala-offline-train-scratch",
            "scratch",
        ),
    ] {
        let model = tmp.path().join(init);
        let (ok, out, err) = run_cli(
            &[
                "validate",
                &format!("pipelines/{plan}.yaml"),
                "--set",
                &format!("model.path={}", model.display()),
                "--set",
                &format!("train.output={}", tmp.path().join("run").display()),
            ],
            &[],
            &repo_root(),
        );
        assert!(ok, "{out}\n{err}");
        assert!(out.contains(&format!("valid plan `{name}`")), "{out}");
        let cfg = std::fs::read_to_string(model.join("config.json")).unwrap();
        let d_model = if init == "prior" { 256 } else { 128 };
        assert!(cfg.contains(&format!("\"d_model\": {d_model}")), "{cfg}");
    }
    assert!(!tmp.path().join("run").exists(), "validate must not train");
}
