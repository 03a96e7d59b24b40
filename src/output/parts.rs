//! Part files: encoding and storing one whole, and reading the row ids of a resumed output.

// `ParquetObjectReader` is deprecated in parquet 59 (in favour of hand-written `AsyncFileReader`s) but
// reads object stores correctly; it is what DataFusion 55's own scans use.
#![allow(deprecated)]

use datafusion::arrow::array::{RecordBatch, UInt64Array};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::file::properties::WriterProperties;
use futures::StreamExt;
use object_store::ObjectStoreExt;

use crate::error::{Error, Result};
use crate::operators::runtime;
use crate::output::manifest::PartInfo;
use crate::storage::Location;

/// Encode `batch` as one parquet file (on a worker thread) and store it whole at `loc`.
pub async fn store_part(
    loc: Location,
    name: String,
    batch: RecordBatch,
    props: WriterProperties,
) -> Result<PartInfo> {
    let rows = batch.num_rows() as u64;
    let display = loc.display.clone();
    let encoder = runtime::spawn_worker(move || -> Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(batch.get_array_memory_size() / 2);
        let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props))
            .map_err(|e| Error::parquet(&display, e))?;
        w.write(&batch).map_err(|e| Error::parquet(&display, e))?;
        w.close().map_err(|e| Error::parquet(&display, e))?;
        Ok(buf)
    });
    let bytes = runtime::join("write: parquet encoder", encoder).await?;
    loc.put_whole(bytes).await?;
    Ok(PartInfo { file: name, rows })
}

async fn read_parquet_column(loc: &Location, column: Option<&str>) -> Result<Vec<RecordBatch>> {
    use datafusion::parquet::arrow::async_reader::{
        ParquetObjectReader, ParquetRecordBatchStreamBuilder,
    };
    use datafusion::parquet::arrow::ProjectionMask;
    let size = loc
        .store
        .head(&loc.path)
        .await
        .map_err(|e| Error::object_store(&loc.display, e))?
        .size;
    let reader = ParquetObjectReader::new(loc.store.clone(), loc.path.clone()).with_file_size(size);
    let builder = ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(|e| Error::parquet(format!("{}: not a readable parquet file", loc.display), e))?;
    let parquet_schema = builder.parquet_schema().clone();
    let builder = match column {
        Some(c) => {
            let i = builder.schema().index_of(c).map_err(|_| {
                Error::Data(format!(
                    "{}: has no column `{c}`; it was not written by this plan",
                    loc.display
                ))
            })?;
            builder.with_projection(ProjectionMask::roots(&parquet_schema, [i]))
        }
        None => builder.with_projection(ProjectionMask::roots(&parquet_schema, [])),
    };
    let stream = builder
        .build()
        .map_err(|e| Error::parquet(&loc.display, e))?;
    stream
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::parquet(&loc.display, e))
}

pub async fn read_row_ids(loc: &Location, row_id: &str) -> Result<Vec<u64>> {
    let mut out = vec![];
    for b in read_parquet_column(loc, Some(row_id)).await? {
        let ids = b
            .column(0)
            .as_any()
            .downcast_ref::<UInt64Array>()
            .ok_or_else(|| {
                Error::Data(format!(
                    "{}: `{row_id}` is not a uint64 row id column",
                    loc.display
                ))
            })?;
        out.extend(ids.values().iter().copied());
    }
    Ok(out)
}
