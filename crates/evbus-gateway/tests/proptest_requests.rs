//! Property tests of every request body and header the gateway reads (issue 18): generated
//! bodies for each route that takes one (`POST /v1/events` structured and binary,
//! `POST /v1/webhooks`, `PATCH /v1/webhooks/{id}`, `POST /v1/webhooks/{id}/replay`,
//! `POST /v1/keys`), generated path ids, query strings and headers (`Authorization`,
//! `Content-Type`, `ce-*`, `Last-Event-ID`, any other) on every route, and the inputs of the
//! webhook signature verifier offered to receivers.
//!
//! Every answer must come within [`BOUND`], never be a 5xx, be a status the OpenAPI document
//! lists for the operation, and, when it is an error, be an RFC 9457 problem (the
//! documented `application/problem+json` shape with the same status). The gateway must still
//! answer afterwards.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use evbus_gateway::{HostResolver, OutboundPolicy};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Value, json};
use support::*;

/// Longest acceptable wait for any answer (the gateway's own request deadline is 30 s).
const BOUND: Duration = Duration::from_secs(10);
/// Cases per property.
const CASES: u32 = 96;

/// Resolves `localhost` names to loopback and refuses every other name at once: no DNS
/// lookups of generated host names.
struct LocalOnly;

#[async_trait::async_trait]
impl HostResolver for LocalOnly {
    async fn lookup(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        if host == "localhost" || host.ends_with(".localhost") {
            Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))])
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not resolved in tests",
            ))
        }
    }
}

/// A gateway on the memory transport and a SQLite store in a temporary directory, with
/// keys and a webhook to aim requests at.
struct Fixture {
    rt: tokio::runtime::Runtime,
    h: Harness,
    /// May publish and subscribe to every type.
    key: String,
    /// No scope at all.
    bare: String,
    /// A webhook of `key`.
    webhook: String,
    /// The OpenAPI document the gateway serves.
    doc: Value,
    /// The statuses answered since the last [`Fixture::run`].
    seen: std::sync::Mutex<BTreeSet<u16>>,
}

/// Who sends a request.
#[derive(Clone, Copy, Debug)]
enum Who {
    Admin,
    Key,
    Bare,
    /// No `Authorization` header from the fixture (the case may set its own).
    Nobody,
}

/// What a request got.
struct Answer {
    status: u16,
    body: String,
}

impl Fixture {
    fn new() -> Fixture {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let (h, key, bare, webhook, doc) = rt.block_on(async {
            let mut config = test_config();
            // The properties send hundreds of requests per key: the limiter is not under test.
            config.rate_limit_per_second = 1_000_000;
            config.rate_limit_burst = 1_000_000;
            // Streams a case opened and dropped are noticed (and their slots freed) quickly.
            config.stream_keepalive = Duration::from_millis(100);
            config.outbound = OutboundPolicy::new(vec!["127.0.0.0/8".parse().unwrap()])
                .with_resolver(Arc::new(LocalOnly));
            let h = Harness::with(
                Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect()),
                config,
            )
            .await;
            let key = h.key(&["*"], &["*"]).await;
            let bare = h.key(&[], &[]).await;
            // Port 9 (discard) is closed on loopback: deliveries fail fast.
            let (webhook, _) = h
                .register(&key, "http://127.0.0.1:9/hook", &["afterOrderCreate"])
                .await;
            let (status, doc) = h.call("GET", "/v1/openapi.json", None, None).await;
            assert_eq!(status.as_u16(), 200);
            (h, key, bare, webhook, doc)
        });
        Fixture {
            rt,
            h,
            key,
            bare,
            webhook,
            doc,
            seen: Default::default(),
        }
    }

    fn key_of(&self, who: Who) -> Option<&str> {
        match who {
            Who::Admin => Some(&self.h.admin),
            Who::Key => Some(&self.key),
            Who::Bare => Some(&self.bare),
            Who::Nobody => None,
        }
    }

    /// The statuses the OpenAPI document lists for `method` on `route`.
    fn documented(&self, method: &str, route: &str) -> BTreeSet<u16> {
        self.doc["paths"][route][method.to_ascii_lowercase()]["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{method} {route} is not in the OpenAPI document"))
            .keys()
            .map(|k| k.parse().unwrap())
            .collect()
    }

    /// Sends one request (bounded by [`BOUND`]) and checks the answer against the document.
    /// A `200` stream is not read: its status is the answer.
    fn send(
        &self,
        method: &str,
        route: &str,
        path: &str,
        who: Who,
        headers: &[(HeaderName, HeaderValue)],
        body: Option<Vec<u8>>,
    ) -> Result<Answer, TestCaseError> {
        let answer = self.rt.block_on(async {
            let mut req = self
                .h
                .http
                .request(method.parse().unwrap(), self.h.url(path));
            if let Some(k) = self.key_of(who) {
                req = req.bearer_auth(k);
            }
            let mut map = HeaderMap::new();
            for (name, value) in headers {
                map.append(name.clone(), value.clone());
            }
            req = req.headers(map);
            if let Some(b) = body {
                req = req.body(b);
            }
            tokio::time::timeout(BOUND, async {
                let resp = req.send().await?;
                let status = resp.status().as_u16();
                let problem = resp
                    .headers()
                    .get("content-type")
                    .is_some_and(|v| v.as_bytes() == b"application/problem+json");
                let challenge = resp.headers().get("www-authenticate").cloned();
                let is_stream = resp
                    .headers()
                    .get("content-type")
                    .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
                let body = if is_stream {
                    String::new()
                } else {
                    resp.text().await?
                };
                Ok::<_, reqwest::Error>((status, problem, challenge, body))
            })
            .await
        });
        let (status, problem, challenge, body) = match answer {
            Err(_) => {
                return Err(TestCaseError::fail(format!(
                    "{method} {path}: no answer within {BOUND:?}"
                )));
            }
            Ok(Err(e)) => {
                return Err(TestCaseError::fail(format!(
                    "{method} {path}: the connection failed (a panic in the gateway?): {e}"
                )));
            }
            Ok(Ok(a)) => a,
        };
        self.seen.lock().unwrap().insert(status);
        prop_assert!(status < 500, "{method} {path}: {status} {body}");
        let documented = self.documented(method, route);
        prop_assert!(
            documented.contains(&status),
            "{method} {route}: {status} is not documented ({documented:?}): {body}"
        );
        if status >= 400 {
            prop_assert!(
                problem,
                "{method} {path}: {status} is not a problem: {body}"
            );
            let p: Value = serde_json::from_str(&body).map_err(|e| {
                TestCaseError::fail(format!("{status} body not JSON ({e}): {body}"))
            })?;
            prop_assert_eq!(&p["status"], &json!(status), "{}", body);
            prop_assert!(p["title"].is_string(), "{body}");
            prop_assert!(p["detail"].is_string(), "{body}");
            prop_assert!(p["type"].is_string(), "{body}");
            if status == 401 {
                prop_assert_eq!(challenge, Some(HeaderValue::from_static("Bearer")));
            }
        }
        Ok(Answer { status, body })
    }

    /// The gateway still answers: health, and an authenticated read.
    fn still_alive(&self) {
        self.rt.block_on(async {
            let (status, body) = self.h.call("GET", "/healthz", None, None).await;
            assert_eq!(status.as_u16(), 200, "{body}");
            let (status, body) = self
                .h
                .call("GET", "/v1/event-types", Some(&self.key), None)
                .await;
            assert_eq!(status.as_u16(), 200, "{body}");
            assert_eq!(body.as_array().map(Vec::len), Some(3), "{body}");
        });
    }

    /// Runs the property over [`CASES`] cases, checks that the gateway still answers, and
    /// returns the statuses the cases got (so that a test can check its cases reached the
    /// checks it aims at).
    fn run<S: Strategy>(
        &self,
        strategy: S,
        test: impl Fn(S::Value) -> Result<(), TestCaseError>,
    ) -> BTreeSet<u16>
    where
        S::Value: std::fmt::Debug,
    {
        self.seen.lock().unwrap().clear();
        let mut runner = TestRunner::new(Config {
            cases: CASES,
            // No source file to keep failing cases beside: the failure message has the case.
            failure_persistence: None,
            ..Config::default()
        });
        runner.run(&strategy, test).unwrap();
        let seen = std::mem::take(&mut *self.seen.lock().unwrap());
        eprintln!("statuses seen: {seen:?}");
        self.still_alive();
        seen
    }
}

