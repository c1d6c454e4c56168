//! Abuse suite, confidentiality: redaction through arrays (`*`), curated schemas at every
//! `$defs` level, error bodies that quote no request value and stay small, and private data
//! files. Real HTTP through the gateway, a real receiver, a real SQLite store.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};
use support::*;

/// Arrays of objects, objects of objects, nested arrays, and a pointer written without an
/// index into an array the schema does not declare.
const ARRAYS: &str = "arrLeak";
/// A schema whose redacted properties live in nested `$defs`.
const DEFS: &str = "defsLeak";
/// A closed schema with many rules, to break on purpose.
const ERRORS: &str = "errLeak";

fn schema(extra: Value) -> Value {
    let mut s = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "description": "Test type of the confidentiality abuse suite.",
        "x-evbus-external": true,
        "type": "object",
    });
    s.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    s
}

fn arrays_schema() -> Value {
    let card = json!({"type": "object", "properties": {"brand": {"type": "string"}, "pan": {"type": "string"}}});
    let customer = json!({"type": "object", "properties": {
        "name": {"type": "string"}, "email": {"type": "string"},
        "cards": {"type": "array", "items": card}}});
    schema(json!({
        "x-evbus-redact": ["/customers/*/email", "/customers/*/cards/*/pan", "/byId/*/email", "/byId/*/cards/*/pan",
                           "/people/email", "/matrix/*/*/secret"],
        "properties": {
            "customers": {"type": "array", "items": customer},
            "byId": {"type": "object", "additionalProperties": customer},
        }
    }))
}

fn defs_schema() -> Value {
    schema(json!({
        "x-evbus-redact": ["/customer/hiddenMailbox", "/customer/card/hiddenPanNumber",
                           "/customers/*/hiddenMailbox", "/customers/*/card/hiddenPanNumber"],
        "properties": {
            "customer": {"$ref": "#/$defs/Customer"},
            "customers": {"type": "array", "items": {"$ref": "#/$defs/Customer"}},
        },
        "$defs": {
            "Customer": {
                "type": "object",
                "properties": {
                    "shownName": {"type": "string"},
                    "hiddenMailbox": {"type": "string", "description": "redacted"},
                    "card": {"$ref": "#/$defs/Customer/$defs/Card"},
                },
                "required": ["shownName", "hiddenMailbox"],
                // Keywords that name properties or hold instances outside `properties`.
                "dependentRequired": {"shownName": ["hiddenMailbox"]},
                "dependencies": {"hiddenMailbox": ["shownName"]},
                "not": {"required": ["hiddenMailbox", "hiddenPanNumber"]},
                "propertyNames": {"enum": ["shownName", "hiddenMailbox", "card"]},
                "examples": [{"shownName": "Ann", "hiddenMailbox": "ann@example.com"}],
                "default": {"hiddenMailbox": "nobody@example.com"},
                "$defs": {
                    "Card": {
                        "type": "object",
                        "properties": {"shownBrand": {"type": "string"}, "hiddenPanNumber": {"type": "string"}},
                        "required": ["hiddenPanNumber"],
                        "const": {"shownBrand": "visa", "hiddenPanNumber": "4111"},
                    }
                }
            }
        }
    }))
}

fn errors_schema() -> Value {
    schema(json!({
        "properties": {
            "kind": {"enum": ["a", "b"]},
            "mail": {"type": "string", "format": "email"},
            "n": {"type": "integer"},
            "items": {"type": "array", "items": {"type": "object",
                "properties": {"code": {"type": "string", "pattern": "^[a-z]{3}$"}},
                "additionalProperties": false}},
            "map": {"type": "object", "additionalProperties": {"type": "integer"}},
            "alt": {"anyOf": [{"type": "integer"},
                {"type": "object", "properties": {"z": {"type": "integer"}}, "additionalProperties": false}]},
        },
        "required": ["kind"],
        "additionalProperties": false,
    }))
}

/// The example catalogue plus the test types.
fn catalog() -> evbus::Catalog {
    let mut b = evbus::Catalog::builder();
    b.load_dir(schemas()).unwrap();
    b.register_json(ARRAYS, arrays_schema()).unwrap();
    b.register_json(DEFS, defs_schema()).unwrap();
    b.register_json(ERRORS, errors_schema()).unwrap();
    b.freeze().unwrap()
}

