//! The raw in-memory loop: a bounded tokio mpsc channel of serialised payloads.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Burst, Carrier, in_tasks};
use crate::Result;
use crate::sample::{Recorder, Sample, decode};

pub(crate) struct RawMemory {
    capacity: usize,
    tx: Option<mpsc::Sender<Vec<u8>>>,
    rx: Option<mpsc::Receiver<Vec<u8>>>,
    task: Option<JoinHandle<()>>,
}

impl RawMemory {
    pub(crate) fn new(capacity: usize) -> Self {
        RawMemory {
            capacity,
            tx: None,
            rx: None,
            task: None,
        }
    }
}

#[async_trait]
impl Carrier for RawMemory {
    async fn setup(&mut self, _run: &str) -> Result<()> {
        let (tx, rx) = mpsc::channel(self.capacity.max(1));
        self.tx = Some(tx);
        self.rx = Some(rx);
        Ok(())
    }

    async fn publish(&mut self, sample: &Sample<'_>) -> Result<()> {
        let bytes = serde_json::to_vec(sample)?;
        let tx = self.tx.as_ref().ok_or("raw memory: not set up")?;
        tx.send(bytes)
            .await
            .map_err(|_| "raw memory: the consumer is gone")?;
        Ok(())
    }

    /// Tasks: sends from every task on clones of the one channel sender. Batches: the
    /// channel has no batch send, so a batch is its events sent one after another.
    async fn publish_burst(
        &mut self,
        payloads: Vec<serde_json::Value>,
        burst: Burst,
    ) -> Result<()> {
        let tx = self.tx.clone().ok_or("raw memory: not set up")?;
        match burst {
            Burst::Tasks(tasks) => {
                in_tasks(payloads, tasks, move |data| {
                    let tx = tx.clone();
                    async move {
                        tx.send(serde_json::to_vec(&data)?)
                            .await
                            .map_err(|_| "raw memory: the consumer is gone")?;
                        Ok(())
                    }
                })
                .await
            }
            Burst::Batch(_) => {
                for data in payloads {
                    tx.send(serde_json::to_vec(&data)?)
                        .await
                        .map_err(|_| "raw memory: the consumer is gone")?;
                }
                Ok(())
            }
        }
    }

    async fn consume(&mut self, recorder: Arc<Recorder>) -> Result<()> {
        let mut rx = self.rx.take().ok_or("raw memory: not set up")?;
        self.task = Some(tokio::spawn(async move {
            while let Some(bytes) = rx.recv().await {
                recorder.received(decode(&bytes));
            }
        }));
        Ok(())
    }

    async fn teardown(&mut self) -> Result<()> {
        self.tx = None;
        self.rx = None;
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        Ok(())
    }
}