// ---- Strategies ----------------------------------------------------------------------------

/// Any JSON value: big and small numbers, any text, nested arrays and objects.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        "[a-zA-Z0-9_./*-]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            proptest::collection::btree_map("[a-z_]{0,10}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Arbitrary bytes, JSON-ish fragments glued at random, or text cut from a JSON document.
fn raw_body() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"{".to_vec()),
        Just(b"}".to_vec()),
        Just(b"[".to_vec()),
        Just(b"]".to_vec()),
        Just(b"\"".to_vec()),
        Just(b"\\ud800".to_vec()),
        Just(b",".to_vec()),
        Just(b":".to_vec()),
        Just(b"null".to_vec()),
        Just(b"1e400".to_vec()),
        Just(b"123456789012345678901234567890".to_vec()),
        Just(b"\"url\":\"http://127.0.0.1:9/\",".to_vec()),
        Just(b"\"event_types\":[\"afterOrderCreate\"],".to_vec()),
        Just(b"\"specversion\":\"1.0\",".to_vec()),
        Just(b"\"since\":\"2026-01-01T00:00:00Z\"".to_vec()),
        Just(b"\"name\":\"n\"".to_vec()),
        Just("\u{feff}".as_bytes().to_vec()),
        Just(vec![0xff, 0xfe]),
        Just(vec![0]),
        "[a-z0-9 ]{1,8}".prop_map(String::into_bytes),
    ];
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        proptest::collection::vec(piece, 0..48).prop_map(|p| p.concat()),
        (json_value(), any::<prop::sample::Index>()).prop_map(|(v, at)| {
            let text = v.to_string().into_bytes();
            text[..at.index(text.len() + 1)].to_vec()
        }),
        // Nesting far past the parser's limit.
        (1usize..5000).prop_map(|n| "[".repeat(n).into_bytes()),
        (1usize..300)
            .prop_map(|n| format!("{}{}", "{\"a\":".repeat(n), "}".repeat(n)).into_bytes()),
    ]
}

