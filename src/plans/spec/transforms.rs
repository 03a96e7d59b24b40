//! The settings of the steps that transform rows: `filter`, `format`, `tokenize` and `evaluate`.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// `filter:` — a SQL predicate; rows where it is false or null are dropped.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FilterSpec {
    pub predicate: String,
}

impl<'de> Deserialize<'de> for FilterSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            predicate: String,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Short(String),
            Full(Full),
        }
        match Either::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a SQL predicate string or { predicate: ... }")
        })? {
            Either::Short(predicate) => Ok(FilterSpec { predicate }),
            Either::Full(f) => Ok(FilterSpec {
                predicate: f.predicate,
            }),
        }
    }
}

/// What `format` does when a template refers to a null field.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnNull {
    /// The output is null (downstream steps skip or record the row).
    #[default]
    Null,
    /// The null field is formatted as an empty string.
    Empty,
    /// The run stops with an error naming the row and column.
    Error,
}

/// `format:` — `OUTPUT_COLUMN: "template with {column} references"`, plus the reserved key `on_null`.
#[derive(Debug, Clone, PartialEq)]
pub struct FormatSpec {
    pub columns: BTreeMap<String, String>,
    /// The plan's order of output columns.
    pub order: Vec<String>,
    pub on_null: OnNull,
}

impl FormatSpec {
    /// (output column, template) in plan order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.order
            .iter()
            .map(|k| (k.as_str(), self.columns[k].as_str()))
    }
}

/// Written back flat, as in the plan (`OUTPUT: template`, `on_null`).
impl Serialize for FormatSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.order.len() + 1))?;
        for (k, v) in self.entries() {
            m.serialize_entry(k, v)?;
        }
        m.serialize_entry("on_null", &self.on_null)?;
        m.end()
    }
}

impl<'de> Deserialize<'de> for FormatSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let map = serde_yaml::Mapping::deserialize(d)?;
        let mut spec = FormatSpec {
            columns: BTreeMap::new(),
            order: vec![],
            on_null: OnNull::Null,
        };
        for (k, v) in map {
            let key = k
                .as_str()
                .ok_or_else(|| D::Error::custom("format keys must be column names"))?;
            if key == "on_null" {
                spec.on_null = serde_yaml::from_value(v)
                    .map_err(|_| D::Error::custom("`on_null` must be one of null, empty, error"))?;
                continue;
            }
            let template = v.as_str().ok_or_else(|| {
                D::Error::custom(format!(
                    "`{key}`: expected a template string like \"{{intent}}\""
                ))
            })?;
            spec.order.push(key.to_string());
            spec.columns.insert(key.to_string(), template.to_string());
        }
        if spec.columns.is_empty() {
            return Err(D::Error::custom(
                "format needs at least one `OUTPUT: \"template\"` entry",
            ));
        }
        Ok(spec)
    }
}

/// `tokenize:` — token ids as `list<int32>` columns.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenizeSpec {
    /// Text column to encode into `input_ids` / `n_input_tokens`.
    pub input: String,
    /// Optional target text column to encode into `labels` / `n_label_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default = "default_max_input")]
    pub max_input_tokens: usize,
    #[serde(default = "default_max_target")]
    pub max_target_tokens: usize,
    /// `tokenizer.json` path, a folder holding one, or a Hub model id; default: the plan's model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// Cut long inputs to the maximum (keeping the final `</s>`). When false, a longer row is recorded
    /// as an error and skipped downstream.
    #[serde(default = "super::yes")]
    pub truncation: bool,
}

fn default_max_input() -> usize {
    512
}
fn default_max_target() -> usize {
    128
}

/// `evaluate:` — score a prediction column against a reference column (BLEU, exact match).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvaluateSpec {
    pub prediction: String,
    pub reference: String,
    /// Per-row smoothed sentence BLEU-4 column name.
    #[serde(default = "default_bleu_column")]
    pub column: String,
}

fn default_bleu_column() -> String {
    "bleu".to_string()
}
