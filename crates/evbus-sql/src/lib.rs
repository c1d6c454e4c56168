#![doc = include_str!("../README.md")]

mod capabilities;
mod config;
mod connector;
mod consumer;
mod error;
mod listen;
mod notify;
mod sqlite_file;
mod transport;
mod wake;

pub mod outbox;

pub use config::{Backend, MAX_PAYLOAD_LIMIT, SqlConfig, SqlConfigKey, URL_SCHEMES};
pub use connector::SqlConnector;
pub use transport::{SqlBroker, SqlTransport};
