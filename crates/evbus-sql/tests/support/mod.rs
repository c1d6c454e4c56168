//! Test helpers shared by the integration tests: a PostgreSQL server the test owns, unique
//! schema names, the database URLs.

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use evbus_conformance::process::BrokerProcess;

/// The shared PostgreSQL server: `EVBUS_POSTGRES_URL`, default
/// `postgres://postgres@127.0.0.1:5432/test`.
pub fn postgres_url() -> String {
    std::env::var("EVBUS_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema name no other run uses (`<prefix>_<pid>_<nanos>`).
pub fn unique_schema(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        % 1_000_000_000_000;
    format!("{prefix}_{}_{nanos}", std::process::id())
}

/// `url` with extra query parameters.
pub fn with_params(url: &str, params: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{params}")
}

/// Whether a missing broker must fail the test (CI=true or EVBUS_REQUIRE_BROKERS=1).
pub fn brokers_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("EVBUS_REQUIRE_BROKERS").is_ok_and(|v| v == "1")
}

/// Drops `schema` (best effort, at the end of a run).
pub async fn drop_schema(url: &str, schema: &str) {
    use sqlx::Connection;
    if let Ok(mut conn) = sqlx::PgConnection::connect(url).await {
        let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .execute(&mut conn)
            .await;
        let _ = conn.close().await;
    }
}

/// The directory of PostgreSQL's server programs: `EVBUS_PG_BINDIR`, else `pg_config
/// --bindir`, else the newest `/usr/lib/postgresql/*/bin`.
fn bindir() -> std::io::Result<PathBuf> {
    if let Ok(dir) = std::env::var("EVBUS_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").is_file())
        .collect();
    candidates.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(dir) = candidates.pop() {
        return Ok(dir);
    }
    let out = Command::new("pg_config").arg("--bindir").output()?;
    if out.status.success() {
        return Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "no PostgreSQL server programs (initdb, postgres): install them or set EVBUS_PG_BINDIR",
    ))
}

/// PostgreSQL refuses to run as root: as root, the server runs as the `postgres` user
/// (through `setpriv`, which execs, so SIGKILL reaches the server itself).
fn as_server_user(program: PathBuf) -> std::io::Result<(Command, Option<(u32, u32)>)> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !root {
        return Ok((Command::new(program), None));
    }
    let id = |flag: &str| -> std::io::Result<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output()?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "running as root, and there is no `postgres` user to run the server as",
                )
            })
    };
    let (uid, gid) = (id("-u")?, id("-g")?);
    let mut command = Command::new("setpriv");
    command
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(program);
    Ok((command, Some((uid, gid))))
}

/// A PostgreSQL server of this test: `initdb` in a data directory of its own, `postgres` on
/// a free port (trust authentication, no Unix socket), killed with SIGKILL (the whole process
/// group: postmaster and backends) and restarted on the same port and data directory.
pub struct PgServer(BrokerProcess);

impl PgServer {
    pub fn start() -> std::io::Result<Self> {
        let bin = bindir()?;
        let postgres = bin.join("postgres");
        let process = BrokerProcess::builder("postgres", move |dir, port| {
            let (mut command, _) = as_server_user(postgres.clone())
                .unwrap_or_else(|_| (Command::new(&postgres), None));
            command
                .arg("-D")
                .arg(dir.join("pgdata"))
                .args(["-p", &port.to_string()])
                .args(["-c", "listen_addresses=127.0.0.1"])
                .args(["-c", "unix_socket_directories="])
                .args(["-c", "max_connections=300"])
                .args(["-c", "fsync=off"]);
            command
        })
        .process_group()
        .log_file("postgres.log")
        .ready_when(Duration::from_secs(60), pg_isready)
        .build()?;
        let data = process.data_dir().join("pgdata");
        std::fs::create_dir_all(&data)?;
        let (mut initdb, ids) = as_server_user(bin.join("initdb"))?;
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(process.data_dir(), Some(uid), Some(gid))?;
            std::os::unix::fs::chown(&data, Some(uid), Some(gid))?;
        }
        let out = initdb
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            .current_dir(process.data_dir())
            .output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        process.restart()?;
        Ok(PgServer(process))
    }

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port())
    }
}

/// Whether the server accepts connections (not merely the port: it must have finished
/// recovery).
fn pg_isready(port: u16) -> std::io::Result<bool> {
    let program = bindir()
        .map(|d| d.join("pg_isready"))
        .unwrap_or_else(|_| PathBuf::from("pg_isready"));
    let status = Command::new(program)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    Ok(status.success())
}

impl std::ops::Deref for PgServer {
    type Target = BrokerProcess;

    fn deref(&self) -> &BrokerProcess {
        &self.0
    }
}

pub fn io_error(what: &str, e: std::io::Error) -> evbus::Error {
    evbus::Error::new(evbus::ErrorKind::Internal, format!("{what}: {e}"))
}

