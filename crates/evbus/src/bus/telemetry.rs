//! Trace context across the broker and the metrics the bus records.
//!
//! With the `opentelemetry` feature, the OpenTelemetry context of the `evbus.emit` span is
//! written into the event as W3C `traceparent`/`tracestate` (the CloudEvents Distributed
//! Tracing extension) by the W3C TraceContext propagator, and read back as the parent of
//! `evbus.handle`. Without it (or without a `tracing-opentelemetry` layer installed) no trace
//! context is written and handler spans have no remote parent.

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
pub(super) fn inject(builder: EventBuilder, span: &tracing::Span) -> EventBuilder {
    #[cfg(feature = "opentelemetry")]
    {
        let mut builder = builder;
        for (name, value) in otel::carrier_of(span) {
            if !value.is_empty() {
                builder = builder.extension(&name, value);
            }
        }
        builder
    }
    #[cfg(not(feature = "opentelemetry"))]
    {
        let _ = span;
        builder
    }
}

/// Parents `span` to the trace context the event carries.
pub(super) fn adopt(span: &tracing::Span, event: &Event) {
    #[cfg(feature = "opentelemetry")]
    otel::adopt(span, event);
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
}

pub(super) fn emitted(ty: &str) {
    metrics::counter!(names::EMITTED, "type" => ty.to_owned()).increment(1);
}

pub(super) fn handled(ty: &str, group: &str) {
    metrics::counter!(names::HANDLED, "type" => ty.to_owned(), "group" => group.to_owned())
        .increment(1);
}

pub(super) fn failed(ty: &str, group: &str) {
    metrics::counter!(names::FAILED, "type" => ty.to_owned(), "group" => group.to_owned())
        .increment(1);
}

pub(super) fn retried(ty: &str, group: &str) {
    metrics::counter!(names::RETRIED, "type" => ty.to_owned(), "group" => group.to_owned())
        .increment(1);
}

pub(super) fn dead_lettered(ty: &str, group: &str, cause: &'static str) {
    metrics::counter!(
        names::DEAD_LETTERED,
        "type" => ty.to_owned(),
        "group" => group.to_owned(),
        "cause" => cause
    )
    .increment(1);
}

pub(super) fn handle_duration(ty: &str, group: &str, seconds: f64) {
    metrics::histogram!(names::HANDLE_DURATION, "type" => ty.to_owned(), "group" => group.to_owned())
        .record(seconds);
}
