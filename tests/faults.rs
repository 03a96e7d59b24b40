//! What a hostile-but-realistic user runs into: absurd settings and mismatched files caught at
//! validation, secrets kept out of messages, closed pipes, and no backtraces in data.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};

use common::*;
use conala::model::init::Family;
use conala::plans;

async fn build_error(yaml: &str, ctx: &conala::Context) -> String {
    let plan = plans::load_str(yaml, "plan.yaml", &[]).unwrap();
    match plans::build(&plan, ctx).await {
        Ok(_) => panic!("the plan should not validate:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

/// A `max_new_tokens` of 99999999999 once passed `validate` and then aborted the run on a 51 TB
/// allocation; a tokenizer larger than the model's vocabulary passed `validate` and failed every row
/// with an index error. Both are now plan errors naming the step and key.
#[tokio::test]
async fn absurd_bounds_and_a_larger_tokenizer_fail_at_validation() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ctx = context(None, tmp.path(), true);
    ctx.plan_only = true;
    let model = tiny_model(tmp.path(), Family::FlanT5);
    let out = tmp.path().join("out");
    let e = build_error(
        &gen_plan(&model, &out, "max_new_tokens: 99999999999", ""),
        &ctx,
    )
    .await;
    assert!(
        e.contains("generate") && e.contains("max_new_tokens") && e.contains("limit"),
        "{e}"
    );
    for (key, setting) in [
        ("num_beams", "num_beams: 100000"),
        ("max_batch_rows", "max_batch_rows: 99999999999"),
        ("batch_tokens", "batch_tokens: 99999999999999"),
    ] {
        let e = build_error(&gen_plan(&model, &out, setting, ""), &ctx).await;
        assert!(e.contains(key) && e.contains("limit"), "{setting}: {e}");
    }
    let huge_input = gen_plan(&model, &out, "max_new_tokens: 8", "")
        .replace("max_input_tokens: 48", "max_input_tokens: 999999999999");
    let e = build_error(&huge_input, &ctx).await;
    assert!(
        e.contains("tokenize") && e.contains("max_input_tokens"),
        "{e}"
    );

    let vocab = conala::tokenizer::load(&tokenizer_path())
        .unwrap()
        .get_vocab_size(true);
    let small = tiny_model_with_vocab(tmp.path(), Family::FlanT5, vocab / 2);
    let e = build_error(&gen_plan(&small, &out, "max_new_tokens: 8", ""), &ctx).await;
    assert!(
        e.contains("tokenize")
            && e.contains(&format!("{vocab} tokens"))
            && e.contains(&format!("vocabulary has {}", vocab / 2)),
        "{e}"
    );
    assert!(!out.exists(), "validation writes nothing");
}

/// `conala run ... | head -1`: the reader goes away before the summary is printed. The run finishes,
/// writes its output and exits 0 instead of panicking on the broken pipe; so does `conala sql`.
#[test]
fn a_closed_stdout_is_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), Family::FlanT5);
    let out = tmp.path().join("out");
    let plan = tmp.path().join("plan.yaml");
    std::fs::write(&plan, gen_plan(&model, &out, "max_new_tokens: 4", "")).unwrap();
    let closed_stdout = |args: &[&str]| {
        let mut child = Command::new(binary())
            .args(args)
            .current_dir(repo_root())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader is gone before anything is printed
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (child.wait().unwrap(), err)
    };
    let (status, err) = closed_stdout(&["run", plan.to_str().unwrap()]);
    assert!(status.success(), "{status:?}\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.join("_manifest.json").is_file());
    let table = format!("o={}", out.display());
    let (status, err) = closed_stdout(&["sql", "--table", &table, "select * from o"]);
    assert!(status.success(), "{status:?}\n{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A password in `HF_ENDPOINT` and the token's value never appear in messages; a 401 while a token is
/// set says the token was refused instead of asking for one.
#[test]
fn hub_errors_mask_secrets_and_blame_a_refused_token() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("hub");
    let model = tiny_model(tmp.path(), Family::FlanT5);
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        put_repo_file(&root, "models", "org/gated", "main", f, &model.join(f));
    }
    std::fs::write(root.join("models/org/gated/.token"), "right-token").unwrap();
    let server = HubServer::start(root);
    let with_password = server
        .endpoint
        .replace("http://", "http://alice:Pa55word-Secret@");
    let plan = tmp.path().join("plan.yaml");
    let out = tmp.path().join("out");
    std::fs::write(
        &plan,
        gen_plan(
            std::path::Path::new("org/gated"),
            &out,
            "max_new_tokens: 4",
            "",
        ),
    )
    .unwrap();
    let home = tmp.path().join("hf-home");
    let (ok, stdout, err) = run_cli(
        &["validate", plan.to_str().unwrap()],
        &[
            ("HF_ENDPOINT", with_password.as_str()),
            ("HF_HOME", home.to_str().unwrap()),
            ("HF_TOKEN", "hf_WrongTokenValue12345"),
        ],
        &repo_root(),
    );
    assert!(!ok, "{stdout}");
    assert!(err.contains("although a token is set"), "{err}");
    for secret in ["Pa55word-Secret", "hf_WrongTokenValue12345"] {
        assert!(!err.contains(secret) && !stdout.contains(secret), "{err}");
    }
    // Without a token the message asks for one.
    let (ok, _, err) = run_cli(
        &["validate", plan.to_str().unwrap()],
        &[
            ("HF_ENDPOINT", server.endpoint.as_str()),
            ("HF_HOME", home.to_str().unwrap()),
        ],
        &repo_root(),
    );
    assert!(!ok && err.contains("set HF_TOKEN"), "{err}");
    // A push through that endpoint with that token: neither appears in what it prints or stores.
    let (ok, stdout, err) = run_cli(
        &["push", model.to_str().unwrap(), "org/pushed"],
        &[
            ("HF_ENDPOINT", with_password.as_str()),
            ("HF_HOME", home.to_str().unwrap()),
            ("HF_TOKEN", "hf_WrongTokenValue12345"),
        ],
        &repo_root(),
    );
    assert!(ok, "{err}");
    assert!(stdout.contains("alice:***@"), "{stdout}");
    for secret in ["Pa55word-Secret", "hf_WrongTokenValue12345"] {
        assert!(
            !err.contains(secret) && !stdout.contains(secret),
            "{stdout}\n{err}"
        );
    }
    let card = tmp.path().join("hub/models/org/pushed/main/README.md");
    let card = std::fs::read_to_string(&card).expect("the pushed card");
    assert!(!card.contains("Pa55word-Secret") && !card.contains("hf_WrongTokenValue12345"));
    // An unreachable endpoint with a password: the connection error does not echo it either.
    let (ok, _, err) = run_cli(
        &["validate", plan.to_str().unwrap()],
        &[
            ("HF_ENDPOINT", "http://bob:An0therSecret@127.0.0.1:9"),
            ("HF_HOME", home.to_str().unwrap()),
        ],
        &repo_root(),
    );
    assert!(!ok, "unreachable");
    assert!(err.contains("bob:***@127.0.0.1:9"), "{err}");
    assert!(!err.contains("An0therSecret"), "{err}");
}

