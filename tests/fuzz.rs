//! Fuzzing, bounded: mutated shipped plans and `--set` values, and random or truncated bytes in place
//! of parquet, JSON and JSON-lines inputs, safetensors, PyTorch .bin, tokenizer.json, config.json and
//! adapter files.
//! Never a panic; every error names the file it is about.
//!
//! `CONALA_FUZZ_CASES` (default 3000) sets the number of cases, `CONALA_FUZZ_SECONDS` runs for that
//! long instead, `CONALA_FUZZ_SEED` picks the sequence (printed, so a failure can be replayed);
//! `scripts/fuzz.sh` runs it for longer.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use conala::model::{DTypeChoice, DeviceChoice, ModelSource};
use conala::plans;

/// splitmix64: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Values that break parsers and validators.
const NASTY: [&str; 16] = [
    "-1",
    "0",
    "1e308",
    "99999999999999999999",
    "\"\"",
    "null",
    "[]",
    "{}",
    "true",
    "NaN",
    "-0.0",
    "\"\\u0000\"",
    "[[[[[[[[[[",
    "{a: [1, {b: }}",
    "&anchor *anchor",
    "!!binary AAAA",
];

/// One random edit of `data`: truncate, flip bytes, insert or delete a run, replace a token with a
/// nasty value, or replace everything.
fn mutate(rng: &mut Rng, data: &[u8]) -> (Vec<u8>, String) {
    let mut d = data.to_vec();
    let len = d.len();
    match rng.below(7) {
        0 => {
            let at = rng.below(len + 1);
            d.truncate(at);
            (d, format!("truncated at {at}"))
        }
        1 => {
            let n = 1 + rng.below(8);
            for _ in 0..n {
                if !d.is_empty() {
                    let i = rng.below(d.len());
                    d[i] ^= 1 << rng.below(8);
                }
            }
            (d, format!("{n} bits flipped"))
        }
        2 => {
            let at = rng.below(len + 1);
            let n = rng.below(64);
            let junk = rng.bytes(n);
            d.splice(at..at, junk);
            (d, format!("{n} random bytes inserted at {at}"))
        }
        3 => {
            let a = rng.below(len + 1);
            let b = (a + rng.below(256)).min(len);
            d.drain(a..b);
            (d, format!("bytes {a}..{b} deleted"))
        }
        4 | 5 => {
            // Replace a token (a run of word characters) with a nasty value.
            let text = String::from_utf8_lossy(&d).into_owned();
            let starts: Vec<usize> = text
                .char_indices()
                .filter(|(i, c)| {
                    c.is_alphanumeric()
                        && text[..*i]
                            .chars()
                            .next_back()
                            .is_none_or(|p| !p.is_alphanumeric() && p != '_')
                })
                .map(|(i, _)| i)
                .collect();
            if starts.is_empty() {
                return (d, "unchanged".into());
            }
            let s = starts[rng.below(starts.len())];
            let e = text[s..]
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.' || c == '-'))
                .map_or(text.len(), |n| s + n);
            let v = NASTY[rng.below(NASTY.len())];
            let out = format!("{}{v}{}", &text[..s], &text[e..]);
            (out.into_bytes(), format!("`{}` -> `{v}`", &text[s..e]))
        }
        _ => {
            let n = rng.below(512);
            (rng.bytes(n), format!("{n} random bytes"))
        }
    }
}

/// A case's outcome: fine (no panic, and any error names `file`, or at least `folder` for a file
/// that parses but does not fit the others), or what went wrong.
fn check(
    what: &str,
    file: &str,
    folder: Option<&str>,
    run: impl FnOnce() -> Result<(), String>,
) -> Option<String> {
    match catch_unwind(AssertUnwindSafe(run)) {
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Some(format!("{what}: PANIC {msg}"))
        }
        Ok(Err(e)) if e.contains("panicked") => Some(format!("{what}: panic in a worker: {e}")),
        Ok(Err(e)) if !e.contains(file) && !folder.is_some_and(|f| e.contains(f)) => {
            Some(format!("{what}: the error does not name {file}: {e}"))
        }
        Ok(_) => None,
    }
}

struct Budget {
    cases: usize,
    until: Option<Instant>,
}

