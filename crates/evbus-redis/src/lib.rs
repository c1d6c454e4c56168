#![doc = include_str!("../README.md")]

mod capabilities;
mod config;
mod connection;
mod connector;
mod consumer;
mod error;
mod keys;
mod publisher;
mod scripts;
mod transport;

pub use config::{ContentMode, MAX_PAYLOAD_LIMIT, RedisConfig, RedisConfigKey, Retention};
pub use connector::{RedisConnector, URL_SCHEMES};
pub use consumer::UNDECODABLE_EVENT_TYPE;
pub use transport::RedisTransport;