/// Event number `n` of the shared cases.
fn event(n: usize) -> evbus::Event {
    evbus::Event::builder("orderPlaced", "/sql-test")
        .json(&serde_json::json!({ "n": n }))
        .unwrap()
        .build()
        .unwrap()
}

/// Queue `name` of `transport`, holding `n` new events (`{"n": 0}` ...), sent as one batch.
async fn queue_holding(
    transport: &evbus_sql::SqlTransport,
    name: &str,
    n: usize,
) -> (std::sync::Arc<dyn evbus::Queue>, Vec<evbus::Event>) {
    use evbus::{Event, Transport};
    let events: Vec<Event> = (0..n).map(event).collect();
    let queue = transport.queue(name).await.unwrap();
    queue.send_batch(&events).await.unwrap();
    (queue, events)
}

/// Durations longer than SQL holds: a consumer of queue `forever` (2 events) with
/// `visibility_timeout(Duration::MAX)` is handed the first, nacks it with a delay of
/// `Duration::MAX` and is handed the second. On PostgreSQL both became
/// `now() + make_interval(secs => 9.2e15)`, "timestamp out of range": every claim of the
/// queue failed, for ever. The transport caps them at 100 years; the caller checks that the
/// nacked row is due then.
///
/// `due_in_years` reads how far ahead the latest `visible_at` of the deliveries is, in years:
/// a claim with `visibility_timeout(Duration::MAX)` is due in 100 years (the transport's cap
/// for SQL), a nack delayed by `Duration::MAX` in one (core's `LONGEST_BACKOFF`).
pub async fn durations_past_what_sql_holds_are_capped<F, Fut>(
    transport: &evbus_sql::SqlTransport,
    due_in_years: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    use evbus::ConsumerOptions;
    let (queue, events) = queue_holding(transport, "forever", 2).await;
    let options = ConsumerOptions::default()
        .visibility_timeout(Duration::MAX)
        .max_in_flight(1);
    let mut sub = queue.receive(options).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), sub.next_delivery())
        .await
        .expect("the first event")
        .unwrap()
        .expect("claimed with visibility_timeout(Duration::MAX)");
    assert_eq!(first.event().id(), events[0].id());
    let years = due_in_years().await;
    assert!(
        (99.0..=100.0).contains(&years),
        "the claim is due in {years} years"
    );
    first
        .nack(Some(Duration::MAX))
        .await
        .expect("nacked with a delay of Duration::MAX");
    let second = tokio::time::timeout(Duration::from_secs(10), sub.next_delivery())
        .await
        .expect("the second event")
        .unwrap()
        .expect("claimed with visibility_timeout(Duration::MAX)");
    assert_eq!(second.event().id(), events[1].id());
    assert_eq!(second.attempt(), 1);
    second.ack().await.unwrap();
    let longest = evbus::bus::LONGEST_BACKOFF.as_secs_f64() / (HUNDRED_YEARS_SECS / 100.0);
    let years = due_in_years().await;
    assert!(
        (longest - 0.01..=longest).contains(&years),
        "the nacked row is due in {years} years"
    );
}

/// 100 years in seconds, as the transport caps durations written into SQL.
pub const HUNDRED_YEARS_SECS: f64 = 100.0 * 365.0 * 24.0 * 3600.0;

/// Rows a consumer claimed ahead and never handed out go back when its subscription is
/// dropped, at once and not counted as an attempt: of 8 events sent to queue `prefetch`, a
/// consumer with room for 8 (so one claim takes them all) hands out the first and is
/// dropped; a new consumer then gets the other 7, in order, each on its first attempt,
/// long before the 60 s visibility timeout that would otherwise hold them.
pub async fn unhanded_claims_go_back_at_once_uncounted(transport: &evbus_sql::SqlTransport) {
    use evbus::ConsumerOptions;
    let (queue, events) = queue_holding(transport, "prefetch", 8).await;
    let options = ConsumerOptions::default()
        .visibility_timeout(Duration::from_secs(60))
        .max_in_flight(8);
    let mut first = queue.receive(options.clone()).await.unwrap();
    let taken = tokio::time::timeout(Duration::from_secs(10), first.next_delivery())
        .await
        .expect("the first delivery")
        .unwrap()
        .unwrap();
    assert_eq!(taken.event().id(), events[0].id());
    drop(first);
    let mut second = queue.receive(options).await.unwrap();
    unhanded_rows_come_first_attempt(&mut second, &events[1..]).await;
    taken.ack().await.unwrap();
}

