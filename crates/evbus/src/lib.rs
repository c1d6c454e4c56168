#![doc = include_str!("../README.md")]

pub mod binding;
pub mod bus;
pub mod capabilities;
pub mod delivery;
pub mod envelope;
pub mod error;
mod json;
pub mod layer;
pub mod memory;
pub mod raw;
pub mod registry;
pub mod schema;
mod signal;
pub mod subscription;
pub mod transport;

pub use bus::{Bus, BusBuilder, Emit, HandlerHandle, Message, RetryPolicy};
pub use capabilities::{Capabilities, Capability};
pub use delivery::{Delivery, Settlement};
pub use envelope::{Event, EventBuilder};
pub use error::{Error, ErrorKind, Result};
pub use registry::{Connector, Registry};
pub use schema::{
    Catalog, CatalogBuilder, Compatibility, EventType, SchemaError, ValidationErrors, Violation,
};
pub use subscription::Subscription;
pub use transport::{
    ConsumerOptions, Health, Queue, StartPosition, SubscribeOptions, Topic, Transport,
    dead_letter_queue_name,
};
