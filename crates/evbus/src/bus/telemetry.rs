//! Trace context across the broker and the metrics the bus records.
//!
//! With the `opentelemetry` feature, the OpenTelemetry context of the `evbus.emit` span is
//! written into the event as W3C `traceparent`/`tracestate` (the CloudEvents Distributed
//! Tracing extension) by the W3C TraceContext propagator, and read back as the parent of
//! `evbus.handle`. Without it (or without a `tracing-opentelemetry` layer installed) no trace
//! context is written and handler spans have no remote parent.

use futures::future::Either;
use tracing::Instrument;

use crate::envelope::{Event, EventBuilder};

#[cfg(feature = "opentelemetry")]
mod otel {
    use std::collections::HashMap;

    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use crate::envelope::{Event, TRACEPARENT, TRACESTATE};

    /// `traceparent` and `tracestate` of `span`'s OpenTelemetry context, if it has a valid one.
    pub(super) fn carrier_of(span: &tracing::Span) -> HashMap<String, String> {
        let cx = span.context();
        let mut carrier = HashMap::new();
        if cx.span().span_context().is_valid() {
            TraceContextPropagator::new().inject_context(&cx, &mut carrier);
        }
        carrier
    }

    /// Makes the event's trace context the parent of `span`.
    pub(super) fn adopt(span: &tracing::Span, event: &Event) {
        let Some(parent) = event.traceparent() else {
            return;
        };
        let mut carrier = HashMap::new();
        carrier.insert(TRACEPARENT.to_owned(), parent.to_owned());
        if let Some(state) = event.tracestate() {
            carrier.insert(TRACESTATE.to_owned(), state.to_owned());
        }
        let cx = TraceContextPropagator::new().extract(&carrier);
        if cx.span().span_context().is_valid() {
            let _ = span.set_parent(cx);
        }
    }
}

/// Writes the trace context of `span` into the event being built.
pub(super) fn inject(builder: &mut EventBuilder, span: &tracing::Span) {
    #[cfg(feature = "opentelemetry")]
    {
        // A disabled span (no subscriber wants it) has no OpenTelemetry context to write.
        if span.is_disabled() {
            return;
        }
        for (name, value) in otel::carrier_of(span) {
            if !value.is_empty() {
                builder.set_extension(&name, value);
            }
        }
    }
    #[cfg(not(feature = "opentelemetry"))]
    {
        let _ = (builder, span);
    }
}

/// Runs `work` inside `span`; when no subscriber wants the span (it is disabled), runs it as
/// it is: entering and leaving a disabled span on every poll records nothing but costs
/// (tracing's `log` fallback looks at the logger each time).
#[inline]
pub(super) fn within<F: Future>(
    span: tracing::Span,
    work: F,
) -> Either<F, tracing::instrument::Instrumented<F>> {
    if span.is_disabled() {
        Either::Left(work)
    } else {
        Either::Right(work.instrument(span))
    }
}

/// Parents `span` to the trace context the event carries.
pub(super) fn adopt(span: &tracing::Span, event: &Event) {
    #[cfg(feature = "opentelemetry")]
    if !span.is_disabled() {
        otel::adopt(span, event);
    }
    #[cfg(not(feature = "opentelemetry"))]
    let _ = (span, event);
}

/// Metric names, recorded through the `metrics` facade.
pub(super) mod names {
    pub(crate) const EMITTED: &str = "evbus_emitted_total";
    pub(crate) const HANDLED: &str = "evbus_handled_total";
    pub(crate) const FAILED: &str = "evbus_failed_total";
    pub(crate) const RETRIED: &str = "evbus_retried_total";
    pub(crate) const DEAD_LETTERED: &str = "evbus_dead_lettered_total";
    pub(crate) const HANDLE_DURATION: &str = "evbus_handle_duration_seconds";
    pub(crate) const UNKNOWN_VERSION_READ: &str = "evbus_unknown_version_read_total";
}

/// Where the metrics are recorded from, for the recorder (as the `metrics` macros do).
static METADATA: metrics::Metadata<'static> =
    metrics::Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

fn counter(key: &metrics::Key) -> metrics::Counter {
    metrics::with_recorder(|r| r.register_counter(key, &METADATA))
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> metrics::Key {
    metrics::Key::from_parts(
        name,
        labels
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, (*v).to_owned()))
            .collect::<Vec<_>>(),
    )
}

/// The per-event metric keys of one type, built once (recording then allocates nothing).
#[derive(Debug)]
pub(super) struct TypeMetrics {
    emitted: metrics::Key,
}

impl TypeMetrics {
    pub(super) fn new(ty: &str) -> Self {
        TypeMetrics {
            emitted: key(names::EMITTED, &[("type", ty)]),
        }
    }

    pub(super) fn emitted(&self) {
        counter(&self.emitted).increment(1);
    }
}

/// The per-event metric keys of one handler (type and group), built once.
pub(super) struct HandlerMetrics {
    handled: metrics::Key,
    failed: metrics::Key,
    retried: metrics::Key,
    duration: metrics::Key,
}

impl HandlerMetrics {
    pub(super) fn new(ty: &str, group: &str) -> Self {
        let labels = [("type", ty), ("group", group)];
        HandlerMetrics {
            handled: key(names::HANDLED, &labels),
            failed: key(names::FAILED, &labels),
            retried: key(names::RETRIED, &labels),
            duration: key(names::HANDLE_DURATION, &labels),
        }
    }

    pub(super) fn handled(&self) {
        counter(&self.handled).increment(1);
    }

    pub(super) fn failed(&self) {
        counter(&self.failed).increment(1);
    }

    pub(super) fn retried(&self) {
        counter(&self.retried).increment(1);
    }

    pub(super) fn handle_duration(&self, seconds: f64) {
        metrics::with_recorder(|r| r.register_histogram(&self.duration, &METADATA)).record(seconds);
    }
}

/// Counts an emitted event of a type without precomputed keys (types the catalogue does not
/// list, accepted by a permissive catalogue).
pub(super) fn emitted(ty: &str) {
    counter(&key(names::EMITTED, &[("type", ty)])).increment(1);
}

/// Counts an event of a version the consumer's catalogue lacks, read as its latest version
/// (`relation`: `newer` or `older` than that version).
pub(super) fn unknown_version_read(ty: &str, group: &str, relation: &'static str) {
    counter(&key(
        names::UNKNOWN_VERSION_READ,
        &[("type", ty), ("group", group), ("relation", relation)],
    ))
    .increment(1);
}

/// Counts a dead-lettered event (rare: its key is built on the spot).
pub(super) fn dead_lettered(ty: &str, group: &str, cause: &'static str) {
    counter(&key(
        names::DEAD_LETTERED,
        &[("type", ty), ("group", group), ("cause", cause)],
    ))
    .increment(1);
}