/// Rows given back with a delay wait apart from the others and come back in publish order:
/// of 10 events of queue `delayed`, held at once, the first five are nacked for an hour and the
/// next five for 3 s, each group in reverse order. An event sent then is handed out at once,
/// ahead of the ten delayed rows at the head of the queue; the five of 3 s come back next, in
/// their publish order, on attempt 2; the five of an hour stay delayed (`delayed_rows` reads
/// how many rows of the database are marked delayed: 5 at the end).
pub async fn delayed_rows_wait_apart_and_come_back_in_order<F, Fut>(
    transport: &evbus_sql::SqlTransport,
    delayed_rows: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = i64>,
{
    use evbus::ConsumerOptions;
    let (queue, events) = queue_holding(transport, "delayed", 10).await;
    let options = ConsumerOptions::default()
        .visibility_timeout(Duration::from_secs(60))
        .max_in_flight(16);
    let mut sub = queue.receive(options).await.unwrap();
    let mut held = Vec::new();
    for expected in &events {
        let d = tokio::time::timeout(Duration::from_secs(10), sub.next_delivery())
            .await
            .expect("the next event")
            .unwrap()
            .unwrap();
        assert_eq!(d.event().id(), expected.id());
        held.push(d);
    }
    for d in held[..5].iter().rev() {
        d.nack(Some(Duration::from_secs(3600))).await.unwrap();
    }
    for d in held[5..].iter().rev() {
        d.nack(Some(Duration::from_secs(3))).await.unwrap();
    }
    assert_eq!(
        delayed_rows().await,
        10,
        "every nack with a delay marks its row delayed"
    );
    let fresh = event(10);
    queue.send(&fresh).await.unwrap();
    let first = next_within(
        &mut sub,
        2,
        "the event sent after the delayed ones, at once",
    )
    .await;
    assert_eq!(
        first.event().id(),
        fresh.id(),
        "a delayed row was handed out early"
    );
    assert_eq!(first.attempt(), 1);
    first.ack().await.unwrap();
    for expected in &events[5..] {
        let d = next_within(&mut sub, 15, "the rows delayed by 3 s, once due").await;
        assert_eq!(
            d.event().id(),
            expected.id(),
            "rows given back together come back in publish order"
        );
        assert_eq!(d.attempt(), 2);
        d.ack().await.unwrap();
    }
    assert_eq!(
        delayed_rows().await,
        5,
        "the rows delayed by an hour are still waiting"
    );
    drop(held);
}

/// A renewal holds a claim, and one that comes after its visibility timeout ran out is
/// refused even though nobody claimed the row again yet (its holder cannot tell the two
/// apart): with a 1 s timeout, the delivery of queue `renewed` is renewed every 250 ms for
/// 3 s and does not come back; left alone past the timeout, its renewal fails with
/// `Expired`, and the row is claimed again at the next look, attempt 2.
pub async fn a_renewal_holds_a_claim_and_one_past_its_timeout_is_refused(
    transport: &evbus_sql::SqlTransport,
) {
    use evbus::ConsumerOptions;
    let visibility = Duration::from_secs(1);
    let (queue, events) = queue_holding(transport, "renewed", 1).await;
    let options = ConsumerOptions::default().visibility_timeout(visibility);
    let mut sub = queue.receive(options).await.unwrap();
    let held = tokio::time::timeout(Duration::from_secs(10), sub.next_delivery())
        .await
        .expect("the delivery")
        .unwrap()
        .unwrap();
    assert_eq!(held.event().id(), events[0].id());
    let since = std::time::Instant::now();
    while since.elapsed() < visibility * 3 {
        held.renew()
            .await
            .expect("renewing a claim within its timeout");
        if let Ok(got) = tokio::time::timeout(visibility / 4, sub.next_delivery()).await {
            panic!(
                "a renewed claim came back after {:?}: {:?}",
                since.elapsed(),
                got.map(|d| d.map(|d| d.attempt()))
            );
        }
    }
    tokio::time::sleep(visibility * 3 / 2).await;
    let e = held
        .renew()
        .await
        .expect_err("renewing a claim past its timeout");
    assert_eq!(e.kind(), evbus::ErrorKind::Expired, "{e}");
    let again = tokio::time::timeout(Duration::from_secs(10), sub.next_delivery())
        .await
        .expect("the expired claim, claimed again")
        .unwrap()
        .unwrap();
    assert_eq!(again.event().id(), events[0].id());
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
}

/// `expected`, in order, each on its first attempt, promptly (well before a visibility
/// timeout of 20 s or more): rows a dropped consumer had claimed and never handed out.
async fn unhanded_rows_come_first_attempt(
    sub: &mut evbus::Subscription,
    expected: &[evbus::Event],
) {
    for expected in expected {
        let d = tokio::time::timeout(Duration::from_secs(5), sub.next_delivery())
            .await
            .expect("the rows the dropped consumer claimed and never handed out, promptly")
            .unwrap()
            .unwrap();
        assert_eq!(d.event().id(), expected.id());
        assert_eq!(
            d.attempt(),
            1,
            "a claim never handed out counted as an attempt"
        );
        d.ack().await.unwrap();
    }
}

/// A reader slower than its claims does not use up attempts: with a 2 s visibility timeout
/// and room for 4, one claim takes all 4 events of queue `slow`; each is handled for 0.7 s,
/// 2.8 s in all. The stream renews the rows it holds for its reader every third of the
/// timeout, so every event is handed out on its first attempt (rows kept unrenewed until the
/// timeout ran out would come back counted twice). That they are renewed rather than given
/// back and claimed again: `rows_claimed_ahead_stay_with_a_reader_in_use`.
pub async fn a_slow_reader_hands_out_every_event_on_its_first_attempt(
    transport: &evbus_sql::SqlTransport,
) {
    use evbus::ConsumerOptions;
    let (queue, events) = queue_holding(transport, "slow", 4).await;
    let options = ConsumerOptions::default()
        .visibility_timeout(Duration::from_secs(2))
        .max_in_flight(4);
    let mut sub = queue.receive(options).await.unwrap();
    for expected in &events {
        let d = tokio::time::timeout(Duration::from_secs(10), sub.next_delivery())
            .await
            .expect("the next event")
            .unwrap()
            .unwrap();
        assert_eq!(d.event().id(), expected.id());
        assert_eq!(d.attempt(), 1, "a slow reader used up an attempt");
        // The handler's work.
        tokio::time::sleep(Duration::from_millis(700)).await;
        d.ack().await.unwrap();
    }
}

/// Rows claimed ahead stay with a reader in use, renewed, and are handed out in order on
/// their first attempt: with a 1 s visibility timeout and room for 4, consumer A's first
/// claim takes all 4 events of queue `ahead` and A handles each for 0.4 s (1.6 s in all);
/// three other consumers of the same queue read all the while. They get none of them, and A
/// gets them in order. The stream used to give rows back once their claim had used half its
/// timeout (here after the second event) and claim afresh: the others, woken by the
/// give-back, raced A for the third and fourth events, and whoever won took them out of A's
/// order (a race A lost in every run on PostgreSQL and in two of five on SQLite).
pub async fn rows_claimed_ahead_stay_with_a_reader_in_use(transport: &evbus_sql::SqlTransport) {
    use evbus::ConsumerOptions;
    let visibility = Duration::from_secs(1);
    let (queue, events) = queue_holding(transport, "ahead", 4).await;
    let options = ConsumerOptions::default().visibility_timeout(visibility);
    let mut a = queue
        .receive(options.clone().max_in_flight(4))
        .await
        .unwrap();
    let first = next_within(&mut a, 10, "A's first delivery").await;
    assert_eq!(first.event().id(), events[0].id());
    // A's claim has taken the four: the others find nothing to claim, and read on.
    let (taken_tx, mut taken_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut readers = Vec::new();
    for _ in 0..3 {
        let mut other = queue
            .receive(options.clone().max_in_flight(1))
            .await
            .unwrap();
        let taken_tx = taken_tx.clone();
        readers.push(tokio::spawn(async move {
            // Held, not settled: with room for 1, nothing else comes to this one.
            let mut kept = Vec::new();
            while let Some(d) = other.next_delivery().await {
                let d = d.unwrap();
                // The test has ended (failed) when nobody receives any more.
                if taken_tx
                    .send((d.event().id().to_owned(), d.attempt()))
                    .is_err()
                {
                    return;
                }
                kept.push(d);
            }
        }));
    }
    let mut held = Some(first);
    for (at, expected) in events.iter().enumerate() {
        let d = match held.take() {
            Some(d) => d,
            None => next_within(&mut a, 10, "A's next delivery").await,
        };
        assert_eq!(
            (d.event().id(), d.attempt()),
            (expected.id(), 1),
            "A's delivery {at} (in order, first attempt)"
        );
        // The handler's work.
        tokio::time::sleep(visibility * 2 / 5).await;
        d.ack().await.unwrap();
    }
    for reader in &readers {
        reader.abort();
    }
    let taken: Vec<_> = std::iter::from_fn(|| taken_rx.try_recv().ok()).collect();
    assert!(
        taken.is_empty(),
        "the other consumers, reading while A held its claims made ahead, got {taken:?}"
    );
}

/// Renewal stops once the stream is not polled for a whole visibility timeout: a hung reader
/// must not hold what it claimed ahead for ever. With a 1 s timeout and room for 4, consumer
/// A's first claim takes all 4 events of queue `hung` and A hands out the first; A is then
/// not polled. Consumer B gets the other 3, in order, on attempt 2 once A's claims ran out
/// (within 10 s; about 2 s: renewed until A had not been polled for 1 s, then 1 s more).
/// When A is read again, it hands none of them out again: its next delivery is an event
/// sent afterwards.
pub async fn rows_claimed_ahead_by_a_stream_not_polled_time_out(
    transport: &evbus_sql::SqlTransport,
) {
    use evbus::ConsumerOptions;
    let (queue, events) = queue_holding(transport, "hung", 4).await;
    let options = ConsumerOptions::default().visibility_timeout(Duration::from_secs(1));
    let mut a = queue
        .receive(options.clone().max_in_flight(4))
        .await
        .unwrap();
    let first = next_within(&mut a, 10, "A's first delivery").await;
    assert_eq!(first.event().id(), events[0].id());
    first.ack().await.unwrap();
    let mut b = queue.receive(options.max_in_flight(1)).await.unwrap();
    for expected in &events[1..] {
        let d = next_within(&mut b, 10, "B's delivery of what A claimed ahead").await;
        assert_eq!((d.event().id(), d.attempt()), (expected.id(), 2));
        d.ack().await.unwrap();
    }
    drop(b);
    let after = event(4);
    queue.send(&after).await.unwrap();
    let d = next_within(&mut a, 10, "A's next delivery").await;
    assert_eq!((d.event().id(), d.attempt()), (after.id(), 1));
    d.ack().await.unwrap();
}

/// Consumes queue `name` of `transport` past rows another program wrote: one consumer with
/// room for 8 (so one claim takes every row, foreign ones and the events behind them
/// together) and a 2 s visibility timeout must be handed exactly `delivered`, in order, each
/// on its first attempt (acked), while core moves `dead` rows aside into the queue's
/// dead-letter queue; returns those records (acked), in order. A failing claim fails the
/// test at once: one bad row must never fail the rows claimed with it.
pub async fn consume_past_foreign_rows(
    transport: &evbus_sql::SqlTransport,
    name: &str,
    delivered: &[&evbus::Event],
    dead: usize,
) -> Vec<evbus::Event> {
    use evbus::{ConsumerOptions, Delivery, Transport, dead_letter_queue_name};
    const BOUND: Duration = Duration::from_secs(20);
    fn got(item: Option<evbus::Result<Delivery>>, what: &str) -> Delivery {
        match item {
            Some(Ok(d)) => d,
            Some(Err(e)) => panic!(
                "{what} failed: {e} (a row that does not decode, or counts too many attempts, \
                 must never fail the rows claimed with it)"
            ),
            None => panic!("{what} ended"),
        }
    }
    let options = ConsumerOptions::default()
        .visibility_timeout(Duration::from_secs(2))
        .max_in_flight(8);
    let deadline = tokio::time::Instant::now() + BOUND;
    let mut sub = transport
        .queue(name)
        .await
        .unwrap()
        .receive(options.clone())
        .await
        .unwrap();
    for expected in delivered {
        let item = tokio::time::timeout_at(deadline, sub.next_delivery())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "event {} was not delivered within {BOUND:?}: the rows before it hold \
                     up queue `{name}`",
                    expected.id()
                )
            });
        let d = got(item, "the consumer");
        assert_eq!(
            d.event().id(),
            expected.id(),
            "the consumer was handed {} of type `{}`",
            d.event().id(),
            d.event().ty()
        );
        assert_eq!(
            d.attempt(),
            1,
            "event {} came on a later attempt",
            d.event().id()
        );
        d.ack().await.unwrap();
    }
    let dlq = dead_letter_queue_name(name, None, &options);
    let mut dead_letters = transport
        .queue(&dlq)
        .await
        .unwrap()
        .receive(ConsumerOptions::default())
        .await
        .unwrap();
    let mut records = Vec::new();
    while records.len() < dead {
        // The consumer keeps being read meanwhile: nothing more may reach it.
        tokio::select! {
            record = dead_letters.next_delivery() => {
                let record = got(record, "the dead-letter queue");
                records.push(record.event().clone());
                record.ack().await.unwrap();
            }
            extra = sub.next_delivery() => {
                let extra = got(extra, "the consumer");
                panic!(
                    "the consumer was handed {} of type `{}` (attempt {}) besides the events \
                     expected",
                    extra.event().id(),
                    extra.event().ty(),
                    extra.attempt()
                );
            }
            () = tokio::time::sleep_until(deadline) => panic!(
                "{} of {dead} records reached the dead-letter queue `{dlq}` within {BOUND:?}",
                records.len()
            ),
        }
    }
    records
}

