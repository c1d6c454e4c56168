//! `cargo xtask capabilities`: regenerates the capability matrix of docs/capabilities.md.
//!
//! The values come from live transports, because several depend on the URL or on what the
//! broker reports when it connects (Redis persistence, NATS `max_payload`). xtask does not
//! depend on the adapter crates: for each adapter it runs `evbus capabilities --transport URL`
//! (the CLI, which is built with every adapter), at the same URL as `cargo xtask conformance`
//! (`EVBUS_REDIS_URL`, ... or the local default), and reads the JSON line it prints: the rows
//! of `Capabilities::rows()`.
//!
//! It rewrites what lies between `<!-- capabilities:begin -->` and `<!-- capabilities:end -->`:
//! one table (rows: capabilities by their report names; columns: adapters), the command that
//! made it, the date and the broker versions. An adapter whose broker does not answer keeps
//! the column of the previous table (or a column of `not generated`), with a note saying so.
//!
//! The test `committed_table_matches_the_live_transports` of evbus-cli
//! (`crates/evbus-cli/tests/capabilities.rs`) fails in CI when the committed table differs from
//! the live transports; it reads the cells with the rule of [`cell_value`].

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::conformance;
use crate::{Result, cargo, display, project_root};

/// The markers around the generated part of docs/capabilities.md.
pub(crate) const BEGIN: &str = "<!-- capabilities:begin -->";
/// See [`BEGIN`].
pub(crate) const END: &str = "<!-- capabilities:end -->";

/// The text of a cell whose value was never read from a live transport.
const NOT_GENERATED: &str = "not generated";

/// Where the matrix lives, from the workspace root.
const DOC: &str = "docs/capabilities.md";

/// One adapter's column: its values in `Capabilities::rows()` order, or why there are none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Column {
    pub(crate) adapter: String,
    pub(crate) outcome: Outcome,
}

/// What reading one adapter gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Read now from the live transport: `(name, value)` rows and the broker's version.
    Live {
        rows: Vec<(String, String)>,
        broker: Option<String>,
    },
    /// The transport could not be read; the reason (one line).
    Unreachable(String),
}

pub(crate) fn run() -> Result<()> {
    let path = project_root().join(DOC);
    let doc =
        std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    // Fail on a malformed document before any broker work.
    let previous = generated_part(&doc)?;

    let mut build = cargo(&["build", "--quiet", "-p", "evbus-cli", "--bin", "evbus"]);
    let shown = display(&build);
    println!("$ {shown}");
    let status = build
        .status()
        .map_err(|e| format!("could not start `{shown}`: {e}"))?;
    if !status.success() {
        return Err(format!("`{shown}` failed"));
    }

    let mut columns = Vec::new();
    for adapter in conformance::present() {
        let url = adapter.url.map(|(var, default)| {
            std::env::var(var)
                .ok()
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| default.to_owned())
        });
        println!("{}", adapter.describe_url());
        let outcome = match read_live(url.as_deref()) {
            Ok(rows) => Outcome::Live {
                rows,
                broker: url.as_deref().and_then(|u| broker_version(adapter.name, u)),
            },
            Err(why) => {
                println!("  {}: not read: {why}", adapter.name);
                Outcome::Unreachable(why)
            }
        };
        columns.push(Column {
            adapter: adapter.name.to_owned(),
            outcome,
        });
    }

    let table = render(&columns, &parse_table(previous), &today());
    let updated = replace_generated(&doc, &table)?;
    if updated == doc {
        println!("{DOC}: up to date");
    } else {
        std::fs::write(&path, &updated).map_err(|e| format!("writing {}: {e}", path.display()))?;
        println!("{DOC}: rewritten");
    }
    let unread: Vec<&str> = columns
        .iter()
        .filter(|c| matches!(c.outcome, Outcome::Unreachable(_)))
        .map(|c| c.adapter.as_str())
        .collect();
    if unread.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "not read (their columns were kept, with a note): {}; start the brokers \
             (`cargo xtask brokers --start`) and run `cargo xtask capabilities` again",
            unread.join(", ")
        ))
    }
}

