//! Training: parity with HF transformers + PEFT (loss, LoRA gradients, 5 AdamW steps), PEFT adapters in
//! both directions, merging, the train plan end to end, kill/resume, and bad input.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use conala::context::Context;
use conala::model::lora::AdapterFiles;
use conala::model::mode::{Dropout, Mode, TrainState};
use conala::model::ops;
use conala::model::weights::Weights;
use conala::model::{DTypeChoice, DeviceChoice, ModelSource};
use conala::model::{ModelConfig, Seq2Seq};
use conala::plans;
use conala::training::optimizer::{AdamW, AdamWConfig};

fn peft_dir() -> PathBuf {
    repo_root().join("tests/fixtures/parity/peft")
}

/// The PEFT fixtures: flan-t5 (targets q, v) and BART (PEFT's default for it: q_proj, v_proj).
const PEFT_FIXTURES: [&str; 2] = ["peft", "peft-bart"];

fn peft_fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/parity").join(name)
}

/// The model of a fixture folder, through the seam.
fn model_at(dir: &Path) -> Box<dyn Seq2Seq> {
    let cfg = ModelConfig::from_json(
        &std::fs::read_to_string(dir.join("config.json")).unwrap(),
        "base",
    )
    .unwrap();
    let w = Weights::open(
        &[dir.join("model.safetensors")],
        "base",
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    cfg.build(&w).unwrap()
}

/// A PEFT fixture's base with one of its adapters applied.
async fn with_adapter_of(
    fixture: &str,
    name: &str,
) -> (Box<dyn Seq2Seq>, Vec<(String, candle_core::Var)>) {
    let mut m = model_at(&peft_fixture(fixture).join("base"));
    let ctx = context(None, Path::new("/tmp"), true);
    let a = AdapterFiles::locate(peft_fixture(fixture).join(name).to_str().unwrap(), &ctx.hub)
        .await
        .unwrap();
    let vars = a.apply(m.as_mut()).unwrap();
    (m, vars)
}

fn io_of(fixture: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(peft_fixture(fixture).join("io.safetensors"), &Device::Cpu)
        .unwrap()
}

/// HF-style batch for a model that starts decoding with `start` and pads with `pad`: HF's
/// `shift_tokens_right` of the labels, -100 replaced by `pad`.
fn batch_for(
    io: &HashMap<String, Tensor>,
    start: u32,
    pad: u32,
) -> (Tensor, Tensor, Tensor, Tensor, Tensor) {
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = io["attention_mask"].to_dtype(DType::U8).unwrap();
    let labels: Vec<Vec<i64>> = io["labels"].to_vec2().unwrap();
    let (mut dec, mut lab, mut lmask) = (vec![], vec![], vec![]);
    for row in &labels {
        for j in 0..row.len() {
            let prev = match j {
                0 => start,
                _ if row[j - 1] < 0 => pad,
                _ => row[j - 1] as u32,
            };
            dec.push(prev);
            lab.push(row[j].max(0) as u32);
            lmask.push(if row[j] >= 0 { 1f32 } else { 0.0 });
        }
    }
    let (b, t) = (labels.len(), labels[0].len());
    let d = |v: Vec<u32>| Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap();
    (
        ids,
        mask,
        d(dec),
        d(lab),
        Tensor::from_vec(lmask, (b, t), &Device::Cpu).unwrap(),
    )
}

/// The training-mode loss (differentiable softmax; dropout 0 as in the fixture).
fn loss(m: &dyn Seq2Seq, io: &HashMap<String, Tensor>) -> Tensor {
    let t = m.config().tokens;
    let (ids, mask, dec, lab, lmask) = batch_for(io, t.decoder_start, t.pad);
    let state = std::cell::RefCell::new(TrainState::new(
        Dropout::uniform(0.0),
        conala::rng::Rng::new(0),
    ));
    let logits = m
        .forward(
            &ids,
            &mask,
            &dec,
            &Mode {
                train: Some(&state),
            },
        )
        .unwrap();
    let (sum, n) = ops::cross_entropy(&logits, &lab, &lmask, 0.0).unwrap();
    (sum / n).unwrap()
}

#[tokio::test]
async fn loss_gradients_and_adamw_steps_match_peft() {
    for fixture in PEFT_FIXTURES {
        loss_gradients_and_adamw_steps_match_peft_for(fixture).await;
    }
}

async fn loss_gradients_and_adamw_steps_match_peft_for(fixture: &str) {
    let io = io_of(fixture);
    let (model, vars) = with_adapter_of(fixture, "adapter_init").await;
    let hf_losses: Vec<f32> = io["losses"].to_vec1().unwrap();
    let l = loss(model.as_ref(), &io);
    let ours = l.to_scalar::<f32>().unwrap();
    assert!(
        (ours - hf_losses[0]).abs() < 1e-4 * hf_losses[0].abs().max(1.0),
        "loss {ours} vs HF {}",
        hf_losses[0]
    );
    let grads = l.backward().unwrap();
    // q and v of 2 encoder blocks, and of the self- and cross-attention of 2 decoder blocks: 12 modules, A and B.
    assert_eq!(vars.len(), 24, "{fixture}");
    for (name, v) in &vars {
        let g = grads.get(v.as_tensor()).unwrap();
        let hf = &io[&format!("grad.{name}")];
        let rel = ((g - hf)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt())
            / hf.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt()
                .max(1e-12);
        assert!(
            rel < 1e-3,
            "{fixture} {name}: relative gradient error {rel}"
        );
    }
    // Five AdamW steps (lr 1e-3, weight decay 0.01 on LoRA weights, as torch.optim.AdamW in the fixture).
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
        |_| true,
    )
    .unwrap();
    for (step, want) in hf_losses.iter().take(5).enumerate() {
        let l = loss(model.as_ref(), &io);
        let got = l.to_scalar::<f32>().unwrap();
        assert!(
            (got - want).abs() < 1e-3 * want.abs().max(1.0),
            "{fixture} step {step}: {got} vs {want}"
        );
        let g = l.backward().unwrap();
        let gs: Vec<Tensor> = vars
            .iter()
            .map(|(_, v)| g.get(v.as_tensor()).unwrap().clone())
            .collect();
        opt.apply(&gs, 1e-3).unwrap();
    }
    for (name, v) in &vars {
        let hf = &io[&format!("after.{name}")];
        let d: f32 = (v.as_tensor() - hf)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-4, "{fixture} {name}: after 5 steps differs by {d}");
    }
}