/// Checks that `record` is the dead-letter record of a row of queue `name` that did not
/// decode, its body kept as `body` (text, or base64 when it is not UTF-8, as core's
/// placeholder writes it), dead-lettered on its first attempt.
pub fn assert_undecodable_record(record: &evbus::Event, name: &str, body: &[u8]) {
    use evbus::raw::{DEAD_LETTER_ATTEMPTS, DEAD_LETTER_ORIGIN, DEAD_LETTER_REASON};
    assert_eq!(
        record.ty(),
        evbus::raw::UNDECODABLE_EVENT_TYPE,
        "{record:?}"
    );
    let reason = record.extension(DEAD_LETTER_REASON).unwrap_or_default();
    assert!(reason.contains("undecodable"), "reason {reason:?}");
    assert_eq!(record.extension(DEAD_LETTER_ATTEMPTS), Some("1"));
    assert_eq!(record.extension(DEAD_LETTER_ORIGIN), Some(name));
    let data = |event: &evbus::Event| -> serde_json::Value {
        serde_json::from_slice(event.data().expect("a placeholder has data")).unwrap()
    };
    // How core's placeholder renders `body` (a string, or {"base64": ...}).
    let expected = evbus::raw::Undecodable::new(evbus::Error::invalid_event("-"), "-", "-")
        .body(body.to_vec())
        .placeholder()
        .unwrap();
    assert_eq!(
        data(record)["body"],
        data(&expected)["body"],
        "the dead-letter record does not keep the row's body"
    );
}

