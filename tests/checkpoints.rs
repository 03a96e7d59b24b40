//! Checkpoint and tokenizer formats beyond safetensors + tokenizer.json, as Hub repos ship them:
//! PyTorch `.bin` (one file and sharded with an index; local and from the Hub stand-in) read tensor by
//! tensor without running the pickle, and refused by name when it is not a plain state dict.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{context, put_repo_file, repo_root, HubServer};
use conala::model::decoding::{generate, DecodeOptions};
use conala::model::mode::Mode;
use conala::model::weights::Weights;
use conala::model::{DTypeChoice, DeviceChoice, ModelSource, Seq2Seq};

fn bin_dir() -> PathBuf {
    repo_root().join("tests/fixtures/parity/t5-bin")
}

fn io() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(bin_dir().join("io.safetensors"), &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The model gives the logits and greedy tokens transformers gave for the same `.bin` weights.
fn assert_matches_hf(model: &dyn Seq2Seq, what: &str) {
    let io = io();
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = io["attention_mask"].to_dtype(DType::U8).unwrap();
    let dec = io["decoder_input_ids"].to_dtype(DType::U32).unwrap();
    let logits = model.forward(&ids, &mask, &dec, &Mode::INFER).unwrap();
    let d = max_diff(&logits, &io["logits"]);
    let scale = max_diff(&io["logits"], &io["logits"].zeros_like().unwrap()).max(1.0);
    assert!(
        d <= 1e-4 * scale,
        "{what}: logits differ from HF by {d} (logits up to {scale})"
    );
    let ids_v: Vec<Vec<i64>> = io["input_ids"].to_vec2().unwrap();
    let mask_v: Vec<Vec<i64>> = io["attention_mask"].to_vec2().unwrap();
    let rows: Vec<Vec<u32>> = ids_v
        .iter()
        .zip(&mask_v)
        .map(|(r, m)| {
            r.iter()
                .zip(m)
                .filter(|(_, k)| **k == 1)
                .map(|(t, _)| *t as u32)
                .collect()
        })
        .collect();
    let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    let o = DecodeOptions {
        max_new_tokens: 32,
        ..Default::default()
    };
    let ours: Vec<Vec<u32>> = generate(model, &refs, &[0; 4], &o)
        .unwrap()
        .into_iter()
        .map(|g| g.tokens)
        .collect();
    let hf: Vec<Vec<i64>> = io["greedy"].to_vec2().unwrap();
    let hf: Vec<Vec<u32>> = hf
        .iter()
        .map(|r| {
            let mut out = vec![];
            for &t in &r[1..] {
                out.push(t as u32);
                if t == 1 {
                    break;
                }
            }
            while out.last() == Some(&0) {
                out.pop();
            }
            out
        })
        .collect();
    assert_eq!(ours, hf, "{what}: greedy");
}

async fn load(
    path: &str,
    ctx: &conala::context::Context,
) -> conala::Result<conala::model::LoadedModel> {
    let spec = ModelSource::at(path, DeviceChoice::Cpu, DTypeChoice::F32);
    conala::model::load(&spec, &ctx.hub).await
}

/// `pytorch_model.bin`, and the same weights in two shards with their index, decode as HF does.
#[tokio::test]
async fn pytorch_checkpoints_load_and_decode_as_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(None, tmp.path(), true);
    for (dir, files) in [(bin_dir(), 1), (bin_dir().join("sharded"), 2)] {
        let loaded = load(dir.to_str().unwrap(), &ctx).await.unwrap();
        assert_eq!(loaded.files.weights.len(), files);
        assert!(loaded
            .files
            .weights
            .iter()
            .all(|f| f.extension().unwrap() == "bin"));
        assert_matches_hf(loaded.model.as_ref(), &dir.display().to_string());
    }
}

/// A `.bin`-only repo on the Hub stand-in: the index and its shards are fetched, and decode as HF.
#[tokio::test]
async fn a_bin_only_hub_repo_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("hub");
    let src = bin_dir().join("sharded");
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        let name = f.file_name().unwrap().to_str().unwrap().to_string();
        put_repo_file(&root, "models", "org/t5-bin", "main", &name, &f);
    }
    let server = HubServer::start(root);
    let ctx = context(Some(&server.endpoint), &tmp.path().join("cache"), false);
    let loaded = load("org/t5-bin", &ctx).await.unwrap();
    assert_eq!(loaded.files.weights.len(), 2);
    assert_matches_hf(loaded.model.as_ref(), "org/t5-bin");
    let seen: Vec<String> = server
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.path.clone())
        .collect();
    assert!(
        seen.iter()
            .any(|p| p.ends_with("pytorch_model.bin.index.json"))
            && seen
                .iter()
                .any(|p| p.ends_with("pytorch_model-00002-of-00002.bin")),
        "{seen:?}"
    );
}

