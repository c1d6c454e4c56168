//! The two evbus loops: the adapter alone (topic publish / subscribe / ack) and the full Bus
//! (emit with validation, handler, ack). Both run on any transport.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use evbus::bus::{Bus, Emit, HandlerHandle, Message};
use evbus::{
    Catalog, ConsumerOptions, Event, StartPosition, SubscribeOptions, Subscription, Topic,
    Transport,
};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::task::JoinHandle;

use super::{Burst, CONCURRENCY, Carrier, Connect, GROUP, in_tasks};
use crate::Result;
use crate::sample::{EVENT_TYPE, Recorder, SOURCE, Sample, decode, schema};

const SHUTDOWN: Duration = Duration::from_secs(5);

fn consumer_options() -> ConsumerOptions {
    ConsumerOptions::default().max_in_flight(CONCURRENCY)
}

fn subscribe_options() -> SubscribeOptions {
    SubscribeOptions::named(GROUP)
        .start(StartPosition::Earliest)
        .consumer(consumer_options())
}

/// The adapter alone: `Topic::publish`, a named subscription, decode, `Delivery::ack`, with as
/// many acks in flight as the Bus allows handlers.
pub(crate) struct AdapterLoop {
    connect: Connect,
    cleanup: bool,
    presubscribe: bool,
    transport: Option<Arc<dyn Transport>>,
    topic: Option<Arc<dyn Topic>>,
    topic_name: String,
    subscription: Option<Subscription>,
    task: Option<JoinHandle<()>>,
}

impl AdapterLoop {
    /// `cleanup`: delete the run's destinations at teardown; `presubscribe`: as for
    /// [`BusLoop::new`] (otherwise the subscription is made when consuming starts, as the raw
    /// loop's consumer joins then).
    pub(crate) fn new(connect: Connect, cleanup: bool, presubscribe: bool) -> Self {
        AdapterLoop {
            connect,
            cleanup,
            presubscribe,
            transport: None,
            topic: None,
            topic_name: String::new(),
            subscription: None,
            task: None,
        }
    }
}

#[async_trait]
impl Carrier for AdapterLoop {
    async fn setup(&mut self, run: &str) -> Result<()> {
        let transport = (self.connect)(run.to_owned()).await?;
        self.topic_name = format!("bench-{run}-adapter");
        let topic = transport.topic(&self.topic_name).await?;
        if self.presubscribe {
            self.subscription = Some(topic.subscribe(subscribe_options()).await?);
        }
        self.topic = Some(topic);
        self.transport = Some(transport);
        Ok(())
    }

    async fn publish(&mut self, sample: &Sample<'_>) -> Result<()> {
        let event = Event::builder(EVENT_TYPE, SOURCE).json(sample)?.build()?;
        let topic = self.topic.as_ref().ok_or("adapter loop: not set up")?;
        topic.publish(&event).await?;
        Ok(())
    }

    async fn publish_burst(
        &mut self,
        payloads: Vec<serde_json::Value>,
        burst: Burst,
    ) -> Result<()> {
        let topic = Arc::clone(self.topic.as_ref().ok_or("adapter loop: not set up")?);
        let event =
            |data: &serde_json::Value| Event::builder(EVENT_TYPE, SOURCE).json(data)?.build();
        match burst {
            Burst::Tasks(tasks) => {
                in_tasks(payloads, tasks, move |data| {
                    let topic = Arc::clone(&topic);
                    async move {
                        let event = Event::builder(EVENT_TYPE, SOURCE).json(&data)?.build()?;
                        topic.publish(&event).await?;
                        Ok(())
                    }
                })
                .await
            }
            Burst::Batch(size) => {
                for chunk in payloads.chunks(size.max(1)) {
                    let events = chunk.iter().map(event).collect::<evbus::Result<Vec<_>>>()?;
                    topic.publish_batch(&events).await?;
                }
                Ok(())
            }
        }
    }

