//! The HTTP/1.1 accept loop: a connection limit, a header-read (and keep-alive idle)
//! timeout, and `/healthz` answered even when every connection slot is taken.
//!
//! A connection within [`GatewayConfig::max_connections`](crate::GatewayConfig) is served
//! normally. One above it takes one of [`SPARE`] spare slots: it is answered once (`/healthz`
//! as usual, anything else `503` with `Retry-After`) and closed, with a short header timeout.
//! When the spare slots are taken too, the connection is closed at once.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::problem::Problem;

/// Connections above the limit that are still answered once (and then closed).
const SPARE: usize = 32;
/// Longest header wait of a connection above the limit.
const SPARE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// The settings of the accept loop.
pub(crate) struct Limits {
    pub(crate) max_connections: usize,
    pub(crate) header_read_timeout: Duration,
    /// How long open connections may take to finish after the stop.
    pub(crate) drain: Duration,
}

/// Accepts and serves connections until `cancel`, then lets them finish (bounded).
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let spare = Arc::new(Semaphore::new(SPARE));
    let tasks = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most often: back off a moment, do not spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        if let Ok(permit) = Arc::clone(&slots).try_acquire_owned() {
            let service = TowerToHyperService::new(router.clone());
            let cancel = cancel.clone();
            let timeout = limits.header_read_timeout;
            tasks.spawn(async move {
                connection(stream, service, timeout, true, cancel).await;
                drop(permit);
            });
        } else if let Ok(permit) = Arc::clone(&spare).try_acquire_owned() {
            metrics::counter!("evbus_gateway_connections_over_limit_total").increment(1);
            let health = TowerToHyperService::new(router.clone());
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let health = health.clone();
                async move {
                    if req.uri().path() == "/healthz" {
                        hyper::service::Service::call(&health, req).await
                    } else {
                        Ok::<Response<Body>, Infallible>(over_limit())
                    }
                }
            });
            let cancel = cancel.clone();
            let timeout = limits.header_read_timeout.min(SPARE_HEADER_TIMEOUT);
            tasks.spawn(async move {
                connection(stream, service, timeout, false, cancel).await;
                drop(permit);
            });
        } else {
            metrics::counter!("evbus_gateway_connections_refused_total").increment(1);
            drop(stream);
        }
    }
    tasks.close();
    let _ = tokio::time::timeout(limits.drain + Duration::from_secs(1), tasks.wait()).await;
    Ok(())
}

fn over_limit() -> Response<Body> {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the gateway has too many open connections (max_connections); close idle connections or try again later",
    )
    .retry_after(1)
    .into_response()
}

/// Serves one connection until it ends, or until `cancel` (then gracefully).
async fn connection<S>(
    stream: TcpStream,
    service: S,
    header_timeout: Duration,
    keep_alive: bool,
    cancel: CancellationToken,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(keep_alive);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            return;
        }
        _ = cancel.cancelled() => conn.as_mut().graceful_shutdown(),
    }
    let _ = conn.await;
}
