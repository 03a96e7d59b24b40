//! Dataset and model cards: README.md with the YAML front matter the Hub and `datasets` read
//! (`configs` / `data_files`, `license`, `task_categories`, `size_categories`, `source_datasets`;
//! `library_name`, `base_model`, `datasets` for models), then what made the files.

use crate::metrics::Scores;
use crate::reports::FinishCounts;

/// What a dataset card says.
#[derive(Debug, Clone)]
pub struct DatasetFacts {
    pub repo_id: String,
    pub rows: u64,
    pub parts: usize,
    pub shards: usize,
    pub columns: Vec<String>,
    pub plan_name: String,
    pub plan: serde_json::Value,
    /// The generating model and its hash.
    pub model: Option<(String, String)>,
    pub finish: Option<FinishCounts>,
    pub generated_tokens: u64,
    pub scores: Option<Scores>,
    pub license: Option<String>,
    pub sources: Vec<String>,
    pub finished_at: Option<String>,
    pub conala_version: String,
    pub complete: bool,
}

/// What a model card says.
#[derive(Debug, Clone, Default)]
pub struct ModelFacts {
    pub repo_id: String,
    pub model_type: Option<String>,
    /// The base checkpoint (a Hub id goes into `base_model`).
    pub base_model: Option<String>,
    pub datasets: Vec<String>,
    pub license: Option<String>,
    /// The train step's settings, as the plan resolved them.
    pub settings: Option<serde_json::Value>,
    pub steps: Option<u64>,
    pub train_examples: Option<usize>,
    pub final_eval_loss: Option<f64>,
    pub scores: Option<Scores>,
    /// LoRA rank, alpha and targets, when the model is a merged adapter.
    pub lora: Option<String>,
}

/// The Hub's size bucket for a row count.
pub fn size_category(rows: u64) -> &'static str {
    match rows {
        0..1_000 => "n<1K",
        1_000..10_000 => "1K<n<10K",
        10_000..100_000 => "10K<n<100K",
        100_000..1_000_000 => "100K<n<1M",
        1_000_000..10_000_000 => "1M<n<10M",
        10_000_000..100_000_000 => "10M<n<100M",
        100_000_000..1_000_000_000 => "100M<n<1B",
        _ => "n>1B",
    }
}

/// The Hub datasets a plan reads: `hf://datasets/ID` sources, and the shipped CoNaLa copy as the
/// dataset it is a copy of.
pub fn source_datasets(plan: &serde_json::Value) -> Vec<String> {
    let mut out = vec![];
    fn visit(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    if k == "uri" || k == "path" {
                        if let Some(s) = v.as_str() {
                            if let Some(id) = crate::hub::parse_dataset_uri(s) {
                                out.push(id);
                            } else if s.trim_end_matches('/').ends_with("data/conala")
                                || s.contains("data/conala/")
                            {
                                out.push("neulab/conala".to_string());
                            }
                        }
                    }
                    visit(v, out);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| visit(v, out)),
            _ => {}
        }
    }
    visit(plan, &mut out);
    out.sort();
    out.dedup();
    out
}

/// Licenses of the sources conala knows (CoNaLa: CC BY-SA 4.0, which its derivatives keep).
pub fn known_license(sources: &[String]) -> Option<String> {
    sources
        .iter()
        .any(|s| s == "neulab/conala")
        .then(|| "cc-by-sa-4.0".to_string())
}

/// A YAML string, quoted when YAML would read it as something else.
fn y(s: &str) -> String {
    serde_yaml::to_string(s)
        .map(|t| t.trim_end().to_string())
        .unwrap_or_else(|_| format!("{s:?}"))
}