    async fn consume(&mut self, recorder: Arc<Recorder>) -> Result<()> {
        let mut subscription = match self.subscription.take() {
            Some(subscription) => subscription,
            None => {
                let topic = self.topic.as_ref().ok_or("adapter loop: not set up")?;
                topic.subscribe(subscribe_options()).await?
            }
        };
        self.task = Some(tokio::spawn(async move {
            let mut acks = FuturesUnordered::new();
            loop {
                tokio::select! {
                    biased;
                    Some(()) = acks.next(), if !acks.is_empty() => {}
                    next = subscription.next() => match next {
                        Some(Ok(delivery)) => {
                            let data = delivery.event().data().map_or(&[][..], |d| &d[..]);
                            recorder.received(decode(data));
                            acks.push(async move {
                                if let Err(e) = delivery.ack().await {
                                    eprintln!("adapter loop: ack failed: {e}");
                                }
                            });
                        }
                        Some(Err(e)) => {
                            eprintln!("adapter loop: {e}");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        None => break,
                    },
                }
            }
            while acks.next().await.is_some() {}
        }));
        Ok(())
    }

    async fn teardown(&mut self) -> Result<()> {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        self.subscription = None;
        self.topic = None;
        if let Some(transport) = self.transport.take() {
            if self.cleanup {
                transport.delete_topic(&self.topic_name).await?;
            }
            transport.close().await?;
        }
        Ok(())
    }
}

/// The full Bus: `Bus::emit` (validated against the catalogue), a handler in a group
/// (validated again on consume), acked by the Bus when the handler returns.
pub(crate) struct BusLoop {
    connect: Connect,
    cleanup: bool,
    presubscribe: bool,
    bus: Option<Bus>,
    handler: Option<HandlerHandle>,
    topic_name: String,
}

impl BusLoop {
    /// `cleanup`: delete the run's destinations at teardown. `presubscribe`: create the
    /// group's subscription at setup so the backlog is kept for it (not needed where a new
    /// subscription starting at the earliest event sees everything the topic retains, as on
    /// Kafka, where it would cost one more consumer-group join per run).
    pub(crate) fn new(connect: Connect, cleanup: bool, presubscribe: bool) -> Self {
        BusLoop {
            connect,
            cleanup,
            presubscribe,
            bus: None,
            handler: None,
            topic_name: String::new(),
        }
    }
}

/// The catalogue the Bus loops validate against: [`schema`] registered for [`EVENT_TYPE`].
pub(crate) fn catalog() -> Result<Catalog> {
    let mut builder = Catalog::builder();
    builder.register_json(EVENT_TYPE, schema())?;
    Ok(builder.freeze()?)
}

#[async_trait]
impl Carrier for BusLoop {
    async fn setup(&mut self, run: &str) -> Result<()> {
        let transport = (self.connect)(run.to_owned()).await?;
        self.topic_name = format!("bench-{run}-bus");
        let bus = Bus::builder(Arc::clone(&transport), catalog()?)
            .source(SOURCE)
            .route([EVENT_TYPE], self.topic_name.clone())
            .concurrency(CONCURRENCY)
            .build();
        let topic = transport.topic(&self.topic_name).await?;
        if self.presubscribe {
            // Create the group's subscription now, so a backlog is kept for the handler.
            drop(topic.subscribe(subscribe_options()).await?);
        }
        self.bus = Some(bus);
        Ok(())
    }

    async fn publish(&mut self, sample: &Sample<'_>) -> Result<()> {
        let bus = self.bus.as_ref().ok_or("bus loop: not set up")?;
        bus.emit(EVENT_TYPE, serde_json::to_value(sample)?).await?;
        Ok(())
    }

    async fn publish_burst(
        &mut self,
        payloads: Vec<serde_json::Value>,
        burst: Burst,
    ) -> Result<()> {
        let bus = self.bus.clone().ok_or("bus loop: not set up")?;
        match burst {
            Burst::Tasks(tasks) => {
                in_tasks(payloads, tasks, move |data| {
                    let bus = bus.clone();
                    async move {
                        bus.emit(EVENT_TYPE, data).await?;
                        Ok(())
                    }
                })
                .await
            }
            Burst::Batch(size) => {
                let mut payloads = payloads.into_iter().peekable();
                while payloads.peek().is_some() {
                    let batch = payloads
                        .by_ref()
                        .take(size.max(1))
                        .map(|data| Emit::new(EVENT_TYPE, data));
                    bus.emit_batch(batch).await?;
                }
                Ok(())
            }
        }
    }

    async fn consume(&mut self, recorder: Arc<Recorder>) -> Result<()> {
        let bus = self.bus.as_ref().ok_or("bus loop: not set up")?;
        let handler = bus
            .on(EVENT_TYPE, GROUP, move |msg: Message| {
                let data = msg.event().data().map_or(&[][..], |d| &d[..]);
                recorder.received(decode(data));
                async { Ok(()) }
            })
            .start_position(StartPosition::Earliest)
            .start()
            .await?;
        self.handler = Some(handler);
        Ok(())
    }

    async fn teardown(&mut self) -> Result<()> {
        if let Some(handler) = self.handler.take() {
            handler.shutdown(SHUTDOWN).await;
        }
        if let Some(bus) = self.bus.take() {
            if self.cleanup {
                let transport = Arc::clone(bus.transport());
                transport.delete_topic(&self.topic_name).await?;
                transport
                    .delete_queue(&bus.dead_letter_queue_name(EVENT_TYPE, GROUP))
                    .await?;
                transport
                    .delete_queue(&bus.redrive_queue_name(EVENT_TYPE, GROUP))
                    .await?;
            }
            bus.shutdown(SHUTDOWN).await?;
        }
        Ok(())
    }
}