/// A JSON object of `members` (each present or not) and maybe one unknown member.
fn object_members(members: Vec<(&'static str, BoxedStrategy<Value>)>) -> BoxedStrategy<Value> {
    let fields: Vec<BoxedStrategy<Option<(&'static str, Value)>>> = members
        .into_iter()
        .map(|(name, s)| proptest::option::weighted(0.85, s.prop_map(move |v| (name, v))).boxed())
        .collect();
    (
        fields,
        proptest::option::weighted(0.15, ("[a-z_]{0,12}", json_value())),
    )
        .prop_map(|(fields, extra)| {
            let mut map = serde_json::Map::new();
            for (name, value) in fields.into_iter().flatten() {
                map.insert(name.to_owned(), value);
            }
            if let Some((name, value)) = extra {
                map.insert(name, value);
            }
            Value::Object(map)
        })
        .boxed()
}

/// A JSON object of `members` (each present or not) and maybe one unknown member, or a raw
/// body.
fn object_body(members: Vec<(&'static str, BoxedStrategy<Value>)>) -> BoxedStrategy<Vec<u8>> {
    let object = object_members(members).prop_map(|v| v.to_string().into_bytes());
    prop_oneof![3 => object, 1 => raw_body()].boxed()
}

/// `valid` (a JSON object the route accepts) with at most one change: a member removed, one
/// replaced by a value of its strategy in `members`, or an unknown member added.
fn one_change(
    valid: Value,
    members: Vec<(&'static str, BoxedStrategy<Value>)>,
) -> BoxedStrategy<Vec<u8>> {
    let n = members.len();
    let members = std::rc::Rc::new(members);
    (0..4usize, 0..n)
        .prop_flat_map(move |(change, at)| {
            let value = members[at].1.clone();
            (Just(change), Just(members[at].0), value, "[a-z_]{0,12}")
        })
        .prop_map(move |(change, name, value, unknown)| {
            let mut body = valid.clone();
            let map = body.as_object_mut().unwrap();
            match change {
                0 => {}
                1 => {
                    map.remove(name);
                }
                2 => {
                    map.insert(name.to_owned(), value);
                }
                _ => {
                    map.insert(unknown, value);
                }
            }
            body.to_string().into_bytes()
        })
        .boxed()
}

/// Bodies for a route: `valid` with one change, or members each present or not and any
/// value of their strategies (or raw bytes).
fn bodies(
    valid: Value,
    members: Vec<(&'static str, BoxedStrategy<Value>)>,
) -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        1 => one_change(valid, members.clone()),
        1 => object_body(members),
    ]
    .boxed()
}

/// Event type names: external, internal, unknown, patterns, garbage.
fn type_name() -> BoxedStrategy<String> {
    prop_oneof![
        Just("afterOrderCreate".to_owned()),
        Just("afterOrderUpdate".to_owned()),
        Just("afterProductUpdate".to_owned()),
        Just("afterOrderCancel".to_owned()),
        Just("afterCartUpdate".to_owned()),
        Just("*".to_owned()),
        "[a-zA-Z*.]{0,12}",
        any::<String>(),
    ]
    .boxed()
}

fn type_list() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => proptest::collection::vec(type_name(), 0..4).prop_map(|v| json!(v)),
        1 => proptest::collection::vec(Just("afterOrderCreate".to_owned()), 49..53).prop_map(|v| json!(v)),
        1 => json_value(),
    ]
    .boxed()
}

/// RFC 3339 times, in range and out of it, and strings that are almost times.
fn time_value() -> BoxedStrategy<Value> {
    prop_oneof![
        Just(json!("2026-01-01T00:00:00Z")),
        Just(json!("1970-01-01T00:00:00Z")),
        Just(json!("0000-01-01T00:00:00Z")),
        Just(json!("9999-12-31T23:59:59.999999999Z")),
        Just(json!("+262142-12-31T23:59:59Z")),
        Just(json!("-262143-01-01T00:00:00Z")),
        Just(json!("2026-12-31T23:59:60Z")),
        Just(json!("2026-02-30T00:00:00Z")),
        Just(json!("2026-01-01T00:00:00+23:59")),
        Just(json!("2026-01-01T00:00:00-23:59")),
        Just(json!("2026-01-01 00:00:00")),
        Just(json!("2026-01-01")),
        Just(json!(null)),
        "[0-9]{1,6}-[0-9]{1,2}-[0-9]{1,2}T[0-9]{1,2}:[0-9]{1,2}:[0-9]{1,2}(\\.[0-9]{1,12})?(Z|[+-][0-9]{2}:[0-9]{2})"
            .prop_map(Value::from),
        json_value(),
    ]
    .boxed()
}

/// Bytes a header value may hold (visible ASCII, space, tab, obs-text), any length.
fn header_value() -> impl Strategy<Value = HeaderValue> {
    let byte = prop_oneof![
        8 => 0x20u8..=0x7e,
        1 => Just(b'\t'),
        2 => 0x80u8..=0xff,
    ];
    prop_oneof![
        8 => proptest::collection::vec(byte.clone(), 0..48),
        1 => proptest::collection::vec(byte, 1000..4000),
    ]
    .prop_map(|b| HeaderValue::from_bytes(&b).expect("valid header bytes"))
}

fn text_header(value: &'static str) -> HeaderValue {
    HeaderValue::from_static(value)
}

/// `Content-Type` values, ordinary and not.
fn content_type() -> BoxedStrategy<Option<HeaderValue>> {
    prop_oneof![
        Just(None),
        Just(Some(text_header("application/cloudevents+json"))),
        Just(Some(text_header(
            "APPLICATION/CloudEvents+JSON; charset=utf-8"
        ))),
        Just(Some(text_header(
            "application/cloudevents+json;charset=latin1"
        ))),
        Just(Some(text_header("application/cloudevents-batch+json"))),
        Just(Some(text_header("application/json"))),
        Just(Some(text_header("application/json; charset=utf-16"))),
        Just(Some(text_header("text/plain"))),
        Just(Some(text_header("multipart/form-data; boundary=x"))),
        Just(Some(text_header(""))),
        header_value().prop_map(Some),
    ]
    .boxed()
}

/// A path segment: arbitrary bytes, percent-encoded (never empty). Not `.` or `..`: URLs
/// treat them (`%2E`, `%2E%2E` too) as dot segments and remove them, so no client can send
/// them as an id; the request would reach another route (`POST /v1/webhooks/%2E/replay` is
/// `POST /v1/webhooks/replay`).
fn path_id() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => proptest::collection::vec(any::<u8>(), 1..48),
        1 => proptest::collection::vec(any::<u8>(), 2000..6000),
        2 => "[a-z0-9_]{1,40}".prop_map(String::into_bytes),
    ]
    .prop_filter("a dot segment is not an id a URL can carry", |bytes| {
        bytes.as_slice() != b"." && bytes.as_slice() != b".."
    })
    .prop_map(|bytes| percent(&bytes))
}