/// The dataset's README.md.
pub fn dataset_card(f: &DatasetFacts) -> String {
    let mut s = String::from("---\n");
    if let Some(l) = &f.license {
        s += &format!("license: {}\n", y(l));
    }
    s += "task_categories:\n- text2text-generation\nlanguage:\n- en\n";
    s += &format!("size_categories:\n- {}\n", y(size_category(f.rows)));
    if !f.sources.is_empty() {
        s += "source_datasets:\n";
        for d in &f.sources {
            s += &format!("- {}\n", y(d));
        }
    }
    s += "tags:\n- conala\n- code\n- synthetic\n";
    s += "configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n";
    s += "---\n\n";
    s += &format!("# {}\n\n", f.repo_id);
    s += &format!(
        "Made with conala {} by the plan `{}`: {} rows in {} parquet file(s){}.\n\n",
        f.conala_version,
        f.plan_name,
        f.rows,
        f.parts,
        if f.shards > 1 {
            format!(", written by {} shards", f.shards)
        } else {
            String::new()
        }
    );
    if !f.complete {
        s += "**Incomplete**: the run that wrote it has not finished every row (pushed with `--allow-incomplete`).\n\n";
    }
    s += "```python\nfrom datasets import load_dataset\n";
    s += &format!(
        "ds = load_dataset({:?}, split=\"train\")\n```\n\n",
        f.repo_id
    );
    if !f.columns.is_empty() {
        s += "## Columns\n\n";
        for c in &f.columns {
            s += &format!("- `{c}`\n");
        }
        s += "\n";
    }
    if let Some((model, hash)) = &f.model {
        s += "## Generation\n\n";
        s += &format!("Model: `{model}` (weights sha256 `{hash}`).\n\n");
        if let Some(fc) = &f.finish {
            s += &format!(
                "| finish reason | rows |\n|---|---|\n| end of sequence | {} |\n| length limit | {} |\n| error | {} |\n\n",
                fc.eos, fc.length, fc.error
            );
        }
        s += &format!("{} tokens generated.\n\n", f.generated_tokens);
    }
    if let Some(sc) = &f.scores {
        s += &scores_table("Evaluation", sc);
    }
    if let Some(l) = &f.license {
        s += &format!("## License\n\n`{l}`");
        if f.sources.iter().any(|d| d == "neulab/conala") {
            s += ", as the source data: the CoNaLa corpus (Yin et al., MSR 2018, https://conala-corpus.github.io), derived from Stack Overflow content, is licensed CC BY-SA 4.0";
        }
        s += ".\n\n";
    }
    s += "## The plan\n\n```yaml\n";
    s += &crate::secrets::redact(&serde_yaml::to_string(&f.plan).unwrap_or_default());
    s += "```\n";
    if let Some(t) = &f.finished_at {
        s += &format!("\nFinished at {t}.\n");
    }
    s
}

/// The model's README.md.
pub fn model_card(f: &ModelFacts) -> String {
    let mut s =
        String::from("---\nlibrary_name: transformers\npipeline_tag: text2text-generation\n");
    if let Some(b) = f.base_model.as_deref().filter(|b| {
        crate::hub::looks_like_repo_id(b) && b.contains('/') && !std::path::Path::new(b).exists()
    }) {
        s += &format!("base_model: {}\n", y(b));
    }
    if !f.datasets.is_empty() {
        s += "datasets:\n";
        for d in &f.datasets {
            s += &format!("- {}\n", y(d));
        }
    }
    if let Some(l) = &f.license {
        s += &format!("license: {}\n", y(l));
    }
    s += "tags:\n- conala\n";
    if let Some(t) = &f.model_type {
        s += &format!("- {}\n", y(t));
    }
    if f.lora.is_some() {
        s += "- lora\n";
    }
    s += "---\n\n";
    s += &format!("# {}\n\n", f.repo_id);
    s += "Fine-tuned with conala";
    if let Some(b) = &f.base_model {
        s += &format!(" from `{b}`");
    }
    if !f.datasets.is_empty() {
        s += &format!(" on {}", f.datasets.join(", "));
    }
    s += ".\n\n";
    s += "```python\nfrom transformers import AutoModelForSeq2SeqLM, AutoTokenizer\n";
    s += &format!(
        "model = AutoModelForSeq2SeqLM.from_pretrained({:?})\ntokenizer = AutoTokenizer.from_pretrained({:?})\n```\n\n",
        f.repo_id, f.repo_id
    );
    if let Some(l) = &f.lora {
        s += &format!("A LoRA adapter ({l}) merged into the base weights.\n\n");
    }
    let mut rows = vec![];
    if let Some(n) = f.steps {
        rows.push(("steps".to_string(), n.to_string()));
    }
    if let Some(n) = f.train_examples {
        rows.push(("training examples".to_string(), n.to_string()));
    }
    if let Some(l) = f.final_eval_loss {
        rows.push(("final eval loss".to_string(), format!("{l:.4}")));
    }
    if let Some(settings) = f.settings.as_ref().and_then(|v| v.as_object()) {
        for key in [
            "learning_rate",
            "lr_scheduler",
            "warmup_steps",
            "batch_size",
            "gradient_accumulation_steps",
            "max_steps",
            "weight_decay",
            "max_grad_norm",
            "label_smoothing",
            "seed",
        ] {
            if let Some(v) = settings.get(key).filter(|v| !v.is_null()) {
                let shown = v.as_str().map(str::to_string).unwrap_or(v.to_string());
                rows.push((key.replace('_', " "), shown));
            }
        }
    }
    if !rows.is_empty() {
        s += "## Training\n\n| setting | value |\n|---|---|\n";
        for (k, v) in rows {
            s += &format!("| {k} | {v} |\n");
        }
        s += "\n";
    }
    if let Some(sc) = &f.scores {
        s += &scores_table("Evaluation", sc);
    }
    if let Some(settings) = &f.settings {
        s += "## The train step\n\n```yaml\n";
        s += &crate::secrets::redact(&serde_yaml::to_string(settings).unwrap_or_default());
        s += "```\n";
    }
    s
}

