//! `format`: build text columns from templates over columns, e.g. `input: "{intent}\n{snippet}"`.
//!
//! `{name}` inserts a column (numbers and other scalars are rendered as text); `{{` and `}}` are literal
//! braces. A null field makes the output null (`on_null: null`, the default; downstream steps then skip
//! or record the row), an empty string (`on_null: empty`), or stops the run naming the row
//! (`on_null: error`).

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, RecordBatch, StringArray, StringBuilder, UInt64Array,
};
use datafusion::arrow::compute::{cast_with_options, CastOptions};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;

use super::{require_column, require_new_column, Operator, StepError, StepResult};
use crate::error::{Error, Result};
use crate::plans::spec::{FormatSpec, OnNull};

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    /// Index into the input schema.
    Column(usize),
}

#[derive(Debug, Clone)]
struct Template {
    output: String,
    pieces: Vec<Piece>,
}

pub struct Format {
    templates: Vec<Template>,
    on_null: OnNull,
    row_id: String,
    schema: SchemaRef,
}

/// Split a template into literal text and column references.
fn parse_template(template: &str, schema: &Schema, key: &str) -> StepResult<Vec<Piece>> {
    let mut pieces = vec![];
    let mut text = String::new();
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(ch) => name.push(ch),
                        None => {
                            return Err(StepError::at(key, format!("unclosed `{{` in template {template:?} (write `{{{{` for a literal brace)")))
                        }
                    }
                }
                let name = name.trim();
                require_column(schema, key, name)?;
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(Piece::Column(schema.index_of(name).expect("checked")));
            }
            '}' => {
                return Err(StepError::at(
                    key,
                    format!(
                        "stray `}}` in template {template:?} (write `}}}}` for a literal brace)"
                    ),
                ))
            }
            other => text.push(other),
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

impl Format {
    pub fn new(spec: &FormatSpec, input: SchemaRef, row_id: &str) -> StepResult<Format> {
        let mut templates = vec![];
        let mut fields: Vec<Arc<Field>> = input.fields().iter().cloned().collect();
        for (output, template) in spec.entries() {
            require_new_column(&input, output, output)?;
            let pieces = parse_template(template, &input, output)?;
            for p in &pieces {
                if let Piece::Column(i) = p {
                    let f = input.field(*i);
                    if matches!(
                        f.data_type(),
                        DataType::List(_)
                            | DataType::LargeList(_)
                            | DataType::Struct(_)
                            | DataType::Map(..)
                    ) {
                        return Err(StepError::at(
                            output,
                            format!(
                                "column `{}` is {}, which has no text form",
                                f.name(),
                                f.data_type()
                            ),
                        ));
                    }
                }
            }
            let nullable = spec.on_null == OnNull::Null;
            fields.push(Arc::new(Field::new(output, DataType::Utf8, nullable)));
            templates.push(Template {
                output: output.to_string(),
                pieces,
            });
        }
        Ok(Format {
            templates,
            on_null: spec.on_null,
            row_id: row_id.to_string(),
            schema: Arc::new(Schema::new(fields)),
        })
    }

    fn apply(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let n = batch.num_rows();
        let ids = batch
            .column_by_name(&self.row_id)
            .and_then(|c| c.as_any().downcast_ref::<UInt64Array>().cloned());
        let row_label = |i: usize| match &ids {
            Some(ids) => format!("row {} = {}", self.row_id, ids.value(i)),
            None => format!("row {i} of the batch"),
        };
        // Each referenced column as text, once per batch.
        let mut text_cols: Vec<Option<StringArray>> = vec![None; batch.num_columns()];
        for t in &self.templates {
            for p in &t.pieces {
                if let Piece::Column(i) = p {
                    if text_cols[*i].is_none() {
                        let col = batch.column(*i);
                        let as_text = cast_with_options(
                            col,
                            &DataType::Utf8,
                            &CastOptions {
                                safe: true,
                                ..Default::default()
                            },
                        )
                        .map_err(|e| {
                            Error::arrow(
                                format!(
                                    "format: column `{}` as text",
                                    batch.schema().field(*i).name()
                                ),
                                e,
                            )
                        })?;
                        let as_text = as_text
                            .as_any()
                            .downcast_ref::<StringArray>()
                            .expect("cast to Utf8")
                            .clone();
                        // A value that is present but has no text form (invalid UTF-8 bytes) is bad data.
                        for r in 0..n {
                            if col.is_valid(r) && as_text.is_null(r) {
                                return Err(Error::Data(format!(
                                    "format: {}: column `{}` is not valid UTF-8 text",
                                    row_label(r),
                                    batch.schema().field(*i).name()
                                )));
                            }
                        }
                        text_cols[*i] = Some(as_text);
                    }
                }
            }
        }
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        for t in &self.templates {
            let mut out = StringBuilder::with_capacity(n, n * 64);
            let mut buf = String::new();
            'rows: for r in 0..n {
                buf.clear();
                for p in &t.pieces {
                    match p {
                        Piece::Text(s) => buf.push_str(s),
                        Piece::Column(i) => {
                            let col = text_cols[*i].as_ref().expect("prepared above");
                            if col.is_null(r) {
                                match self.on_null {
                                    OnNull::Null => {
                                        out.append_null();
                                        continue 'rows;
                                    }
                                    OnNull::Empty => {}
                                    OnNull::Error => {
                                        return Err(Error::Data(format!(
                                            "format `{}`: {}: column `{}` is null (set `on_null: null` or `empty`, or filter the row)",
                                            t.output,
                                            row_label(r),
                                            batch.schema().field(*i).name()
                                        )))
                                    }
                                }
                            } else {
                                buf.push_str(col.value(r));
                            }
                        }
                    }
                }
                out.append_value(&buf);
            }
            columns.push(Arc::new(out.finish()));
        }
        RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| Error::arrow("format", e))
    }
}