/// Runs `evbus capabilities --transport URL` (`memory://` without a URL) and reads its rows.
fn read_live(url: Option<&str>) -> Result<Vec<(String, String)>> {
    let url = url.unwrap_or("memory://");
    let mut cmd = cargo(&[
        "run",
        "--quiet",
        "-p",
        "evbus-cli",
        "--bin",
        "evbus",
        "--",
        "capabilities",
        "--transport",
        url,
    ]);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not start `evbus capabilities`: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let reason = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        let reason = reason.trim();
        return Err(reason
            .strip_prefix("evbus: error: ")
            .unwrap_or(reason)
            .to_owned());
    }
    parse_rows(&String::from_utf8_lossy(&output.stdout))
}

/// The rows of the JSON line `evbus capabilities` prints.
pub(crate) fn parse_rows(stdout: &str) -> Result<Vec<(String, String)>> {
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty());
    let value: serde_json::Value = line
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| format!("`evbus capabilities` printed no JSON line: {stdout:?}"))?;
    let rows = value["capabilities"]
        .as_array()
        .ok_or_else(|| format!("no `capabilities` array in {value}"))?;
    rows.iter()
        .map(|row| match (row["name"].as_str(), row["value"].as_str()) {
            (Some(name), Some(value)) => Ok((name.to_owned(), value.to_owned())),
            _ => Err(format!("a capability row without a name and value: {row}")),
        })
        .collect()
}

/// What lies between the markers of `doc`.
pub(crate) fn generated_part(doc: &str) -> Result<&str> {
    let missing = |marker: &str| {
        format!("{DOC} has no `{marker}` line: put the two markers around the generated table")
    };
    let start = doc.find(BEGIN).ok_or_else(|| missing(BEGIN))? + BEGIN.len();
    let end = doc[start..].find(END).ok_or_else(|| missing(END))? + start;
    Ok(&doc[start..end])
}

/// `doc` with the part between the markers replaced by `table`.
pub(crate) fn replace_generated(doc: &str, table: &str) -> Result<String> {
    let part = generated_part(doc)?;
    let start = part.as_ptr() as usize - doc.as_ptr() as usize;
    let end = start + part.len();
    Ok(format!("{}\n{}{}", &doc[..start], table, &doc[end..]))
}

/// The table in `part`: its column names and, per row, the capability and its cells.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Table {
    pub(crate) columns: Vec<String>,
    pub(crate) rows: Vec<(String, Vec<String>)>,
}

impl Table {
    /// The cells of column `adapter`, row by row, if the table has it.
    fn column(&self, adapter: &str) -> Option<Vec<(String, String)>> {
        let i = self.columns.iter().position(|c| c == adapter)?;
        self.rows
            .iter()
            .map(|(name, cells)| Some((name.clone(), cells.get(i)?.clone())))
            .collect()
    }
}

/// Reads the first markdown table of `part` (the header's first cell is `Capability`).
pub(crate) fn parse_table(part: &str) -> Table {
    let cells = |line: &str| -> Vec<String> {
        line.trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_owned())
            .collect()
    };
    let mut lines = part
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("| Capability"));
    let Some(header) = lines.next() else {
        return Table::default();
    };
    let columns = cells(header).into_iter().skip(1).collect();
    let rows = lines
        .skip(1) // |---|---|
        .take_while(|l| l.trim_start().starts_with('|'))
        .map(|l| {
            let mut c = cells(l);
            let name = c.remove(0);
            (name, c)
        })
        .collect();
    Table { columns, rows }
}

/// The value a cell stands for: its text before ` (`, without backticks (`16777216 (16 MiB)`
/// is `16777216`). The drift test of evbus-cli reads cells with the same rule.
pub(crate) fn cell_value(cell: &str) -> &str {
    cell.split(" (")
        .next()
        .unwrap_or("")
        .trim()
        .trim_matches('`')
}

