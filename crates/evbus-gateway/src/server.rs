//! The HTTP/1.1 accept loop: a connection limit, a header-read (and keep-alive idle)
//! timeout, a write-stall timeout, and `/healthz` answered even when every connection slot
//! is taken.
//!
//! The header-read timeout ([`GatewayConfig::header_read_timeout`](crate::GatewayConfig))
//! bounds reading a request's headers and an idle kept-alive connection. It does not apply
//! while a response is being written: a client that pipelines requests and never reads the
//! responses would hold its connection (and a full kernel send buffer) for good. So every
//! connection's socket is wrapped in a [`WriteStall`]: a write (or flush) that stays pending,
//! the socket taking no byte, for as long as the header-read timeout fails with
//! [`TimedOut`](std::io::ErrorKind::TimedOut), which closes the connection. It measures time
//! without progress, not a response's total time: a stream (`GET /v1/stream`) read slowly
//! but steadily stays open.
//!
//! A connection within [`GatewayConfig::max_connections`](crate::GatewayConfig) is served
//! normally. One above it takes one of [`SPARE`] spare slots: it is answered once (`/healthz`
//! as usual, anything else `503` with `Retry-After`) and closed, with a short header timeout.
//! When the spare slots are taken too, the connection is closed at once.
//!
//! A peer that vanishes without closing (NAT or firewall state lost, a mobile network
//! change) is noticed by the kernel: what the gateway wrote and the peer never acknowledged
//! ends the connection after [`UNACKNOWLEDGED_LIMIT`] (`TCP_USER_TIMEOUT`, Linux), and an
//! idle connection is probed (TCP keepalive). A stream's keep-alive comments are a few bytes
//! that the send buffer takes without a stall: without this, each dead stream held its
//! key's stream slot until TCP gave up retransmitting (about 15 minutes), and the key's
//! reconnects were refused with 429 meanwhile (outside review).
//!
//! Connections are also counted per client address (an IPv6 address by its /64 network,
//! which one host commonly holds whole): one above
//! [`GatewayConfig::max_connections_per_address`](crate::GatewayConfig) is treated like one
//! above the limit, so one host cannot take every slot.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
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
    pub(crate) max_connections_per_address: usize,
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
    let addresses = Arc::new(Addresses::new(limits.max_connections_per_address));
    let tasks = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
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
        dead_peers_end(&stream);
        let admitted = match Addresses::enter(&addresses, peer) {
            None => Err(OVER_ADDRESS_LIMIT),
            Some(address) => match Arc::clone(&slots).try_acquire_owned() {
                Ok(permit) => Ok((address, permit)),
                Err(_) => Err(OVER_LIMIT),
            },
        };
        let limit = match admitted {
            Ok(held) => {
                let service = TowerToHyperService::new(router.clone());
                let cancel = cancel.clone();
                let timeout = limits.header_read_timeout;
                tasks.spawn(async move {
                    connection(stream, service, timeout, true, cancel).await;
                    drop(held);
                });
                continue;
            }
            Err(limit) => limit,
        };
        let Ok(permit) = Arc::clone(&spare).try_acquire_owned() else {
            metrics::counter!("evbus_gateway_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        if limit == OVER_ADDRESS_LIMIT {
            metrics::counter!("evbus_gateway_connections_over_address_limit_total").increment(1);
        } else {
            metrics::counter!("evbus_gateway_connections_over_limit_total").increment(1);
        }
        let health = TowerToHyperService::new(router.clone());
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let health = health.clone();
            async move {
                if req.uri().path() == "/healthz" {
                    hyper::service::Service::call(&health, req).await
                } else {
                    Ok::<Response<Body>, Infallible>(over_limit(limit))
                }
            }
        });
        let cancel = cancel.clone();
        let timeout = limits.header_read_timeout.min(SPARE_HEADER_TIMEOUT);
        tasks.spawn(async move {
            connection(stream, service, timeout, false, cancel).await;
            drop(permit);
        });
    }
    tasks.close();
    let _ = tokio::time::timeout(limits.drain + Duration::from_secs(1), tasks.wait()).await;
    Ok(())
}

const OVER_LIMIT: &str = "the gateway has too many open connections (max_connections); close idle connections or try again later";
const OVER_ADDRESS_LIMIT: &str = "too many open connections from your address (max_connections_per_address); close idle connections or try again later";

