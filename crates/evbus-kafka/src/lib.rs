#![doc = include_str!("../README.md")]

mod capabilities;
mod config;
mod connection;
mod connector;
mod consumer;
mod error;
mod naming;
mod publisher;
mod state;
mod transport;

pub use config::{KafkaConfig, KafkaConfigKey};
pub use connector::{KafkaConnector, URL_SCHEMES};
pub use consumer::UNDECODABLE_EVENT_TYPE;
pub use state::OffsetStateStore;
pub use transport::KafkaTransport;