impl Operator for Format {
    fn name(&self) -> &'static str {
        "format"
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn execute(
        &self,
        input: SendableRecordBatchStream,
        _exec: &super::Exec,
    ) -> Result<SendableRecordBatchStream> {
        let me = Arc::new(Format {
            templates: self.templates.clone(),
            on_null: self.on_null,
            row_id: self.row_id.clone(),
            schema: self.schema.clone(),
        });
        let stream = input.map(move |b| b.and_then(|b| Ok(me.apply(&b)?)));
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            stream,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{BinaryArray, Int64Array};
    use std::collections::BTreeMap;

    fn spec(entries: &[(&str, &str)], on_null: OnNull) -> FormatSpec {
        let columns: BTreeMap<String, String> = entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        FormatSpec {
            order: entries.iter().map(|(k, _)| k.to_string()).collect(),
            columns,
            on_null,
        }
    }

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("row_id", DataType::UInt64, false),
            Field::new("intent", DataType::Utf8, true),
            Field::new("snippet", DataType::Utf8, true),
            Field::new("question_id", DataType::Int64, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(UInt64Array::from(vec![10, 11])),
                Arc::new(StringArray::from(vec![Some("sort a list"), Some("x")])),
                Arc::new(StringArray::from(vec![Some("sorted(l)"), None])),
                Arc::new(Int64Array::from(vec![7, 8])),
            ],
        )
        .unwrap()
    }

    fn col(b: &RecordBatch, name: &str) -> Vec<Option<String>> {
        let a = b
            .column_by_name(name)
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        a.iter().map(|v| v.map(str::to_string)).collect()
    }

    #[test]
    fn formats_templates_with_escapes_and_numbers() {
        let b = batch();
        let f = Format::new(
            &spec(
                &[
                    ("input", "{intent}\n{snippet}"),
                    ("tag", "{{q{question_id}}}"),
                ],
                OnNull::Null,
            ),
            b.schema(),
            "row_id",
        )
        .unwrap();
        let out = f.apply(&b).unwrap();
        assert_eq!(
            col(&out, "input"),
            vec![Some("sort a list\nsorted(l)".into()), None]
        );
        assert_eq!(
            col(&out, "tag"),
            vec![Some("{q7}".into()), Some("{q8}".into())]
        );
        assert!(out.schema().field_with_name("input").unwrap().is_nullable());
    }

    #[test]
    fn on_null_empty_and_error() {
        let b = batch();
        let f = Format::new(
            &spec(&[("input", "{intent}|{snippet}")], OnNull::Empty),
            b.schema(),
            "row_id",
        )
        .unwrap();
        assert_eq!(
            col(&f.apply(&b).unwrap(), "input")[1].as_deref(),
            Some("x|")
        );
        let f = Format::new(
            &spec(&[("input", "{intent}|{snippet}")], OnNull::Error),
            b.schema(),
            "row_id",
        )
        .unwrap();
        let e = f.apply(&b).unwrap_err().to_string();
        assert!(
            e.contains("row row_id = 11") && e.contains("`snippet` is null"),
            "{e}"
        );
    }

    #[test]
    fn bad_templates_are_step_errors() {
        let s = batch().schema();
        let e = Format::new(
            &spec(&[("input", "{intnet}")], OnNull::Null),
            s.clone(),
            "row_id",
        )
        .err()
        .unwrap();
        assert_eq!(e.suggestion.as_deref(), Some("intent"));
        assert_eq!(e.key.as_deref(), Some("input"));
        assert!(Format::new(
            &spec(&[("input", "{intent")], OnNull::Null),
            s.clone(),
            "row_id"
        )
        .is_err());
        assert!(Format::new(
            &spec(&[("input", "a } b")], OnNull::Null),
            s.clone(),
            "row_id"
        )
        .is_err());
        assert!(Format::new(&spec(&[("intent", "{snippet}")], OnNull::Null), s, "row_id").is_err());
    }

    #[test]
    fn invalid_utf8_names_the_row() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("row_id", DataType::UInt64, false),
            Field::new("raw", DataType::Binary, true),
        ]));
        let b = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(UInt64Array::from(vec![5, 6])),
                Arc::new(BinaryArray::from(vec![
                    Some(&b"ok"[..]),
                    Some(&[0xff, 0xfe][..]),
                ])),
            ],
        )
        .unwrap();
        let f = Format::new(&spec(&[("t", "{raw}")], OnNull::Null), b.schema(), "row_id").unwrap();
        let e = f.apply(&b).unwrap_err().to_string();
        assert!(
            e.contains("row_id = 6") && e.contains("not valid UTF-8"),
            "{e}"
        );
    }
}