/// Checks that `record` is `original`, of queue `name`, dead-lettered by core as delivered
/// too often at the largest attempt count (`i32::MAX`, where the count saturates).
pub fn assert_over_delivered_record(record: &evbus::Event, original: &evbus::Event, name: &str) {
    use evbus::raw::{DEAD_LETTER_ATTEMPTS, DEAD_LETTER_ORIGIN, DEAD_LETTER_REASON};
    assert_eq!(record.id(), original.id());
    assert_eq!(record.ty(), original.ty());
    let reason = record.extension(DEAD_LETTER_REASON).unwrap_or_default();
    assert!(
        reason.contains("max attempts exceeded"),
        "reason {reason:?}"
    );
    let max = i32::MAX.to_string();
    assert_eq!(record.extension(DEAD_LETTER_ATTEMPTS), Some(max.as_str()));
    assert_eq!(record.extension(DEAD_LETTER_ORIGIN), Some(name));
}

/// Subscriptions end when another transport deletes what they consume: on `consumer`, a
/// named and an anonymous subscription of topic `deleted-topic` and a consumer of queue
/// `deleted-queue`; `deleter` deletes both. What is published to a name afterwards goes to
/// new partitions, so a consumer left waiting on the old one would never receive again.
pub async fn subscriptions_end_when_another_transport_deletes(
    consumer: &evbus_sql::SqlTransport,
    deleter: &evbus_sql::SqlTransport,
) {
    use evbus::{SubscribeOptions, Transport};
    let topic = consumer.topic("deleted-topic").await.unwrap();
    let named = topic
        .subscribe(SubscribeOptions::named("billing"))
        .await
        .unwrap();
    let anonymous = topic
        .subscribe(SubscribeOptions::anonymous())
        .await
        .unwrap();
    let queue = consumer.queue("deleted-queue").await.unwrap();
    let received = queue.receive(Default::default()).await.unwrap();
    deleter.delete_topic("deleted-topic").await.unwrap();
    deleter.delete_queue("deleted-queue").await.unwrap();
    evbus_conformance::checks::each_ends_within(
        vec![
            ("the named subscription", named),
            ("the anonymous subscription", anonymous),
            ("the queue's consumer", received),
        ],
        Duration::from_secs(10),
    )
    .await;
}

