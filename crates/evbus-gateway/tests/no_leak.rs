//! Property: no redacted value appears in any outbound byte — webhook bodies and headers,
//! stream frames, error bodies and logs captured at TRACE — over random payloads: random
//! values in the example shapes, and random structures (nested objects and arrays, with
//! random keys) placed at redacted pointers, outside allow-lists and around them.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Map, Value, json};
use support::*;

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An external type redacting an object member, a deep member and an array element.
const REDACTED: &str = "leakRedact";
/// An external type with an allow-list and a redacted pointer under it.
const ALLOWED: &str = "leakAllow";

/// The example catalogue plus the two types above (open payloads, one enum to break).
fn catalog_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["events", "definitions"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
        for entry in std::fs::read_dir(schemas().join(sub)).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.path().join(sub).join(path.file_name().unwrap())).unwrap();
        }
    }
    let write = |name: &str, extra: Value| {
        let mut schema = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "description": "Test type of the no-leak property.",
            "x-evbus-external": true,
            "type": "object",
            "properties": {"kind": {"enum": ["a", "b"]}},
            "required": ["kind"]
        });
        schema
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let path = Path::new("events").join(format!("{name}.json"));
        std::fs::write(dir.path().join(path), schema.to_string()).unwrap();
    };
    write(
        REDACTED,
        json!({"x-evbus-redact": ["/secret", "/nested/deep/secret", "/list/0"]}),
    );
    write(
        ALLOWED,
        json!({"x-evbus-allow": ["/kind", "/public", "/nested/open"], "x-evbus-redact": ["/public/hidden"]}),
    );
    dir
}

/// A secret string: `S` + 16 random characters, found nowhere else by chance.
fn marker() -> impl Strategy<Value = String> {
    "[A-Z0-9]{16}".prop_map(|s| format!("S{s}"))
}

/// Any JSON structure whose strings and object keys are all secret markers.
fn secret_tree() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        4 => marker().prop_map(Value::String),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => Just(Value::Null),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[A-Z0-9]{16}".prop_map(|s| format!("K{s}")), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Any JSON structure of public values (lowercase strings and keys, numbers, booleans).
fn public_tree() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        "[a-z]{0,8}".prop_map(Value::String),
        any::<i32>().prop_map(Value::from),
        any::<bool>().prop_map(Value::Bool),
        Just(Value::Null),
    ];
    leaf.prop_recursive(3, 16, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            public_map(inner).prop_map(Value::Object),
        ]
    })
}

fn public_map(values: impl Strategy<Value = Value>) -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map("[a-z]{1,6}", values, 0..3)
        .prop_map(|m: BTreeMap<String, Value>| m.into_iter().collect())
}

/// Every secret marker in `value`: strings and object keys.
fn markers(value: &Value, out: &mut Vec<String>) {
    let is_marker = |s: &str| s.len() == 17 && (s.starts_with('S') || s.starts_with('K'));
    match value {
        Value::String(s) if is_marker(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| markers(v, out)),
        Value::Object(map) => {
            for (k, v) in map {
                if is_marker(k) {
                    out.push(k.clone());
                }
                markers(v, out);
            }
        }
        _ => {}
    }
}

/// The random structures of one case.
#[derive(Debug, Clone)]
struct Shapes {
    top: Map<String, Value>,
    secret: Value,
    deep_secret: Value,
    deep_public: Map<String, Value>,
    list_secret: Value,
    list_public: Vec<Value>,
    open: Value,
    hidden: Value,
    outside: BTreeMap<String, Value>,
    bad_kind: Value,
}

fn shapes() -> impl Strategy<Value = Shapes> {
    (
        public_map(public_tree()),
        secret_tree(),
        secret_tree(),
        public_map(public_tree()),
        secret_tree(),
        prop::collection::vec(public_tree(), 0..3),
        public_tree(),
        secret_tree(),
        prop::collection::btree_map("x[a-z]{1,5}", secret_tree(), 1..3),
        secret_tree(),
    )
        .prop_map(
            |(
                top,
                secret,
                deep_secret,
                deep_public,
                list_secret,
                list_public,
                open,
                hidden,
                outside,
                bad_kind,
            )| Shapes {
                top,
                secret,
                deep_secret,
                deep_public,
                list_secret,
                list_public,
                open,
                hidden,
                outside,
                bad_kind,
            },
        )
}