/// Views into a larger storage (an offset and strides), and f16 / bf16 storages, read as torch
/// holds them; conversions as candle's.
#[test]
fn views_and_reduced_precision_storages_read_as_torch_holds_them() {
    let w = Weights::open(
        &[bin_dir().join("views.bin")],
        "views",
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let whole = w.get("whole", &[5, 8]).unwrap();
    let want: Vec<f32> = (0..40).map(|v| v as f32).collect();
    assert_eq!(whole.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    // big[1:3, 2:6]: rows 1 and 2, columns 2 to 5.
    let view = w.get("view", &[2, 4]).unwrap();
    assert_eq!(
        view.to_vec2::<f32>().unwrap(),
        vec![vec![10., 11., 12., 13.], vec![18., 19., 20., 21.]]
    );
    for name in ["half", "bf"] {
        let t = w.get(name, &[5, 8]).unwrap();
        assert_eq!(t.dtype(), DType::F32);
        assert_eq!(
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want,
            "{name}"
        );
    }
    let as_bf16 = Weights::open(
        &[bin_dir().join("views.bin")],
        "views",
        &Device::Cpu,
        DType::BF16,
    )
    .unwrap()
    .get("whole", &[5, 8])
    .unwrap();
    assert_eq!(as_bf16.dtype(), DType::BF16);
    let e = w.get("whole", &[8, 5]).unwrap_err().to_string();
    assert!(e.contains("has shape [5, 8], expected [8, 5]"), "{e}");
}

/// A `.bin` whose pickle would run code, a training checkpoint that is not a plain state dict, and the
/// legacy format are refused naming the file; nothing in them runs.
#[test]
fn bin_files_that_are_not_plain_state_dicts_are_refused_by_name() {
    let marker = Path::new("/tmp/conala-pwned");
    let _ = std::fs::remove_file(marker);
    let bad = bin_dir().join("bad");
    for (file, want) in [
        ("code.bin", "refers to `posix.system`"),
        ("nested.bin", "`state_dict` holds a dict, not a tensor"),
        ("legacy.bin", "legacy (before torch 1.6) format"),
    ] {
        let e = Weights::open(&[bad.join(file)], "bad", &Device::Cpu, DType::F32)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(file) && e.contains(want), "{file}: {e}");
    }
    assert!(!marker.exists(), "the pickle's code ran");
    // Truncated and foreign files are errors naming the file, not panics.
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(bin_dir().join("pytorch_model.bin")).unwrap();
    for (name, content) in [
        ("cut.bin", bytes[..bytes.len() / 2].to_vec()),
        ("junk.bin", b"PK\x03\x04 not really a zip".to_vec()),
        ("text.bin", b"hello".to_vec()),
    ] {
        let p = tmp.path().join(name);
        std::fs::write(&p, content).unwrap();
        let e = Weights::open(&[p], "bad", &Device::Cpu, DType::F32)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(name), "{name}: {e}");
    }
}

