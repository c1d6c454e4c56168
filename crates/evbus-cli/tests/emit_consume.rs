//! `evbus emit` and `evbus consume` run as processes: against memory:// (in-process, so only
//! what one process shows) and across two processes on the local Redis.

mod support;

use support::{evbus, jsonl, payload, schemas, text};

#[test]
fn emit_prints_the_new_event_id() {
    let data = payload("afterOrderCancel.valid.json");
    let dir = schemas();
    let out = evbus(&[
        "emit",
        "--transport",
        "memory://",
        "--schemas",
        dir.to_str().unwrap(),
        "--type",
        "afterOrderCancel",
        "--key",
        "ord_01J9Z6",
        "--data",
        &data,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let id = text(&out.stdout);
    assert_eq!(
        uuid::Uuid::parse_str(id.trim()).unwrap().get_version_num(),
        7
    );
}

#[test]
fn emit_of_a_file_with_one_invalid_line_names_it_and_emits_nothing() {
    let file = jsonl(
        "drift.jsonl",
        &[
            payload("afterOrderCancel.valid.json"),
            payload("afterOrderCancel.drift.json"),
            payload("afterOrderCancel.valid.json"),
        ],
    );
    let dir = schemas();
    let out = evbus(&[
        "emit",
        "--transport",
        "memory://",
        "--schemas",
        dir.to_str().unwrap(),
        "--type",
        "afterOrderCancel",
        "--data-file",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "", "no event id is printed");
    let err = text(&out.stderr);
    assert!(
        err.contains(r#"line 2: /returnToStock: required property "returnToStock" is missing"#),
        "{err}"
    );
    assert!(err.contains("nothing was emitted"), "{err}");
}

#[test]
fn an_invalid_payload_is_counted_once_whatever_its_violations() {
    let dir = schemas();
    let out = evbus(&[
        "emit",
        "--transport",
        "memory://",
        "--schemas",
        dir.to_str().unwrap(),
        "--type",
        "afterOrderCancel",
        "--data",
        "{}",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(err.matches("required property").count(), 3, "{err}");
    assert!(err.contains("1 of 1 payloads refused"), "{err}");
}

/// An unknown `--type` is a usage error (exit 2, as the README says), not a refused payload
/// (exit 1): it was exit 1, the payload checked against a type that does not exist.
#[test]
fn emit_of_an_unknown_type_exits_2_listing_the_known_ones() {
    let dir = schemas();
    let out = evbus(&[
        "emit",
        "--transport",
        "memory://",
        "--schemas",
        dir.to_str().unwrap(),
        "--type",
        "noSuchType",
        "--data",
        "{}",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "");
    let err = text(&out.stderr);
    assert!(err.contains(r#"unknown event type "noSuchType""#), "{err}");
    assert!(err.contains("afterOrderCancel"), "the known types: {err}");
}

/// A publish failing partway (the 150th of 250 events is larger than the memory transport
/// takes) leaves on stdout exactly the ids of the events published before it: the first
/// 100, published as one chunk (the memory transport publishes a chunk all or nothing).
/// Before, stdout was empty although events had been published.
#[test]
fn a_publish_failing_partway_leaves_the_ids_published_on_stdout() {
    let valid = payload("afterOrderCancel.valid.json");
    let mut huge: serde_json::Value = serde_json::from_str(&valid).unwrap();
    huge["canceledBy"] = serde_json::Value::String("x".repeat(8_000));
    let mut lines = vec![valid; 250];
    lines[149] = huge.to_string();
    let file = jsonl("partway.jsonl", &lines);
    let dir = schemas();
    let out = evbus(&[
        "emit",
        "--transport",
        "memory://?max_payload_bytes=4096",
        "--schemas",
        dir.to_str().unwrap(),
        "--type",
        "afterOrderCancel",
        "--data-file",
        file.to_str().unwrap(),
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let ids: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(ids.len(), 100, "{err}");
    for id in &ids {
        uuid::Uuid::parse_str(id).unwrap_or_else(|e| panic!("{id}: {e}"));
    }
    let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 100);
    assert!(err.contains("100 of 250 events published"), "{err}");
    assert!(
        err.contains("max_payload_bytes"),
        "the transport's reason: {err}"
    );
}

/// `--transport` falls back on EVBUS_TRANSPORT (a password kept off the command line), and
/// `--help` names the variable without showing its value.
#[test]
fn emit_and_consume_read_the_transport_from_evbus_transport() {
    let dir = schemas();
    let run = |args: &[&str], url: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_evbus"))
            .args(args)
            .env("EVBUS_TRANSPORT", url)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let data = payload("afterOrderCancel.valid.json");
    let common = [
        "--schemas",
        dir.to_str().unwrap(),
        "--type",
        "afterOrderCancel",
    ];
    let mut emit = vec!["emit"];
    emit.extend(common);
    emit.extend(["--data", &data]);
    let out = run(&emit, "memory://");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 1);
    let mut consume = vec!["consume"];
    consume.extend(common);
    consume.extend(["--group", "g", "--timeout", "0.2"]);
    let out = run(&consume, "memory://");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // The flag wins over the variable.
    emit.extend(["--transport", "memory://"]);
    let out = run(&emit, "carrier-pigeon://coop");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for command in ["emit", "consume", "serve", "capabilities"] {
        let out = run(&[command, "--help"], "memory://s3cr3t@x");
        let help = text(&out.stdout);
        assert!(help.contains("[env: EVBUS_TRANSPORT]"), "{command}: {help}");
        assert!(!help.contains("s3cr3t"), "{command}: {help}");
    }
    let out = run(&["dlq", "list", "--help"], "memory://s3cr3t@x");
    let help = text(&out.stdout);
    assert!(
        help.contains("[env: EVBUS_TRANSPORT]") && !help.contains("s3cr3t"),
        "{help}"
    );
}

/// Run with `--no-default-features` (each adapter's scheme without its feature), or the
/// default build (an unknown scheme): either way the command says what it can open.
#[test]
fn a_transport_this_build_cannot_open_is_refused_before_anything_else() {
    let dir = schemas();
    let mut urls = vec![("carrier-pigeon://coop", None)];
    if cfg!(not(feature = "redis")) {
        urls.push(("redis://127.0.0.1:6379", Some("redis")));
    }
    if cfg!(not(feature = "kafka")) {
        urls.push(("kafka://127.0.0.1:9092", Some("kafka")));
    }
    if cfg!(not(feature = "nats")) {
        urls.push(("nats://127.0.0.1:4222", Some("nats")));
    }
    if cfg!(not(feature = "amqp")) {
        urls.push(("amqp://guest:guest@127.0.0.1:5672/%2f", Some("amqp")));
    }
    for (url, feature) in urls {
        for command in ["emit", "consume"] {
            let mut args = vec![
                command,
                "--transport",
                url,
                "--schemas",
                dir.to_str().unwrap(),
                "--type",
                "afterOrderCancel",
            ];
            if command == "emit" {
                // Invalid: the transport is refused before any payload is looked at.
                args.extend(["--data", "{}"]);
            } else {
                args.extend(["--group", "g", "--timeout", "5"]);
            }
            let out = evbus(&args);
            assert_eq!(out.status.code(), Some(2), "{command} {url}");
            assert_eq!(text(&out.stdout), "");
            let err = text(&out.stderr);
            assert!(err.contains("this build of evbus"), "{err}");
            let known: Vec<&str> = err
                .split("knows: ")
                .nth(1)
                .unwrap_or_else(|| panic!("no list of known schemes: {err}"))
                .trim()
                .split(", ")
                .collect();
            assert!(known.contains(&"memory"), "{err}");
            for (built, scheme) in [
                (cfg!(feature = "redis"), "redis"),
                (cfg!(feature = "kafka"), "kafka"),
                (cfg!(feature = "nats"), "nats"),
                (cfg!(feature = "amqp"), "amqp"),
            ] {
                assert_eq!(known.contains(&scheme), built, "{scheme}: {err}");
            }
            match feature {
                Some(feature) => assert!(
                    err.contains(&format!("`{feature}` feature"))
                        && err.contains(&format!("evbus-{feature}")),
                    "{err}"
                ),
                None => assert!(
                    err.contains("no transport for `carrier-pigeon://` URLs"),
                    "{err}"
                ),
            }
            assert!(!err.contains("required property"), "{err}");
        }
    }
}

/// A build without TLS for Redis refuses `rediss://` saying how to get a build with it, not
/// evbus-redis's advice to edit a Cargo.toml, which a user of the binary does not have (found
/// by a new-user review).
#[cfg(all(feature = "redis", not(feature = "redis-tls")))]
#[test]
fn a_tls_redis_url_without_tls_built_in_names_the_feature_that_adds_it() {
    let dir = schemas();
    for url in [
        "rediss://127.0.0.1:6379",
        "rediss+cluster://127.0.0.1:7231,127.0.0.1:7232",
    ] {
        let out = evbus(&[
            "emit",
            "--transport",
            url,
            "--schemas",
            dir.to_str().unwrap(),
            "--type",
            "afterOrderCancel",
            "--data",
            &payload("afterOrderCancel.valid.json"),
        ]);
        assert_eq!(out.status.code(), Some(2), "{url}");
        assert_eq!(text(&out.stdout), "");
        let err = text(&out.stderr);
        assert!(!err.contains("Cargo.toml"), "{err}");
        assert!(
            err.contains("rebuild evbus-cli with its `redis-tls` feature")
                && err.contains("--features redis-tls"),
            "{err}"
        );
    }
}

#[test]
fn consume_without_events_exits_1_when_the_timeout_passes() {
    let dir = schemas();
    let out = evbus(&[
        "consume",
        "--transport",
        "memory://",
        "--schemas",
        dir.to_str().unwrap(),
        "--type",
        "afterOrderCancel",
        "--group",
        "g",
        "--count",
        "1",
        "--timeout",
        "0.3",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "");
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread")]
async fn events_emitted_by_one_process_are_consumed_by_another_on_redis() {
    use evbus::Transport;
    use serde_json::Value;

    let base = std::env::var("EVBUS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("evbus-cli-test-{}:", uuid::Uuid::now_v7().simple());
    let url = format!("{base}?prefix={prefix}");
    let dir = schemas();
    let dir = dir.to_str().unwrap();
    let file = jsonl(
        "redis.jsonl",
        &vec![payload("afterOrderCancel.valid.json"); 3],
    );

    let out = evbus(&[
        "emit",
        "--transport",
        &url,
        "--schemas",
        dir,
        "--type",
        "afterOrderCancel",
        "--key",
        "ord_01J9Z6",
        "--data-file",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let ids: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(ids.len(), 3);

    let out = evbus(&[
        "consume",
        "--transport",
        &url,
        "--schemas",
        dir,
        "--type",
        "afterOrderCancel",
        "--group",
        "audit",
        "--count",
        "3",
        "--timeout",
        "20",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let events: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one CloudEvent per line"))
        .collect();
    let got: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(got, ids, "every event, in emit order (one key)");
    assert_eq!(events[0]["type"], "afterOrderCancel");
    assert_eq!(events[0]["specversion"], "1.0");
    assert_eq!(
        events[0]["dataschema"],
        "urn:evbus:schema:afterOrderCancel:1"
    );
    assert_eq!(events[0]["partitionkey"], "ord_01J9Z6");
    assert_eq!(events[0]["data"]["returnToStock"], true);

    // The group acked them: a second consumer of the group gets nothing and times out.
    let out = evbus(&[
        "consume",
        "--transport",
        &url,
        "--schemas",
        dir,
        "--type",
        "afterOrderCancel",
        "--group",
        "audit",
        "--count",
        "1",
        "--timeout",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "");

    let transport = evbus_redis::RedisTransport::connect_url(&url)
        .await
        .unwrap();
    transport.delete_topic("afterOrderCancel").await.unwrap();
    for q in [
        "afterOrderCancel.audit.dlq",
        "afterOrderCancel.audit.redrive",
    ] {
        transport.delete_queue(q).await.unwrap();
    }
    transport.close().await.unwrap();
}