#[tokio::test]
async fn peft_trained_adapter_reproduces_hf_generations() {
    for fixture in PEFT_FIXTURES {
        peft_trained_adapter_reproduces_hf_generations_for(fixture).await;
    }
}

async fn peft_trained_adapter_reproduces_hf_generations_for(fixture: &str) {
    let io = io_of(fixture);
    let (model, _) = with_adapter_of(fixture, "adapter_trained").await;
    let (eos, pad) = (model.config().tokens.eos, model.config().tokens.pad);
    let ids: Vec<Vec<i64>> = io["input_ids"].to_vec2().unwrap();
    let mask: Vec<Vec<i64>> = io["attention_mask"].to_vec2().unwrap();
    let rows: Vec<Vec<u32>> = ids
        .iter()
        .zip(&mask)
        .map(|(r, m)| {
            r.iter()
                .zip(m)
                .filter(|(_, k)| **k == 1)
                .map(|(t, _)| *t as u32)
                .collect()
        })
        .collect();
    let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    let o = conala::model::decoding::DecodeOptions {
        max_new_tokens: 32,
        ..Default::default()
    };
    let got = conala::model::decoding::generate(model.as_ref(), &refs, &[0; 4], &o).unwrap();
    let hf: Vec<Vec<i64>> = io["greedy_trained"].to_vec2().unwrap();
    for (g, h) in got.iter().zip(&hf) {
        let mut want: Vec<u32> = vec![];
        for &t in &h[1..] {
            want.push(t as u32);
            if t as u32 == eos {
                break;
            }
        }
        while want.last() == Some(&pad) {
            want.pop();
        }
        assert_eq!(g.tokens, want, "{fixture}");
    }
    assert!(
        got.iter().any(|g| g.tokens.len() > 3),
        "{fixture}: the outputs say something"
    );
}

#[tokio::test]
async fn adapter_for_another_base_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(None, tmp.path(), true);
    // The t5 parity model has the same shapes but no lm_head; use a differently sized random model.
    let other = tmp.path().join("other");
    let vocab = 64;
    let mut cfg = conala::model::init::config(
        conala::model::init::Family::FlanT5,
        conala::model::init::Size::Tiny,
        vocab,
    );
    cfg.d_model = 48;
    std::fs::create_dir_all(&other).unwrap();
    let w = conala::model::init::random_weights(&cfg, 1).unwrap();
    conala::model::weights::save_safetensors(&w, &other.join("model.safetensors")).unwrap();
    std::fs::write(
        other.join("config.json"),
        conala::model::init::config_json(&cfg).to_string(),
    )
    .unwrap();
    let spec = ModelSource {
        adapter: Some(peft_dir().join("adapter_trained").display().to_string()),
        ..ModelSource::at(
            &other.display().to_string(),
            DeviceChoice::Cpu,
            DTypeChoice::F32,
        )
    };
    let e = conala::model::load(&spec, &ctx.hub)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("has shape") && e.contains("does the adapter belong to this base model"),
        "{e}"
    );
}

/// Load, validate and run a plan given as YAML text.
async fn run_plan(yaml: &str, ctx: &Context) -> conala::error::Result<plans::RunSummary> {
    let plan = plans::load_str(yaml, "train.yaml", &[])?;
    plans::build(&plan, ctx).await?.run(ctx).await
}

fn tiny(
    dir: &Path,
    family: conala::model::init::Family,
    size: conala::model::init::Size,
) -> PathBuf {
    let out = dir.join("base");
    let vocab = conala::tokenizer::load(&tokenizer_path())
        .unwrap()
        .get_vocab_size(true);
    conala::model::init::write_random_model(
        &conala::model::init::config(family, size, vocab),
        5,
        &tokenizer_path(),
        &out,
    )
    .unwrap();
    out
}

