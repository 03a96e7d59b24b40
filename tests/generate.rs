//! The `generate` operator end to end on the shipped test rows with tiny models: provenance columns,
//! batch-independence, seeded sampling, per-row errors, dedup, ordering, and kill/resume.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use conala::model::init::Family;
use conala::plans;
use datafusion::arrow::array::{Array, Int64Array, StringArray, UInt64Array};

async fn run(yaml: &str, ctx: &conala::Context) -> plans::RunSummary {
    let plan = plans::load_str(yaml, "gen.yaml", &[]).unwrap();
    plans::build(&plan, ctx)
        .await
        .unwrap()
        .run(ctx)
        .await
        .unwrap()
}

/// row_id -> (prediction, finish_reason, n_output_tokens)
async fn outputs(
    ctx: &conala::Context,
    table: &str,
    path: &Path,
) -> HashMap<u64, (Option<String>, String, Option<i64>)> {
    conala::sql::register_table(ctx, table, path.to_str().unwrap())
        .await
        .unwrap();
    let batches = conala::sql::query(ctx, &format!("select row_id, prediction, finish_reason, cast(n_output_tokens as bigint) from {table}")).await.unwrap();
    let mut out = HashMap::new();
    for b in batches {
        let ids = b.column(0).as_any().downcast_ref::<UInt64Array>().unwrap();
        // Parquet strings come back from DataFusion as Utf8View; compare as plain strings.
        let text = |i: usize| {
            datafusion::arrow::compute::cast(
                b.column(i),
                &datafusion::arrow::datatypes::DataType::Utf8,
            )
            .unwrap()
        };
        let (p, f) = (text(1), text(2));
        let p = p.as_any().downcast_ref::<StringArray>().unwrap();
        let f = f.as_any().downcast_ref::<StringArray>().unwrap();
        let n = b.column(3).as_any().downcast_ref::<Int64Array>().unwrap();
        for i in 0..b.num_rows() {
            let prev = out.insert(
                ids.value(i),
                (
                    p.is_valid(i).then(|| p.value(i).to_string()),
                    f.value(i).to_string(),
                    n.is_valid(i).then(|| n.value(i)),
                ),
            );
            assert!(prev.is_none(), "row {} twice", ids.value(i));
        }
    }
    out
}

#[tokio::test]
async fn generates_with_provenance_and_batching_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(None, tmp.path(), true);
    let model = tiny_model(tmp.path(), Family::FlanT5);
    let a = tmp.path().join("a");
    let s = run(
        &gen_plan(
            &model,
            &a,
            "max_new_tokens: 12, batch_tokens: 100000, max_batch_rows: 64",
            "",
        ),
        &ctx,
    )
    .await;
    assert_eq!(s.write.as_ref().unwrap().rows_written, 500);
    let g = s.reports.generate.as_ref().unwrap();
    assert_eq!(g.rows, 500);
    assert!(g.model_hash.starts_with("sha256:"));
    assert_eq!(g.settings.max_new_tokens, 12);
    let a_out = outputs(&ctx, "a", &a).await;
    assert_eq!(a_out.len(), 500);
    for (id, (pred, finish, n)) in &a_out {
        assert!(finish == "eos" || finish == "length", "row {id}: {finish}");
        let n = n.unwrap();
        assert!((1..=12).contains(&n));
        assert_eq!(finish == "length", n == 12 && pred.is_some(), "row {id}");
    }
    // The manifest carries the model hash and generation settings.
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("_manifest.json")).unwrap()).unwrap();
    assert_eq!(m["extra"]["generate"]["model_hash"], g.model_hash.as_str());
    // Tiny batches (a token budget of 40) give the same outputs row by row.
    let b = tmp.path().join("b");
    run(
        &gen_plan(
            &model,
            &b,
            "max_new_tokens: 12, batch_tokens: 40, window_rows: 50",
            "",
        ),
        &ctx,
    )
    .await;
    assert_eq!(outputs(&ctx, "b", &b).await, a_out);
}