/// Rows a consumer claimed ahead are not handed out after their queue was deleted by
/// another transport: of 8 events, a consumer with room for 8 (one claim takes them all)
/// hands out the first; the queue is deleted; past the consumer's look-up interval the
/// stream ends at once, without handing out the other 7 (it used to, acks `Ok` and all).
pub async fn claimed_rows_of_a_deleted_queue_are_not_handed_out(
    consumer: &evbus_sql::SqlTransport,
    deleter: &evbus_sql::SqlTransport,
) {
    use evbus::{ConsumerOptions, Transport};
    let (queue, _) = queue_holding(consumer, "claimed-then-deleted", 8).await;
    let options = ConsumerOptions::default()
        .visibility_timeout(Duration::from_secs(30))
        .max_in_flight(8);
    let mut sub = queue.receive(options).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), sub.next_delivery())
        .await
        .expect("the first delivery")
        .unwrap()
        .unwrap();
    first.ack().await.unwrap();
    deleter.delete_queue("claimed-then-deleted").await.unwrap();
    // Set-up: past the consumer's look-up interval (two seconds).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    match tokio::time::timeout(Duration::from_secs(10), sub.next_delivery()).await {
        Ok(None) => {}
        Ok(Some(Ok(d))) => panic!("a delivery of the deleted queue: {:?}", d.event().data()),
        Ok(Some(Err(e))) => panic!("an error instead of the end: {e}"),
        Err(_) => panic!("the consumer of the deleted queue did not end"),
    }
}

/// An anonymous subscription whose handler holds a delivery longer than `anonymous_ttl` is
/// alive all the same: `transport` must have an `anonymous_ttl` of 1 s and a cleanup every
/// 200 ms. The subscription is not polled for 3 s; the cleanup used to delete it, its ack
/// then settled nothing, and it ended without the events published meanwhile.
pub async fn an_unpolled_anonymous_subscription_outlives_the_ttl(
    transport: &evbus_sql::SqlTransport,
) {
    use evbus::{SubscribeOptions, Transport};
    let topic = transport.topic("held-anonymous").await.unwrap();
    let mut sub = topic
        .subscribe(SubscribeOptions::anonymous())
        .await
        .unwrap();
    let sent = event(0);
    topic.publish(&sent).await.unwrap();
    let held = tokio::time::timeout(Duration::from_secs(10), sub.next_delivery())
        .await
        .expect("the first delivery")
        .unwrap()
        .unwrap();
    assert_eq!(held.event().id(), sent.id());
    // The handler works for three TTLs; nobody polls the subscription meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    held.ack().await.unwrap();
    still_delivers(&*topic, &mut sub).await;
}