#[tokio::test]
async fn train_plan_writes_peft_adapter_merged_model_metrics_and_plot() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(None, tmp.path(), true);
    let base = tiny(
        tmp.path(),
        conala::model::init::Family::FlanT5,
        conala::model::init::Size::Tiny,
    );
    let out = tmp.path().join("run");
    let yaml = train_plan(&base, &out, "lora: { r: 4, alpha: 8, targets: [q, v] }\n      max_steps: 12\n      batch_size: 8\n      learning_rate: 1.0e-2\n      warmup_steps: 2\n      log_every: 3\n      eval_every: 4\n      save_every: 4\n      save_total_limit: 1\n      baseline: intent");
    let s = run_plan(&yaml, &ctx).await.unwrap();
    let t = s.reports.train.unwrap();
    assert_eq!(t.steps, 12);
    assert!(t.final_eval_loss.unwrap().is_finite());
    let scores = t.eval_scores.unwrap();
    assert_eq!(scores.rows as usize, t.eval_examples);
    assert!(t.baseline_scores.unwrap().bleu > 0.0);
    for f in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "metrics.jsonl",
        "loss.png",
        "eval_predictions.parquet",
        "summary.json",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    // save_total_limit 1 keeps the newest and the best.
    let cks: Vec<u64> = conala::training::checkpoint::list(&out);
    assert!(cks.contains(&12) && cks.len() <= 2, "{cks:?}");
    // metrics.jsonl: loss every 3 steps, eval every 4.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.iter().filter(|l| l.get("loss").is_some()).count(), 4);
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.get("eval_loss").is_some())
            .count(),
        3
    );
    assert!(lines.iter().any(|l| l.get("eval_bleu").is_some()));
    // PEFT keys and shapes.
    let a =
        candle_core::safetensors::load(out.join("adapter/adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let k = "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight";
    assert_eq!(a[k].dims(), &[4, 64]);
    assert_eq!(
        a["base_model.model.decoder.block.1.layer.1.EncDecAttention.v.lora_B.weight"].dims(),
        &[64, 4]
    );
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (
            cfg["r"].as_u64(),
            cfg["lora_alpha"].as_f64(),
            cfg["peft_type"].as_str()
        ),
        (Some(4), Some(8.0), Some("LORA"))
    );
    // The merged checkpoint gives the same greedy outputs as base + adapter.
    let merged = conala::model::load(
        &ModelSource {
            adapter: None,
            ..ModelSource::at(
                &out.join("model").display().to_string(),
                DeviceChoice::Cpu,
                DTypeChoice::F32,
            )
        },
        &ctx.hub,
    )
    .await
    .unwrap();
    let with = conala::model::load(
        &ModelSource {
            adapter: Some(out.join("adapter").display().to_string()),
            ..ModelSource::at(
                &base.display().to_string(),
                DeviceChoice::Cpu,
                DTypeChoice::F32,
            )
        },
        &ctx.hub,
    )
    .await
    .unwrap();
    let rows: Vec<Vec<u32>> = (0..4).map(|i| (3..(10 + i * 5)).collect()).collect();
    let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    let o = conala::model::decoding::DecodeOptions {
        max_new_tokens: 16,
        ..Default::default()
    };
    assert_eq!(
        conala::model::decoding::generate(merged.model.as_ref(), &refs, &[0; 4], &o).unwrap(),
        conala::model::decoding::generate(with.model.as_ref(), &refs, &[0; 4], &o).unwrap()
    );
    // `conala merge` writes the same checkpoint.
    let m2 = tmp.path().join("merged2");
    let (ok, _, err) = run_cli(
        &[
            "merge",
            "--base",
            base.to_str().unwrap(),
            "--adapter",
            out.join("adapter").to_str().unwrap(),
            "--out",
            m2.to_str().unwrap(),
        ],
        &[],
        &repo_root(),
    );
    assert!(ok, "{err}");
    let x = candle_core::safetensors::load(m2.join("model.safetensors"), &Device::Cpu).unwrap();
    let y =
        candle_core::safetensors::load(out.join("model/model.safetensors"), &Device::Cpu).unwrap();
    let q = "encoder.block.1.layer.0.SelfAttention.q.weight";
    let d: f32 = (&x[q] - &y[q])
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(d < 1e-6);
    // Running again without --resume refuses to clobber the checkpoints.
    let e = run_plan(&yaml, &ctx).await.unwrap_err().to_string();
    assert!(e.contains("--resume"), "{e}");
}

/// Full fine-tuning (`lora: null`) with the same seed gives the same losses twice.
#[tokio::test]
async fn full_finetuning_is_seeded_and_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(None, tmp.path(), true);
    let base = tiny(
        tmp.path(),
        conala::model::init::Family::T5,
        conala::model::init::Size::Tiny,
    );
    let mut losses = vec![];
    for run in 0..2 {
        let out = tmp.path().join(format!("run{run}"));
        let yaml = train_plan(&base, &out, "lora: null\n      max_steps: 6\n      batch_size: 8\n      learning_rate: 1.0e-3\n      log_every: 1\n      eval_every: 3\n      save_every: 3\n      lr_scheduler: cosine\n      gradient_accumulation_steps: 2\n      label_smoothing: 0.1");
        run_plan(&yaml, &ctx).await.unwrap();
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let values: Vec<(u64, Option<f64>, Option<f64>)> = metrics
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| {
                (
                    v["step"].as_u64().unwrap(),
                    v["loss"].as_f64(),
                    v["eval_loss"].as_f64(),
                )
            })
            .collect();
        assert_eq!(values.iter().filter(|v| v.1.is_some()).count(), 6);
        losses.push(values);
        assert!(out.join("model/model.safetensors").is_file());
        assert!(!out.join("adapter").exists());
    }
    assert_eq!(losses[0], losses[1], "same seed, same losses");
}

