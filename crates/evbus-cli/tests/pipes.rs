//! Output into a pipe whose reader goes away early (`evbus … | head -1`): the command stops
//! quietly with exit status 141 (128 + SIGPIPE, what a shell reports for a tool SIGPIPE
//! killed) instead of panicking (101), and what it changes stays consistent: `consume` does
//! not ack the event whose line could not be written, a redrive moves nothing more.
//!
//! Every line that must fail is longer than a pipe holds (64 KiB on Linux): the reader reads
//! one line, and whatever the timing, the write after it cannot complete. No broker: the
//! catalogue commands and the SQLite transport (one process at a time on its file).

mod rolling;
mod support;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use evbus::schema::Catalog;
use evbus::{Bus, Event, Transport};
use serde_json::{Value, json};
use support::{evbus, temp_dir, text};

/// What a line longer than any pipe buffer is made of.
const BIG: usize = 300_000;

/// What `evbus ARGS | head -1` leaves: the line read, the exit status, stderr.
struct Head {
    first: String,
    code: Option<i32>,
    stderr: String,
}

impl Head {
    /// Exit status 141 and no panic, else a panic saying what happened.
    fn assert_stopped_quietly(&self) {
        assert!(
            !self.stderr.contains("panicked"),
            "evbus panicked: {}",
            self.stderr
        );
        assert_eq!(
            self.code,
            Some(141),
            "expected 141 (stdout closed); stderr: {}",
            self.stderr
        );
    }
}

/// Runs `evbus ARGS` with stdout into a pipe that is closed once one line has been read from
/// it (what `| head -1` does).
fn head_1(args: &[&str]) -> Head {
    let mut child = Command::new(env!("CARGO_BIN_EXE_evbus"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run evbus");
    let mut stderr = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = stderr.read_to_string(&mut all);
        all
    });
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // The reader is gone: the pipe's read end is closed here.
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("evbus did not end after its reader left");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Head {
        first: first.trim_end().to_owned(),
        code: status.code(),
        stderr: stderr.join().unwrap(),
    }
}

fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("bus.db").display())
}

/// Puts `events` in the dead-letter queue of `ty` in `group` of the SQLite bus at `url`, and
/// lets go of the file.
async fn dead_letter(url: &str, ty: &str, group: &str, events: &[Event]) {
    let transport: Arc<dyn Transport> =
        Arc::new(evbus_sql::SqlTransport::connect_url(url).await.unwrap());
    let name = Bus::new(Arc::clone(&transport), Catalog::default(), "/test")
        .dead_letter_queue_name(ty, group);
    let queue = transport.queue(&name).await.unwrap();
    for e in events {
        queue.send(e).await.unwrap();
    }
    drop(queue);
    transport.close().await.unwrap();
}

fn dlq_args<'a>(command: &'a str, url: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "dlq",
        command,
        "--transport",
        url,
        "--type",
        "big",
        "--group",
        "g",
        "--wait",
        "1",
    ];
    args.extend_from_slice(rest);
    args
}

