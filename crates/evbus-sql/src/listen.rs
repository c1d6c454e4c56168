//! PostgreSQL `LISTEN`: one connection per transport (its own, outside the pool) that wakes
//! this process's consumers when another process publishes. Losing it costs latency only:
//! consumers poll every `poll_interval` regardless, and every consumer is woken after a
//! reconnection (notifications sent meanwhile are lost).

use std::sync::Arc;

use sqlx::postgres::{PgListener, PgPoolOptions};

use crate::transport::{Db, Shared, listen_backoff};

/// Starts the `LISTEN` task of a PostgreSQL transport; it ends when the transport closes or
/// is dropped.
pub(crate) fn spawn(shared: &Arc<Shared>) -> evbus::Result<()> {
    let Db::Postgres(pool) = &shared.db else {
        return Ok(());
    };
    // A pool of one, apart from the transport's pool: the listener holds its connection.
    let options = pool.connect_options().as_ref().clone();
    let listen_pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(shared.config.connect_timeout)
        .connect_lazy_with(options);
    let channel = shared.channel.clone();
    let wakers = Arc::clone(&shared.wakers);
    let stop = shared.stop_token();
    tokio::spawn(async move {
        let mut backoff = listen_backoff();
        loop {
            let connect = async {
                let mut listener = PgListener::connect_with(&listen_pool).await?;
                listener.listen(&channel).await?;
                Ok::<_, sqlx::Error>(listener)
            };
            let listener = tokio::select! {
                () = stop.cancelled() => break,
                listener = connect => listener,
            };
            let mut listener = match listener {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::debug!(error = %e, "evbus-sql: LISTEN connection failed; polling meanwhile");
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(backoff.next_delay()) => continue,
                    }
                }
            };
            backoff.reset();
            // Anything published while not listening.
            wakers.wake_all();
            loop {
                let next = tokio::select! {
                    () = stop.cancelled() => break,
                    next = listener.try_recv() => next,
                };
                match next {
                    Ok(Some(notification)) => wakers.wake(notification.payload()),
                    Ok(None) => {
                        // Lost; `try_recv` reconnects on the next call (and listens again).
                        wakers.wake_all();
                        tokio::select! {
                            () = stop.cancelled() => break,
                            () = tokio::time::sleep(backoff.next_delay()) => {}
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "evbus-sql: LISTEN connection lost");
                        wakers.wake_all();
                        tokio::select! {
                            () = stop.cancelled() => break,
                            () = tokio::time::sleep(backoff.next_delay()) => {}
                        }
                        break;
                    }
                }
            }
            if stop.is_cancelled() {
                break;
            }
        }
        listen_pool.close().await;
    });
    Ok(())
}
