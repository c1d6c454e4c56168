//! Schema evolution: the history layout of a catalogue directory, reading events of versions
//! the consumer does not know, and comparing catalogues (`Catalog::diff`).

mod bus_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bus_support::{WAIT, drain_queue, recv};
use evbus::Transport;
use evbus::bus::{Bus, Message};
use evbus::memory::MemoryBroker;
use evbus::schema::{
    Catalog, ChangeKind, Compatibility, SchemaErrorKind, Severity, ValidationProblem,
};
use serde_json::{Value, json};

/// A fresh, empty directory under the target's temporary directory.
fn fresh_dir(what: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "schema-evolution-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("events")).unwrap();
    dir
}

fn write(dir: &Path, rel: &str, value: &Value) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_string_pretty(value).unwrap()).unwrap();
}

/// `{productId, price}`, closed.
fn product_v1() -> Value {
    json!({
        "type": "object",
        "properties": {"productId": {"type": "string"}, "price": {"type": "number"}},
        "required": ["productId"],
        "additionalProperties": false
    })
}

/// v1 plus an optional `color`: a BACKWARD-compatible change of a closed model.
fn product_v2() -> Value {
    let mut v = product_v1();
    v["properties"]["color"] = json!({"type": "string"});
    v
}

fn catalog(ty: &str, versions: &[Value]) -> Catalog {
    let mut b = Catalog::builder();
    for v in versions {
        b.register_json(ty, v.clone()).unwrap();
    }
    b.freeze().unwrap()
}

fn event(ty: &str, version: u32, data: &Value) -> evbus::Event {
    evbus::Event::builder(ty, "/test")
        .dataschema(evbus::schema::dataschema_uri(ty, version))
        .json(data)
        .unwrap()
        .build()
        .unwrap()
}

#[test]
fn a_directory_with_history_loads_every_version() {
    let dir = fresh_dir("history");
    write(&dir, "events/product.json", &product_v2());
    write(&dir, "events/product/1.json", &product_v1());
    let c = Catalog::from_dir(&dir).unwrap();
    let info = c.get("product").unwrap();
    let versions: Vec<u32> = info.versions().iter().map(|v| v.version()).collect();
    assert_eq!(
        versions,
        [1, 2],
        "the latest file is the version after the history"
    );
    assert!(
        info.version(1)
            .unwrap()
            .origin()
            .ends_with("events/product/1.json"),
        "{}",
        info.version(1).unwrap().origin()
    );
    let colored = json!({"productId": "p-1", "color": "red"});
    assert!(c.validate_version("product", 1, &colored).is_err());
    assert_eq!(
        c.validate("product", &colored).unwrap().version(),
        Some(2),
        "new events are validated against the latest"
    );
}

#[test]
fn a_type_with_only_history_files_has_its_highest_as_latest() {
    let dir = fresh_dir("only-history");
    write(&dir, "events/product/1.json", &product_v1());
    write(&dir, "events/product/2.json", &product_v2());
    let c = Catalog::from_dir(&dir).unwrap();
    assert_eq!(c.get("product").unwrap().latest().version(), 2);
}

#[test]
fn a_breaking_history_is_a_load_error_naming_files_versions_and_rule() {
    let dir = fresh_dir("breaking");
    let mut v2 = product_v2();
    v2["required"] = json!(["productId", "color"]);
    write(&dir, "events/product.json", &v2);
    write(&dir, "events/product/1.json", &product_v1());
    let e = Catalog::from_dir(&dir).unwrap_err();
    assert_eq!(e.kind(), SchemaErrorKind::Incompatible);
    let text = e.to_string();
    assert!(
        text.contains(r#"event type "product" version 2 is not BACKWARD compatible with v1"#),
        "{text}"
    );
    assert!(text.contains("events/product.json"), "{text}");
    assert!(text.contains("events/product/1.json"), "{text}");
    assert!(
        text.contains(
            "[BACKWARD: v2 reading data written with v1] /required: REQUIRED_PROPERTY_ADDED"
        ),
        "{text}"
    );
    assert_eq!(e.incompatibilities()[0].rule(), "REQUIRED_PROPERTY_ADDED");
}

#[test]
fn the_latest_files_mode_governs_its_history() {
    let dir = fresh_dir("mode");
    let mut v2 = product_v2();
    v2["x-evbus-compatibility"] = json!("FULL");
    write(&dir, "events/product.json", &v2);
    write(&dir, "events/product/1.json", &product_v1());
    let e = Catalog::from_dir(&dir).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("is not FULL compatible with v1"), "{text}");
    assert!(
        text.contains("[FORWARD: v1 reading data written with v2] /properties/color: PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL"),
        "{text}"
    );

    // The same files under BACKWARD (said explicitly) load, and the mode is the type's.
    v2["x-evbus-compatibility"] = json!("backward");
    write(&dir, "events/product.json", &v2);
    let c = Catalog::from_dir(&dir).unwrap();
    assert_eq!(
        c.get("product").unwrap().compatibility(),
        Compatibility::Backward
    );
}