fn percent(bytes: &[u8]) -> String {
    let mut out = String::new();
    for b in bytes {
        if b.is_ascii_alphanumeric() || b"-_~".contains(b) {
            out.push(char::from(*b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn who() -> impl Strategy<Value = Who> {
    prop_oneof![
        1 => Just(Who::Admin),
        4 => Just(Who::Key),
        1 => Just(Who::Bare),
    ]
}

// ---- POST /v1/events -----------------------------------------------------------------------

/// A structured CloudEvent: the attributes and the data each valid, absent or any JSON value,
/// sometimes an extension.
fn structured_event() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        1 => random_event(),
        1 => one_change_event(),
    ]
    .boxed()
}

/// A valid event (an external type, an internal one or an unknown one; a fresh id, or one
/// of a few reused ids), then at most one change: an attribute removed, replaced by any
/// value, or an extension of any name and value added.
fn one_change_event() -> BoxedStrategy<Vec<u8>> {
    let attributes = [
        "specversion",
        "id",
        "source",
        "type",
        "datacontenttype",
        "time",
        "subject",
        "partitionkey",
        "data",
        "data_base64",
        "dataschema",
    ];
    (
        prop_oneof![
            3 => Just("afterOrderCreate"),
            1 => Just("afterOrderUpdate"),
            1 => Just("afterCartUpdate"),
            1 => Just("nope"),
        ],
        prop_oneof!["[a-z0-9]{12}", "r[0-3]"],
        prop_oneof![1 => Just(order_created()), 1 => order_created_like()],
        prop_oneof![2 => Just(0usize), 3 => 1..4usize],
        proptest::sample::select(attributes.to_vec()),
        prop_oneof!["[a-z0-9]{1,25}", ".{0,12}"],
        json_value(),
    )
        .prop_map(|(ty, id, data, change, attribute, extension, value)| {
            let mut event = json!({
                "specversion": "1.0", "id": id, "source": "/props", "type": ty,
                "datacontenttype": "application/json", "data": data,
            });
            match change {
                0 => {}
                1 => {
                    event.as_object_mut().unwrap().remove(attribute);
                }
                2 => event[attribute] = value,
                _ => event[extension] = value,
            }
            event.to_string().into_bytes()
        })
        .boxed()
}

/// Every attribute valid, absent or any value at once.
fn random_event() -> BoxedStrategy<Vec<u8>> {
    let string_or_any = |valid: BoxedStrategy<String>| {
        prop_oneof![4 => valid.prop_map(Value::from), 1 => json_value()].boxed()
    };
    object_body(vec![
        ("specversion", string_or_any(Just("1.0".to_owned()).boxed())),
        ("id", string_or_any("[a-zA-Z0-9-]{1,20}|.{0,300}".boxed())),
        ("source", string_or_any("/[a-z]{0,8}|.{0,40}".boxed())),
        ("type", string_or_any(type_name())),
        (
            "datacontenttype",
            string_or_any(
                prop_oneof![
                    Just("application/json".to_owned()),
                    Just("text/plain".to_owned()),
                    Just("application/cloudevents+json".to_owned()),
                    ".{0,20}",
                ]
                .boxed(),
            ),
        ),
        ("time", time_value()),
        ("subject", string_or_any(".{0,20}".boxed())),
        ("partitionkey", string_or_any(".{0,20}".boxed())),
        (
            "data",
            prop_oneof![order_created_like(), json_value()].boxed(),
        ),
        (
            "data_base64",
            string_or_any("[A-Za-z0-9+/=%]{0,40}".boxed()),
        ),
    ])
}

/// The example `afterOrderCreate` payload, or it with one member replaced by any value.
fn order_created_like() -> BoxedStrategy<Value> {
    (json_value(), 0..4usize)
        .prop_map(|(value, at)| {
            let mut data = order_created();
            match at {
                0 => {}
                1 => data["createdBy"] = value,
                2 => data["order"]["items"] = value,
                _ => data["order"]["totals"] = value,
            }
            data
        })
        .boxed()
}

#[test]
fn structured_events_of_any_shape_get_a_documented_answer() {
    let fx = Fixture::new();
    let content_type = prop_oneof![
        3 => Just(Some(text_header("application/cloudevents+json"))),
        1 => content_type(),
    ];
    let seen = fx.run(
        (structured_event(), content_type, who()),
        |(body, ct, who)| {
            let headers: Vec<_> = ct
                .into_iter()
                .map(|v| (reqwest::header::CONTENT_TYPE, v))
                .collect();
            fx.send(
                "POST",
                "/v1/events",
                "/v1/events",
                who,
                &headers,
                Some(body),
            )?;
            Ok(())
        },
    );
    // The cases reached the decoder, the scope check, the media type check and the schema
    // (and, most runs, acceptance and the idempotency check: 202, 409).
    for expected in [400, 403, 415, 422] {
        assert!(seen.contains(&expected), "{seen:?}");
    }
}

/// A binary-mode event: `ce-*` headers valid, absent or any bytes, more `ce-*` headers of
/// any name, any `Content-Type`, any body.
fn binary_event() -> impl Strategy<Value = (Vec<(HeaderName, HeaderValue)>, Vec<u8>)> {
    let attribute = |valid: BoxedStrategy<String>| {
        proptest::option::weighted(
            0.9,
            prop_oneof![
                4 => valid.prop_map(|s| HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static("x"))),
                1 => header_value(),
            ],
        )
    };
    let extra_name = prop_oneof![
        "ce-[a-z0-9]{0,24}",
        "ce-[a-z0-9!#$%&'*+.^_`|~-]{0,30}",
        "ce_[a-z]{0,8}",
        Just("ce-".to_owned()),
        Just("ce-data".to_owned()),
        Just("ce-data_base64".to_owned()),
        Just("ce-datacontenttype".to_owned()),
        Just("ce-time".to_owned()),
    ];
    (
        attribute(Just("1.0".to_owned()).boxed()),
        attribute("[a-zA-Z0-9-]{1,20}".boxed()),
        attribute("/[a-z]{0,8}".boxed()),
        attribute(type_name()),
        proptest::collection::vec((extra_name, header_value()), 0..6),
        content_type(),
        prop_oneof![
            3 => order_created_like().prop_map(|v| v.to_string().into_bytes()),
            2 => raw_body(),
        ],
    )
        .prop_map(|(spec, id, source, ty, extra, ct, body)| {
            let mut headers = Vec::new();
            for (name, value) in [
                ("ce-specversion", spec),
                ("ce-id", id),
                ("ce-source", source),
                ("ce-type", ty),
            ] {
                if let Some(v) = value {
                    headers.push((HeaderName::from_static(name), v));
                }
            }
            for (name, value) in extra {
                if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                    headers.push((name, value));
                }
            }
            if let Some(ct) = ct {
                headers.push((reqwest::header::CONTENT_TYPE, ct));
            }
            (headers, body)
        })
}

#[test]
fn binary_mode_events_of_any_headers_get_a_documented_answer() {
    let fx = Fixture::new();
    let seen = fx.run((binary_event(), who()), |((headers, body), who)| {
        fx.send(
            "POST",
            "/v1/events",
            "/v1/events",
            who,
            &headers,
            Some(body),
        )?;
        Ok(())
    });
    for expected in [400, 415] {
        assert!(seen.contains(&expected), "{seen:?}");
    }
}

// ---- Webhooks ------------------------------------------------------------------------------

fn webhook_url() -> BoxedStrategy<Value> {
    prop_oneof![
        1 => Just(json!("http://127.0.0.1:9/hook")),
        2 => prop_oneof![
        Just(json!("http://localhost:9/hook")),
        Just(json!("http://example.invalid/hook")),
        Just(json!("http://10.0.0.1/hook")),
        Just(json!("http://[::1]:9/hook")),
        Just(json!("http://[::ffff:169.254.169.254]/")),
        Just(json!("http://user:pw@127.0.0.1:9/")),
        Just(json!("ftp://127.0.0.1/")),
        Just(json!("http://127.0.0.1:99999/")),
        Just(json!("http:///hook")),
        Just(json!("/relative")),
        "http://127\\.0\\.0\\.1:9/.{0,40}".prop_map(Value::from),
        "https?://[a-z0-9.%\\[\\]:@-]{0,30}/?.{0,10}".prop_map(Value::from),
        json_value(),
        ],
    ]
    .boxed()
}

fn description() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => ".{0,40}".prop_map(Value::from),
        1 => proptest::collection::vec(any::<char>(), 990..1010).prop_map(|c| Value::from(c.into_iter().collect::<String>())),
        1 => json_value(),
    ]
    .boxed()
}