#[test]
fn events_list_into_a_pipe_closed_early_exits_141_without_a_panic() {
    let dir = temp_dir("pipe-events");
    // One sentence (no ". "): the whole description is the row's last column.
    let schema = json!({"description": "d".repeat(BIG), "type": "object"});
    rolling::write(&dir.join("events/big.json"), &schema);
    let head = head_1(&["events", "list", "--schemas", dir.to_str().unwrap()]);
    assert!(head.first.starts_with("TYPE"), "{}", head.first);
    head.assert_stopped_quietly();
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_list_into_a_pipe_closed_early_exits_141_without_a_panic() {
    let dir = temp_dir("pipe-dlq-list");
    let url = sqlite_url(&dir);
    let events: Vec<Event> = (0..3)
        .map(|i| {
            Event::builder("big", "/test")
                .extension("deadletterreason", format!("{i}{}", "r".repeat(BIG)))
                .build()
                .unwrap()
        })
        .collect();
    dead_letter(&url, "big", "g", &events).await;

    let head = head_1(&dlq_args("list", &url, &[]));
    assert!(head.first.starts_with("ID"), "{}", head.first);
    head.assert_stopped_quietly();

    // The look gave back all it held: the three are still there.
    let out = evbus(&dlq_args("list", &url, &["--format", "json"]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_redrive_into_a_pipe_closed_early_moves_nothing_more_and_loses_nothing() {
    let dir = temp_dir("pipe-dlq-redrive");
    let url = sqlite_url(&dir);
    // Ids longer than a pipe holds: the id after the one read cannot be written.
    let ids: Vec<String> = (0..5).map(|i| format!("{i}-{}", "x".repeat(BIG))).collect();
    let events: Vec<Event> = ids
        .iter()
        .map(|id| {
            Event::builder("big", "/test")
                .id(id.clone())
                .extension("deadletterreason", "rejected")
                .build()
                .unwrap()
        })
        .collect();
    dead_letter(&url, "big", "g", &events).await;

    let head = head_1(&dlq_args("redrive", &url, &["--all"]));
    head.assert_stopped_quietly();
    assert!(ids.contains(&head.first), "{:.40}", head.first);

    // Moved: the one printed and the one whose id could not be; the other three are left
    // where they were, none of them lost or moved twice.
    let out = evbus(&dlq_args("list", &url, &["--format", "json"]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let left = ids_of(&out.stdout);
    assert_eq!(left.len(), 3, "{}", text(&out.stderr));
    assert!(!left.contains(&head.first));
    assert!(left.iter().all(|id| ids.contains(id)));
}

#[test]
fn consume_into_a_pipe_closed_early_does_not_ack_the_event_it_could_not_print() {
    let dir = temp_dir("pipe-consume");
    let url = sqlite_url(&dir);
    let schema = json!({
        "type": "object",
        "properties": {"n": {"type": "integer"}, "pad": {"type": "string"}},
        "required": ["n", "pad"]
    });
    let catalogue = rolling::catalogue("pipe-consume-schemas", "big", &schema, &[]);
    let schemas = catalogue.to_str().unwrap();
    // Each line is longer than a pipe holds: the line after the one read cannot be written.
    let ids = rolling::emit(
        &url,
        &catalogue,
        "big",
        &[
            json!({"n": 1, "pad": "a".repeat(BIG)}),
            json!({"n": 2, "pad": "b".repeat(BIG)}),
        ],
    );
    let consume = |extra: &[&'static str]| {
        let mut args = vec![
            "consume",
            "--transport",
            &url,
            "--schemas",
            schemas,
            "--type",
            "big",
            "--group",
            "g",
        ];
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<String>>()
    };

    let args = consume(&["--count", "2", "--timeout", "60"]);
    let head = head_1(&args.iter().map(String::as_str).collect::<Vec<_>>());
    head.assert_stopped_quietly();
    let first: Value = serde_json::from_str(&head.first).unwrap();
    assert_eq!(first["id"], ids[0].as_str());

    // The first was printed and acked; the second, whose line could not be written, was not
    // acked: the group's next consume gets it, and only it.
    let args = consume(&["--timeout", "10"]);
    let out = evbus(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let got = ids_of(&out.stdout);
    assert_eq!(got, [ids[1].clone()], "{}", text(&out.stderr));
}

#[test]
fn a_stdout_that_cannot_be_written_is_an_error_message_and_exit_2() {
    // Writing to /dev/full fails with ENOSPC: an IO error, not a reader gone.
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        eprintln!("WARNING: no /dev/full here; skipped");
        return;
    };
    let out = Command::new(env!("CARGO_BIN_EXE_evbus"))
        .args(["capabilities", "--transport", "memory://"])
        .stdin(Stdio::null())
        .stdout(full)
        .stderr(Stdio::piped())
        .output()
        .expect("run evbus");
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "evbus panicked: {stderr}");
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with("evbus: error: cannot write to stdout: No space left on device"),
        "{stderr}"
    );
}

/// The `id` of each line of JSON output.
fn ids_of(stdout: &[u8]) -> Vec<String> {
    text(stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}