#[test]
fn history_files_are_named_after_their_version() {
    let dir = fresh_dir("misnamed");
    write(&dir, "events/product/first.json", &product_v1());
    let e = Catalog::from_dir(&dir).unwrap_err();
    assert_eq!(e.kind(), SchemaErrorKind::InvalidName);
    assert!(e.to_string().contains("events/product/first.json"), "{e}");
    assert!(
        e.to_string().contains("named after it (1.json, 2.json…)"),
        "{e}"
    );

    let dir = fresh_dir("mismatch");
    let mut v1 = product_v1();
    v1["x-evbus-version"] = json!(3);
    write(&dir, "events/product/1.json", &v1);
    let e = Catalog::from_dir(&dir).unwrap_err();
    assert_eq!(e.kind(), SchemaErrorKind::VersionOrder);
    assert!(
        e.to_string()
            .contains(r#"the file name says version 1 but "x-evbus-version" says 3"#),
        "{e}"
    );

    let dir = fresh_dir("badmode");
    let mut v1 = product_v1();
    v1["x-evbus-compatibility"] = json!("SIDEWAYS");
    write(&dir, "events/product.json", &v1);
    let e = Catalog::from_dir(&dir).unwrap_err();
    assert_eq!(e.kind(), SchemaErrorKind::InvalidSchema);
    assert!(
        e.to_string()
            .contains(r#"unknown compatibility mode "SIDEWAYS""#),
        "{e}"
    );
}

#[test]
fn a_newer_version_is_read_as_the_latest_known_when_its_data_fits() {
    let consumer = catalog("product", &[product_v1()]);
    let ok = consumer
        .read_event(&event(
            "product",
            2,
            &json!({"productId": "p-1", "price": 3}),
        ))
        .unwrap();
    assert_eq!(ok.version(), Some(1));
    assert_eq!(ok.unknown_version(), Some(2));
    // validate_event stays strict: it names the version it lacks.
    let strict = consumer
        .validate_event(&event("product", 2, &json!({"productId": "p-1"})))
        .unwrap_err();
    assert!(matches!(
        strict.problem(),
        ValidationProblem::UnknownVersion { version: 2, .. }
    ));

    let e = consumer
        .read_event(&event(
            "product",
            2,
            &json!({"productId": "p-1", "color": "crimson-77"}),
        ))
        .unwrap_err();
    assert!(
        matches!(e.problem(), ValidationProblem::UnknownVersion { version: 2, known } if known == &[1])
    );
    let text = e.to_string();
    assert!(
        text.starts_with(
            r#"event type "product" version 2 is newer than this consumer's catalogue (versions: 1), and its data is not valid under version 1, the latest this consumer knows (/color: "#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"deploy this consumer with version 2 of "product""#)
            && text.contains("consumers must be deployed before producers"),
        "{text}"
    );
    assert!(
        !text.contains("crimson-77"),
        "never quotes payload values: {text}"
    );
    // The violation under the latest version is listed after the summary.
    assert_eq!(e.violations()[1].pointer(), "/color");
}

#[test]
fn an_older_version_the_catalogue_dropped_is_read_as_the_latest_when_it_fits() {
    let mut v2 = product_v2();
    v2["x-evbus-version"] = json!(2);
    v2["required"] = json!(["productId", "price"]);
    let consumer = catalog("product", &[v2]);
    let ok = consumer
        .read_event(&event(
            "product",
            1,
            &json!({"productId": "p-1", "price": 1}),
        ))
        .unwrap();
    assert_eq!((ok.version(), ok.unknown_version()), (Some(2), Some(1)));
    let e = consumer
        .read_event(&event("product", 1, &json!({"productId": "p-1"})))
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.starts_with(
            r#"event type "product" version 1 is not in this consumer's catalogue (versions: 2), and its data is not valid under version 2"#
        ),
        "{text}"
    );
    assert!(text.contains("events/product/1.json"), "{text}");
}

#[tokio::test]
async fn a_consumer_on_v1_handles_v2_events_valid_for_v1_and_dead_letters_the_others() {
    let broker = MemoryBroker::new(Default::default());
    let producer = Bus::new(
        Arc::new(broker.connect()),
        catalog("product", &[product_v1(), product_v2()]),
        "/producer",
    );
    let consumer = Bus::new(
        Arc::new(broker.connect()),
        catalog("product", &[product_v1()]),
        "/consumer",
    );
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (dtx, mut drx) = tokio::sync::mpsc::unbounded_channel();
    consumer
        .on("product", "search", move |m: Message| {
            let _ = tx.send(m.id().to_owned());
            async { Ok(()) }
        })
        .on_dead_letter(move |e, reason| {
            let _ = dtx.send((e.id().to_owned(), reason.to_owned()));
        })
        .start()
        .await
        .unwrap();
    let plain = producer
        .emit("product", json!({"productId": "p-1", "price": 2}))
        .await
        .unwrap();
    let colored = producer
        .emit("product", json!({"productId": "p-2", "color": "red"}))
        .await
        .unwrap();
    assert_eq!(recv(&mut rx).await, plain);
    let (id, reason) = recv(&mut drx).await;
    assert_eq!(id, colored);
    assert!(
        reason.starts_with(
            r#"rejected on consume: event type "product" version 2 is newer than this consumer's catalogue (versions: 1)"#
        ),
        "{reason}"
    );
    let dead = drain_queue(
        &broker.connect() as &dyn Transport,
        &consumer.dead_letter_queue_name("product", "search"),
        1,
    )
    .await;
    assert_eq!(dead[0].id(), colored);
    assert_eq!(dead[0].extension("deadletterreason"), Some(reason.as_str()));
    let _ = WAIT;
}

fn kinds(changes: &[evbus::schema::Change]) -> Vec<(String, ChangeKind, Severity, String)> {
    changes
        .iter()
        .map(|c| (c.event_type.clone(), c.kind, c.severity, c.rule.clone()))
        .collect()
}

#[test]
fn diff_classifies_every_kind_of_change() {
    let from = {
        let mut b = Catalog::builder();
        b.register_json("gone", json!({"type": "object"})).unwrap();
        b.register_json("grows", product_v1()).unwrap();
        b.register_json("breaks", product_v1()).unwrap();
        b.register_json("edited", product_v1()).unwrap();
        b.register_json("rewritten", product_v1()).unwrap();
        b.register_json("pruned", product_v1()).unwrap();
        b.register_json("pruned", product_v2()).unwrap();
        b.type_compatibility("loosened", Compatibility::Full);
        b.register_json("loosened", product_v1()).unwrap();
        b.freeze().unwrap()
    };
    let to = {
        let mut b = Catalog::builder();
        b.check_compatibility(false);
        b.register_json("fresh", json!({"type": "object"})).unwrap();
        b.register_json("grows", product_v1()).unwrap();
        b.register_json("grows", product_v2()).unwrap();
        b.register_json("breaks", product_v1()).unwrap();
        let mut v2 = product_v2();
        v2["required"] = json!(["productId", "color"]);
        b.register_json("breaks", v2).unwrap();
        let mut v1 = product_v1();
        v1["description"] = json!("now described");
        b.register_json("edited", v1).unwrap();
        let mut v1 = product_v1();
        v1["properties"]["price"]["minimum"] = json!(0);
        b.register_json("rewritten", v1).unwrap();
        let mut v2 = product_v2();
        v2["x-evbus-version"] = json!(2);
        b.register_json("pruned", v2).unwrap();
        b.register_json("loosened", product_v1()).unwrap();
        b.freeze().unwrap()
    };
    let changes = from.diff(&to);
    let got = kinds(&changes);
    let s = |x: &str| x.to_owned();
    assert_eq!(
        got,
        vec![
            (
                s("breaks"),
                ChangeKind::Incompatible,
                Severity::Breaking,
                s("REQUIRED_PROPERTY_ADDED")
            ),
            (
                s("edited"),
                ChangeKind::VersionChanged,
                Severity::Compatible,
                s("VERSION_CHANGED")
            ),
            (
                s("fresh"),
                ChangeKind::TypeAdded,
                Severity::Compatible,
                s("TYPE_ADDED")
            ),
            (
                s("gone"),
                ChangeKind::TypeRemoved,
                Severity::Breaking,
                s("TYPE_REMOVED")
            ),
            (
                s("grows"),
                ChangeKind::VersionAdded,
                Severity::Compatible,
                s("VERSION_ADDED")
            ),
            (
                s("loosened"),
                ChangeKind::ModeChanged,
                Severity::Breaking,
                s("MODE_CHANGED")
            ),
            (
                s("pruned"),
                ChangeKind::VersionRemoved,
                Severity::Compatible,
                s("VERSION_REMOVED")
            ),
            (
                s("rewritten"),
                ChangeKind::VersionChanged,
                Severity::Breaking,
                s("MINIMUM_ADDED")
            ),
        ],
        "{changes:#?}"
    );
    let line = changes[0].to_string();
    assert_eq!(
        line,
        r#"breaking breaks v1 -> v2 /required REQUIRED_PROPERTY_ADDED (BACKWARD): v2 reading data written with v1: property "color" is required by the reader but not by the writer: data without it is refused"#
    );
    // Identical catalogues: nothing to say.
    assert!(from.diff(&from).is_empty());
}

#[test]
fn a_dropped_version_the_latest_cannot_read_is_breaking() {
    // FORWARD: v2 drops `color` from the closed model (v1 reads v2 data, not the reverse).
    let forward = |versions: &[Value]| {
        let mut b = Catalog::builder();
        b.type_compatibility("t", Compatibility::Forward);
        for v in versions {
            b.register_json("t", v.clone()).unwrap();
        }
        b.freeze().unwrap()
    };
    let mut v2 = product_v1();
    v2["x-evbus-version"] = json!(2);
    let from = forward(&[product_v2(), v2.clone()]);
    let to = forward(&[v2]);
    let changes = from.diff(&to);
    assert_eq!(changes.len(), 1, "{changes:#?}");
    assert_eq!(changes[0].kind, ChangeKind::VersionRemoved);
    assert_eq!(changes[0].severity, Severity::Breaking);
    assert!(
        changes[0].message.contains("keep events/t/1.json"),
        "{}",
        changes[0]
    );
}