/// The offline default's recipe in small: a copy-prior base made by `model.init`, LoRA on q and v,
/// beam-search evaluation. The prior copies before training, so a few gentle steps keep its BLEU at
/// the level of copying (a random model scores ~0); a misspelt prior is refused by name.
#[tokio::test]
async fn copy_prior_base_trains_with_lora_and_beam_evaluation() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(None, tmp.path(), true);
    let model = tmp.path().join("prior");
    let out = tmp.path().join("run");
    let init = format!(
        "path: \"{}\"\n  init: {{ family: flan-t5, prior: copy, tokenizer: \"{}\" }}",
        model.display(),
        tokenizer_path().display()
    );
    let train = "lora: { r: 8, alpha: 32, dropout: 0.0, targets: [q, v] }\n      dropout: 0.0\n      max_steps: 3\n      batch_size: 8\n      learning_rate: 1.0e-4\n      eval_every: 3\n      save_every: 3\n      eval_num_beams: 2\n      eval_no_repeat_ngram_size: 3\n      baseline: intent";
    let yaml = train_plan(Path::new("X"), &out, train)
        .replace("model: { path: \"X\" }", &format!("model:\n  {init}"));
    let t = run_plan(&yaml, &ctx).await.unwrap().reports.train.unwrap();
    assert_eq!(t.steps, 3);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        (cfg["d_model"].as_u64(), cfg["num_heads"].as_u64()),
        (Some(256), Some(4))
    );
    let (scores, baseline) = (t.eval_scores.unwrap(), t.baseline_scores.unwrap());
    assert!(
        scores.bleu > 0.5 * baseline.bleu && baseline.bleu > 5.0,
        "BLEU {} vs copy-the-intent {}",
        scores.bleu,
        baseline.bleu
    );

    let bad = yaml.replace("prior: copy", "prior: copy-intent").replace(
        &format!("{}\"", model.display()),
        &format!("{}-bad\"", model.display()),
    );
    let e = run_plan(&bad, &ctx)
        .await
        .expect_err("an unknown prior fails")
        .to_string();
    // Refused when the plan is read, naming the key and the valid names.
    assert!(
        e.contains("key `model.init.prior`")
            && e.contains("unknown value `copy-intent`")
            && e.contains("one of: random, copy"),
        "{e}"
    );
}

/// The training losses a run logged in `out/metrics.jsonl`, step by step.
fn loss_curve(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .collect()
}

