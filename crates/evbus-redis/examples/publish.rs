//! Publishes one event to a topic and prints the stream key, so you can look at it with a
//! stock client: `redis-cli XRANGE <key> - +`.
//!
//! ```text
//! cargo run -p evbus-redis --example publish -- [redis://127.0.0.1:6379] [topic]
//! ```

use evbus::{Event, Transport};
use evbus_redis::RedisTransport;

#[tokio::main(flavor = "current_thread")]
async fn main() -> evbus::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
    let topic_name = args.next().unwrap_or_else(|| "orders".to_owned());
    let transport = RedisTransport::connect_url(&url).await?;
    let topic = transport.topic(&topic_name).await?;
    let event = Event::builder("afterOrderCreate", "/shop/orders")
        .subject("o-1001")
        .partition_key("o-1001")
        .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .json(&serde_json::json!({"orderId": "o-1001", "total": 42.5, "customer": "Zoë"}))?
        .build()?;
    topic.publish(&event).await?;
    println!("{}", transport.topic_key(&topic_name));
    transport.close().await
}