/// The Hub stand-in answers 503 (a server restarting): requests are retried with backoff a bounded
/// number of times, then the run fails naming the repository; once the server is back the rerun
/// completes.
#[test]
fn a_hub_that_is_down_is_retried_a_bounded_number_of_times() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("hub");
    let model = tiny_model(tmp.path(), Family::FlanT5);
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        put_repo_file(&root, "models", "org/tiny", "main", f, &model.join(f));
    }
    let server = HubServer::start(root);
    server.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let plan = tmp.path().join("plan.yaml");
    let out = tmp.path().join("out");
    std::fs::write(
        &plan,
        gen_plan(
            std::path::Path::new("org/tiny"),
            &out,
            "max_new_tokens: 4",
            "",
        ),
    )
    .unwrap();
    let home = tmp.path().join("hf-home");
    let env = [
        ("HF_ENDPOINT", server.endpoint.as_str()),
        ("HF_HOME", home.to_str().unwrap()),
        ("CONALA_HUB_RETRIES", "3"),
    ];
    let started = std::time::Instant::now();
    let (ok, _, err) = run_cli(&["run", plan.to_str().unwrap()], &env, &repo_root());
    assert!(!ok, "the Hub is down");
    assert!(started.elapsed().as_secs() < 60, "retries are bounded");
    assert!(
        err.contains("org/tiny") && err.contains("gave up after 3 attempts") && err.contains("503"),
        "{err}"
    );
    assert!(err.contains("retrying in"), "{err}");
    assert_eq!(
        server.refused.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "one request, three attempts"
    );
    server
        .down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let (ok, stdout, err) = run_cli(&["run", plan.to_str().unwrap()], &env, &repo_root());
    assert!(ok, "{err}");
    assert!(stdout.contains("wrote 500 rows"), "{stdout}");
}