#[test]
fn webhook_registrations_of_any_body_get_a_documented_answer() {
    let fx = Fixture::new();
    let allow = prop_oneof![
        3 => proptest::collection::vec(prop_oneof![Just("/order/_id".to_owned()), "/?[a-z/~01]{0,12}", ".{0,12}"], 0..4).prop_map(|v| json!(v)),
        1 => proptest::collection::vec(Just("/a".to_owned()), 99..102).prop_map(|v| json!(v)),
        1 => json_value(),
    ]
    .boxed();
    let body = prop_oneof![
        // A valid registration but for its URL, where most refusals are.
        1 => webhook_url().prop_map(|url| json!({"url": url, "event_types": ["afterOrderCreate"]}).to_string().into_bytes()),
        2 => bodies(
            json!({"url": "http://127.0.0.1:9/hook", "event_types": ["afterOrderCreate"], "description": "d", "allow": ["/order/_id"]}),
            vec![
                ("url", webhook_url()),
                ("event_types", type_list()),
                ("description", description()),
                ("allow", allow),
            ],
        ),
    ];
    let seen = fx.run((body, content_type(), who()), |(body, ct, who)| {
        let headers: Vec<_> = ct
            .into_iter()
            .map(|v| (reqwest::header::CONTENT_TYPE, v))
            .collect();
        let a = fx.send(
            "POST",
            "/v1/webhooks",
            "/v1/webhooks",
            who,
            &headers,
            Some(body),
        )?;
        if a.status == 201 {
            // Keep the key under its webhook limit, so that later cases reach the checks.
            let id = serde_json::from_str::<Value>(&a.body).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned();
            let path = format!("/v1/webhooks/{id}");
            fx.send("DELETE", "/v1/webhooks/{id}", &path, Who::Admin, &[], None)?;
        }
        Ok(())
    });
    for expected in [201, 400, 403, 422] {
        assert!(seen.contains(&expected), "{expected} not in {seen:?}");
    }
}

