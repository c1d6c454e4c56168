//! `evbus dlq`: events dead-lettered by a consumer that rejects them (a consumer on version 1
//! of a type, events of version 2 it cannot read) are listed with their reason, shown, and
//! redriven — by id, then all — to the same group, where a fixed consumer (on version 2)
//! handles them. Every step is a separate `evbus` process on the local Redis.

mod rolling;
mod support;

use std::collections::BTreeSet;

use rolling::{catalogue, cleanup, consume, dlq_list, emit, redis};
use serde_json::json;
use support::{evbus, text};

fn dlq(url: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec![
        args[0],
        "--transport",
        url,
        "--type",
        "product",
        "--group",
        "search",
        "--wait",
        "1",
    ];
    all.splice(0..0, ["dlq"]);
    all.extend_from_slice(&args[1..]);
    evbus(&all)
}

#[tokio::test(flavor = "multi_thread")]
async fn rejected_events_are_listed_with_their_reason_and_redriven_to_a_fixed_consumer() {
    let Some(url) = redis("dlq").await else {
        return;
    };
    let v1 = json!({
        "type": "object",
        "properties": {"productId": {"type": "string"}},
        "required": ["productId"],
        "additionalProperties": false
    });
    let mut v2 = v1.clone();
    v2["properties"]["color"] = json!({"type": "string"});
    let old = catalogue("dlq-v1", "product", &v1, &[]);
    let fixed = catalogue("dlq-v2", "product", &v2, &[&v1]);

    let ids = emit(
        &url,
        &fixed,
        "product",
        &[
            json!({"productId": "p-1", "color": "red"}),
            json!({"productId": "p-2", "color": "blue"}),
            json!({"productId": "p-3"}),
        ],
    );
    // The old consumer handles what it can read and rejects the rest, saying so on stderr.
    let seen = consume(&url, &old, "product", "search", 1);
    assert_eq!(seen.code, Some(0), "{}", seen.stderr);
    assert_eq!(seen.handled_ids(), [ids[2].clone()]);
    assert_eq!(
        seen.dead_ids(),
        [ids[0].clone(), ids[1].clone()],
        "{}",
        seen.stderr
    );

    // Listed with their reason; listing twice loses nothing and keeps the order.
    let reason = "rejected on consume: event type \"product\" version 2 is newer than this \
                  consumer's catalogue (versions: 1), and its data is not valid under version 1";
    for _ in 0..2 {
        let listed = dlq_list(&url, "product", "search");
        let got: Vec<&str> = listed.iter().map(|(id, _, _)| id.as_str()).collect();
        assert_eq!(got, [ids[0].as_str(), ids[1].as_str()]);
        for (_, r, attempts) in &listed {
            assert!(r.starts_with(reason), "{r}");
            assert_eq!(*attempts, 1);
        }
    }
    let out = dlq(&url, &["list"]);
    assert_eq!(out.status.code(), Some(0));
    let table = text(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("ATTEMPTS") && lines[0].ends_with("REASON"),
        "{table}"
    );
    for (line, id) in lines[1..].iter().zip(&ids) {
        assert!(line.starts_with(id.as_str()), "{table}");
        assert!(line.contains(" product/search "), "the origin: {table}");
        assert!(line.contains(reason), "{table}");
    }

    // One in full.
    let out = dlq(&url, &["show", &ids[0]]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.contains(&format!("id:            {}", ids[0])),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("reason:        {reason}")),
        "{shown}"
    );
    assert!(
        shown.contains("\"color\": \"red\""),
        "the original event: {shown}"
    );
    assert!(
        !shown.contains("deadletterreason"),
        "without the dead-letter attributes: {shown}"
    );
    let out = dlq(&url, &["show", "no-such-id"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no dead letter no-such-id"),
        "{}",
        text(&out.stderr)
    );

    // Redrive one by id (a missing id is reported, exit 1), then the rest.
    let out = dlq(&url, &["redrive", "--id", &ids[0], "--id", "no-such-id"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{}\n", ids[0]));
    assert!(
        text(&out.stderr).contains("not found in product.search.dlq: no-such-id"),
        "{}",
        text(&out.stderr)
    );
    let left: Vec<String> = dlq_list(&url, "product", "search")
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(left, [ids[1].clone()]);
    let out = dlq(&url, &["redrive", "--all"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{}\n", ids[1]));
    assert!(dlq_list(&url, "product", "search").is_empty());

    // The fixed consumer of the group gets both, as written, and rejects nothing.
    let seen = consume(&url, &fixed, "product", "search", 2);
    assert_eq!(seen.code, Some(0), "{}", seen.stderr);
    let got: BTreeSet<String> = seen.handled_ids().into_iter().collect();
    assert_eq!(got, BTreeSet::from([ids[0].clone(), ids[1].clone()]));
    for e in &seen.handled {
        assert_eq!(e["dataschema"], "urn:evbus:schema:product:2");
        assert!(e.get("deadletterreason").is_none(), "{e}");
    }
    assert!(seen.dead_lettered.is_empty(), "{}", seen.stderr);
    assert!(dlq_list(&url, "product", "search").is_empty());

    cleanup(&url, "product", &["search"]).await;
}

#[test]
fn redrive_needs_ids_or_all() {
    for args in [
        vec![
            "dlq",
            "redrive",
            "--transport",
            "memory://",
            "--type",
            "t",
            "--group",
            "g",
        ],
        vec![
            "dlq",
            "redrive",
            "--transport",
            "memory://",
            "--type",
            "t",
            "--group",
            "g",
            "--all",
            "--id",
            "x",
        ],
        vec![
            "dlq",
            "list",
            "--transport",
            "memory://",
            "--type",
            "t",
            "--group",
            "g",
            "--wait",
            "0",
        ],
    ] {
        let out = evbus(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(text(&out.stdout), "", "{args:?}");
    }
}

#[test]
fn an_empty_dead_letter_queue_lists_nothing() {
    let out = evbus(&[
        "dlq",
        "list",
        "--transport",
        "memory://",
        "--type",
        "t",
        "--group",
        "g",
        "--wait",
        "0.2",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 1, "the header only");
    assert!(
        text(&out.stderr).contains("0 dead letters in t.g.dlq"),
        "{}",
        text(&out.stderr)
    );
}