impl Shapes {
    /// A `leakRedact` payload: secrets at the three redacted pointers, public data around.
    fn redacted(&self) -> Value {
        let mut deep = self.deep_public.clone();
        deep.insert("secret".into(), self.secret_at_deep());
        let mut list = vec![self.list_secret.clone()];
        list.extend(self.list_public.iter().cloned());
        let mut top = self.top.clone();
        top.insert("kind".into(), json!("a"));
        top.insert("secret".into(), self.secret.clone());
        top.insert("nested".into(), json!({"deep": deep, "public": self.open}));
        top.insert("list".into(), Value::Array(list));
        Value::Object(top)
    }

    fn secret_at_deep(&self) -> Value {
        self.deep_secret.clone()
    }

    /// A `leakAllow` payload: secrets outside the allow-list and at the redacted pointer
    /// under it.
    fn allowed(&self) -> Value {
        let mut public = self.deep_public.clone();
        public.insert("hidden".into(), self.hidden.clone());
        let mut top: Map<String, Value> = self.outside.clone().into_iter().collect();
        top.insert("kind".into(), json!("b"));
        top.insert("public".into(), Value::Object(public));
        top.insert(
            "nested".into(),
            json!({"open": self.open, "closed": self.secret}),
        );
        Value::Object(top)
    }

    fn secrets(&self) -> Vec<String> {
        let mut out = Vec::new();
        for v in [
            &self.secret,
            &self.deep_secret,
            &self.list_secret,
            &self.hidden,
            &self.bad_kind,
        ] {
            markers(v, &mut out);
        }
        self.outside.values().for_each(|v| markers(v, &mut out));
        out
    }
}

