#![doc = include_str!("../README.md")]

mod capabilities;
mod config;
mod connection;
mod connector;
mod consumer;
mod error;
mod names;
mod publisher;
mod transport;

pub use config::{HEADER_ALLOWANCE, NatsConfig, NatsConfigKey, Retention, Storage};
pub use connector::{NatsConnector, URL_SCHEMES};
pub use transport::NatsTransport;
