//! The one error type of the core crate and of every adapter.
//!
//! An [`Error`] has a [`ErrorKind`] (what went wrong, stable for matching), a message a person
//! can act on, and optionally the underlying cause. [`Error::is_retryable`] tells whether the
//! same operation may succeed if tried again later (a broker outage) or never will (an invalid
//! event).

use std::fmt;

/// Result alias used throughout evbus.
pub type Result<T, E = Error> = std::result::Result<T, E>;

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What kind of failure an [`Error`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The transport, topic, queue or subscription was closed; open a new one.
    Closed,
    /// The broker could not be reached or the connection dropped. Retryable.
    Connection,
    /// An operation did not finish in its time limit. Retryable.
    Timeout,
    /// A bounded buffer is full (a slow consumer, a capacity limit). Retryable once consumers
    /// catch up.
    Full,
    /// A payload or message exceeds a size limit of the transport or broker.
    TooLarge,
    /// An event envelope is malformed: a missing required attribute, an invalid extension name,
    /// undecodable data or headers.
    InvalidEvent,
    /// A delivery was already acknowledged, negatively acknowledged or dead-lettered.
    AlreadySettled,
    /// The delivery can no longer be settled by this consumer (its visibility timeout expired
    /// and it was handed to another consumer).
    Expired,
    /// The operation is not supported by this transport (see its capabilities).
    Unsupported,
    /// A configuration value or transport URL is invalid.
    InvalidConfig,
    /// A named resource does not exist.
    NotFound,
    /// The broker refused the operation (permissions, a protocol error). Not retryable unless
    /// the broker says otherwise.
    Broker,
    /// An event failed schema validation.
    Validation,
    /// A bug or broken invariant inside evbus. Please report it.
    Internal,
}

impl ErrorKind {
    /// A short, stable, lowercase name for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Closed => "closed",
            ErrorKind::Connection => "connection",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Full => "full",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::InvalidEvent => "invalid_event",
            ErrorKind::AlreadySettled => "already_settled",
            ErrorKind::Expired => "expired",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::InvalidConfig => "invalid_config",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Broker => "broker",
            ErrorKind::Validation => "validation",
            ErrorKind::Internal => "internal",
        }
    }

    /// Whether an operation failing with this kind may succeed when tried again later.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Connection | ErrorKind::Timeout | ErrorKind::Full
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An evbus error: a kind, a message, an optional cause.
#[derive(thiserror::Error)]
#[error("{kind}: {message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    retryable: Option<bool>,
    #[source]
    source: Option<Source>,
}

impl Error {
    /// A new error of `kind` with a message saying what happened and, where possible, what to
    /// do about it.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            retryable: None,
            source: None,
        }
    }

    /// An error a broker client reported while doing `what` ("publishing to topic `orders`"),
    /// classified by the adapter as `kind`: the message is `what: error`, the client error is
    /// kept as the source. Refine it with [`with_hint`](Self::with_hint) and
    /// [`with_retryable`](Self::with_retryable).
    ///
    /// ```
    /// use evbus::{Error, ErrorKind};
    ///
    /// let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
    /// let e = Error::client(ErrorKind::Connection, "publishing to topic `orders`", io)
    ///     .with_hint("the adapter reconnects by itself; retry later");
    /// assert_eq!(
    ///     e.message(),
    ///     "publishing to topic `orders`: refused; the adapter reconnects by itself; retry later"
    /// );
    /// assert!(e.is_retryable());
    /// assert!(std::error::Error::source(&e).is_some());
    /// ```
    pub fn client<E>(kind: ErrorKind, what: impl fmt::Display, error: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Error::new(kind, format!("{what}: {error}")).with_source(error)
    }

    /// Appends a hint for the caller (what to do) to the message; an empty hint adds nothing.
    pub fn with_hint(mut self, hint: &str) -> Self {
        if !hint.is_empty() {
            self.message.push_str("; ");
            self.message.push_str(hint);
        }
        self
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Overrides the retryable classification derived from the kind (an adapter that knows a
    /// broker error is transient marks it so).
    pub fn with_retryable(mut self, retryable: bool) -> Self {
        self.retryable = Some(retryable);
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The human-readable message, without the kind prefix.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether the same operation may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        self.retryable.unwrap_or_else(|| self.kind.is_retryable())
    }

    /// Shorthand for [`ErrorKind::Closed`].
    pub fn closed(what: impl fmt::Display) -> Self {
        Error::new(ErrorKind::Closed, format!("{what} is closed"))
    }

    /// Shorthand for [`ErrorKind::InvalidEvent`].
    pub fn invalid_event(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidEvent, message)
    }

    /// Shorthand for [`ErrorKind::InvalidConfig`].
    pub fn invalid_config(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidConfig, message)
    }

    /// Shorthand for [`ErrorKind::Unsupported`].
    pub fn unsupported(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unsupported, message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_the_kind_and_the_message() {
        let e = Error::new(ErrorKind::Full, "subscription `s` holds 10 events");
        assert_eq!(e.to_string(), "full: subscription `s` holds 10 events");
    }

    #[test]
    fn retryable_follows_the_kind_unless_overridden() {
        assert!(Error::new(ErrorKind::Connection, "x").is_retryable());
        assert!(!Error::new(ErrorKind::InvalidEvent, "x").is_retryable());
        assert!(
            Error::new(ErrorKind::Broker, "x")
                .with_retryable(true)
                .is_retryable()
        );
    }
}