async fn harness() -> Harness {
    let mut config = test_config();
    // The property test sends a few hundred requests with one key.
    config.rate_limit_per_second = 10_000;
    config.rate_limit_burst = 10_000;
    Harness::with_catalog(
        Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect()),
        config,
        catalog(),
    )
    .await
}

#[test]
fn pointers_curation_cannot_apply_are_refused_at_catalogue_load() {
    for pointer in [
        "/customers/-/email",
        "/customers/email",
        "/customers/*/cards/pan",
    ] {
        let mut s = arrays_schema();
        s["x-evbus-redact"] = json!([pointer]);
        let mut b = evbus::Catalog::builder();
        b.register_json(ARRAYS, s).unwrap();
        let e = b.freeze().expect_err(pointer);
        assert_eq!(e.kind(), evbus::schema::SchemaErrorKind::InvalidSchema);
        let m = e.message();
        assert!(m.contains(ARRAYS) && m.contains(pointer), "{m}");
        assert!(m.contains("\"*\""), "the message tells the wildcard: {m}");
    }
    // The same through an allow-list, and `*` itself is accepted everywhere.
    let mut s = arrays_schema();
    s["x-evbus-allow"] = json!(["/customers/-"]);
    let mut b = evbus::Catalog::builder();
    b.register_json(ARRAYS, s).unwrap();
    assert!(b.freeze().unwrap_err().message().contains("/customers/-"));
    let mut s = arrays_schema();
    s["x-evbus-allow"] = json!(["/customers/*/name", "/byId/*/name"]);
    let mut b = evbus::Catalog::builder();
    b.register_json(ARRAYS, s).unwrap();
    b.freeze().unwrap();
}