/// The next delivery of `sub`, within `secs` seconds (`what` names it when it does not come).
async fn next_within(sub: &mut evbus::Subscription, secs: u64, what: &str) -> evbus::Delivery {
    tokio::time::timeout(Duration::from_secs(secs), sub.next_delivery())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing came within {secs} s"))
        .unwrap_or_else(|| panic!("{what}: the subscription ended"))
        .unwrap()
}

/// `sub`, an anonymous subscription of `topic`, is alive: an event published now reaches it
/// (a subscription the cleanup took for a dead process's has ended).
pub async fn still_delivers(topic: &dyn evbus::Topic, sub: &mut evbus::Subscription) {
    let later = event(1);
    topic.publish(&later).await.unwrap();
    let next = next_within(sub, 10, "the next delivery after the cleanup").await;
    assert_eq!(next.event().id(), later.id());
    next.ack().await.unwrap();
}

/// A live anonymous subscription of `subscriber` (default TTL: its keep-alive marks it once a
/// minute) survives the cleanup of `cleaner`, whose own `anonymous_ttl_ms` is far shorter:
/// each subscription is judged by the TTL its keep-alive records. The cleaner deleted it after
/// its own TTL, and the subscription ended (found by an outsider review).
pub async fn a_shorter_ttl_elsewhere_does_not_end_a_live_anonymous_subscription(
    subscriber: &evbus_sql::SqlTransport,
    cleaner: &evbus_sql::SqlTransport,
) {
    use evbus::{SubscribeOptions, Transport};
    assert!(cleaner.config().anonymous_ttl < Duration::from_secs(1));
    let topic = subscriber.topic("ttl-elsewhere").await.unwrap();
    let mut sub = topic
        .subscribe(SubscribeOptions::anonymous())
        .await
        .unwrap();
    // Longer than the cleaner's TTL, far shorter than the subscriber's keep-alive interval.
    tokio::time::sleep(cleaner.config().anonymous_ttl * 3).await;
    cleaner.cleanup().await.unwrap();
    let sent = event(7);
    topic.publish(&sent).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), sub.next_delivery())
        .await
        .expect("a delivery")
        .expect("the subscription ended: another process's cleanup deleted it")
        .unwrap();
    assert_eq!(got.event().id(), sent.id());
    got.ack().await.unwrap();
}

/// The anonymous subscriptions' partitions in the database.
pub const ANONYMOUS_PARTS: &str = r"evbus_parts WHERE name LIKE '\_anonymous.%'";