fn scores_table(title: &str, sc: &Scores) -> String {
    format!(
        "## {title}\n\n{} rows scored.\n\n| metric | value |\n|---|---|\n| BLEU (sacreBLEU) | {:.2} |\n| CoNaLa BLEU | {:.2} |\n| sentence BLEU | {:.2} |\n| exact match | {:.3} |\n\n",
        sc.rows, sc.bleu, sc.conala_bleu, sc.sentence_bleu, sc.exact_match
    )
}

/// The YAML front matter of a card, parsed (for checks).
pub fn front_matter(card: &str) -> Option<serde_yaml::Value> {
    let rest = card.strip_prefix("---\n")?;
    let end = rest.find("\n---\n")?;
    serde_yaml::from_str(&rest[..end]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> DatasetFacts {
        DatasetFacts {
            repo_id: "me/conala-mined".into(),
            rows: 593_891,
            parts: 6,
            shards: 2,
            columns: vec!["intent: Utf8".into()],
            plan_name: "conala-mined".into(),
            plan: serde_json::json!({"steps": [{"source": {"uri": "hf://datasets/neulab/conala", "config": "mined"}}],
                "write": {"path": "s3://user:hunter2secret@bucket/out"}}),
            model: Some(("runs/model".into(), "abc".into())),
            finish: Some(FinishCounts {
                eos: 590_000,
                length: 3_891,
                error: 0,
            }),
            generated_tokens: 9_000_000,
            scores: None,
            license: Some("cc-by-sa-4.0".into()),
            sources: vec!["neulab/conala".into()],
            finished_at: Some("2026-12-07T00:00:00Z".into()),
            conala_version: "0.1.0".into(),
            complete: true,
        }
    }

    #[test]
    fn dataset_card_front_matter_is_what_the_hub_reads() {
        let card = dataset_card(&facts());
        let fm = front_matter(&card).expect("front matter");
        assert_eq!(fm["license"].as_str(), Some("cc-by-sa-4.0"));
        assert_eq!(fm["size_categories"][0].as_str(), Some("100K<n<1M"));
        assert_eq!(fm["source_datasets"][0].as_str(), Some("neulab/conala"));
        assert_eq!(
            fm["task_categories"][0].as_str(),
            Some("text2text-generation")
        );
        let files = &fm["configs"][0]["data_files"][0];
        assert_eq!(files["split"].as_str(), Some("train"));
        assert_eq!(files["path"].as_str(), Some("data/train-*"));
        assert!(card.contains("| length limit | 3891 |"), "{card}");
        assert!(!card.contains("hunter2secret"), "a URL password leaked");
    }

    #[test]
    fn sources_and_licenses_are_found_in_plans() {
        let plan = serde_json::json!({"steps": [{"source": {"uri": "data/conala"}},
            {"source": {"uri": "hf://datasets/org/other"}}]});
        assert_eq!(source_datasets(&plan), vec!["neulab/conala", "org/other"]);
        assert_eq!(
            known_license(&source_datasets(&plan)).as_deref(),
            Some("cc-by-sa-4.0")
        );
        assert_eq!(known_license(&["org/other".into()]), None);
        assert_eq!(size_category(999), "n<1K");
        assert_eq!(size_category(1_000), "1K<n<10K");
    }

    #[test]
    fn model_card_names_a_hub_base_only() {
        let mut f = ModelFacts {
            repo_id: "me/m".into(),
            base_model: Some("google/flan-t5-base".into()),
            datasets: vec!["neulab/conala".into()],
            license: Some("apache-2.0".into()),
            model_type: Some("t5".into()),
            ..Default::default()
        };
        let fm = front_matter(&model_card(&f)).unwrap();
        assert_eq!(fm["library_name"].as_str(), Some("transformers"));
        assert_eq!(fm["base_model"].as_str(), Some("google/flan-t5-base"));
        assert_eq!(fm["datasets"][0].as_str(), Some("neulab/conala"));
        f.base_model = Some("runs/conala-offline/base".into());
        let fm = front_matter(&model_card(&f)).unwrap();
        assert!(fm.get("base_model").is_none());
    }
}