#[tokio::test]
async fn seeded_sampling_is_per_row_and_beam_works() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(None, tmp.path(), true);
    let model = tiny_model(tmp.path(), Family::T5);
    let sample = "max_new_tokens: 10, temperature: 0.9, top_p: 0.95, top_k: 50, seed: 7";
    let a = tmp.path().join("a");
    run(
        &gen_plan(&model, &a, &format!("{sample}, batch_tokens: 100000"), ""),
        &ctx,
    )
    .await;
    let b = tmp.path().join("b");
    run(
        &gen_plan(
            &model,
            &b,
            &format!("{sample}, batch_tokens: 30, window_rows: 64"),
            "",
        ),
        &ctx,
    )
    .await;
    let (oa, ob) = (outputs(&ctx, "a", &a).await, outputs(&ctx, "b", &b).await);
    assert_eq!(oa, ob, "a row's sample does not depend on its batch");
    let c = tmp.path().join("c");
    run(
        &gen_plan(&model, &c, &sample.replace("seed: 7", "seed: 8"), ""),
        &ctx,
    )
    .await;
    let oc = outputs(&ctx, "c", &c).await;
    let differ = oa.iter().filter(|(k, v)| oc[*k] != **v).count();
    assert!(
        differ > 100,
        "another seed gives other samples ({differ} of 500 differ)"
    );
    // Beam search and greedy with repetition penalty run through the plan.
    let d = tmp.path().join("d");
    let s = run(&gen_plan(&model, &d, "max_new_tokens: 8, num_beams: 3, length_penalty: 0.8, repetition_penalty: 1.2, no_repeat_ngram_size: 2", ""), &ctx).await;
    assert_eq!(s.write.unwrap().rows_written, 500);
}

#[tokio::test]
async fn bad_rows_are_recorded_and_identical_inputs_generated_once() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(None, tmp.path(), true);
    let model = tiny_model(tmp.path(), Family::Ul2);
    let out = tmp.path().join("o");
    // Without truncation, long inputs are errors; the run goes on. The source is read twice (repeat),
    // so every input appears twice in a window and is generated once.
    let plan = gen_plan(
        &model,
        &out,
        "max_new_tokens: 6, window_rows: 2000, keep_order: true",
        ", repeat: 2",
    )
    .replace(
        "max_input_tokens: 48 }",
        "max_input_tokens: 24, truncation: false }",
    );
    let s = run(&plan, &ctx).await;
    assert_eq!(s.write.as_ref().unwrap().rows_written, 1000);
    let g = s.reports.generate.as_ref().unwrap();
    let errors = g.finish_reason.error;
    assert!(errors > 50 && errors < 1000, "{errors} errors");
    assert!(g.generated_rows <= (1000 - errors) / 2 + 1, "{g:?}");
    conala::sql::register_table(&ctx, "o", out.to_str().unwrap())
        .await
        .unwrap();
    let b = conala::sql::query(&ctx, "select count(*) from o where finish_reason = 'error' and (error not like '%more than the 24 allowed%' or prediction is not null)").await.unwrap();
    assert_eq!(
        b[0].column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .value(0),
        0
    );
    // keep_order: each part lists rows in row-id order.
    let b = conala::sql::query(&ctx, "select row_id from o")
        .await
        .unwrap();
    let ids: Vec<u64> = b
        .iter()
        .flat_map(|b| {
            b.column(0)
                .as_any()
                .downcast_ref::<UInt64Array>()
                .unwrap()
                .values()
                .to_vec()
        })
        .collect();
    assert!(
        ids.windows(2).filter(|w| w[0] > w[1]).count() <= 5,
        "rows mostly in order across parts"
    );
}

