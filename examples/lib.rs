//! Runnable examples of evbus. Each program is an `[[example]]` of this package:
//!
//! - `cargo run --example quickstart`: fan-out, competing consumers, redelivery and
//!   dead-lettering on the in-memory transport.
//! - `cargo run --example orders [redis://127.0.0.1:6379]`: the commerce scenario through the
//!   Bus: order events routed to one topic, two handler groups, a drifted payload refused.
//!
//! The library itself is empty; it also compiles and runs the code blocks of the repository
//! README as doctests, so the README cannot drift from the API.

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