#[test]
fn webhook_changes_of_any_body_get_a_documented_answer() {
    let fx = Fixture::new();
    let body = bodies(
        json!({"event_types": ["afterOrderCreate", "afterOrderUpdate"], "description": "d", "enabled": true}),
        vec![
            ("event_types", type_list()),
            ("description", description()),
            (
                "enabled",
                prop_oneof![3 => any::<bool>().prop_map(Value::from), 1 => json_value()].boxed(),
            ),
        ],
    );
    let id = prop_oneof![3 => Just(None), 1 => path_id().prop_map(Some)];
    let seen = fx.run((body, id, who()), |(body, id, who)| {
        let path = format!(
            "/v1/webhooks/{}",
            id.as_deref().unwrap_or(fx.webhook.as_str())
        );
        fx.send("PATCH", "/v1/webhooks/{id}", &path, who, &[], Some(body))?;
        Ok(())
    });
    for expected in [200, 400, 403, 404] {
        assert!(seen.contains(&expected), "{expected} not in {seen:?}");
    }
    // The webhook is still there, with a valid view.
    let path = format!("/v1/webhooks/{}", fx.webhook);
    let (status, body) = fx.rt.block_on(fx.h.call("GET", &path, Some(&fx.key), None));
    assert_eq!(status.as_u16(), 200, "{body}");
    assert!(body["event_types"].is_array(), "{body}");
}

#[test]
fn replays_of_any_body_get_a_documented_answer() {
    let fx = Fixture::new();
    let body = bodies(
        json!({"since": "2026-01-01T00:00:00Z"}),
        vec![("since", time_value())],
    );
    let id = prop_oneof![3 => Just(None), 1 => path_id().prop_map(Some)];
    let seen = fx.run((body, id, who()), |(body, id, who)| {
        let path = format!(
            "/v1/webhooks/{}/replay",
            id.as_deref().unwrap_or(fx.webhook.as_str())
        );
        fx.send(
            "POST",
            "/v1/webhooks/{id}/replay",
            &path,
            who,
            &[],
            Some(body),
        )?;
        Ok(())
    });
    for expected in [202, 400, 404] {
        assert!(seen.contains(&expected), "{expected} not in {seen:?}");
    }
}

/// Every route that takes a path id, with any id (percent-encoded bytes, long ones).
#[test]
fn any_path_id_gets_a_documented_answer() {
    let fx = Fixture::new();
    let routes = prop_oneof![
        Just(("GET", "/v1/webhooks/{id}", "")),
        Just(("DELETE", "/v1/webhooks/{id}", "")),
        Just(("PATCH", "/v1/webhooks/{id}", "")),
        Just(("POST", "/v1/webhooks/{id}/rotate-secret", "/rotate-secret")),
        Just(("GET", "/v1/webhooks/{id}/attempts", "/attempts")),
        Just(("POST", "/v1/webhooks/{id}/replay", "/replay")),
        Just(("DELETE", "/v1/keys/{id}", "")),
    ];
    fx.run(
        (routes, path_id(), who()),
        |((method, route, tail), id, who)| {
            let prefix = route.split("/{id}").next().unwrap();
            let path = format!("{prefix}/{id}{tail}");
            let body = matches!(method, "PATCH" | "POST").then(|| b"{}".to_vec());
            fx.send(method, route, &path, who, &[], body)?;
            Ok(())
        },
    );
}

// ---- Keys ----------------------------------------------------------------------------------

/// A key's own rate limit: numbers in range, at the edges, past them, of the wrong type.
fn rate_limit() -> BoxedStrategy<Value> {
    let number = prop_oneof![
        3 => (1u64..1000).prop_map(Value::from),
        1 => Just(json!(0)),
        1 => Just(json!(-1)),
        1 => Just(json!(1.5)),
        1 => Just(json!(u64::MAX)),
        1 => Just(json!(u64::from(u32::MAX) + 1)),
        1 => Just(json!(1e300)),
        1 => Just(json!("10")),
        1 => Just(Value::Null),
        1 => any::<u64>().prop_map(Value::from),
    ];
    prop_oneof![
        3 => object_members(vec![("per_second", number.clone().boxed()), ("burst", number.boxed())]),
        1 => Just(Value::Null),
        1 => json_value(),
    ]
    .boxed()
}

#[test]
fn key_creations_of_any_body_get_a_documented_answer() {
    let fx = Fixture::new();
    let scopes = prop_oneof![
        3 => proptest::collection::vec(prop_oneof![type_name(), Just("afterOrder*".to_owned()), "[A-Za-z0-9._*-]{190,210}"], 0..4).prop_map(|v| json!(v)),
        1 => json_value(),
    ]
    .boxed();
    let body = bodies(
        json!({"name": "k", "subscribe": ["afterOrder*"], "publish": ["afterOrderCreate"], "sources": ["/crm", "https://crm.example/*"], "admin": false, "expires_at": "2999-01-01T00:00:00Z", "rate_limit": {"per_second": 10, "burst": 20}}),
        vec![
        (
            "name",
            prop_oneof![
                3 => ".{0,30}".prop_map(Value::from),
                1 => Just(json!(" \t\r\n")),
                1 => proptest::collection::vec(any::<char>(), 195..205).prop_map(|c| Value::from(c.into_iter().collect::<String>())),
                1 => json_value(),
            ]
            .boxed(),
        ),
        ("subscribe", scopes.clone()),
        ("publish", scopes),
        (
            "sources",
            prop_oneof![
                3 => proptest::collection::vec(prop_oneof![".{0,40}", Just("*".to_owned()), ".{2040,2060}"], 0..3).prop_map(|v| json!(v)),
                1 => json_value(),
            ]
            .boxed(),
        ),
        (
            "admin",
            prop_oneof![3 => Just(json!(false)), 1 => json_value()].boxed(),
        ),
        ("expires_at", time_value()),
        ("rate_limit", rate_limit()),
    ],
    );
    let who = prop_oneof![4 => Just(Who::Admin), 1 => Just(Who::Key)];
    let seen = fx.run((body, content_type(), who), |(body, ct, who)| {
        let headers: Vec<_> = ct
            .into_iter()
            .map(|v| (reqwest::header::CONTENT_TYPE, v))
            .collect();
        fx.send("POST", "/v1/keys", "/v1/keys", who, &headers, Some(body))?;
        Ok(())
    });
    for expected in [201, 400, 403] {
        assert!(seen.contains(&expected), "{expected} not in {seen:?}");
    }
    // Every key created is listed with a valid view.
    let (status, body) = fx
        .rt
        .block_on(fx.h.call("GET", "/v1/keys", Some(&fx.h.admin), None));
    assert_eq!(status.as_u16(), 200, "{body}");
    assert!(
        body.as_array().is_some_and(|keys| keys.len() >= 3),
        "{body}"
    );
}

