//! Text columns of a source, gathered whole (what a tokenizer is trained on).

use datafusion::arrow::array::{Array, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use futures::TryStreamExt;

use super::Source;
use crate::context::Context;
use crate::error::{from_stream_error, Error, Result};
use crate::operators::Exec;
use crate::plans::spec::SourceSpec;

/// Non-null strings of `columns` from a source.
pub async fn collect_texts(
    ctx: &Context,
    uri: &str,
    config: Option<&str>,
    split: Option<&str>,
    columns: &[String],
) -> Result<Vec<String>> {
    let spec = SourceSpec {
        uri: uri.to_string(),
        config: config.map(str::to_string),
        split: split.map(str::to_string),
        revision: None,
        format: None,
        columns: Some(columns.to_vec()),
        limit: None,
        row_id: "row_id".into(),
        batch_rows: 8192,
        repeat: 1,
    };
    let source = Source::open(&spec, ctx)
        .await
        .map_err(|e| Error::Data(format!("{uri}: {}", e.message)))?;
    let batches: Vec<_> = source
        .execute(&Exec::detached("source"))
        .try_collect()
        .await
        .map_err(from_stream_error)?;
    let mut out = vec![];
    for b in &batches {
        for c in columns {
            let col = cast(b.column_by_name(c).expect("projected"), &DataType::Utf8)
                .map_err(|e| Error::arrow(c, e))?;
            let s = col.as_any().downcast_ref::<StringArray>().expect("Utf8");
            out.extend(s.iter().flatten().map(str::to_string));
        }
    }
    Ok(out)
}