fn over_limit(detail: &'static str) -> Response<Body> {
    Problem::new(StatusCode::SERVICE_UNAVAILABLE, detail)
        .retry_after(1)
        .into_response()
}

/// Open connections per client address, bounded.
struct Addresses {
    limit: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection counted against its address until dropped.
struct AddressSlot {
    addresses: Arc<Addresses>,
    key: IpAddr,
}

impl Addresses {
    fn new(limit: usize) -> Self {
        Addresses {
            limit: limit.max(1),
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a connection from `peer`; `None` when its address holds the most already.
    fn enter(this: &Arc<Self>, peer: SocketAddr) -> Option<AddressSlot> {
        let key = address_key(peer.ip());
        let mut open = this.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= this.limit {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            addresses: Arc::clone(this),
            key,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self
            .addresses
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// What connections are counted under: an IPv4 address itself (an IPv4-mapped IPv6 one too),
/// an IPv6 address by its /64 network.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

/// Serves one connection until it ends, or until `cancel` (then gracefully). A write that
/// makes no progress for `header_timeout` ends it too (see [`WriteStall`]).
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
    let io = WriteStall::new(stream, header_timeout);
    let conn = builder.serve_connection(TokioIo::new(io), service);
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

/// A connection's IO whose writes fail once one has stayed pending, with no byte taken by the
/// socket, for `limit`: a peer that stops reading cannot hold the connection for good.
///
/// The timer starts when a write (flush, shutdown) first answers `Pending` and is cleared by
/// any write that completes, so it measures time without progress, not the time a response
/// (a stream) takes. Reads are passed through unchanged (the header-read timeout covers
/// them).
pub(crate) struct WriteStall<T> {
    inner: T,
    limit: Duration,
    /// Armed while a write is pending: fires at the last progress plus `limit`.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<T> WriteStall<T> {
    pub(crate) fn new(inner: T, limit: Duration) -> Self {
        WriteStall {
            inner,
            limit,
            timer: None,
        }
    }

    /// Passes `polled` (a write's answer) on; a `Pending` one arms the timer, and fails once
    /// the timer has fired.
    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        if polled.is_ready() {
            self.timer = None;
            return polled;
        }
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + limit)));
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                metrics::counter!("evbus_gateway_connections_write_stalled_total").increment(1);
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client read nothing for the write-stall timeout",
                )))
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteStall<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteStall<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, polled)
    }
}

/// How long data the gateway wrote may stay unacknowledged by the peer before the kernel
/// ends the connection (`TCP_USER_TIMEOUT`): a stream writes a keep-alive comment every
/// `stream_keepalive` (15 s by default), so a dead peer is found within about a minute.
pub(crate) const UNACKNOWLEDGED_LIMIT: Duration = Duration::from_secs(45);

/// Lets the kernel end the connection of a peer that vanished (see the module's header):
/// `TCP_USER_TIMEOUT` where the platform has it, and keepalive probes after a minute idle.
/// Best effort: a socket that refuses either is served as before.
fn dead_peers_end(stream: &tokio::net::TcpStream) {
    let socket = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    let _ = socket.set_tcp_keepalive(&keepalive);
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
    let _ = socket.set_tcp_user_timeout(Some(UNACKNOWLEDGED_LIMIT));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_host_is_counted_by_its_64_network() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(other));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(address_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn an_address_slot_is_given_back_when_dropped() {
        let addresses = Arc::new(Addresses::new(2));
        let peer: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let first = Addresses::enter(&addresses, peer).unwrap();
        let second = Addresses::enter(&addresses, peer).unwrap();
        assert!(Addresses::enter(&addresses, peer).is_none());
        assert!(Addresses::enter(&addresses, "192.0.2.2:5000".parse().unwrap()).is_some());
        drop(first);
        let third = Addresses::enter(&addresses, peer).unwrap();
        drop((second, third));
        assert!(addresses.open.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn accepted_sockets_end_when_their_peer_vanishes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        dead_peers_end(&stream);
        let socket = socket2::SockRef::from(&stream);
        assert!(socket.keepalive().unwrap());
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            Duration::from_secs(60)
        );
        #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(UNACKNOWLEDGED_LIMIT)
        );
    }
}
