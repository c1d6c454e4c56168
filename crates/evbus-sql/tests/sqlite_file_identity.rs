//! The single-process rule of an SQLite file belongs to the file, not to the name it is opened
//! by. An outside review opened one database from two processes through a hard link (each
//! name had its own `<name>.lock`, and SQLite its own `-wal`/`-shm`): the file was corrupted
//! and events whose publish returned `Ok` were lost. Through a symbolic link the second
//! process was admitted too. Now a symbolic link leads to the real file's lock, and a file
//! with several names (hard links) is refused, by the transport and by the outbox relay.

#![cfg(unix)]

mod outbox_support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use evbus::{ErrorKind, Event, StartPosition, SubscribeOptions, Transport};
use evbus_sql::outbox::{Outbox, Relay};
use evbus_sql::{SqlConfig, SqlTransport};
use outbox_support::bus;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{ConnectOptions, SqlitePool};

/// Set in the child process of `a_symlink_to_a_file_held_by_another_process_is_refused`: the
/// database file it holds.
const CHILD_FILE: &str = "EVBUS_SQL_TEST_IDENTITY_CHILD_FILE";

fn url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

async fn connect(path: &Path) -> evbus::Result<SqlTransport> {
    SqlTransport::connect(SqlConfig::from_url(&url(path)).unwrap()).await
}

fn event(n: usize) -> Event {
    Event::builder("orderPlaced", "/sqlite-identity-test")
        .json(&serde_json::json!({ "n": n }))
        .unwrap()
        .build()
        .unwrap()
}

/// Every file of `dirs` with its length and a hash of its contents.
fn snapshot(dirs: &[&Path]) -> BTreeMap<PathBuf, (usize, u64)> {
    use std::hash::{Hash, Hasher};
    let mut files = BTreeMap::new();
    for dir in dirs {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut hasher);
            files.insert(path, (bytes.len(), hasher.finish()));
        }
    }
    files
}

/// The files of `dirs` once no connection closing in the background changes them any more.
async fn settled(dirs: &[&Path]) -> BTreeMap<PathBuf, (usize, u64)> {
    let mut last = snapshot(dirs);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = snapshot(dirs);
        if now == last {
            return now;
        }
        last = now;
    }
}

/// Creates the database at `path` with three events published to the topic `orders`.
/// A fresh root (removed on drop) holding two empty directories, `a` and `b`.
fn two_dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    (root, a, b)
}

