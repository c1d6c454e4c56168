//! A transport layer over the example adapter: decorators need no adapter code of their own.

use evbus::layer::{Destination, Layer, LayerExt, Next, Observe};
use evbus::{Event, SubscribeOptions, Transport};

/// Stamps every published event with the tenant it was published for.
struct Tenant(&'static str);

#[async_trait::async_trait]
impl Layer for Tenant {
    async fn publish(
        &self,
        _to: &Destination,
        events: &[Event],
        next: Next<'_>,
    ) -> evbus::Result<()> {
        let mut stamped = events.to_vec();
        for event in &mut stamped {
            event.set_extension("tenant", self.0)?;
        }
        next.run(&stamped).await
    }
}

#[tokio::test]
async fn a_layer_stamps_every_publish_and_the_consumer_sees_it() -> evbus::Result<()> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = format!("sqlite-example://{}", dir.path().join("layer.db").display());
    let transport = evbus_example_sqlite::connect(&url)
        .await?
        .layer(Tenant("acme"))
        .layer(Observe::new("sqlite-example"));

    let topic = transport.topic("orders").await?;
    let mut billing = topic.subscribe(SubscribeOptions::named("billing")).await?;
    let batch = [
        Event::builder("orderPlaced", "/shop").build()?,
        Event::builder("orderPaid", "/shop").build()?,
    ];
    topic.publish_batch(&batch).await?;
    for expected in &batch {
        let delivery = billing.next_delivery().await.expect("a delivery")?;
        assert_eq!(delivery.event().id(), expected.id());
        assert_eq!(delivery.event().extension("tenant"), Some("acme"));
        delivery.ack().await?;
    }
    transport.close().await
}