// ---- Streams -------------------------------------------------------------------------------

#[test]
fn streams_with_any_query_and_last_event_id_get_a_documented_answer() {
    let fx = Fixture::new();
    let types = proptest::option::of(prop_oneof![
        proptest::collection::vec(type_name(), 0..4).prop_map(|v| v.join(",")),
        ".{0,40}",
    ]);
    let last_query = proptest::option::weighted(0.3, prop_oneof!["[0-9a-f]{24}", ".{0,30}"]);
    let last_header = proptest::option::weighted(
        0.5,
        prop_oneof![
            "[0-9a-fA-F]{24}".prop_map(|s| HeaderValue::from_str(&s).unwrap()),
            header_value(),
        ],
    );
    let raw_query = proptest::option::weighted(0.1, ".{0,40}");
    let who = prop_oneof![4 => Just(Who::Key), 1 => Just(Who::Bare), 1 => Just(Who::Admin)];
    let seen = fx.run(
        (types, last_query, last_header, raw_query, who),
        |(types, last_query, last_header, raw_query, who)| {
            let mut query = Vec::new();
            if let Some(t) = types {
                query.push(format!("types={}", percent(t.as_bytes())));
            }
            if let Some(l) = last_query {
                query.push(format!("last_event_id={}", percent(l.as_bytes())));
            }
            if let Some(raw) = raw_query {
                // Unencoded, as a careless client sends it (reqwest encodes what it must).
                query.push(raw);
            }
            let path = if query.is_empty() {
                "/v1/stream".to_owned()
            } else {
                format!("/v1/stream?{}", query.join("&"))
            };
            let headers: Vec<_> = last_header
                .into_iter()
                .map(|v| (HeaderName::from_static("last-event-id"), v))
                .collect();
            fx.send("GET", "/v1/stream", &path, who, &headers, None)?;
            Ok(())
        },
    );
    for expected in [200, 400, 403] {
        assert!(seen.contains(&expected), "{expected} not in {seen:?}");
    }
}

// ---- Any header, any route -----------------------------------------------------------------

/// Every authenticated operation, with a body it accepts when it takes one.
const OPERATIONS: [(&str, &str); 13] = [
    ("POST", "/v1/events"),
    ("GET", "/v1/event-types"),
    ("GET", "/v1/stream"),
    ("POST", "/v1/webhooks"),
    ("GET", "/v1/webhooks"),
    ("GET", "/v1/webhooks/{id}"),
    ("PATCH", "/v1/webhooks/{id}"),
    ("POST", "/v1/webhooks/{id}/rotate-secret"),
    ("GET", "/v1/webhooks/{id}/attempts"),
    ("POST", "/v1/webhooks/{id}/replay"),
    ("POST", "/v1/keys"),
    ("GET", "/v1/keys"),
    ("GET", "/metrics"),
];

/// An operation ready to send: method, route, path, body, headers.
type Operation = (
    &'static str,
    &'static str,
    String,
    Option<Vec<u8>>,
    Vec<(HeaderName, HeaderValue)>,
);

impl Fixture {
    /// Operation `i` of [`OPERATIONS`] on the fixture's webhook, with a body it accepts and
    /// the `Content-Type` that body needs (first, so a generated one comes after it).
    fn operation(&self, i: usize) -> Operation {
        let (method, route) = OPERATIONS[i];
        let path = route.replace("{id}", &self.webhook);
        let body = match route {
            "/v1/events" => Some(
                json!({"specversion": "1.0", "id": format!("h-{}", uuid::Uuid::now_v7().simple()), "source": "/headers", "type": "afterOrderCreate", "datacontenttype": "application/json", "data": order_created()})
                    .to_string(),
            ),
            "/v1/webhooks" => Some(
                json!({"url": "http://127.0.0.1:9/other", "event_types": ["afterOrderUpdate"]})
                    .to_string(),
            ),
            "/v1/webhooks/{id}" if method == "PATCH" => {
                Some(json!({"description": "changed"}).to_string())
            }
            "/v1/webhooks/{id}/replay" => Some(json!({"since": "2026-01-01T00:00:00Z"}).to_string()),
            "/v1/keys" if method == "POST" => Some(json!({"name": "from headers"}).to_string()),
            _ => None,
        };
        let headers = if route == "/v1/events" {
            vec![(
                reqwest::header::CONTENT_TYPE,
                text_header("application/cloudevents+json"),
            )]
        } else {
            Vec::new()
        };
        (method, route, path, body.map(String::into_bytes), headers)
    }
}