/// Anonymous subscribes cancelled part way (their futures dropped by timeouts of a fraction
/// of a millisecond) leave no partition behind: one whose insert committed as its future
/// was dropped used to collect a delivery of every publish until the TTL cleanup, and close
/// did not remove it. `anonymous` counts [`ANONYMOUS_PARTS`].
pub async fn cancelled_anonymous_subscribes_leave_no_partition<F, Fut>(
    transport: &evbus_sql::SqlTransport,
    anonymous: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = i64>,
{
    use evbus::{SubscribeOptions, Transport};
    let topic = transport.topic("cancelled-anonymous").await.unwrap();
    for round in 0..200u64 {
        let within = Duration::from_micros(200 + (round % 20) * 100);
        if let Ok(sub) =
            tokio::time::timeout(within, topic.subscribe(SubscribeOptions::anonymous())).await
        {
            drop(sub.unwrap());
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = anonymous().await;
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} anonymous partitions left 10 s after the subscribes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rows a consumer claimed ahead go back when its transport closes, whether its
/// subscription was dropped just before (`dropped_first`) or is still held: of 8 events, a
/// consumer with room for 8 hands out and acks the first, and the transport closes. A new
/// transport's consumer gets the other 7 promptly, each on its first attempt. Dropped just
/// before, the give-back used to meet the closed pool; still held, nothing read the
/// subscription any more and nothing gave them back. Either way the rows came back only
/// after the 20 s visibility timeout, counted as a second attempt.
pub async fn claimed_rows_go_back_at_close<F, Fut>(open: F, dropped_first: bool)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = evbus_sql::SqlTransport>,
{
    use evbus::{ConsumerOptions, Transport};
    let first = open().await;
    let (queue, events) = queue_holding(&first, "dropped-then-closed", 8).await;
    let options = ConsumerOptions::default()
        .visibility_timeout(Duration::from_secs(20))
        .max_in_flight(8);
    let mut sub = queue.receive(options.clone()).await.unwrap();
    let taken = tokio::time::timeout(Duration::from_secs(10), sub.next_delivery())
        .await
        .expect("the first delivery")
        .unwrap()
        .unwrap();
    assert_eq!(taken.event().id(), events[0].id());
    taken.ack().await.unwrap();
    if dropped_first {
        drop(sub);
        first.close().await.unwrap();
    } else {
        first.close().await.unwrap();
        drop(sub);
    }
    let second = open().await;
    let queue = second.queue("dropped-then-closed").await.unwrap();
    let mut sub = queue.receive(options).await.unwrap();
    unhanded_rows_come_first_attempt(&mut sub, &events[1..]).await;
    drop(sub);
    second.close().await.unwrap();
}

/// The next delivery of `sub`, within 30 s.
async fn next(sub: &mut evbus::Subscription) -> evbus::Delivery {
    tokio::time::timeout(Duration::from_secs(30), sub.next_delivery())
        .await
        .expect("a delivery in time")
        .expect("the subscription goes on")
        .unwrap()
}

/// A named subscription nobody consumes any more (its group renamed) keeps every event
/// published since: retention deletes only what every subscription acknowledged. Deleting it
/// (`SqlTransport::delete_subscription`) takes its deliveries, lets retention take the
/// events, ends its consumers and leaves the other subscriptions alone. `transport` is opened
/// with `retention_ms=0&cleanup_interval_ms=3600000`; `rows` counts the rows of a table.
/// Closes `transport`.
pub async fn a_deleted_subscription_lets_retention_take_what_it_held<F, Fut>(
    transport: &evbus_sql::SqlTransport,
    rows: F,
) where
    F: Fn(&'static str) -> Fut,
    Fut: std::future::Future<Output = i64>,
{
    use evbus::{ErrorKind, SubscribeOptions, Transport};
    let topic = transport.topic("orders").await.unwrap();
    let mut current = topic
        .subscribe(SubscribeOptions::named("new"))
        .await
        .unwrap();
    let mut retired = topic
        .subscribe(SubscribeOptions::named("old"))
        .await
        .unwrap();
    let published: Vec<evbus::Event> = (0..3).map(event).collect();
    topic.publish_batch(&published).await.unwrap();
    for _ in 0..3 {
        next(&mut current).await.ack().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(5)).await; // created_at strictly in the past
    // `old` has acknowledged nothing: every event stays.
    assert_eq!(transport.cleanup().await.unwrap(), 0);
    assert_eq!(rows("evbus_deliveries").await, 3);

    assert!(
        transport
            .delete_subscription("orders", "old")
            .await
            .unwrap()
    );
    assert_eq!(rows("evbus_deliveries").await, 0);
    assert_eq!(transport.cleanup().await.unwrap(), 3);
    assert_eq!(rows("evbus_events").await, 0);
    // Its consumer ends; the other goes on.
    let ended = tokio::time::timeout(Duration::from_secs(30), retired.next_delivery())
        .await
        .expect("the deleted subscription's consumer ends in time");
    assert!(ended.is_none(), "{ended:?}");
    let later = event(9);
    topic.publish(&later).await.unwrap();
    let delivery = next(&mut current).await;
    assert_eq!(delivery.event().id(), later.id());
    delivery.ack().await.unwrap();

    // Gone: a second delete finds nothing; names are checked; a closed transport refuses.
    assert!(
        !transport
            .delete_subscription("orders", "old")
            .await
            .unwrap()
    );
    assert!(
        !transport
            .delete_subscription("nothing", "old")
            .await
            .unwrap()
    );
    let err = transport
        .delete_subscription("orders", "")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    transport.close().await.unwrap();
    let err = transport
        .delete_subscription("orders", "new")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
}

/// A batch of more event bytes than one statement carries is published whole and in order:
/// 18 events of 15 MiB (270 MiB, over the 256 MiB a statement takes) to a topic with a
/// subscription, then read back. Before, a batch went as one statement whatever its size,
/// and PostgreSQL drops the connection on a message over 1 GiB: a retryable "outage" that
/// every retry met again.
pub async fn a_batch_over_one_statement_is_published_whole_in_order(
    transport: &evbus_sql::SqlTransport,
) {
    use evbus::{Event, SubscribeOptions, Transport};
    let pad = "x".repeat(15 << 20);
    let events: Vec<Event> = (0..18)
        .map(|n| {
            Event::builder("bigBatch", "/sql-test")
                .id(format!("big-{n}"))
                .json(&serde_json::json!({ "n": n, "pad": pad }))
                .unwrap()
                .build()
                .unwrap()
        })
        .collect();
    drop(pad);
    let topic = transport.topic("big-batch").await.unwrap();
    let mut sub = topic
        .subscribe(SubscribeOptions::named("reader"))
        .await
        .unwrap();
    topic.publish_batch(&events).await.unwrap();
    for expected in &events {
        let d = tokio::time::timeout(Duration::from_secs(60), sub.next_delivery())
            .await
            .expect("every event of the batch")
            .unwrap()
            .unwrap();
        assert_eq!(d.event().id(), expected.id());
        assert_eq!(d.event().data(), expected.data());
        d.ack().await.unwrap();
    }
}