#[test]
fn no_redacted_value_appears_in_any_outbound_byte() {
    let logs = Logs::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let schemas = catalog_dir();
    let types = ["afterOrderCreate", "afterProductUpdate", REDACTED, ALLOWED];
    let (h, receiver, key, stream) = rt.block_on(async {
        let catalog = evbus::Catalog::from_dir(schemas.path()).unwrap();
        // Every case publishes through one key as fast as the machine runs: the per-key rate
        // limit (tested in rate_limits.rs) would answer 429 on a fast machine, not the
        // statuses this test reads the bodies of.
        let mut config = test_config();
        config.rate_limit_per_second = 100_000;
        config.rate_limit_burst = 100_000;
        let h = Harness::with_catalog(
            Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect()),
            config,
            catalog,
        )
        .await;
        let receiver = Receiver::start(200).await;
        let key = h.key(&["*"], &["*"]).await;
        h.register(&key, &receiver.url(), &types).await;
        let stream = h
            .http
            .get(h.url(&format!("/v1/stream?types={}", types.join(","))))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(stream.status().as_u16(), 200);
        (h, receiver, key, stream)
    });
    let receiver = tokio::sync::Mutex::new(receiver);
    let stream = tokio::sync::Mutex::new((stream, String::new()));
    let outbound = Mutex::new(String::new());
    let checked = Mutex::new(0usize);

    let fixed = (
        "[a-z]{14,20}",
        "[A-Z0-9]{14,20}",
        "[a-z]{14,20}",
        -1000i64..1000,
        proptest::bool::ANY,
    );
    let mut runner = TestRunner::new(Config {
        cases: 24,
        ..Config::default()
    });
    runner
        .run(&(fixed, shapes()), |((local, phone, cost, price, visible), shapes)| {
            let email = format!("{local}@example.com");
            let phone = format!("P{phone}");
            let cost_note = format!("C{cost}");
            let mut secrets = vec![email.clone(), phone.clone(), cost_note.clone()];
            secrets.extend(shapes.secrets());
            let mut received: Vec<Value> = Vec::new();
            rt.block_on(async {
                let mut order = order_created();
                order["order"]["email"] = json!(email);
                order["order"]["shippingAddress"]["phone"] = json!(phone);
                order["order"]["totals"]["total"] = json!(price.abs());
                let product = json!({"productId": "p1", "product": {"_id": "p1", "shopId": "s", "title": "T", "isVisible": visible,
                    "description": cost_note, "variants": [{"_id": "v", "price": 1, "costPrice": price.abs()}]}});
                // Through the bus and through POST /v1/events, the example shapes and the
                // random ones.
                let mut ids = vec![
                    h.bus.emit("afterOrderCreate", order.clone()).await.unwrap(),
                    h.bus.emit(REDACTED, shapes.redacted()).await.unwrap(),
                ];
                for (ty, data) in [("afterProductUpdate", product.clone()), (ALLOWED, shapes.allowed()), (REDACTED, shapes.redacted())] {
                    let (s, posted) = h.publish(&key, ty, data).await;
                    assert_eq!(s.as_u16(), 202, "{posted}");
                    ids.push(posted["id"].as_str().unwrap().to_owned());
                }
                // Error bodies: invalid payloads carrying the values.
                let mut bad = order.clone();
                bad["order"]["email"] = json!(format!("not an email {email}"));
                bad["order"]["status"] = json!(phone);
                let (_, problem) = h.publish(&key, "afterOrderCreate", bad).await;
                outbound.lock().unwrap().push_str(&problem.to_string());
                for (ty, mut data) in [(REDACTED, shapes.redacted()), (ALLOWED, shapes.allowed())] {
                    data["kind"] = shapes.bad_kind.clone();
                    let (s, problem) = h.publish(&key, ty, data).await;
                    assert_eq!(s.as_u16(), 422, "{problem}");
                    outbound.lock().unwrap().push_str(&problem.to_string());
                }
                let (_, problem) = h.call("POST", "/v1/webhooks", Some(&key), Some(json!({"url": format!("http://{email}/"), "event_types": [phone]}))).await;
                outbound.lock().unwrap().push_str(&problem.to_string());
                // Webhook bodies and headers.
                let mut rx = receiver.lock().await;
                let mut got = Vec::new();
                while got.len() < ids.len() {
                    let r = rx.next().await;
                    got.push(r.id().to_owned());
                    received.push(r.json());
                    let mut out = outbound.lock().unwrap();
                    out.push_str(&r.body);
                    for (k, v) in &r.headers {
                        out.push_str(k.as_str());
                        out.push_str(v.to_str().unwrap_or(""));
                    }
                }
                for id in &ids {
                    assert!(got.contains(id), "{id} delivered");
                }
                // Stream frames.
                let mut guard = stream.lock().await;
                let (resp, buf) = &mut *guard;
                tokio::time::timeout(WAIT, async {
                    while !ids.iter().all(|id| buf.contains(id.as_str())) {
                        let chunk = resp.chunk().await.unwrap().unwrap();
                        buf.push_str(&String::from_utf8_lossy(&chunk));
                    }
                })
                .await
                .expect("frames in time");
                outbound.lock().unwrap().push_str(buf);
            });
            let out = outbound.lock().unwrap();
            let log = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
            for secret in &secrets {
                prop_assert!(!out.contains(secret.as_str()), "{secret} left in an HTTP body or header");
                prop_assert!(!log.contains(secret.as_str()), "{secret} left in the log");
            }
            *checked.lock().unwrap() += secrets.len();
            // Curation kept what it allows.
            prop_assert!(out.contains("\"isVisible\""));
            let data = |ty: &str| -> Vec<Value> {
                received.iter().filter(|e| e["type"] == ty).map(|e| e["data"].clone()).collect()
            };
            for d in data(REDACTED) {
                prop_assert_eq!(&d["kind"], "a");
                prop_assert_eq!(&d["nested"]["public"], &shapes.open);
                prop_assert!(d.get("secret").is_none() && d["nested"]["deep"].get("secret").is_none());
                // The redacted element is nulled in place; the others keep their positions.
                let mut list = vec![Value::Null];
                list.extend(shapes.list_public.iter().cloned());
                prop_assert_eq!(&d["list"], &Value::Array(list));
            }
            for d in data(ALLOWED) {
                prop_assert_eq!(&d["kind"], "b");
                prop_assert_eq!(&d["nested"], &json!({"open": shapes.open}));
                let mut public = shapes.deep_public.clone();
                public.remove("hidden");
                prop_assert_eq!(&d["public"], &Value::Object(public));
                prop_assert_eq!(d.as_object().map(Map::len), Some(3));
            }
            Ok(())
        })
        .unwrap();
    assert!(*checked.lock().unwrap() > 200, "markers were checked");
    assert!(!logs.0.lock().unwrap().is_empty(), "the log was captured");
}