/// Every table of a parquet file, as record batches.
fn read_parquet(path: &Path) -> Vec<datafusion::arrow::array::RecordBatch> {
    let f = std::fs::File::open(path).unwrap();
    datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

/// The texts the shipped plans tokenize, from every shipped CoNaLa row (as the fixture script lists
/// them): `intent\nsnippet`, and the rewritten intent where there is one.
fn conala_texts() -> Vec<String> {
    use datafusion::arrow::array::{Array, AsArray};
    let mut out = vec![];
    for split in ["test", "train"] {
        let path = repo_root().join(format!("data/conala/curated/{split}/0000.parquet"));
        for b in read_parquet(&path) {
            let col = |n: &str| b.column_by_name(n).unwrap().as_string::<i32>().clone();
            let (intent, snippet, rewritten) =
                (col("intent"), col("snippet"), col("rewritten_intent"));
            for i in 0..b.num_rows() {
                if intent.is_valid(i) && snippet.is_valid(i) {
                    out.push(format!("{}\n{}", intent.value(i), snippet.value(i)));
                }
                if rewritten.is_valid(i) && !rewritten.value(i).is_empty() {
                    out.push(rewritten.value(i).to_string());
                }
            }
        }
    }
    out
}

/// Tokenizers without a tokenizer.json (vocab.json + merges.txt as CodeT5 and BART ship them;
/// spiece.model as older T5 and UL2 repos do) give transformers' ids on every shipped CoNaLa row.
#[test]
fn slow_tokenizer_files_give_transformers_ids_on_every_shipped_row() {
    use datafusion::arrow::array::{Array, AsArray, ListArray};
    let texts = conala_texts();
    assert!(texts.len() > 5000, "{} texts", texts.len());
    for kind in ["bpe", "sentencepiece"] {
        let dir = repo_root().join("tests/fixtures/tokenizers").join(kind);
        assert!(!dir.join("tokenizer.json").exists());
        let files = conala::tokenizer::TokenizerFiles::in_folder(&dir)
            .unwrap()
            .unwrap();
        let tok = files.load().unwrap();
        let (mut rows, mut equal, mut first_diff) = (0, 0, None);
        for b in read_parquet(&dir.join("ids.parquet")) {
            let text = b.column_by_name("text").unwrap().as_string::<i32>().clone();
            let ids = b
                .column_by_name("ids")
                .unwrap()
                .as_any()
                .downcast_ref::<ListArray>()
                .unwrap()
                .clone();
            for i in 0..b.num_rows() {
                assert_eq!(
                    text.value(i),
                    texts[rows],
                    "{kind}: row {rows} is not the shipped text"
                );
                let want: Vec<u32> = ids
                    .value(i)
                    .as_primitive::<datafusion::arrow::datatypes::Int32Type>()
                    .values()
                    .iter()
                    .map(|&t| t as u32)
                    .collect();
                let got = tok.encode(text.value(i), true).unwrap().get_ids().to_vec();
                if got == want {
                    equal += 1;
                } else if first_diff.is_none() {
                    first_diff = Some((text.value(i).to_string(), got, want));
                }
                rows += 1;
            }
        }
        assert_eq!(rows, texts.len(), "{kind}: every shipped text has HF's ids");
        assert_eq!(
            equal, rows,
            "{kind}: {equal}/{rows} identical; first difference: {first_diff:?}"
        );
        println!("{kind}: {equal}/{rows} rows identical to transformers' ids");
    }
}

/// Slow files of a class conala cannot convert are refused by name, pointing to tokenizer.json.
#[test]
fn unconvertible_tokenizer_files_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = repo_root().join("tests/fixtures/tokenizers");
    let case = |name: &str, files: &[(&str, &Path)], extra: &[(&str, &str)]| -> String {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for (n, src) in files {
            std::fs::copy(src, d.join(n)).unwrap();
        }
        for (n, text) in extra {
            std::fs::write(d.join(n), text).unwrap();
        }
        let files = conala::tokenizer::TokenizerFiles::in_folder(&d)
            .unwrap()
            .unwrap();
        files.load().unwrap_err().to_string()
    };
    let bpe = [
        ("vocab.json", fx.join("bpe/vocab.json")),
        ("merges.txt", fx.join("bpe/merges.txt")),
    ];
    let bpe: Vec<(&str, &Path)> = bpe.iter().map(|(n, p)| (*n, p.as_path())).collect();
    let e = case(
        "gpt2",
        &bpe,
        &[(
            "tokenizer_config.json",
            r#"{"tokenizer_class": "GPT2Tokenizer"}"#,
        )],
    );
    assert!(
        e.contains("`GPT2Tokenizer`") && e.contains("tokenizer.json"),
        "{e}"
    );
    let spiece = fx.join("sentencepiece/spiece.model");
    let e = case(
        "spm-bart",
        &[("spiece.model", &spiece)],
        &[("config.json", r#"{"model_type": "bart"}"#)],
    );
    assert!(
        e.contains("`bart` model") && e.contains("spiece.model"),
        "{e}"
    );
    let e = case("mbart", &[("sentencepiece.bpe.model", &spiece)], &[]);
    assert!(
        e.contains("sentencepiece.bpe.model") && e.contains("tokenizer.json"),
        "{e}"
    );
}