/// `Authorization` values: no header, other schemes, `Bearer` with garbage, and a real key
/// changed in one place, cut short or lengthened.
fn authorization(real: String) -> impl Strategy<Value = Option<HeaderValue>> {
    let real2 = real.clone();
    prop_oneof![
        Just(None),
        header_value().prop_map(Some),
        header_value().prop_map(|v| {
            let mut b = b"Bearer ".to_vec();
            b.extend_from_slice(v.as_bytes());
            Some(HeaderValue::from_bytes(&b).unwrap())
        }),
        Just(Some(text_header("Bearer"))),
        Just(Some(text_header("Bearer "))),
        Just(Some(text_header("Basic YWxhZGRpbjpvcGVuc2VzYW1l"))),
        "evb_[0-9a-f]{16}_[0-9a-f]{64}"
            .prop_map(|k| Some(HeaderValue::from_str(&format!("Bearer {k}")).unwrap())),
        (any::<prop::sample::Index>(), "[0-9a-zA-Z_]").prop_filter_map(
            "a change",
            move |(at, c)| {
                let at = at.index(real.len());
                let mut k = real.clone();
                k.replace_range(at..at + 1, &c);
                (k != real).then(|| Some(HeaderValue::from_str(&format!("Bearer {k}")).unwrap()))
            }
        ),
        (any::<prop::sample::Index>(), "[a-zA-Z0-9_]{0,4}").prop_map(move |(at, tail)| {
            let mut k = real2[..at.index(real2.len())].to_owned();
            if !tail.is_empty() {
                k = format!("{real2}{tail}");
            }
            HeaderValue::from_bytes(format!("Bearer {k}").as_bytes()).ok()
        }),
    ]
}

#[test]
fn any_authorization_on_any_operation_is_401_unless_it_is_a_key() {
    let fx = Fixture::new();
    fx.run(
        (0..OPERATIONS.len(), authorization(fx.key.clone())),
        |(i, auth)| {
            let (method, route, path, body, mut headers) = fx.operation(i);
            headers.extend(auth.map(|v| (reqwest::header::AUTHORIZATION, v)));
            let a = fx.send(method, route, &path, Who::Nobody, &headers, body)?;
            prop_assert_eq!(a.status, 401, "{} {}: {}", method, path, a.body);
            Ok(())
        },
    );
}

/// Headers of any name a client might send (and some it should not), with any value.
fn extra_headers() -> impl Strategy<Value = Vec<(HeaderName, HeaderValue)>> {
    let name = prop_oneof![
        Just("accept"),
        Just("accept-encoding"),
        Just("accept-language"),
        Just("content-type"),
        Just("content-encoding"),
        Just("cookie"),
        Just("origin"),
        Just("forwarded"),
        Just("x-forwarded-for"),
        Just("x-forwarded-proto"),
        Just("user-agent"),
        Just("idempotency-key"),
        Just("last-event-id"),
        Just("if-none-match"),
        Just("range"),
        Just("ce-specversion"),
        Just("ce-id"),
        Just("ce-type"),
        Just("ce-traceparent"),
        Just("traceparent"),
        Just("tracestate"),
        Just("webhook-id"),
        Just("webhook-timestamp"),
        Just("webhook-signature"),
        Just("x-evbus-key"),
    ];
    proptest::collection::vec((name, header_value()), 0..8).prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(n, v)| (HeaderName::from_static(n), v))
            .collect()
    })
}

#[test]
fn any_other_header_on_any_operation_gets_a_documented_answer() {
    let fx = Fixture::new();
    fx.run(
        (0..OPERATIONS.len(), extra_headers(), who()),
        |(i, extra, who)| {
            let (method, route, path, body, mut headers) = fx.operation(i);
            headers.extend(extra);
            let a = fx.send(method, route, &path, who, &headers, body)?;
            if route == "/v1/webhooks" && method == "POST" && a.status == 201 {
                let id = serde_json::from_str::<Value>(&a.body).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                let path = format!("/v1/webhooks/{id}");
                fx.send("DELETE", "/v1/webhooks/{id}", &path, Who::Admin, &[], None)?;
            }
            Ok(())
        },
    );
}

// ---- Webhook signatures, as a receiver verifies them ---------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// `signing::verify_at` takes what a receiver got from the network: any header, id,
    /// timestamp, body and configured secret give `false`, never a panic; a header holding the
    /// right signature among garbage gives `true` when checked at the signing time, `false`
    /// an hour later.
    #[test]
    fn signature_verification_of_any_input_never_panics(
        secret in prop_oneof![
            Just(evbus_gateway::signing::generate_secret()),
            "whsec_[A-Za-z0-9+/=]{0,60}",
            ".{0,40}",
        ],
        id in ".{0,40}",
        timestamp in any::<i64>(),
        body in proptest::collection::vec(any::<u8>(), 0..256),
        garbage in proptest::collection::vec(
            prop_oneof![
                "v1,[A-Za-z0-9+/=]{0,60}",
                "v[0-9],.{0,20}",
                ".{0,30}",
                Just(String::new()),
            ],
            0..4,
        ),
        real_at in any::<prop::sample::Index>(),
    ) {
        use evbus_gateway::signing;
        let header = garbage.join(" ");
        let _ = signing::secret_bytes(&secret);
        // Garbage verifies only if it happens to hold the signature (it cannot, in practice).
        let signed = signing::sign(&secret, &id, timestamp, &body);
        if signed.as_deref().is_none_or(|s| !garbage.iter().any(|g| g == s)) {
            prop_assert!(!signing::verify_at(&secret, &id, timestamp, &body, &header, timestamp));
        }
        if let Some(sig) = signed {
            let mut parts = garbage.clone();
            parts.insert(real_at.index(parts.len() + 1), sig);
            let header = parts.join(" ");
            prop_assert!(signing::verify_at(&secret, &id, timestamp, &body, &header, timestamp));
            prop_assert!(!signing::verify_at(&secret, &id, timestamp.wrapping_add(1), &body, &header, timestamp));
            if let Some(later) = timestamp.checked_add(3600) {
                prop_assert!(!signing::verify_at(&secret, &id, timestamp, &body, &header, later));
            }
            // Any input, any clock: no panic.
            let _ = signing::verify(&secret, &id, timestamp, &body, &header);
        }
    }
}