async fn create(path: &Path) {
    let transport = connect(path).await.unwrap();
    let topic = transport.topic("orders").await.unwrap();
    for n in 0..3 {
        topic.publish(&event(n)).await.unwrap();
    }
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hard_linked_database_is_refused_through_either_name_and_nothing_is_written() {
    let (_root, a, b) = two_dirs();
    let path = a.join("bus.db");
    create(&path).await;
    let link = b.join("hard.db");
    std::fs::hard_link(&path, &link).unwrap();
    let before = settled(&[&a, &b]).await;

    for name in [&path, &link] {
        let e = connect(name)
            .await
            .expect_err("a database file with two names");
        assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
        let text = e.to_string();
        assert!(text.contains("2 names (hard links)"), "{text}");
        assert!(text.contains("own -wal and -shm"), "{text}");
        assert!(text.contains("remove the extra link"), "{text}");
    }
    // Refused before anything was opened: no lock file, no -wal/-shm, the same bytes.
    assert_eq!(snapshot(&[&a, &b]), before, "files written while refusing");

    // With the extra name gone, the file opens and holds what was published.
    std::fs::remove_file(&link).unwrap();
    let transport = connect(&path).await.unwrap();
    assert!(transport.health().await.is_healthy());
    transport.close().await.unwrap();
    let mut db = SqliteConnectOptions::new()
        .filename(&path)
        .connect()
        .await
        .unwrap();
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM evbus_events")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(events, 3);
}

/// In the child process (`CHILD_FILE` set): opens the file, says `ready <pid>`, and holds it
/// until its stdin closes. In the test process: nothing.
#[tokio::test(flavor = "multi_thread")]
async fn child_holding_the_file() {
    let Ok(file) = std::env::var(CHILD_FILE) else {
        return;
    };
    let transport = connect(Path::new(&file)).await.unwrap();
    println!("ready {}", std::process::id());
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {}
    })
    .await
    .unwrap();
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_symlink_to_a_file_held_by_another_process_is_refused() {
    let (_root, a, b) = two_dirs();
    let path = a.join("bus.db");
    create(&path).await;
    let link = b.join("link.db");
    std::os::unix::fs::symlink(&path, &link).unwrap();

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_holding_the_file", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD_FILE, &path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Read every line the child prints (a closed pipe would fail the child's libtest).
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let _ = tx.send(line.unwrap_or_default());
        }
    });
    let pid = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("the child holds the file");
        // libtest may print `test <name> ... ` on the same line first.
        if let Some((_, pid)) = line.split_once("ready ") {
            break pid.trim().to_owned();
        }
    };

    // Through the link, as through the file's own name, this process is refused while the
    // child holds the file, and told which process holds it.
    for name in [&link, &path] {
        let e = connect(name)
            .await
            .expect_err("the file is held by the child");
        assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
        assert!(
            e.to_string()
                .contains(&format!("is already open in process {pid}")),
            "{e}"
        );
    }
    assert!(
        !b.join("link.db.lock").exists(),
        "the link got a lock file of its own"
    );

    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    // Released: the link opens the file.
    let transport = connect(&link).await.unwrap();
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_symlink_in_the_same_process_shares_the_hold_of_the_file() {
    let (_root, a, b) = two_dirs();
    let path = a.join("bus.db");
    create(&path).await;
    let link = b.join("link.db");
    std::os::unix::fs::symlink(&path, &link).unwrap();

    // Transports of one process share the hold, whichever name they open the file by.
    let first = connect(&path).await.unwrap();
    let second = connect(&link).await.unwrap();
    assert!(first.health().await.is_healthy() && second.health().await.is_healthy());
    assert!(
        !b.join("link.db.lock").exists(),
        "the link got a lock file of its own"
    );
    // One database: what one publishes, the other's consumer receives.
    let mut sub = second
        .topic("orders")
        .await
        .unwrap()
        .subscribe(SubscribeOptions::named("s").start(StartPosition::Earliest))
        .await
        .unwrap();
    first
        .topic("orders")
        .await
        .unwrap()
        .publish(&event(9))
        .await
        .unwrap();
    let mut got = 0;
    while got < 4 {
        let d = tokio::time::timeout(Duration::from_secs(30), sub.next_delivery())
            .await
            .expect("a delivery")
            .expect("open")
            .unwrap();
        d.ack().await.unwrap();
        got += 1;
    }
    drop(sub);
    first.close().await.unwrap();
    second.close().await.unwrap();
    // Opened by the link, the file's SQLite files are beside the file, not the link.
    assert!(!b.join("link.db-wal").exists() && !b.join("link.db-shm").exists());
}

/// A pool that does not touch the file until used (the relay's lock only reads its options).
fn lazy(path: &Path) -> SqlitePool {
    SqlitePoolOptions::new().connect_lazy_with(
        SqliteConnectOptions::new()
            .filename(path)
            .journal_mode(SqliteJournalMode::Wal),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outbox_relay_on_a_hard_linked_file_is_refused_through_either_name() {
    let (_root, a, b) = two_dirs();
    let path = a.join("app.db");
    {
        let pool = SqlitePoolOptions::new()
            .connect_with(
                SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal),
            )
            .await
            .unwrap();
        Outbox::new(&bus()).migrate(&pool).await.unwrap();
        pool.close().await;
    }
    let link = b.join("hard.db");
    std::fs::hard_link(&path, &link).unwrap();
    let before = settled(&[&a, &b]).await;
    let transport = Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect());

    for name in [&path, &link] {
        let e = Relay::sqlite(lazy(name), transport.clone())
            .spawn()
            .expect_err("a relay on a file with two names");
        assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
        assert!(e.to_string().contains("2 names (hard links)"), "{e}");
    }
    assert_eq!(snapshot(&[&a, &b]), before, "files written while refusing");

    std::fs::remove_file(&link).unwrap();
    let relay = Relay::sqlite(lazy(&path), transport).spawn().unwrap();
    relay.shutdown().await.unwrap();
}

/// A symbolic link to a file not created yet: the transport creates the file it points to,
/// and holds that file's lock, the one a process opening the file by its own name takes.
#[tokio::test(flavor = "multi_thread")]
async fn a_symlink_to_a_file_not_created_yet_holds_the_lock_of_the_file_it_creates() {
    let (_root, a, b) = two_dirs();
    let link = b.join("link.db");
    std::os::unix::fs::symlink("../a/bus.db", &link).unwrap();
    let transport = connect(&link).await.unwrap();
    assert!(
        a.join("bus.db").is_file(),
        "the file is created where the link points"
    );
    assert!(a.join("bus.db.lock").is_file());
    assert!(
        !b.join("link.db.lock").exists(),
        "the link got a lock file of its own"
    );
    // This process shares the hold, by either name.
    let again = connect(&a.join("bus.db")).await.unwrap();
    again.close().await.unwrap();
    transport.close().await.unwrap();
}