impl Budget {
    fn from_env() -> Budget {
        let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        Budget {
            cases: var("CONALA_FUZZ_CASES").unwrap_or(3000) as usize,
            until: var("CONALA_FUZZ_SECONDS").map(|s| Instant::now() + Duration::from_secs(s)),
        }
    }
    fn more(&self, done: usize, share: usize) -> bool {
        match self.until {
            Some(t) => Instant::now() < t,
            None => done < self.cases * share / 100,
        }
    }
}

fn seed() -> u64 {
    std::env::var("CONALA_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0xC0_4A1A)
}

fn report(kind: &str, cases: usize, failures: &[String]) {
    println!(
        "fuzz {kind}: {cases} cases, {} failures (seed {})",
        failures.len(),
        seed()
    );
    assert!(
        failures.is_empty(),
        "{kind}: {} of {cases} cases failed, e.g.:\n{}",
        failures.len(),
        failures
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Shipped plans with YAML edits, and `--set` with nasty values: errors name the plan file.
#[test]
fn mutated_plans_and_overrides_fail_clearly() {
    let budget = Budget::from_env();
    let mut rng = Rng(seed());
    let plans_dir = repo_root().join("pipelines");
    let shipped: Vec<(String, String)> = std::fs::read_dir(&plans_dir)
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect();
    let keys = [
        "name",
        "model.path",
        "model.device",
        "model.dtype",
        "source.uri",
        "source.limit",
        "format.input",
        "tokenize.max_input_tokens",
        "generate.max_new_tokens",
        "generate.num_beams",
        "generate.batch_tokens",
        "train.batch_size",
        "train.learning_rate",
        "train.devices",
        "train.lora.r",
        "write.path",
        "write.mode",
        "write.rows_per_file",
        "steps",
        "nope.nothing",
    ];
    let (mut cases, mut failures) = (0, vec![]);
    while budget.more(cases, 60) {
        let (name, text) = &shipped[rng.below(shipped.len())];
        let file = format!("fuzz-{name}");
        let (bytes, how, sets) = if rng.below(3) == 0 {
            let k = keys[rng.below(keys.len())];
            let v = NASTY[rng.below(NASTY.len())];
            (
                text.as_bytes().to_vec(),
                format!("--set {k}={v}"),
                vec![format!("{k}={v}")],
            )
        } else {
            let (b, how) = mutate(&mut rng, text.as_bytes());
            (b, how, vec![])
        };
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let what = format!("case {cases} {file} ({how})");
        if let Some(f) = check(&what, &file, None, || {
            plans::load_str(&text, &file, &sets)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }) {
            failures.push(f);
        }
        cases += 1;
    }
    report("plans", cases, &failures);
}

/// A plan that reads `input` and writes parquet, run in-process.
async fn read_through(input: &Path, out: &Path) -> Result<(), String> {
    let yaml = format!(
        "name: fuzz\nsteps:\n  - source: {{ uri: \"{}\" }}\n  - write: {{ path: \"{}\", mode: overwrite }}\n",
        input.display(),
        out.display()
    );
    let tmp = out.parent().unwrap();
    let ctx = context(None, tmp, true);
    let plan = plans::load_str(&yaml, "fuzz.yaml", &[]).map_err(|e| e.to_string())?;
    plans::build(&plan, &ctx)
        .await
        .map_err(|e| e.to_string())?
        .run(&ctx)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Parquet, JSON and JSON-lines inputs with random edits: the run fails naming the file, or reads it.
#[test]
fn corrupt_inputs_fail_naming_the_file() {
    let budget = Budget::from_env();
    let mut rng = Rng(seed() ^ 1);
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Valid inputs to start from: 40 real rows as parquet, JSON and JSON lines.
    let base = tmp.path().join("base");
    let (ok, _, err) = run_cli(
        &[
            "sql",
            "--table",
            &format!("t={}", data_dir().join("curated/test").display()),
            "--format",
            "parquet",
            "--output",
            base.with_extension("parquet").to_str().unwrap(),
            "select * from t limit 40",
        ],
        &[],
        &repo_root(),
    );
    assert!(ok, "{err}");
    let (ok, jsonl, err) = run_cli(
        &[
            "sql",
            "--table",
            &format!("t={}", data_dir().join("curated/test").display()),
            "--format",
            "json",
            "select * from t limit 40",
        ],
        &[],
        &repo_root(),
    );
    assert!(ok, "{err}");
    let json = format!("[{}]", jsonl.lines().collect::<Vec<_>>().join(","));
    let originals: Vec<(&str, Vec<u8>)> = vec![
        (
            "parquet",
            std::fs::read(base.with_extension("parquet")).unwrap(),
        ),
        ("jsonl", jsonl.into_bytes()),
        ("json", json.into_bytes()),
    ];
    let (mut cases, mut failures) = (0, vec![]);
    while budget.more(cases, 15) {
        let (ext, data) = &originals[rng.below(originals.len())];
        let (bytes, how) = mutate(&mut rng, data);
        let file = format!("input-{cases}.{ext}");
        let path = tmp.path().join(&file);
        std::fs::write(&path, &bytes).unwrap();
        let out = tmp.path().join("out");
        let what = format!("case {cases} {file} ({how})");
        if let Some(f) = check(&what, &file, None, || {
            rt.block_on(read_through(&path, &out))
        }) {
            failures.push(f);
        }
        let _ = std::fs::remove_file(&path);
        cases += 1;
    }
    report("inputs", cases, &failures);
}

/// A model folder and a LoRA adapter with one file edited at random: loading fails naming the file,
/// or loads.
#[test]
fn corrupt_model_files_fail_naming_the_file() {
    let budget = Budget::from_env();
    let mut rng = Rng(seed() ^ 2);
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fixtures = repo_root().join("tests/fixtures/parity/peft");
    let model = tmp.path().join("model");
    let adapter = tmp.path().join("adapter");
    let bin = tmp.path().join("bin");
    for d in [&model, &adapter, &bin] {
        std::fs::create_dir_all(d).unwrap();
    }
    let bin_fixture = repo_root().join("tests/fixtures/parity/t5-bin");
    let mut files: Vec<(PathBuf, Vec<u8>)> = vec![
        (
            model.join("config.json"),
            std::fs::read(fixtures.join("base/config.json")).unwrap(),
        ),
        (
            model.join("model.safetensors"),
            std::fs::read(fixtures.join("base/model.safetensors")).unwrap(),
        ),
        (
            model.join("tokenizer.json"),
            std::fs::read(tokenizer_path()).unwrap(),
        ),
        (
            adapter.join("adapter_config.json"),
            std::fs::read(fixtures.join("adapter_trained/adapter_config.json")).unwrap(),
        ),
        (
            adapter.join("adapter_model.safetensors"),
            std::fs::read(fixtures.join("adapter_trained/adapter_model.safetensors")).unwrap(),
        ),
    ];
    // A PyTorch checkpoint: its zip and pickle.
    for f in ["config.json", "pytorch_model.bin"] {
        files.push((bin.join(f), std::fs::read(bin_fixture.join(f)).unwrap()));
    }
    let restore = || {
        for (p, b) in &files {
            std::fs::write(p, b).unwrap();
        }
    };
    restore();
    let hub = conala::hub::Hub::new(conala::hub::HubConfig {
        endpoint: "http://127.0.0.1:9".into(),
        cache_dir: tmp.path().join("hf"),
        token: None,
        offline: true,
        progress: false,
    })
    .unwrap();
    let mut source = ModelSource::at(model.to_str().unwrap(), DeviceChoice::Cpu, DTypeChoice::F32);
    source.adapter = Some(adapter.display().to_string());
    let bin_source = ModelSource::at(bin.to_str().unwrap(), DeviceChoice::Cpu, DTypeChoice::F32);
    // The untouched files load.
    rt.block_on(conala::model::load(&source, &hub)).unwrap();
    rt.block_on(conala::model::load(&bin_source, &hub)).unwrap();
    let (mut cases, mut failures) = (0, vec![]);
    while budget.more(cases, 25) {
        let (path, data) = &files[rng.below(files.len())];
        let (bytes, how) = mutate(&mut rng, data);
        std::fs::write(path, &bytes).unwrap();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let folder = path.parent().unwrap().display().to_string();
        let what = format!("case {cases} {file} ({how})");
        let source = if path.starts_with(&bin) {
            &bin_source
        } else {
            &source
        };
        if let Some(f) = check(&what, &file, Some(&folder), || {
            rt.block_on(conala::model::load(source, &hub))
                .map(|_| ())
                .map_err(|e| e.to_string())
        }) {
            failures.push(f);
        }
        std::fs::write(path, data).unwrap();
        cases += 1;
    }
    report("model files", cases, &failures);
}