/// Killing a run with SIGKILL part-way and running it again loses no row and duplicates none.
#[test]
fn killed_run_resumes_without_loss_or_duplicates() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), Family::FlanT5);
    let out = tmp.path().join("out");
    let plan_path = tmp.path().join("plan.yaml");
    let plan = gen_plan(
        &model,
        &out,
        "max_new_tokens: 24, min_new_tokens: 24, window_rows: 256, max_batch_rows: 32",
        ", repeat: 40",
    )
    .replace("rows_per_file: 200", "rows_per_file: 256");
    std::fs::write(&plan_path, plan).unwrap();
    let mut child = std::process::Command::new(binary())
        .args(["run", plan_path.to_str().unwrap()])
        .current_dir(repo_root())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let parts = |dir: &Path| {
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .ends_with(".parquet")
                })
                .count()
            })
            .unwrap_or(0)
    };
    let started = std::time::Instant::now();
    while parts(&out) < 3 {
        assert!(started.elapsed().as_secs() < 300, "no parts written");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run finished before it could be killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let written = parts(&out);
    assert!(written < 20000 / 256, "killed part-way ({written} parts)");
    let (ok, stdout, stderr) = run_cli(&["run", plan_path.to_str().unwrap()], &[], &repo_root());
    assert!(ok, "{stderr}");
    assert!(stdout.contains("kept from earlier runs"), "{stdout}");
    let table = format!("o={}", out.display());
    let (ok, stdout, _) = run_cli(
        &[
            "sql",
            "--table",
            &table,
            "--format",
            "csv",
            "select count(*), count(distinct row_id), min(row_id), max(row_id) from o",
        ],
        &[],
        &repo_root(),
    );
    assert!(ok);
    assert_eq!(
        stdout.lines().nth(1),
        Some("20000,20000,0,19999"),
        "{stdout}"
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("_manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["rows_written"], 20000);
    assert!(m["rows_resumed"].as_u64().unwrap() >= 512);
}

/// A panic in background work — the model worker at the input's last batch, or the source's reader
/// after its first batch — fails the run with a message naming the step, leaves the output marked
/// incomplete (no `_SUCCESS`), and a rerun resumes to exactly the output of a run that never failed.
#[test]
fn a_panic_in_background_work_fails_the_run_and_the_rerun_completes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), Family::FlanT5);
    let plan_for = |out: &Path| {
        let plan = gen_plan(
            &model,
            out,
            "max_new_tokens: 8, window_rows: 100",
            ", batch_rows: 100",
        )
        .replace("rows_per_file: 200", "rows_per_file: 100");
        let path = out.with_extension("yaml");
        std::fs::write(&path, plan).unwrap();
        path
    };
    let clean = tmp.path().join("clean");
    let (ok, _, stderr) = run_cli(
        &["run", plan_for(&clean).to_str().unwrap()],
        &[],
        &repo_root(),
    );
    assert!(ok, "{stderr}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ctx = context(None, tmp.path(), true);
    let want = rt.block_on(outputs(&ctx, "clean", &clean));
    assert_eq!(want.len(), 500);
    for (point, stage) in [
        (
            "generate-last-batch",
            "step 4 (generate): model worker: panicked: injected panic",
        ),
        ("source", "step 1 (source): panicked: injected panic"),
    ] {
        let out = tmp.path().join(point);
        let plan = plan_for(&out);
        let (ok, _, stderr) = run_cli(
            &["run", plan.to_str().unwrap()],
            &[("CONALA_INJECT_PANIC", point)],
            &repo_root(),
        );
        assert!(!ok, "{point}: the run must fail");
        assert!(stderr.contains(stage), "{point}: {stderr}");
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("_manifest.json")).unwrap())
                .unwrap();
        assert_eq!(
            manifest["complete"], false,
            "{point}: a failed run was marked complete"
        );
        assert!(!out.join("_SUCCESS").exists(), "{point}");
        let (ok, _, stderr) = run_cli(&["run", plan.to_str().unwrap()], &[], &repo_root());
        assert!(ok, "{point}: {stderr}");
        assert!(
            out.join("_SUCCESS").exists(),
            "{point}: committed at the end"
        );
        let got = rt.block_on(outputs(&ctx, &point.replace('-', "_"), &out));
        assert_eq!(
            got, want,
            "{point}: the resumed output differs from a clean run"
        );
    }
}