fn adapter_tensors(dir: &Path) -> HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(dir.join("adapter/adapter_model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

/// Killed with SIGKILL after a checkpoint, or stopped by SIGTERM (which checkpoints the step it stops
/// at and says how to resume), `--resume` ends with the same weights as an uninterrupted run.
#[test]
fn killed_training_resumes_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny(
        tmp.path(),
        conala::model::init::Family::FlanT5,
        conala::model::init::Size::Small,
    );
    let settings = "lora: { r: 8, alpha: 16, dropout: 0.1, targets: [q, v] }\n      max_steps: 8\n      batch_size: 8\n      learning_rate: 1.0e-3\n      warmup_steps: 2\n      log_every: 1\n      eval_every: 4\n      save_every: 2\n      save_total_limit: 2";
    let write = |name: &str| {
        let out = tmp.path().join(name);
        let p = tmp.path().join(format!("{name}.yaml"));
        std::fs::write(
            &p,
            train_plan(&base, &out, settings).replace("limit: 40", "limit: 8"),
        )
        .unwrap();
        (p, out)
    };
    let (plan_a, out_a) = write("a");
    let (ok, _, err) = run_cli(&["run", plan_a.to_str().unwrap()], &[], &repo_root());
    assert!(ok, "{err}");
    // SIGKILL after a checkpoint; SIGTERM, which saves a checkpoint of the step it stops at.
    for (name, signal) in [("b", "KILL"), ("c", "TERM")] {
        let (plan_b, out_b) = write(name);
        let child = std::process::Command::new(binary())
            .args(["run", plan_b.to_str().unwrap()])
            .current_dir(repo_root())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut child = child;
        let started = std::time::Instant::now();
        while conala::training::checkpoint::list(&out_b).is_empty() {
            assert!(started.elapsed().as_secs() < 600, "no checkpoint written");
            assert!(
                child.try_wait().unwrap().is_none(),
                "finished before it could be killed"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let sent = std::process::Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let at_kill = conala::training::checkpoint::list(&out_b);
        assert!(*at_kill.last().unwrap() < 8, "{signal}: {at_kill:?}");
        if signal == "TERM" {
            assert_eq!(out.status.code(), Some(143), "{stderr}");
            assert!(
                stderr.contains("train: stopped by SIGTERM at step") && stderr.contains("--resume"),
                "{stderr}"
            );
        }
        let (ok, _, err) = run_cli(&["run", plan_b.to_str().unwrap()], &[], &repo_root());
        assert!(!ok && err.contains("--resume"), "{err}");
        let (ok, _, err) = run_cli(
            &["run", plan_b.to_str().unwrap(), "--resume"],
            &[],
            &repo_root(),
        );
        assert!(ok, "{err}");
        let (a, b) = (adapter_tensors(&out_a), adapter_tensors(&out_b));
        assert_eq!(a.len(), b.len());
        for (k, va) in &a {
            let d = va
                .iter()
                .zip(&b[k])
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(d <= 1e-6, "{signal}: {k} differs by {d} after resume");
        }
        assert_eq!(loss_curve(&out_a), loss_curve(&out_b), "{signal}");
    }
}

#[tokio::test]
async fn bad_training_input_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(None, tmp.path(), true);
    let base = tiny(
        tmp.path(),
        conala::model::init::Family::FlanT5,
        conala::model::init::Size::Tiny,
    );
    // Empty training set.
    let yaml = train_plan(&base, &tmp.path().join("e"), "max_steps: 2").replace(
        "rewritten_intent IS NOT NULL\"",
        "rewritten_intent IS NOT NULL AND false\"",
    );
    let e = run_plan(&yaml, &ctx).await.unwrap_err().to_string();
    assert!(e.contains("empty training set"), "{e}");
    // Eval rows without the target column.
    let j = tmp.path().join("eval.jsonl");
    std::fs::write(&j, "{\"intent\": \"a\", \"snippet\": \"b\"}\n").unwrap();
    let yaml = train_plan(&base, &tmp.path().join("f"), "max_steps: 2").replace(
        &format!(
            "{{ uri: \"{}\", config: curated, split: test, limit: 40 }}",
            data_dir().display()
        ),
        &format!("{{ uri: \"{}\" }}", j.display()),
    );
    let e = run_plan(&yaml, &ctx).await.unwrap_err().to_string();
    assert!(
        e.contains("rewritten_intent") && e.contains("eval rows"),
        "{e}"
    );
    // A loss that becomes NaN stops the run and names the last good checkpoint.
    let out = tmp.path().join("nan");
    let yaml = train_plan(&base, &out, "lora: null\n      max_steps: 50\n      batch_size: 8\n      learning_rate: 1.0e+30\n      max_grad_norm: 0\n      save_every: 1\n      eval_every: 100");
    let e = run_plan(&yaml, &ctx).await.unwrap_err().to_string();
    assert!(
        e.contains("loss became") && e.contains("checkpoint-"),
        "{e}"
    );
    let kept = conala::training::checkpoint::list(&out);
    assert!(!kept.is_empty());
}

/// LoRA on a bf16 base, as PEFT runs it: base weights in bf16; norms, softmax and the loss in f32;
/// adapter weights and AdamW state in f32. Its losses track an f32 run's step by step, and what it
/// saves (adapter, optimizer state) is f32.
#[tokio::test]
async fn bf16_lora_training_tracks_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(None, tmp.path(), true);
    let base = tiny(
        tmp.path(),
        conala::model::init::Family::FlanT5,
        conala::model::init::Size::Tiny,
    );
    let train = "lora: { r: 4, alpha: 8, dropout: 0.0, targets: [q, v] }\n      dropout: 0.0\n      max_steps: 8\n      batch_size: 8\n      learning_rate: 1.0e-2\n      log_every: 1\n      eval_every: 8\n      save_every: 8";
    let mut losses = vec![];
    for dtype in ["f32", "bf16"] {
        let out = tmp.path().join(dtype);
        let yaml = train_plan(&base, &out, train).replace(
            &format!("model: {{ path: \"{}\" }}", base.display()),
            &format!("model: {{ path: \"{}\", dtype: {dtype} }}", base.display()),
        );
        let t = run_plan(&yaml, &ctx).await.unwrap().reports.train.unwrap();
        assert_eq!(t.steps, 8);
        let curve = loss_curve(&out);
        assert_eq!(curve.len(), 8, "{dtype}: {curve:?}");
        for (name, t) in candle_core::safetensors::load(
            out.join("adapter/adapter_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap()
        {
            assert_eq!(t.dtype(), DType::F32, "{dtype}: adapter tensor {name}");
        }
        for (name, t) in candle_core::safetensors::load(
            out.join("checkpoint-8/optimizer.safetensors"),
            &Device::Cpu,
        )
        .unwrap()
        {
            assert_eq!(t.dtype(), DType::F32, "{dtype}: optimizer state {name}");
        }
        losses.push(curve);
    }
    let (f32_run, bf16_run) = (&losses[0], &losses[1]);
    for (step, (a, b)) in f32_run.iter().zip(bf16_run).enumerate() {
        let rel = (a - b).abs() / a.abs();
        assert!(rel < 0.02, "step {}: f32 loss {a}, bf16 {b}", step + 1);
    }
    // Both learn: the loss falls over the run.
    assert!(bf16_run[7] < bf16_run[0], "{bf16_run:?}");
    println!("losses f32 {f32_run:?}\n       bf16 {bf16_run:?}");
}

/// Gradient checkpointing gives the plain backward pass's loss and gradients, with dropout on (the
/// recomputed blocks replay the same masks) and the generator left where the plain pass leaves it: for
/// LoRA's variables, and for every weight in full fine-tuning.
#[test]
fn checkpointed_gradients_equal_plain_ones() {
    // T5 (flan) and BART (post-norm, biases, learned positions: every weight of full fine-tuning).
    for (fixture, targets) in [
        ("peft", ["q", "v", "wo"]),
        ("peft-bart", ["q_proj", "v_proj", "fc2"]),
    ] {
        checkpointed_gradients_equal_plain_ones_for(fixture, &targets);
    }
}

fn checkpointed_gradients_equal_plain_ones_for(fixture: &str, targets: &[&str]) {
    use conala::model::lora::{attach_new, AdapterConfig, LoraSettings};
    let io = io_of(fixture);
    let base_model = || model_at(&peft_fixture(fixture).join("base"));
    let t = base_model().config().tokens;
    let (ids, mask, dec, lab, lmask) = batch_for(&io, t.decoder_start, t.pad);
    let loss = |logits: &Tensor| -> conala::Result<Tensor> {
        let (sum, n) = ops::cross_entropy(logits, &lab, &lmask, 0.1)?;
        Ok((sum / n)?)
    };
    let lora = AdapterConfig::new(
        &LoraSettings {
            r: 4,
            alpha: 8.0,
            dropout: 0.1,
            targets: Some(targets.iter().map(|t| t.to_string()).collect()),
            rslora: false,
        },
        "base",
        base_model().config(),
    );
    for full in [false, true] {
        let mut m = base_model();
        let vars: Vec<candle_core::Var> = if full {
            m.make_all_trainable().unwrap()
        } else {
            attach_new(m.as_mut(), &lora, 3).unwrap()
        }
        .into_iter()
        .map(|(_, v)| v)
        .collect();
        // LoRA's B starts at zero: give it values (seeded) so every path carries gradient.
        let mut rng = conala::rng::Rng::new(5);
        for v in &vars {
            if v.as_tensor().sum_all().unwrap().to_scalar::<f32>().unwrap() == 0.0 {
                let n = v.as_tensor().elem_count();
                let values: Vec<f32> = (0..n)
                    .map(|_| (rng.next_f64() as f32 - 0.5) * 0.2)
                    .collect();
                v.set(&Tensor::from_vec(values, v.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        let run = |checkpointed: bool| {
            let state = std::cell::RefCell::new(TrainState::new(
                Dropout::uniform(0.1),
                conala::rng::Rng::new(11),
            ));
            let mode = Mode {
                train: Some(&state),
            };
            let (l, g) = m
                .gradients((&ids, &mask, &dec), &mode, &vars, checkpointed, &loss)
                .unwrap();
            let next = state.borrow_mut().rng.next_u64();
            (l.to_scalar::<f32>().unwrap(), g, next)
        };
        let (plain_loss, plain, plain_next) = run(false);
        let (ck_loss, ck, ck_next) = run(true);
        let what = format!(
            "{fixture}, {}",
            if full { "full fine-tuning" } else { "LoRA" }
        );
        assert!(
            (plain_loss - ck_loss).abs() <= 1e-6 * plain_loss.abs(),
            "{what}: loss {plain_loss} vs {ck_loss}"
        );
        assert_eq!(
            plain_next, ck_next,
            "{what}: the generator moved differently"
        );
        // Gradients that vanish analytically (a key projection's bias: softmax ignores a shift of
        // all scores) are rounding noise on both paths; judge them against the largest gradient.
        let largest = plain
            .iter()
            .flatten()
            .map(|g| {
                g.abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .fold(0f32, f32::max);
        let mut compared = 0;
        for (i, (a, b)) in plain.iter().zip(&ck).enumerate() {
            match (a, b) {
                (Some(a), Some(b)) => {
                    let scale = a
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    let d = (a - b)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    // Equal up to float rounding: the backward passes sum the same terms in
                    // another order.
                    assert!(
                        d <= 1e-4 * scale.max(1e-6) + 1e-6 * largest,
                        "{what}: variable {i} differs by {d} (scale {scale})"
                    );
                    compared += 1;
                }
                (None, None) => {}
                _ => panic!("{what}: variable {i} has a gradient on one path only"),
            }
        }
        assert_eq!(
            compared,
            vars.len(),
            "{what}: every variable has a gradient"
        );
    }
}

/// Data parallelism: the batch split over replicas (two listed devices; three by count, so the shards
/// are uneven) trains like one device on the whole batch: the same loss curve and the same adapter up
/// to float rounding (dropout off, since each replica draws its own masks).
#[tokio::test]
async fn replicas_train_like_one_device() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(None, tmp.path(), true);
    let base = tiny(
        tmp.path(),
        conala::model::init::Family::FlanT5,
        conala::model::init::Size::Tiny,
    );
    let train = "lora: { r: 4, alpha: 8, dropout: 0.0, targets: [q, v] }\n      dropout: 0.0\n      max_steps: 6\n      batch_size: 8\n      gradient_accumulation_steps: 2\n      learning_rate: 1.0e-2\n      log_every: 1\n      eval_every: 6\n      save_every: 6";
    let mut runs = vec![];
    for devices in ["", "devices: [cpu, cpu]", "devices: 3"] {
        let out = tmp.path().join(format!("run{}", runs.len()));
        let yaml = train_plan(&base, &out, &format!("{train}\n      {devices}"));
        let t = run_plan(&yaml, &ctx).await.unwrap().reports.train.unwrap();
        assert_eq!(t.steps, 6, "{devices}");
        let curve = loss_curve(&out);
        assert_eq!(curve.len(), 6, "{devices}: {curve:?}");
        runs.push((devices, curve, adapter_tensors(&out)));
    }
    let (_, one_curve, one_adapter) = &runs[0];
    for (devices, curve, adapter) in &runs[1..] {
        for (step, (a, b)) in one_curve.iter().zip(curve).enumerate() {
            let rel = (a - b).abs() / a.abs();
            assert!(rel < 1e-5, "{devices}: step {} loss {a} vs {b}", step + 1);
        }
        assert_eq!(adapter.len(), one_adapter.len(), "{devices}");
        for (name, want) in one_adapter {
            let got = &adapter[name];
            // Relative in norm: ||got - want|| / ||want||.
            let norm = want.iter().map(|v| v * v).sum::<f32>().sqrt();
            let diff = want
                .iter()
                .zip(got)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
                .sqrt();
            assert!(
                diff <= 1e-5 * norm,
                "{devices}: {name} differs by {diff} (norm {norm})"
            );
        }
    }
}

/// For every family: a LoRA adapter (PEFT's default targets for it) saved in PEFT's format loads back
/// onto the base with the same logits, and the merged checkpoint (`conala merge`'s) gives the base +
/// adapter's logits and keeps every tensor name of the original checkpoint (so transformers loads it
/// as it loaded the base). The `.bin` fixture merges into safetensors.
#[tokio::test]
async fn adapters_round_trip_and_merge_for_every_family() {
    use conala::model::lora::{attach_new, save_adapter, save_merged, AdapterConfig, LoraSettings};
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(None, tmp.path(), true);
    for family in [
        "t5", "flan-t5", "ul2", "umt5", "bart", "mbart", "plbart", "t5-bin",
    ] {
        let dir = repo_root().join("tests/fixtures/parity").join(family);
        let src = ModelSource::at(dir.to_str().unwrap(), DeviceChoice::Cpu, DTypeChoice::F32);
        let mut loaded = conala::model::load(&src, &ctx.hub).await.unwrap();
        let cfg = loaded.model.config().clone();
        let adapter_cfg = AdapterConfig::new(&LoraSettings::default(), "base", &cfg);
        let vars = attach_new(loaded.model.as_mut(), &adapter_cfg, 7).unwrap();
        let expected = if cfg.model_type.contains("bart") {
            "q_proj"
        } else {
            ".q.lora_A"
        };
        assert!(
            vars.iter().any(|(n, _)| n.contains(expected)),
            "{family}: {:?}",
            vars[0].0
        );
        let mut rng = conala::rng::Rng::new(9);
        for (_, v) in &vars {
            let n = v.as_tensor().elem_count();
            let vals: Vec<f32> = (0..n)
                .map(|_| (rng.next_f64() as f32 - 0.5) * 0.2)
                .collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
        let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap();
        let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
        let mask = io["attention_mask"].to_dtype(DType::U8).unwrap();
        let dec = io["decoder_input_ids"].to_dtype(DType::U32).unwrap();
        let logits = |m: &dyn Seq2Seq| m.forward(&ids, &mask, &dec, &Mode::INFER).unwrap();
        let with_adapter = logits(loaded.model.as_ref());
        let base_logits = logits(
            conala::model::load(&src, &ctx.hub)
                .await
                .unwrap()
                .model
                .as_ref(),
        );
        let close = |a: &Tensor, b: &Tensor| {
            let scale = b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .max(1.0);
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            d <= 1e-4 * scale
        };
        assert!(
            !close(&with_adapter, &base_logits),
            "{family}: the adapter changes nothing"
        );
        // Our adapter, saved and loaded back onto a fresh base.
        let adapter_dir = tmp.path().join(format!("{family}-adapter"));
        save_adapter(loaded.model.as_mut(), &adapter_cfg, &adapter_dir).unwrap();
        let reloaded = conala::model::load(
            &ModelSource {
                adapter: Some(adapter_dir.display().to_string()),
                ..src.clone()
            },
            &ctx.hub,
        )
        .await
        .unwrap();
        assert!(
            close(&logits(reloaded.model.as_ref()), &with_adapter),
            "{family}: adapter round trip"
        );
        // Merged.
        let merged_dir = tmp.path().join(format!("{family}-merged"));
        save_merged(loaded.model.as_mut(), &loaded.files, &merged_dir).unwrap();
        let merged_src = ModelSource::at(
            merged_dir.to_str().unwrap(),
            DeviceChoice::Cpu,
            DTypeChoice::F32,
        );
        let merged = conala::model::load(&merged_src, &ctx.hub).await.unwrap();
        assert!(
            close(&logits(merged.model.as_ref()), &with_adapter),
            "{family}: merged"
        );
        let original =
            Weights::open(&loaded.files.weights, family, &Device::Cpu, DType::F32).unwrap();
        let written =
            Weights::open(&merged.files.weights, family, &Device::Cpu, DType::F32).unwrap();
        for name in original.names() {
            assert!(
                written.contains(name),
                "{family}: the merged checkpoint lacks `{name}`"
            );
        }
        assert_eq!(
            merged.model.config().tokens,
            cfg.tokens,
            "{family}: generation tokens kept"
        );
    }
}

/// A BART through the training and generation plans: `lora` without targets takes PEFT's default for
/// BART (q_proj, v_proj), with gradient checkpointing; the adapter has PEFT's BART keys; the merged
/// model generates what the base with the adapter generates.
#[tokio::test]
async fn a_bart_trains_with_lora_and_generates_through_the_plans() {
    use conala::model::init::{Family, NewModel, Prior, Size};
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(None, tmp.path(), true);
    let base = tmp.path().join("bart");
    NewModel {
        family: Family::Bart,
        size: Size::Tiny,
        prior: Prior::Random,
        tokenizer: tokenizer_path(),
        seed: 1,
    }
    .write(&base)
    .unwrap();
    let out = tmp.path().join("run");
    let yaml = train_plan(
        &base,
        &out,
        "lora: { r: 4, alpha: 8 }\n      gradient_checkpointing: true\n      max_steps: 6\n      batch_size: 8\n      learning_rate: 1.0e-2\n      warmup_steps: 1\n      eval_every: 6\n      save_every: 6",
    );
    let s = run_plan(&yaml, &ctx).await.unwrap();
    let t = s.reports.train.unwrap();
    assert_eq!(t.steps, 6);
    assert!(t.final_eval_loss.unwrap().is_finite());
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    let a =
        candle_core::safetensors::load(out.join("adapter/adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(
        a.len(),
        2 * 2 * (2 + 2 * 2),
        "q_proj and v_proj of 2 + 2 layers (cross too), A and B"
    );
    assert_eq!(
        a["base_model.model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight"].dims(),
        &[4, 64]
    );
    assert!(
        a.contains_key("base_model.model.model.decoder.layers.1.encoder_attn.v_proj.lora_B.weight")
    );
    // Generation: the merged model, and the base with the adapter, give the same tokens.
    let generate = |model: &str, adapter: Option<&Path>, name: &str| {
        let adapter = adapter.map_or(String::new(), |a| format!(", adapter: \"{}\"", a.display()));
        format!(
            r#"name: {name}
model: {{ path: "{model}"{adapter} }}
steps:
  - source: {{ uri: "{data}", config: curated, split: test, limit: 24 }}
  - format: {{ input: "{{intent}}\n{{snippet}}" }}
  - tokenize: {{ input: input, max_input_tokens: 48 }}
  - generate: {{ output: out, max_new_tokens: 8, min_new_tokens: 3, keep_order: true }}
  - write: {{ path: "{out}" }}
"#,
            data = data_dir().display(),
            out = tmp.path().join(name).display()
        )
    };
    let mut outputs = vec![];
    for (model, adapter, name) in [
        (out.join("model"), None, "merged"),
        (base.clone(), Some(out.join("adapter")), "adapted"),
    ] {
        let s = run_plan(
            &generate(model.to_str().unwrap(), adapter.as_deref(), name),
            &ctx,
        )
        .await
        .unwrap();
        assert_eq!(s.reports.generate.as_ref().unwrap().rows, 24, "{name}");
        outputs.push(read_column(&tmp.path().join(name), "out_ids"));
    }
    assert_eq!(outputs[0].len(), 24);
    assert_eq!(outputs[0], outputs[1]);
    assert!(
        outputs[0].iter().all(|ids| ids.len() >= 3),
        "{:?}",
        outputs[0]
    );
}

/// Every row's list<int32> column of the parquet parts in `dir`, in row-id order.
fn read_column(dir: &Path, column: &str) -> Vec<Vec<i32>> {
    use datafusion::arrow::array::{Array, AsArray, ListArray, UInt64Array};
    let mut rows = vec![];
    for f in std::fs::read_dir(dir).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|e| e == "parquet") {
            let file = std::fs::File::open(&p).unwrap();
            let reader =
                datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                    file,
                )
                .unwrap()
                .build()
                .unwrap();
            for b in reader {
                let b = b.unwrap();
                let ids = b
                    .column_by_name("row_id")
                    .unwrap()
                    .as_any()
                    .downcast_ref::<UInt64Array>()
                    .unwrap()
                    .clone();
                let col = b
                    .column_by_name(column)
                    .unwrap()
                    .as_any()
                    .downcast_ref::<ListArray>()
                    .unwrap()
                    .clone();
                for i in 0..b.num_rows() {
                    let v = col.value(i);
                    let v = v.as_primitive::<datafusion::arrow::datatypes::Int32Type>();
                    rows.push((ids.value(i), v.values().to_vec()));
                }
            }
        }
    }
    rows.sort();
    rows.into_iter().map(|(_, v)| v).collect()
}

/// Validation catches what would fail (or be silently wrong) later: LoRA targets of another family,
/// and lengths past a BART's learned positions.
#[tokio::test]
async fn family_mismatches_fail_at_validation_naming_the_key() {
    use conala::model::init::{Family, NewModel, Prior, Size};
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(None, tmp.path(), true);
    let t5 = tiny(tmp.path(), Family::FlanT5, Size::Tiny);
    let bart = tmp.path().join("bart");
    NewModel {
        family: Family::Bart,
        size: Size::Tiny,
        prior: Prior::Random,
        tokenizer: tokenizer_path(),
        seed: 1,
    }
    .write(&bart)
    .unwrap();
    let ctx = &ctx;
    let check = |yaml: String| async move {
        let plan = plans::load_str(&yaml, "train.yaml", &[]).unwrap();
        plans::build(&plan, ctx).await.err().unwrap().to_string()
    };
    let e = check(train_plan(
        &t5,
        &tmp.path().join("o1"),
        "lora: { targets: [q_proj, v_proj] }",
    ))
    .await;
    assert!(
        e.contains("lora.targets")
            && e.contains("match no module")
            && e.contains("q, k, v, o, wi_0, wi_1, wo"),
        "{e}"
    );
    let e = check(train_plan(
        &bart,
        &tmp.path().join("o2"),
        "lora: { targets: [q, v] }",
    ))
    .await;
    assert!(
        e.contains("q_proj, k_proj, v_proj, out_proj, fc1, fc2"),
        "{e}"
    );
    let long = train_plan(&bart, &tmp.path().join("o3"), "max_steps: 1")
        .replace("max_input_tokens: 48", "max_input_tokens: 2048");
    let e = check(long).await;
    assert!(
        e.contains("max_position_embeddings 1024") && e.contains("max_input_tokens 2048"),
        "{e}"
    );
}