/// A value as a cell: sizes of a KiB or more also in KiB/MiB.
fn cell(value: &str) -> String {
    match value.parse::<u64>() {
        Ok(n) if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{n} ({} MiB)", n >> 20),
        Ok(n) if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{n} ({} KiB)", n >> 10),
        _ => value.to_owned(),
    }
}

/// The generated part: provenance, the table, and a note per adapter not read now.
pub(crate) fn render(columns: &[Column], previous: &Table, date: &str) -> String {
    // Row names in the order of the first live column (`Capabilities::rows()` order), then any
    // that only a kept column has.
    let mut names: Vec<String> = Vec::new();
    let kept: Vec<Option<Vec<(String, String)>>> = columns
        .iter()
        .map(|c| match &c.outcome {
            Outcome::Live { .. } => None,
            Outcome::Unreachable(_) => previous.column(&c.adapter),
        })
        .collect();
    for column in columns {
        if let Outcome::Live { rows, .. } = &column.outcome {
            for (name, _) in rows {
                if !names.contains(name) {
                    names.push(name.clone());
                }
            }
        }
    }
    for rows in kept.iter().flatten() {
        for (name, _) in rows {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
    }

    let mut out = String::new();
    out.push_str(&format!(
        "Generated by `cargo xtask capabilities` on {date}, from the live transports at their\n\
         default local URLs (`EVBUS_<ADAPTER>_URL` overrides them) through `evbus capabilities\n\
         --transport URL`. Do not edit by hand: CI fails when this table differs from the\n\
         transports (test `committed_table_matches_the_live_transports` of evbus-cli).\n\n"
    ));
    out.push_str("| Capability |");
    for column in columns {
        out.push_str(&format!(" {} |", column.adapter));
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(columns.len()));
    out.push('\n');
    for name in &names {
        out.push_str(&format!("| {name} |"));
        for (column, kept) in columns.iter().zip(&kept) {
            let text = match (&column.outcome, kept) {
                (Outcome::Live { rows, .. }, _) => rows
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or_else(|| NOT_GENERATED.to_owned(), |(_, v)| cell(v)),
                (Outcome::Unreachable(_), Some(rows)) => rows
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or_else(|| NOT_GENERATED.to_owned(), |(_, v)| cell(cell_value(v))),
                (Outcome::Unreachable(_), None) => NOT_GENERATED.to_owned(),
            };
            out.push_str(&format!(" {text} |"));
        }
        out.push('\n');
    }
    out.push('\n');

    let brokers: Vec<String> = columns
        .iter()
        .filter_map(|c| match &c.outcome {
            Outcome::Live {
                broker: Some(b), ..
            } => Some(format!("{b} ({})", c.adapter)),
            _ => None,
        })
        .collect();
    if !brokers.is_empty() {
        out.push_str(&format!("Broker versions: {}.\n\n", brokers.join(", ")));
    }
    for (column, kept) in columns.iter().zip(&kept) {
        if let Outcome::Unreachable(why) = &column.outcome {
            let what = if kept.is_some() {
                "its column is the previous table's, not checked against the code"
            } else {
                "it has never been generated"
            };
            out.push_str(&format!(
                "- **{}: not read on {date}** ({}); {what}.\n",
                column.adapter,
                why.replace('|', "/")
            ));
        }
    }
    if columns
        .iter()
        .any(|c| matches!(c.outcome, Outcome::Unreachable(_)))
    {
        out.push('\n');
    }
    out
}

/// The broker's version, asked over its own protocol in a few bytes (none for Kafka: the
/// Kafka protocol does not report one).
fn broker_version(adapter: &str, url: &str) -> Option<String> {
    let default_port = match adapter {
        "redis" => 6379,
        "nats" => 4222,
        "amqp" => 5672,
        _ => return None,
    };
    let mut stream = connect(url, default_port)?;
    match adapter {
        "redis" => {
            // An inline command; the reply is a bulk string of `key:value` lines.
            stream.write_all(b"INFO server\r\n").ok()?;
            let reply = read_until(&mut stream, |r| r.contains("redis_version:"))?;
            let line = reply
                .lines()
                .find_map(|l| l.strip_prefix("redis_version:"))?;
            Some(format!("Redis {}", line.trim()))
        }
        "nats" => {
            // The server greets every client with `INFO {json}`.
            let reply = read_until(&mut stream, |r| r.contains("\r\n"))?;
            let json = reply.strip_prefix("INFO ")?.lines().next()?;
            let info: serde_json::Value = serde_json::from_str(json).ok()?;
            let js = if info["jetstream"].as_bool() == Some(true) {
                " with JetStream"
            } else {
                ""
            };
            Some(format!("NATS {}{js}", info["version"].as_str()?))
        }
        _ => {
            // AMQP 0-9-1: after the protocol header the server sends connection.start with
            // its properties, a field table holding `product` and `version` long strings.
            stream.write_all(b"AMQP\x00\x00\x09\x01").ok()?;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while buf.len() < 8192 {
                let n = stream.read(&mut chunk).ok()?;
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                if long_string(&buf, b"version").is_some() {
                    break;
                }
            }
            let version = long_string(&buf, b"version")?;
            let product = long_string(&buf, b"product").unwrap_or_else(|| "AMQP broker".into());
            Some(format!("{product} {version}"))
        }
    }
}

/// A TCP connection to the host and port of `url`, with short timeouts.
fn connect(url: &str, default_port: u16) -> Option<TcpStream> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let addr = if host_port
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.contains(']'))
    {
        host_port.to_owned()
    } else {
        format!("{host_port}:{default_port}")
    };
    let addr = addr.to_socket_addrs().ok()?.next()?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .ok()?;
    Some(stream)
}

