//! The raw Redis loop: the `redis` crate driven directly, with the adapter's batch size and
//! acknowledgement point: one `XADD` per publish (awaited), `XREADGROUP COUNT 16 BLOCK 100` on a
//! dedicated connection, one `XACK` per event once decoded (up to 16 in flight on the shared
//! multiplexed connection, as the Bus's handlers ack).
//!
//! Its entries carry the payload alone (`data`), unless made with
//! [`RawRedis::with_cloudevents_fields`]: then every `XADD` also writes, by hand, the
//! CloudEvents attributes a validated Bus emit writes as stream fields (binary mode:
//! `ce_specversion`, `ce_id` a new UUIDv7, `ce_source`, `ce_type`, `ce_time` now,
//! `ce_dataschema`, `content-type`). That loop (`raw-same-fields`, run with `--peers`) is
//! what a user of the bare client pays to carry the same events, so the ratio against it is
//! evbus's own cost, apart from the cost of the wire format.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::Value;
use redis::aio::MultiplexedConnection;
use tokio::task::JoinHandle;

use super::{Burst, CONCURRENCY, Carrier, GROUP, in_tasks};
use crate::Result;
use crate::sample::{BrokerWait, EVENT_TYPE, Recorder, SOURCE, Sample, decode};

/// The baseline name of the loop made by [`RawRedis::with_cloudevents_fields`].
pub(crate) const SAME_FIELDS: &str = "raw-same-fields";

/// The `dataschema` a validated Bus emit of the sample type writes (the catalogue's
/// `urn:evbus:schema:<type>:<version>`).
const DATASCHEMA: &str = "urn:evbus:schema:benchSample:1";

pub(crate) struct RawRedis {
    client: redis::Client,
    conn: Option<MultiplexedConnection>,
    stream: String,
    wait: BrokerWait,
    task: Option<JoinHandle<()>>,
    /// Whether each entry carries the CloudEvents attributes too.
    cloudevents: bool,
}

impl RawRedis {
    pub(crate) fn new(url: &str) -> Result<Self> {
        // The adapter's own query parameters are not the client's.
        let plain = url.split('?').next().unwrap_or(url);
        Ok(RawRedis {
            client: redis::Client::open(plain)?,
            conn: None,
            stream: String::new(),
            wait: BrokerWait::default(),
            task: None,
            cloudevents: false,
        })
    }

    /// The same loop, its entries carrying the CloudEvents attributes as the Bus writes them
    /// (see the module documentation).
    pub(crate) fn with_cloudevents_fields(url: &str) -> Result<Self> {
        Ok(RawRedis {
            cloudevents: true,
            ..RawRedis::new(url)?
        })
    }
}

/// The `XADD` of one payload to `stream`: `data` alone, or after the CloudEvents attributes.
fn xadd(stream: &str, data: Vec<u8>, cloudevents: bool) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    if cloudevents {
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        cmd.arg("ce_specversion")
            .arg("1.0")
            .arg("ce_id")
            .arg(uuid::Uuid::now_v7().to_string())
            .arg("ce_source")
            .arg(SOURCE)
            .arg("ce_type")
            .arg(EVENT_TYPE)
            .arg("ce_time")
            .arg(time)
            .arg("ce_dataschema")
            .arg(DATASCHEMA)
            .arg("content-type")
            .arg("application/json");
    }
    cmd.arg("data").arg(data);
    cmd
}

#[async_trait]
impl Carrier for RawRedis {
    async fn setup(&mut self, run: &str) -> Result<()> {
        let mut conn = self.client.get_multiplexed_async_connection().await?;
        self.stream = format!("evbus-bench:{run}:raw");
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(GROUP)
            .arg("$")
            .arg("MKSTREAM")
            .query_async::<Value>(&mut conn)
            .await?;
        self.conn = Some(conn);
        Ok(())
    }

    async fn publish(&mut self, sample: &Sample<'_>) -> Result<()> {
        let bytes = serde_json::to_vec(sample)?;
        let conn = self.conn.as_mut().ok_or("raw redis: not set up")?;
        let started = Instant::now();
        xadd(&self.stream, bytes, self.cloudevents)
            .query_async::<Value>(conn)
            .await?;
        self.wait.add(started);
        Ok(())
    }

