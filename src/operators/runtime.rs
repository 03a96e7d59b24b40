//! How background work hands its results on: a stage runs as a task (or a blocking worker) and its
//! consumer reads a stream that ends only once the stage has finished. Whatever the stage ends with
//! reaches the consumer as the stream's last item: its error, or its panic as [`Error::Panic`] naming
//! the stage. A stage that panics therefore fails the run; it can never look like a stream that ended
//! early and cleanly (which a sink would take for the whole input and mark complete).
//!
//! The same idea as DataFusion's `RecordBatchReceiverStreamBuilder`, with our error type and the
//! stage's name in the message. Dropping the stream cancels the stage.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::Stream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};

/// Where a stage sends its output batches.
#[derive(Clone)]
pub struct Emitter {
    tx: mpsc::Sender<RecordBatch>,
}

impl Emitter {
    /// Hand a batch to the consumer, waiting while it is busy. False when the consumer is gone: the
    /// stage should stop (quietly: nobody reads its output any more).
    pub async fn send(&self, batch: RecordBatch) -> bool {
        self.tx.send(batch).await.is_ok()
    }
}

/// Run `work` as a task that sends batches of `schema` through an [`Emitter`] (at most `buffer` ahead
/// of the consumer); returns the stream of those batches, which ends with `work`'s error or panic.
pub fn spawn_stage<F, Fut>(
    stage: &str,
    schema: SchemaRef,
    buffer: usize,
    work: F,
) -> SendableRecordBatchStream
where
    F: FnOnce(Emitter) -> Fut,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(buffer.max(1));
    let task = tokio::spawn(work(Emitter { tx }));
    let stream = StageStream {
        stage: stage.to_string(),
        rx,
        task: Some(task),
    };
    Box::pin(RecordBatchStreamAdapter::new(schema, stream))
}

/// Wait for a task and turn what it ended with into ours: its own error, or a panic or cancellation
/// named after `stage`.
pub async fn join<T>(stage: &str, task: JoinHandle<Result<T>>) -> Result<T> {
    task.await.map_err(|e| Error::task(stage, e))?
}

/// Run blocking work (model code, encoders) on a thread of its own; awaiting the handle gives its
/// result, or its panic as an error (see [`join`]).
pub fn spawn_worker<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> JoinHandle<Result<T>> {
    tokio::task::spawn_blocking(work)
}

struct StageStream {
    stage: String,
    rx: mpsc::Receiver<RecordBatch>,
    /// The running stage; `None` once joined.
    task: Option<JoinHandle<Result<()>>>,
}

impl StageStream {
    /// Poll the stage: `Some(error)` when it failed or panicked, `None` while it runs or after it
    /// ended well.
    fn poll_task(&mut self, cx: &mut Context<'_>) -> Poll<Option<Error>> {
        let Some(task) = self.task.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(task).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(joined) => {
                self.task = None;
                Poll::Ready(match joined {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e),
                    Err(e) => Some(Error::task(&self.stage, e)),
                })
            }
        }
    }
}

impl Stream for StageStream {
    type Item = std::result::Result<RecordBatch, DataFusionError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(batch)) => Poll::Ready(Some(Ok(batch))),
            // Every sender is gone: the stage has ended (or is ending); its outcome is the last item.
            Poll::Ready(None) => match self.poll_task(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(e)) => Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => Poll::Ready(None),
            },
            // Nothing to read yet. A stage that failed is reported now, even if a helper it started
            // still holds a sender.
            Poll::Pending => match self.poll_task(cx) {
                Poll::Ready(Some(e)) => Poll::Ready(Some(Err(e.into()))),
                _ => Poll::Pending,
            },
        }
    }
}

impl Drop for StageStream {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::from_stream_error;
    use datafusion::arrow::array::UInt64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use futures::StreamExt;
    use std::sync::Arc;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("x", DataType::UInt64, false)]))
    }

    fn batch(v: u64) -> RecordBatch {
        RecordBatch::try_new(schema(), vec![Arc::new(UInt64Array::from(vec![v]))]).unwrap()
    }

    /// (values read, the error the stream ended with)
    async fn drain(mut s: SendableRecordBatchStream) -> (Vec<u64>, Option<Error>) {
        let mut seen = vec![];
        while let Some(item) = s.next().await {
            match item {
                Ok(b) => seen.push(
                    b.column(0)
                        .as_any()
                        .downcast_ref::<UInt64Array>()
                        .unwrap()
                        .value(0),
                ),
                Err(e) => return (seen, Some(from_stream_error(e))),
            }
        }
        (seen, None)
    }

    #[tokio::test]
    async fn batches_then_a_clean_end() {
        let s = spawn_stage("numbers", schema(), 1, |out| async move {
            for i in 0..5 {
                if !out.send(batch(i)).await {
                    return Ok(());
                }
            }
            Ok(())
        });
        let (seen, err) = drain(s).await;
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
        assert!(err.is_none(), "{err:?}");
    }

    #[tokio::test]
    async fn a_stage_error_is_the_last_item() {
        let s = spawn_stage("numbers", schema(), 4, |out| async move {
            out.send(batch(1)).await;
            Err(Error::Data("bad row 7".into()))
        });
        let (seen, err) = drain(s).await;
        assert_eq!(seen, vec![1]);
        assert_eq!(err.unwrap().to_string(), "bad row 7");
    }

    /// A panic in the stage, or in a worker it waits for, fails the stream naming where it happened.
    #[tokio::test]
    async fn panics_reach_the_consumer_with_the_stage_name() {
        let s = spawn_stage("source", schema(), 4, |out| async move {
            out.send(batch(1)).await;
            panic!("disk on fire");
        });
        let (seen, err) = drain(s).await;
        assert_eq!(seen, vec![1]);
        let err = err.expect("an error, not a clean end");
        assert!(matches!(err, Error::Panic { .. }), "{err:?}");
        assert_eq!(err.to_string(), "source: panicked: disk on fire");

        let s = spawn_stage("generate", schema(), 4, |out| async move {
            out.send(batch(2)).await;
            let worker =
                spawn_worker(|| -> Result<()> { panic!("model thread at the last batch") });
            join("generate: model worker", worker).await
        });
        let (seen, err) = drain(s).await;
        assert_eq!(seen, vec![2]);
        assert_eq!(
            err.unwrap().to_string(),
            "generate: model worker: panicked: model thread at the last batch"
        );
    }
}