fn array_payload(secrets: &[String; 6]) -> Value {
    json!({
        "customers": [
            {"name": "ann", "email": secrets[0], "cards": [{"brand": "visa", "pan": secrets[1]}, {"brand": "amex", "pan": secrets[2]}]},
            {"name": "bob", "email": secrets[3], "cards": []},
        ],
        "byId": {"c1": {"name": "cid", "email": secrets[4]}},
        "people": [{"email": secrets[5], "age": 3}, [{"email": secrets[5]}]],
        "matrix": [[{"secret": secrets[5], "ok": 1}]],
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn wildcard_redaction_keeps_array_values_off_sse_and_webhooks() {
    let h = harness().await;
    let key = h.key(&["*"], &["*"]).await;
    let mut receiver = Receiver::start(200).await;
    h.register(&key, &receiver.url(), &[ARRAYS]).await;
    let mut stream = h
        .http
        .get(h.url(&format!("/v1/stream?types={ARRAYS}")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    let secrets: [String; 6] =
        std::array::from_fn(|i| format!("ZSECRET{i}{}", uuid::Uuid::now_v7().simple()));
    // Through POST /v1/events and through the bus.
    let (status, posted) = h.publish(&key, ARRAYS, array_payload(&secrets)).await;
    assert_eq!(status.as_u16(), 202, "{posted}");
    let emitted = h.bus.emit(ARRAYS, array_payload(&secrets)).await.unwrap();
    let ids = [posted["id"].as_str().unwrap().to_owned(), emitted];

    let mut bodies = String::new();
    for _ in 0..2 {
        let r = receiver.next().await;
        assert!(ids.iter().any(|i| i == r.id()));
        bodies.push_str(&r.body);
        let data = r.json()["data"].clone();
        assert_eq!(
            data,
            json!({
                "customers": [
                    {"name": "ann", "cards": [{"brand": "visa"}, {"brand": "amex"}]},
                    {"name": "bob", "cards": []},
                ],
                "byId": {"c1": {"name": "cid"}},
                "people": [{"age": 3}, [{}]],
                "matrix": [[{"ok": 1}]],
            })
        );
    }
    let frames = read_stream_until(&mut stream, |read| {
        ids.iter().all(|id| read.contains(id.as_str()))
    })
    .await;
    assert!(frames.contains("\"ann\"") && frames.contains("\"visa\""));
    for s in &secrets {
        assert!(!bodies.contains(s.as_str()), "{s} left in a webhook body");
        assert!(!frames.contains(s.as_str()), "{s} left in a stream frame");
    }
}

/// Every object key and `required` entry of a schema, at any depth.
fn names(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                out.insert(k.clone());
                if k == "required"
                    && let Value::Array(req) = v
                {
                    out.extend(req.iter().filter_map(Value::as_str).map(str::to_owned));
                }
                names(v, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| names(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn published_schemas_name_no_redacted_property_at_any_defs_level() {
    let h = harness().await;
    let key = h.key(&["*"], &[]).await;
    let (status, list) = h.call("GET", "/v1/event-types", Some(&key), None).await;
    assert_eq!(status.as_u16(), 200);
    let schema_of = |ty: &str| -> Value {
        list.as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == ty)
            .unwrap_or_else(|| panic!("{ty} listed"))["schema"]
            .clone()
    };
    for (ty, hidden, shown) in [
        (
            DEFS,
            &["hiddenMailbox", "hiddenPanNumber"][..],
            &["shownName", "shownBrand"][..],
        ),
        // The example: Order.json keeps Address in its own nested `$defs`.
        (
            "afterOrderCreate",
            &["email", "phone"][..],
            &["fullName", "city", "referenceId"][..],
        ),
        (
            "afterOrderUpdate",
            &["email", "phone"][..],
            &["fullName", "city"][..],
        ),
        (ARRAYS, &["email", "pan"][..], &["name", "brand"][..]),
    ] {
        let schema = schema_of(ty);
        let mut found = BTreeSet::new();
        names(&schema, &mut found);
        for name in hidden {
            assert!(
                !found.contains(*name),
                "{ty}: redacted {name} published: {schema}"
            );
        }
        for name in shown {
            assert!(found.contains(*name), "{ty}: {name} kept: {schema}");
        }
        for kw in ["$defs", "definitions", "$ref", "x-evbus-redact"] {
            assert!(!found.contains(kw), "{ty}: {kw} published: {schema}");
        }
    }
    // Not anywhere in the text either: not in `dependentRequired`, `not`, `propertyNames`,
    // examples, defaults or constants (this suite's own schema, whose descriptions do not
    // name them).
    let text = schema_of(DEFS).to_string();
    for hidden in [
        "hiddenMailbox",
        "hiddenPanNumber",
        "ann@example.com",
        "4111",
    ] {
        assert!(!text.contains(hidden), "{DEFS}: {hidden} published: {text}");
    }
    assert!(
        text.contains("shownName") && text.contains("shownBrand"),
        "{text}"
    );
}

/// Every 8-byte window of every string of `values` that `body` contains.
fn quoted<'a>(body: &str, values: &'a [String]) -> Vec<&'a str> {
    let mut out = Vec::new();
    for v in values {
        for w in 0..=v.len().saturating_sub(8) {
            let window = &v[w..(w + 8).min(v.len())];
            if window.len() == 8 && body.contains(window) {
                out.push(window);
            }
        }
    }
    out
}

/// The random values of one case.
#[derive(Debug, Clone)]
struct Request {
    upper: Vec<String>,
    lower: Vec<String>,
}

fn request() -> impl Strategy<Value = Request> {
    (
        prop::collection::vec("[A-Z0-9]{12,40}", 14),
        prop::collection::vec("[a-z][a-z0-9]{9,18}", 6),
    )
        .prop_map(|(upper, lower)| Request { upper, lower })
}

impl Request {
    fn all(&self) -> Vec<String> {
        self.upper.iter().chain(&self.lower).cloned().collect()
    }

    /// Invalid requests to POST /v1/events, each as (content type or binary headers, body).
    fn invalid(&self) -> Vec<(Vec<(String, String)>, String)> {
        let u = &self.upper;
        let l = &self.lower;
        let data = json!({
            "kind": u[0], "mail": u[1], "n": u[2],
            "items": [{"code": u[3], l[0].clone(): u[4]}],
            "map": {l[1].clone(): u[5]},
            "alt": {l[2].clone(): u[6]},
            l[3].clone(): u[7],
        });
        let structured = |event: Value| {
            (
                vec![(
                    "content-type".to_owned(),
                    "application/cloudevents+json".to_owned(),
                )],
                event.to_string(),
            )
        };
        let base = json!({"specversion": "1.0", "id": u[8], "source": format!("/{}", u[9]),
            "type": ERRORS, "subject": u[10], "datacontenttype": "application/json"});
        let with = |k: &str, v: Value| {
            let mut e = base.clone();
            e[k] = v;
            e
        };
        vec![
            // Data breaking every kind of rule, with an extension of random name and value.
            structured({
                let mut e = with("data", data.clone());
                e[l[4].as_str()] = json!(u[11]);
                e
            }),
            // An unknown type, another's type, a bad specversion.
            structured(with("type", json!(u[12]))),
            structured(with("specversion", json!(u[13]))),
            // Malformed attributes and extensions quoting values.
            structured(with("subject", json!({"x": u[10]}))),
            structured(with(&l[5], json!({"x": u[11]}))),
            structured(with(&u[12].to_ascii_lowercase(), json!(u[13]))),
            structured(with("id", json!([u[8]]))),
            (
                vec![("content-type".to_owned(), "application/json".to_owned())],
                data.to_string(),
            ),
            // Binary mode, data breaking the schema.
            (
                vec![
                    ("content-type".to_owned(), "application/json".to_owned()),
                    ("ce-specversion".to_owned(), "1.0".to_owned()),
                    ("ce-id".to_owned(), u[8].clone()),
                    ("ce-source".to_owned(), format!("/{}", u[9])),
                    ("ce-type".to_owned(), ERRORS.to_owned()),
                    (format!("ce-{}", l[4]), u[11].clone()),
                ],
                data.to_string(),
            ),
        ]
    }
}

#[test]
fn error_bodies_of_post_events_quote_no_request_value() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (h, key) = rt.block_on(async {
        let h = harness().await;
        let key = h.key(&["*"], &[ERRORS, "afterOrderCreate"]).await;
        (h, key)
    });
    let mut runner = TestRunner::new(Config {
        cases: 32,
        ..Config::default()
    });
    let statuses = std::sync::Mutex::new(BTreeSet::new());
    runner
        .run(&request(), |req| {
            let values = req.all();
            for (headers, body) in req.invalid() {
                let (status, text) = rt.block_on(async {
                    let mut r = h.http.post(h.url("/v1/events")).bearer_auth(&key);
                    for (k, v) in &headers {
                        r = r.header(k, v);
                    }
                    let resp = r.body(body.clone()).send().await.unwrap();
                    (resp.status().as_u16(), resp.text().await.unwrap())
                });
                prop_assert!((400..500).contains(&status), "{status} {text}");
                statuses.lock().unwrap().insert(status);
                let leaked = quoted(&text, &values);
                prop_assert!(leaked.is_empty(), "{leaked:?} quoted in {status} {text}");
            }
            Ok(())
        })
        .unwrap();
    // The cases reached the decoder (400), the scope check (403), the media type check (415)
    // and the schema (422).
    assert_eq!(
        *statuses.lock().unwrap(),
        BTreeSet::from([400, 403, 415, 422])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_huge_invalid_request_gets_a_small_error_body() {
    let h = harness().await;
    let key = h.key(&[], &[ERRORS]).await;
    // ~320 KB of items breaking two rules each.
    let items: Vec<Value> = (0..13_500)
        .map(|i| json!({"code": format!("C{i:05}"), "x": i}))
        .collect();
    let data = json!({"kind": "a", "items": items});
    assert!(data.to_string().len() > 300_000);
    let (status, body) = h.publish(&key, ERRORS, data).await;
    assert_eq!(status.as_u16(), 422, "{body}");
    let text = body.to_string();
    assert!(text.len() < 16 * 1024, "{} bytes", text.len());
    let listed = body["violations"].as_array().unwrap();
    assert_eq!(listed.len(), evbus_gateway::problem::MAX_VIOLATIONS);
    assert_eq!(body["violations_total"], json!(27_000));
    assert!(
        listed
            .iter()
            .any(|v| v["pointer"] == "/items/0" && v["keyword"] == "additionalProperties"),
        "{text}"
    );
    assert!(!text.contains("C00000"), "{text}");
}

#[cfg(unix)]
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn data_directory_is_0700_and_database_files_0600() {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    let files = |dir: &Path| {
        [
            "gateway.sqlite3",
            "gateway.sqlite3-wal",
            "gateway.sqlite3-shm",
        ]
        .map(|f| dir.join(f))
    };
    // A fresh directory (with a parent to create), a webhook secret written through the API.
    let h = harness().await;
    let key = h.key(&["*"], &[]).await;
    let receiver = Receiver::start(200).await;
    h.register(&key, &receiver.url(), &[ARRAYS]).await;
    for f in files(h.dir.path()) {
        assert!(f.exists(), "{} exists while the store is open", f.display());
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    let root = tempfile::tempdir().unwrap();
    let fresh = root.path().join("a/data");
    let store = evbus_gateway::SqliteStore::open_dir(&fresh).await.unwrap();
    assert_eq!(mode(&fresh), 0o700);
    assert_eq!(mode(&fresh.join("gateway.sqlite3")), 0o600);
    store.close().await;

    // An existing world-readable directory and files are made private on open.
    std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o777)).unwrap();
    let db = fresh.join("gateway.sqlite3");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(mode(&db), 0o644);
    let store = evbus_gateway::SqliteStore::open_dir(&fresh).await.unwrap();
    assert_eq!(mode(&fresh), 0o700);
    let (_, _) = evbus_gateway::create_key(&store, evbus_gateway::KeySpec::new("k"))
        .await
        .unwrap();
    for f in files(&fresh) {
        assert!(f.exists(), "{} exists while the store is open", f.display());
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    store.close().await;
}

/// Item 6, second half: webhook signing secrets sealed at rest with a key kept outside the
/// data directory. Deliveries still verify; the database file holds no clear secret; secrets
/// written in clear before the key are sealed when the store opens with it; a store opened
/// without the key, or with another, refuses to start instead of failing at delivery.
#[tokio::test]
async fn webhook_secrets_are_sealed_at_rest_and_open_only_with_their_key() {
    use evbus_gateway::{SecretsKey, SqliteStore, Store};
    let key = || SecretsKey::from_bytes(&[9u8; 32]).unwrap();
    let holds = |dir: &std::path::Path, needle: &str| {
        ["gateway.sqlite3", "gateway.sqlite3-wal"].iter().any(|f| {
            std::fs::read(dir.join(f))
                .unwrap_or_default()
                .windows(needle.len())
                .any(|w| w == needle.as_bytes())
        })
    };

    // A webhook registered before any key: its secret is in the file, in clear.
    let dir = tempfile::tempdir().unwrap();
    let (id, old_secret) = {
        let store = SqliteStore::open_dir(dir.path()).await.unwrap();
        let h = Harness::with_store(
            Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect()),
            test_config(),
            catalog(),
            tempfile::tempdir().unwrap(),
            store,
        )
        .await;
        let k = h.key(&["*"], &[]).await;
        let receiver = Receiver::start(200).await;
        let registered = h.register(&k, &receiver.url(), &[ARRAYS]).await;
        // One gateway per data directory: this one's dispatcher (which has no secrets key)
        // must not go on claiming the next gateway's deliveries from the same file.
        h.gateway.shutdown().await;
        registered
    };
    assert!(
        holds(dir.path(), &old_secret),
        "the clear secret before sealing"
    );

    // Opened with a key: sealed in place, no clear copy left in the file or its log.
    let store = SqliteStore::open_dir(dir.path())
        .await
        .unwrap()
        .seal_secrets(key())
        .await
        .unwrap();
    assert_eq!(
        store.get_webhook(&id).await.unwrap().unwrap().secret,
        old_secret
    );
    assert!(
        !holds(dir.path(), &old_secret),
        "a clear secret left after sealing"
    );

    // A gateway on the sealed store: new secrets are sealed, deliveries verify.
    let h = Harness::with_store(
        Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect()),
        test_config(),
        catalog(),
        tempfile::tempdir().unwrap(),
        store,
    )
    .await;
    let k = h.key(&["*"], &["*"]).await;
    let mut receiver = Receiver::start(200).await;
    let (new_id, secret) = h.register(&k, &receiver.url(), &[ARRAYS]).await;
    let (status, body) = h.publish(&k, ARRAYS, json!({"customers": []})).await;
    assert_eq!(status.as_u16(), 202, "{body}");
    let delivery = receiver.next().await;
    assert!(
        delivery.verify(&secret),
        "a delivery signed with the sealed secret"
    );
    assert!(!holds(dir.path(), &secret), "a new secret stored in clear");
    let (status, rotated) = h
        .call(
            "POST",
            &format!("/v1/webhooks/{new_id}/rotate-secret"),
            Some(&k),
            None,
        )
        .await;
    assert_eq!(status.as_u16(), 200, "{rotated}");
    let rotated = rotated["secret"].as_str().unwrap().to_owned();
    assert!(
        !holds(dir.path(), &rotated),
        "a rotated secret stored in clear"
    );

    // Without the key, or with another one: refused at start, naming what to do.
    let clear = SqliteStore::open_dir(dir.path()).await.unwrap();
    let e = evbus_gateway::Gateway::start(
        evbus::Bus::new(
            Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect()),
            catalog(),
            "/t",
        ),
        Arc::new(clear),
        test_config(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("EVBUS_SECRETS_KEY"), "{e}");
    let other = SecretsKey::from_bytes(&[1u8; 32]).unwrap();
    let e = SqliteStore::open_dir(dir.path())
        .await
        .unwrap()
        .seal_secrets(other)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("does not open"), "{e}");
}

/// A type whose version 2 redacts `/iban` and allow-lists only `/accountId`, `/iban` and
/// `/note`, where version 1 had no rules; `/v1/event-types` and every outbound path must
/// apply version 2's rules to events that still name version 1.
const RULED: &str = "acctChanged";

fn account_schema(rules: Value) -> Value {
    let mut s = schema(json!({
        "properties": {
            "accountId": {"type": "string"},
            "iban": {"type": "string"},
            "note": {"type": "string"},
            "owner": {"type": "string"},
        },
        "required": ["accountId"],
    }));
    s.as_object_mut()
        .unwrap()
        .extend(rules.as_object().unwrap().clone());
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn rules_added_in_a_new_version_cover_events_of_older_versions() {
    let transport: Arc<dyn evbus::Transport> =
        Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect());
    let mut b = evbus::Catalog::builder();
    b.register_json(RULED, account_schema(json!({}))).unwrap();
    b.register_json(
        RULED,
        account_schema(json!({
            "x-evbus-redact": ["/iban"],
            "x-evbus-allow": ["/accountId", "/iban", "/note"],
        })),
    )
    .unwrap();
    let h = Harness::with_catalog(Arc::clone(&transport), test_config(), b.freeze().unwrap()).await;
    // A producer not upgraded yet: its catalogue knows version 1 only.
    let mut old = evbus::Catalog::builder();
    old.register_json(RULED, account_schema(json!({}))).unwrap();
    let producer = evbus::bus::Bus::new(Arc::clone(&transport), old.freeze().unwrap(), "/old");

    let key = h.key(&[RULED], &[]).await;
    let mut receiver = Receiver::start(200).await;
    h.register(&key, &receiver.url(), &[RULED]).await;
    let mut stream = h
        .http
        .get(h.url(&format!("/v1/stream?types={RULED}")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status().as_u16(), 200);

    let secret = format!("ZIBAN{}", uuid::Uuid::now_v7().simple());
    let owner = format!("ZOWNER{}", uuid::Uuid::now_v7().simple());
    let id = producer
        .send(
            evbus::bus::Emit::new(
                RULED,
                json!({"accountId": "a1", "iban": secret, "note": "n", "owner": owner}),
            )
            .subject("accounts/a1"),
        )
        .await
        .unwrap();

    let r = receiver.next().await;
    assert_eq!(r.id(), id);
    let body = r.json();
    assert_eq!(
        body["dataschema"],
        format!("urn:evbus:schema:{RULED}:1"),
        "the event names version 1"
    );
    assert_eq!(body["data"], json!({"accountId": "a1", "note": "n"}));
    assert!(
        body.get("subject").is_none(),
        "version 2's allow-list drops the subject: {body}"
    );
    let frames = read_stream_until(&mut stream, |read| read.contains(id.as_str())).await;
    for leaked in [&secret, &owner] {
        assert!(
            !r.body.contains(leaked.as_str()),
            "{leaked} left in a webhook body"
        );
        assert!(
            !frames.contains(leaked.as_str()),
            "{leaked} left in a stream frame"
        );
    }
    assert!(
        !frames.contains("accounts/a1"),
        "the subject left in a stream frame"
    );

    // The version history publishes version 1's schema under version 2's rules too.
    let (status, listed) = h.call("GET", "/v1/event-types", Some(&key), None).await;
    assert_eq!(status.as_u16(), 200);
    let ty = listed["types"]
        .as_array()
        .or_else(|| listed.as_array())
        .unwrap()
        .iter()
        .find(|t| t["type"] == RULED)
        .unwrap()
        .clone();
    let versions = ty["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2, "{ty}");
    for v in versions {
        let mut found = BTreeSet::new();
        names(&v["schema"], &mut found);
        assert!(found.contains("accountId"), "{v}");
        for hidden in ["iban", "owner"] {
            assert!(
                !found.contains(hidden),
                "version {} names `{hidden}`: {v}",
                v["version"]
            );
        }
    }
}