    /// Tasks: `XADD`s from every task on the one multiplexed connection, which pipelines
    /// them (the client's recommended way to many requests in flight). Batches: one
    /// pipeline of `XADD`s per batch.
    async fn publish_burst(
        &mut self,
        payloads: Vec<serde_json::Value>,
        burst: Burst,
    ) -> Result<()> {
        let conn = self.conn.clone().ok_or("raw redis: not set up")?;
        let stream = self.stream.clone();
        let cloudevents = self.cloudevents;
        match burst {
            Burst::Tasks(tasks) => {
                in_tasks(payloads, tasks, move |data| {
                    let (mut conn, stream) = (conn.clone(), stream.clone());
                    async move {
                        let bytes = serde_json::to_vec(&data)?;
                        xadd(&stream, bytes, cloudevents)
                            .query_async::<Value>(&mut conn)
                            .await?;
                        Ok(())
                    }
                })
                .await
            }
            Burst::Batch(size) => {
                let mut conn = conn;
                for chunk in payloads.chunks(size.max(1)) {
                    let mut pipe = redis::pipe();
                    for data in chunk {
                        pipe.add_command(xadd(&stream, serde_json::to_vec(data)?, cloudevents))
                            .ignore();
                    }
                    pipe.query_async::<()>(&mut conn).await?;
                }
                Ok(())
            }
        }
    }

    async fn consume(&mut self, recorder: Arc<Recorder>) -> Result<()> {
        let acks = self.conn.clone().ok_or("raw redis: not set up")?;
        let mut reads = self.client.get_multiplexed_async_connection().await?;
        let stream = self.stream.clone();
        let wait = self.wait.clone();
        self.task = Some(tokio::spawn(async move {
            loop {
                let started = Instant::now();
                let reply = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(GROUP)
                    .arg("c1")
                    .arg("COUNT")
                    .arg(CONCURRENCY)
                    .arg("BLOCK")
                    .arg(100)
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(">")
                    .query_async::<Value>(&mut reads)
                    .await;
                wait.add(started);
                let entries = match reply {
                    Ok(v) => entries(v),
                    Err(e) => {
                        eprintln!("raw redis: XREADGROUP: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let mut pending = Vec::with_capacity(entries.len());
                for (id, data) in entries {
                    recorder.received(decode(&data));
                    let mut conn = acks.clone();
                    let stream = &stream;
                    pending.push(async move {
                        redis::cmd("XACK")
                            .arg(stream)
                            .arg(GROUP)
                            .arg(id)
                            .query_async::<Value>(&mut conn)
                            .await
                    });
                }
                let started = Instant::now();
                for result in futures::future::join_all(pending).await {
                    if let Err(e) = result {
                        eprintln!("raw redis: XACK: {e}");
                    }
                }
                wait.add(started);
            }
        }));
        Ok(())
    }

    async fn teardown(&mut self) -> Result<()> {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        if let Some(mut conn) = self.conn.take() {
            redis::cmd("DEL")
                .arg(&self.stream)
                .query_async::<Value>(&mut conn)
                .await?;
        }
        Ok(())
    }

    fn take_broker_wait(&mut self) -> Duration {
        self.wait.take()
    }
}

/// The `(id, data)` of each entry of an `XREADGROUP` reply (`[[key, [[id, [f, v, ...]]]]]`,
/// or a map in RESP3; nil when the read timed out).
fn entries(reply: Value) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    let streams: Vec<Value> = match reply {
        Value::Array(items) => items
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut kv) if kv.len() == 2 => kv.pop(),
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs.into_iter().map(|(_, v)| v).collect(),
        _ => return out,
    };
    for list in streams {
        let Value::Array(list) = list else { continue };
        for entry in list {
            let Value::Array(mut parts) = entry else {
                continue;
            };
            if parts.len() != 2 {
                continue;
            }
            let fields = parts.pop();
            let id = parts.pop();
            let (Some(Value::BulkString(id)), Some(Value::Array(fields))) = (id, fields) else {
                continue;
            };
            let mut fields = fields.into_iter();
            while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
                if let (Value::BulkString(name), Value::BulkString(value)) = (name, value)
                    && name == b"data"
                {
                    out.push((id.clone(), value));
                }
            }
        }
    }
    out
}