/// Reads from `stream` until `done` holds for what arrived (at most 64 KiB).
fn read_until(stream: &mut TcpStream, done: impl Fn(&str) -> bool) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while buf.len() < 1 << 16 {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if done(&text) {
            return Some(text.into_owned());
        }
    }
    None
}

/// The long string (`S`) field `key` of an AMQP field table somewhere in `buf`.
fn long_string(buf: &[u8], key: &[u8]) -> Option<String> {
    let mut pattern = vec![u8::try_from(key.len()).ok()?];
    pattern.extend_from_slice(key);
    pattern.push(b'S');
    let at = buf.windows(pattern.len()).position(|w| w == pattern)? + pattern.len();
    let len = u32::from_be_bytes(buf.get(at..at + 4)?.try_into().ok()?) as usize;
    let value = buf.get(at + 4..at + 4 + len)?;
    Some(String::from_utf8_lossy(value).into_owned())
}

/// Today's date (UTC) as `YYYY-MM-DD`.
fn today() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    civil_date(i64::try_from(secs / 86_400).unwrap_or(0))
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The committed document, for tests.
#[cfg(test)]
fn doc_path() -> std::path::PathBuf {
    project_root().join(DOC)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(adapter: &str, rows: &[(&str, &str)]) -> Column {
        Column {
            adapter: adapter.into(),
            outcome: Outcome::Live {
                rows: rows
                    .iter()
                    .map(|(n, v)| ((*n).into(), (*v).into()))
                    .collect(),
                broker: None,
            },
        }
    }

    fn unreachable(adapter: &str) -> Column {
        Column {
            adapter: adapter.into(),
            outcome: Outcome::Unreachable("broker unreachable: connection refused".into()),
        }
    }

    #[test]
    fn the_json_of_evbus_capabilities_parses_in_order() {
        let rows = parse_rows(
            r#"{"capabilities":[{"name":"replay","value":"true"},{"name":"max-payload-bytes","value":"16777216"}],"transport":"memory"}"#,
        )
        .unwrap();
        assert_eq!(
            rows,
            [
                ("replay".to_owned(), "true".to_owned()),
                ("max-payload-bytes".to_owned(), "16777216".to_owned())
            ]
        );
        assert!(parse_rows("evbus: error: nothing").is_err());
        assert!(parse_rows(r#"{"capabilities":[{"name":"replay"}]}"#).is_err());
    }

    #[test]
    fn a_rendered_table_reads_back_to_its_values() {
        let columns = [
            live(
                "memory",
                &[("replay", "true"), ("max-payload-bytes", "16777216")],
            ),
            live(
                "nats",
                &[("replay", "true"), ("max-payload-bytes", "1044480")],
            ),
        ];
        let part = render(&columns, &Table::default(), "2026-11-30");
        assert!(part.contains("on 2026-11-30"), "{part}");
        assert!(part.contains("| max-payload-bytes | 16777216 (16 MiB) | 1044480 (1020 KiB) |"));
        let table = parse_table(&part);
        assert_eq!(table.columns, ["memory", "nats"]);
        let nats = table.column("nats").unwrap();
        let values: Vec<_> = nats
            .iter()
            .map(|(n, c)| (n.as_str(), cell_value(c)))
            .collect();
        assert_eq!(
            values,
            [("replay", "true"), ("max-payload-bytes", "1044480")]
        );
    }

    #[test]
    fn an_unreachable_adapter_keeps_its_previous_column_with_a_note() {
        let before = render(
            &[
                live("memory", &[("replay", "true")]),
                live("redis", &[("replay", "false")]),
            ],
            &Table::default(),
            "2026-11-01",
        );
        let after = render(
            &[live("memory", &[("replay", "true")]), unreachable("redis")],
            &parse_table(&before),
            "2026-11-30",
        );
        assert!(after.contains("| replay | true | false |"), "{after}");
        assert!(
            after.contains("**redis: not read on 2026-11-30** (broker unreachable"),
            "{after}"
        );
        assert!(after.contains("previous table's"), "{after}");
    }

    #[test]
    fn an_adapter_never_read_gets_a_column_saying_so() {
        let part = render(
            &[live("memory", &[("replay", "true")]), unreachable("kafka")],
            &Table::default(),
            "2026-11-30",
        );
        assert!(part.contains("| Capability | memory | kafka |"), "{part}");
        assert!(part.contains("| replay | true | not generated |"), "{part}");
        assert!(part.contains("it has never been generated"), "{part}");
    }

    #[test]
    fn only_the_part_between_the_markers_is_replaced() {
        let doc = format!("# Title\nkept above\n{BEGIN}\nold table\n{END}\nkept below\n");
        let new = replace_generated(&doc, "new table\n").unwrap();
        assert_eq!(
            new,
            format!("# Title\nkept above\n{BEGIN}\nnew table\n{END}\nkept below\n")
        );
        let err = replace_generated("# no markers\n", "x").unwrap_err();
        assert!(err.contains(BEGIN), "{err}");
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(20_422), "2025-11-30");
        assert_eq!(civil_date(11_016), "2000-02-29");
    }

    #[test]
    fn amqp_server_properties_are_read() {
        let mut frame = b"\x01\x00\x00junk\x07productS".to_vec();
        frame.extend_from_slice(&8u32.to_be_bytes());
        frame.extend_from_slice(b"RabbitMQ\x07versionS");
        frame.extend_from_slice(&7u32.to_be_bytes());
        frame.extend_from_slice(b"3.10.8x");
        assert_eq!(long_string(&frame, b"version").as_deref(), Some("3.10.8x"));
        assert_eq!(long_string(&frame, b"product").as_deref(), Some("RabbitMQ"));
        assert_eq!(long_string(&frame, b"platform"), None);
    }

    #[test]
    fn the_committed_document_has_one_generated_table() {
        let doc = std::fs::read_to_string(doc_path()).unwrap();
        let table = parse_table(generated_part(&doc).unwrap());
        assert!(table.columns.contains(&"memory".to_owned()), "{table:?}");
        assert!(!table.rows.is_empty(), "{table:?}");
        for (name, cells) in &table.rows {
            assert_eq!(cells.len(), table.columns.len(), "row {name}");
        }
    }
}
