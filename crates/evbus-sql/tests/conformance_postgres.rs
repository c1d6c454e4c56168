//! The conformance suite against PostgreSQL.
//!
//! Most cases run against the server at `EVBUS_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), in a schema of their own
//! (`evbus_conf_<pid>_<nanos>`, dropped at the end) so runs never meet. The outage cases run
//! against a PostgreSQL this harness starts itself (`initdb`, then `postgres` on a free port
//! with a temporary data directory; as root, as the `postgres` user), kills with SIGKILL to
//! interrupt and restarts on the same port and data to resume. Without PostgreSQL's server
//! programs those cases are reported `IGNORED ...: needs broker-control`.
//!
//! In container mode (`cargo xtask conformance --containers`, `EVBUS_CONFORMANCE_IMAGE` set)
//! both run against containers of `docker/postgres` instead, the outage cases killing and
//! restarting their container.
//!
//! The foreign-message case writes with plain sqlx: an event row whose body is not a
//! CloudEvent and its delivery row in the queue's partition (README, "Transport").

mod support;

use std::process::ExitCode;
use std::sync::Arc;

use async_trait::async_trait;
use evbus::{Error, ErrorKind};
use evbus_conformance::container::{self, BrokerContainer, ContainerControl, ContainerSpec};
use evbus_conformance::{BrokerControl, RawProducer, Suite};
use evbus_sql::{SqlConfig, SqlTransport};
use sqlx::Connection;
use support::{PgServer, io_error, postgres_url, unique_schema, with_params};

evbus_conformance::harness_false_required!();

fn main() -> ExitCode {
    let base = postgres_url();
    let schema = unique_schema("evbus_conf");
    let url = if base.contains("schema=") {
        base.clone()
    } else {
        with_params(&base, &format!("schema={schema}&max_connections=4"))
    };
    let raw_url = url.clone();
    let image = container::image_from_env();
    let in_container = image.is_some();
    let code = evbus_conformance::main(move || match image {
        Some(image) => in_containers(image),
        None => {
            let suite = suite(url, raw_url, None);
            match PgServer::start() {
                Ok(server) => suite.with_broker_control(Controlled(server)),
                Err(e) => {
                    eprintln!(
                        "WARNING: cannot start a PostgreSQL server for the outage cases: {e}"
                    );
                    suite
                }
            }
        }
    });
    if in_container {
        return code;
    }
    if let Ok(runtime) = tokio::runtime::Runtime::new()
        && !base.contains("schema=")
    {
        runtime.block_on(support::drop_schema(&base, &schema));
    }
    code
}

/// The suite against the PostgreSQL at `url`, with a raw producer; it keeps `container` (the
/// server at `url` in container mode) until it is dropped, which removes it.
fn suite(
    url: String,
    raw_url: String,
    container: Option<Arc<BrokerContainer>>,
) -> Suite<SqlTransport> {
    Suite::new("postgres", move || {
        let _owned = &container;
        let url = url.clone();
        async move { SqlTransport::connect(SqlConfig::from_url(&url)?).await }
    })
    .with_raw_producer(RawPostgres { url: raw_url })
}

/// Container mode (`EVBUS_CONFORMANCE_IMAGE`, see `docker/postgres`): one container for the
/// suite, another for the outage cases, killed with SIGKILL and started again (every
/// committed transaction is in the WAL).
fn in_containers(image: String) -> Suite<SqlTransport> {
    let spec = ContainerSpec::new(image, 5432);
    let mut started = container::start_or_exit("postgres", vec![spec.clone(), spec]);
    let controlled = started.pop().expect("two containers");
    let main = started.pop().expect("two containers");
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/test?schema=evbus_conf&max_connections=4",
        main.host_port()
    );
    println!(
        "container mode: the suite runs against {} at {url}",
        main.name()
    );
    let control = ContainerControl::new(controlled, |port| async move {
        let url = format!(
            "postgres://postgres@127.0.0.1:{port}/test?schema=evbus_ctl&poll_interval_ms=100&connect_timeout_ms=2000"
        );
        SqlTransport::connect(SqlConfig::from_url(&url)?).await
    });
    suite(url.clone(), url, Some(Arc::new(main))).with_broker_control(control)
}

struct Controlled(PgServer);

#[async_trait]
impl BrokerControl for Controlled {
    type Transport = SqlTransport;

    async fn connect(&self) -> evbus::Result<SqlTransport> {
        let url = with_params(
            &self.0.url(),
            "schema=evbus_ctl&poll_interval_ms=100&connect_timeout_ms=2000",
        );
        SqlTransport::connect(SqlConfig::from_url(&url)?).await
    }

    async fn interrupt(&self) -> evbus::Result<()> {
        // SIGKILL to the postmaster and its backends: every transaction that committed is in
        // the WAL (written before COMMIT returns; the OS keeps it).
        self.0.kill();
        Ok(())
    }

    async fn resume(&self) -> evbus::Result<()> {
        tokio::task::block_in_place(|| self.0.restart())
            .map_err(|e| io_error("restarting PostgreSQL", e))
    }
}

/// A foreign producer: its own sqlx connection, no evbus involved.
struct RawPostgres {
    /// The transport's URL (its `schema` parameter names the tables' schema).
    url: String,
}

#[async_trait]
impl RawProducer for RawPostgres {
    async fn send_undecodable(&self, queue: &str) -> evbus::Result<()> {
        let failed = |e: sqlx::Error| {
            Error::new(
                ErrorKind::Connection,
                format!("the raw PostgreSQL producer could not insert into queue `{queue}`: {e}"),
            )
        };
        let config = SqlConfig::from_url(&self.url)?;
        let mut db = sqlx::PgConnection::connect(&config.url)
            .await
            .map_err(failed)?;
        let schema = &config.schema;
        let inserted = sqlx::query(&format!(
            "WITH p AS (INSERT INTO \"{schema}\".evbus_parts (kind, dest, name) \
               VALUES ('queue', $1, '') ON CONFLICT (kind, dest, name) \
               DO UPDATE SET kind = EXCLUDED.kind RETURNING id), \
             ev AS (INSERT INTO \"{schema}\".evbus_events (kind, dest, body) \
               VALUES ('queue', $1, 'not a cloudevent') RETURNING id) \
             INSERT INTO \"{schema}\".evbus_deliveries (part, event) SELECT p.id, ev.id FROM p, ev"
        ))
        .bind(queue)
        .execute(&mut db)
        .await
        .map_err(failed)?;
        db.close().await.map_err(failed)?;
        if inserted.rows_affected() != 1 {
            return Err(Error::new(
                ErrorKind::Internal,
                format!(
                    "the raw PostgreSQL producer inserted {} rows into queue `{queue}`, expected 1",
                    inserted.rows_affected()
                ),
            ));
        }
        Ok(())
    }
}
