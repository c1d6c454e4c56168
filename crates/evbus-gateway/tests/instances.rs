//! Several gateway instances on one PostgreSQL store (and, where the defect is not specific to
//! sharing, one instance on SQLite): what an owner changes through one instance must hold
//! whatever the instances' dispatchers are doing at that moment.
//!
//! PostgreSQL: the server at `EVBUS_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), each test in a schema of its own (dropped at
//! the end). Without a reachable server the PostgreSQL tests say so loudly and pass, unless
//! CI=true or EVBUS_REQUIRE_BROKERS=1 (then they fail).

mod support;

use std::sync::Arc;

use axum::http::StatusCode;
use evbus::Bus;
use evbus_gateway::{Gateway, GatewayConfig, KeySpec, PostgresStore, Store};
use serde_json::{Value, json};
use support::*;

const ORDERS: &str = "afterOrderCreate";

/// Gateway instances sharing one PostgreSQL schema and one broker, each on its own socket and
/// its own connection pool, as `evbus serve --store postgres://…` on several pods.
struct Instances {
    bases: Vec<String>,
    http: reqwest::Client,
    admin: String,
    gateways: Vec<Arc<Gateway>>,
    store: PostgresStore,
    schema: String,
}

impl Instances {
    /// The first two instances' APIs.
    fn apis(&self) -> [Api; 2] {
        [0, 1].map(|i| Api {
            base: self.bases[i].clone(),
            http: self.http.clone(),
        })
    }

    async fn start(n: usize) -> Option<Instances> {
        Self::start_with(n, holding_config()).await
    }

    /// `n` instances with `config`.
    async fn start_with(n: usize, config: GatewayConfig) -> Option<Instances> {
        if !postgres_reachable().await {
            return None;
        }
        let schema = format!("gwi_{}", uuid::Uuid::now_v7().simple());
        let sep = if postgres_url().contains('?') {
            '&'
        } else {
            '?'
        };
        let url = format!("{}{sep}schema={schema}&max_connections=4", postgres_url());
        let broker = evbus::memory::MemoryBroker::new(Default::default());
        let mut bases = Vec::new();
        let mut gateways = Vec::new();
        let first = PostgresStore::open(&url).await.unwrap();
        for i in 0..n {
            let store = if i == 0 {
                first.clone()
            } else {
                PostgresStore::open(&url).await.unwrap()
            };
            let bus = Bus::new(Arc::new(broker.connect()), catalog(), "/test");
            let gateway = Arc::new(
                Gateway::start(bus, Arc::new(store) as Arc<dyn Store>, config.clone())
                    .await
                    .unwrap(),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            bases.push(format!("http://{}", listener.local_addr().unwrap()));
            let router = gateway.router();
            tokio::spawn(async move { axum::serve(listener, router).await });
            gateways.push(gateway);
        }
        let (_, admin) = evbus_gateway::create_key(&first, KeySpec::new("admin").admin(true))
            .await
            .unwrap();
        Some(Instances {
            bases,
            http: reqwest::Client::new(),
            admin,
            gateways,
            store: first,
            schema,
        })
    }

    async fn finish(self) {
        for g in &self.gateways {
            g.shutdown().await;
        }
        self.store.drop_schema().await.unwrap();
        self.store.close().await;
    }
}

/// A client of the HTTP API of one instance.
#[derive(Clone)]
struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    /// The API of a one-instance harness (SQLite).
    fn of(h: &Harness) -> Api {
        Api {
            base: h.base.clone(),
            http: h.http.clone(),
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let url = format!("{}{path}", self.base);
        request(&self.http, method, &url, Some(key), body).await
    }

    async fn publish(&self, key: &str, data: Value) {
        let id = format!("client-{}", uuid::Uuid::now_v7().simple());
        let resp = self
            .http
            .post(format!("{}/v1/events", self.base))
            .bearer_auth(key)
            .header("content-type", "application/cloudevents+json")
            .body(
                json!({"specversion": "1.0", "id": id, "source": "/external", "type": ORDERS,
                    "datacontenttype": "application/json", "data": data})
                .to_string(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 202);
    }
}

/// Through `deliverer`: a key named `name` publishing and subscribing to orders, and a
/// webhook of it for orders (`webhook`'s members added) on a receiver that holds each request
/// until released. The key, the receiver and the webhook as created.
async fn key_with_held_webhook(
    deliverer: &Api,
    admin: &str,
    name: &str,
    webhook: Value,
) -> (String, HeldReceiver, Value) {
    let (status, created) = deliverer
        .call(
            "POST",
            "/v1/keys",
            admin,
            Some(json!({"name": name, "subscribe": [ORDERS], "publish": [ORDERS], "sources": ["/external"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap().to_owned();
    let receiver = HeldReceiver::start().await;
    let mut body = json!({"url": receiver.url, "event_types": [ORDERS]});
    if let (Some(body), Value::Object(more)) = (body.as_object_mut(), webhook) {
        body.extend(more);
    }
    let (status, hook) = deliverer
        .call("POST", "/v1/webhooks", &key, Some(body))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{hook}");
    (key, receiver, hook)
}

/// Registers a webhook through `deliverer`'s side, then, while its first attempt is held by
/// the receiver, rotates its secret and changes its description through `owner_side`. The
/// attempt then fails: the retry must be signed with the new secret (and the previous one,
/// during the overlap), and the webhook must keep its new description.
async fn a_rotation_during_a_failing_attempt_holds(deliverer: &Api, owner_side: &Api, admin: &str) {
    let (key, mut receiver, hook) =
        key_with_held_webhook(deliverer, admin, "crm", json!({"description": "before"})).await;
    let id = hook["id"].as_str().unwrap().to_owned();
    let old_secret = hook["secret"].as_str().unwrap().to_owned();
    deliverer.publish(&key, order_created()).await;

    let first = receiver.next().await;
    assert!(first.verify(&old_secret));
    // The attempt is in flight: the owner rotates the secret and renames the webhook.
    let (status, rotated) = owner_side
        .call(
            "POST",
            &format!("/v1/webhooks/{id}/rotate-secret"),
            &key,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    let (status, patched) = owner_side
        .call(
            "PATCH",
            &format!("/v1/webhooks/{id}"),
            &key,
            Some(json!({"description": "after"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    receiver.open();

    let retry = receiver.next().await;
    assert_eq!(retry.id(), first.id(), "the same event, retried");
    assert!(
        retry.verify(&new_secret),
        "the retry after a rotation must be signed with the new secret (the failing attempt wrote the old one back)"
    );
    assert!(
        retry.verify(&old_secret),
        "the previous secret still signs during the overlap"
    );
    let (_, now) = owner_side
        .call("GET", &format!("/v1/webhooks/{id}"), &key, None)
        .await;
    assert_eq!(now["description"], "after", "{now}");
    assert!(now["failing_since"].is_string(), "{now}");
}

/// While an attempt is held, the owner disables the webhook through `owner_side`; once that
/// attempt has failed and is logged, the webhook is still disabled, with the owner's reason.
async fn disabling_during_a_failing_attempt_holds(deliverer: &Api, owner_side: &Api, admin: &str) {
    let (key, mut receiver, hook) = key_with_held_webhook(deliverer, admin, "erp", json!({})).await;
    let id = hook["id"].as_str().unwrap().to_owned();
    deliverer.publish(&key, order_created()).await;
    receiver.next().await;
    let (status, patched) = owner_side
        .call(
            "PATCH",
            &format!("/v1/webhooks/{id}"),
            &key,
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["enabled"], false);
    receiver.open();
    // The attempt's outcome is settled with its log row: once the row is there, so is the
    // endpoint's bookkeeping.
    eventually("the held attempt is logged", || async {
        let (_, attempts) = owner_side
            .call("GET", &format!("/v1/webhooks/{id}/attempts"), &key, None)
            .await;
        attempts.as_array().is_some_and(|a| !a.is_empty())
    })
    .await;
    let (_, now) = owner_side
        .call("GET", &format!("/v1/webhooks/{id}"), &key, None)
        .await;
    assert_eq!(
        now["enabled"], false,
        "a failing attempt must not re-enable a webhook its owner disabled meanwhile: {now}"
    );
    assert_eq!(now["disabled_reason"], "disabled by its owner", "{now}");
}

#[tokio::test]
async fn postgres_a_secret_rotated_on_one_instance_during_an_attempt_is_kept() {
    let Some(instances) = Instances::start(2).await else {
        return;
    };
    let [a, b] = instances.apis();
    a_rotation_during_a_failing_attempt_holds(&a, &b, &instances.admin).await;
    instances.finish().await;
}

#[tokio::test]
async fn postgres_a_webhook_disabled_on_one_instance_during_an_attempt_stays_disabled() {
    let Some(instances) = Instances::start(2).await else {
        return;
    };
    let [a, b] = instances.apis();
    disabling_during_a_failing_attempt_holds(&a, &b, &instances.admin).await;
    instances.finish().await;
}

#[tokio::test]
async fn sqlite_a_secret_rotated_during_an_attempt_is_kept() {
    let h = holding_harness().await;
    let api = Api::of(&h);
    a_rotation_during_a_failing_attempt_holds(&api, &api, &h.admin).await;
}

#[tokio::test]
async fn sqlite_a_webhook_disabled_during_an_attempt_stays_disabled() {
    let h = holding_harness().await;
    let api = Api::of(&h);
    disabling_during_a_failing_attempt_holds(&api, &api, &h.admin).await;
}

/// A replay that re-enables a disabled webhook must not write back the webhook as it read it
/// before queueing: a secret rotated meanwhile (here through another instance, while the
/// replay waits for its key's turn) must stay rotated.
#[tokio::test]
async fn postgres_a_secret_rotated_on_one_instance_while_a_replay_waits_is_kept() {
    let Some(instances) = Instances::start(2).await else {
        return;
    };
    let [a, b] = instances.apis();
    let (status, created) = a
        .call(
            "POST",
            "/v1/keys",
            &instances.admin,
            Some(json!({"name": "crm", "subscribe": [ORDERS], "publish": [ORDERS], "sources": ["*"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap().to_owned();
    let owner = created["id"].as_str().unwrap().to_owned();
    let mut receiver = Receiver::start(200).await;
    let (status, hook) = a
        .call(
            "POST",
            "/v1/webhooks",
            &key,
            Some(json!({"url": receiver.url(), "event_types": [ORDERS]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{hook}");
    let id = hook["id"].as_str().unwrap().to_owned();
    let old_secret = hook["secret"].as_str().unwrap().to_owned();
    let (status, _) = a
        .call(
            "PATCH",
            &format!("/v1/webhooks/{id}"),
            &key,
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let since = chrono::Utc::now() - chrono::Duration::minutes(1);
    a.publish(&key, order_created()).await;
    eventually("the event is logged", || async {
        instances.store.latest_seq().await.unwrap() > 0
    })
    .await;

    // Another replay of this key holds the key's turn (the lock the store's replays take).
    let mut holder = <sqlx::PgConnection as sqlx::Connection>::connect(&postgres_url())
        .await
        .unwrap();
    let lock = "hashtext('evbus-gateway replay ' || $1 || ' ' || $2)";
    sqlx::query(&format!("SELECT pg_advisory_lock({lock})"))
        .bind(&instances.schema)
        .bind(&owner)
        .execute(&mut holder)
        .await
        .unwrap();
    let replaying = tokio::spawn({
        let a = a.clone();
        let key = key.clone();
        let id = id.clone();
        async move {
            a.call(
                "POST",
                &format!("/v1/webhooks/{id}/replay"),
                &key,
                Some(json!({"since": since})),
            )
            .await
        }
    });
    // The replay has read the webhook and waits for the turn.
    eventually("the replay waits for its key's turn", || {
        let url = postgres_url();
        let schema = instances.schema.clone();
        let owner = owner.clone();
        async move {
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
                .await
                .unwrap();
            let waiting: i64 = sqlx::query_scalar(&format!(
                "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
                   AND objid::BIGINT = ({lock})::BIGINT & 4294967295"
            ))
            .bind(&schema)
            .bind(&owner)
            .fetch_one(&mut conn)
            .await
            .unwrap();
            let _ = sqlx::Connection::close(conn).await;
            waiting > 0
        }
    })
    .await;
    let (status, rotated) = b
        .call(
            "POST",
            &format!("/v1/webhooks/{id}/rotate-secret"),
            &key,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    sqlx::query(&format!("SELECT pg_advisory_unlock({lock})"))
        .bind(&instances.schema)
        .bind(&owner)
        .execute(&mut holder)
        .await
        .unwrap();
    let (status, replayed) = replaying.await.unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{replayed}");
    assert_eq!(replayed["replayed"], 1, "{replayed}");

    let delivered = receiver.next().await;
    assert!(
        delivered.verify(&new_secret),
        "a replay must not undo a rotation made while it waited (the old secret was written back)"
    );
    assert!(
        delivered.verify(&old_secret),
        "the previous secret signs during the overlap"
    );
    let (_, now) = b
        .call("GET", &format!("/v1/webhooks/{id}"), &key, None)
        .await;
    assert_eq!(now["enabled"], true, "the replay re-enabled it: {now}");
    let _ = sqlx::Connection::close(holder).await;
    instances.finish().await;
}

/// The two admin keys of a deployment revoke each other at the same moment, through two
/// instances: one revocation is refused with 409 (it would revoke the last admin key), so an
/// admin key is left. Both requests are held at the store until both have checked.
#[tokio::test]
async fn postgres_two_admin_keys_revoking_each_other_on_two_instances_leave_one() {
    let Some(instances) = Instances::start(2).await else {
        return;
    };
    let [a, b] = instances.apis();
    let first = instances.admin.clone();
    let first_id = first.split('_').nth(1).unwrap().to_owned();
    let (status, created) = a
        .call(
            "POST",
            "/v1/keys",
            &first,
            Some(json!({"name": "second admin", "admin": true})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let second = created["key"].as_str().unwrap().to_owned();
    let second_id = created["id"].as_str().unwrap().to_owned();

    // Key writes wait (reads go on: both requests authenticate and check) until both
    // revocations are waiting on a lock.
    let mut holder = <sqlx::PgConnection as sqlx::Connection>::connect(&postgres_url())
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query(&format!(
        "LOCK TABLE {}.api_keys IN SHARE MODE",
        instances.schema
    ))
    .execute(&mut holder)
    .await
    .unwrap();
    let revoke = |api: &Api, key: &str, id: &str| {
        let (api, key, path) = (api.clone(), key.to_owned(), format!("/v1/keys/{id}"));
        tokio::spawn(async move { api.call("DELETE", &path, &key, None).await.0 })
    };
    let one = revoke(&a, &first, &second_id);
    let two = revoke(&b, &second, &first_id);
    eventually("both revocations wait on a lock", || async {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&postgres_url())
            .await
            .unwrap();
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'
               AND query ILIKE '%api_keys%'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        let _ = sqlx::Connection::close(conn).await;
        waiting >= 2
    })
    .await;
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    let mut answers = [one.await.unwrap(), two.await.unwrap()];
    answers.sort();
    let keys = instances.store.list_keys().await.unwrap();
    let active_admins = keys
        .iter()
        .filter(|k| k.admin && k.is_active(chrono::Utc::now()))
        .count();
    assert_eq!(
        active_admins, 1,
        "one admin key is left (answers {answers:?}); none would lock every administrator out"
    );
    assert_eq!(answers, [StatusCode::NO_CONTENT, StatusCode::CONFLICT]);
    let _ = sqlx::Connection::close(holder).await;
    instances.finish().await;
}

/// The per-key webhook limit of the concurrent-registration tests, and how many registrations
/// they make at once.
const WEBHOOK_LIMIT: usize = 3;
const REGISTRATIONS: usize = 24;

/// `REGISTRATIONS` webhook registrations for `key` at once, spread over `apis` in turn; their
/// answers, once all are in.
fn register_at_once(
    apis: &[Api],
    key: &str,
    url: &str,
) -> Vec<tokio::task::JoinHandle<(StatusCode, Value)>> {
    (0..REGISTRATIONS)
        .map(|i| {
            let api = apis[i % apis.len()].clone();
            let key = key.to_owned();
            let body =
                json!({"url": url, "event_types": [ORDERS], "description": format!("hook {i}")});
            tokio::spawn(async move { api.call("POST", "/v1/webhooks", &key, Some(body)).await })
        })
        .collect()
}

/// Exactly `WEBHOOK_LIMIT` registrations answered 201, every other one refused with the limit's
/// problem (409 naming the limit), as a registration past the limit is when it comes alone;
/// and the key lists exactly `WEBHOOK_LIMIT` webhooks, those answered 201.
async fn assert_the_limit_held(
    requests: Vec<tokio::task::JoinHandle<(StatusCode, Value)>>,
    lister: &Api,
    key: &str,
) {
    let mut answers = Vec::new();
    for r in requests {
        answers.push(r.await.unwrap());
    }
    let mut created: Vec<String> = answers
        .iter()
        .filter(|(status, _)| *status == StatusCode::CREATED)
        .map(|(_, body)| body["id"].as_str().unwrap().to_owned())
        .collect();
    let (_, listed) = lister.call("GET", "/v1/webhooks", key, None).await;
    let mut listed: Vec<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        (created.len(), listed.len()),
        (WEBHOOK_LIMIT, WEBHOOK_LIMIT),
        "registrations made at once must stay within max_webhooks_per_key ({WEBHOOK_LIMIT}): \
         {} answered 201 and the key holds {}",
        created.len(),
        listed.len()
    );
    created.sort();
    listed.sort();
    assert_eq!(created, listed);
    for (status, problem) in answers.iter().filter(|(s, _)| *s != StatusCode::CREATED) {
        assert_eq!(*status, StatusCode::CONFLICT, "{problem}");
        assert_eq!(problem["status"], 409, "{problem}");
        assert_eq!(problem["limit"], WEBHOOK_LIMIT, "{problem}");
        assert_eq!(
            problem["detail"],
            format!(
                "this key already holds {WEBHOOK_LIMIT} webhooks, the most one key may \
                 (max_webhooks_per_key); delete one before registering another"
            ),
            "{problem}"
        );
    }
}

/// Registrations for one key made at the same moment through two instances on one
/// PostgreSQL stay within `max_webhooks_per_key`. So that they meet in the store whatever
/// their timing, inserts into `webhooks` are held (a SHARE lock on the table, which reads
/// pass) until more registrations than the limit wait in the store; a gateway that counts,
/// then inserts, would then insert every one of them.
#[tokio::test]
async fn postgres_registrations_at_once_on_two_instances_stay_within_the_key_limit() {
    let mut config = holding_config();
    config.max_webhooks_per_key = WEBHOOK_LIMIT;
    let Some(instances) = Instances::start_with(2, config).await else {
        return;
    };
    let apis = instances.apis();
    let (status, created) = apis[0]
        .call(
            "POST",
            "/v1/keys",
            &instances.admin,
            Some(json!({"name": "crm", "subscribe": [ORDERS]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap().to_owned();
    let receiver = Receiver::start(200).await;

    let mut holder = <sqlx::PgConnection as sqlx::Connection>::connect(&postgres_url())
        .await
        .unwrap();
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut holder)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query(&format!(
        "LOCK TABLE {}.webhooks IN SHARE MODE",
        instances.schema
    ))
    .execute(&mut holder)
    .await
    .unwrap();
    let requests = register_at_once(&apis, &key, &receiver.url());
    // Sessions waiting on the holder's lock, or on a session that waits on it, and so on.
    eventually(
        "more registrations than the limit waiting in the store at once (a gateway that lets \
         one registration at a time into the store serialises only its own process: instances \
         in processes of their own would each pass the count)",
        || async {
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&postgres_url())
                .await
                .unwrap();
            let waiting: i64 = sqlx::query_scalar(
                "WITH RECURSIVE waiting (pid) AS (
                   SELECT pid FROM pg_stat_activity WHERE $1 = ANY (pg_blocking_pids(pid))
                   UNION
                   SELECT a.pid FROM pg_stat_activity a JOIN waiting w
                     ON w.pid = ANY (pg_blocking_pids(a.pid))
                 )
                 SELECT COUNT(*) FROM waiting",
            )
            .bind(holder_pid)
            .fetch_one(&mut conn)
            .await
            .unwrap();
            let _ = sqlx::Connection::close(conn).await;
            waiting > WEBHOOK_LIMIT as i64
        },
    )
    .await;
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    assert_the_limit_held(requests, &apis[1], &key).await;
    let _ = sqlx::Connection::close(holder).await;
    instances.finish().await;
}

/// The same on one instance on SQLite: registrations for one key at once stay within
/// `max_webhooks_per_key`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_registrations_at_once_stay_within_the_key_limit() {
    let mut config = holding_config();
    config.max_webhooks_per_key = WEBHOOK_LIMIT;
    let h = Harness::with(
        Arc::new(evbus::memory::MemoryBroker::new(Default::default()).connect()),
        config,
    )
    .await;
    let api = Api::of(&h);
    let key = h.key(&[ORDERS], &[]).await;
    let receiver = Receiver::start(200).await;
    let requests = register_at_once(std::slice::from_ref(&api), &key, &receiver.url());
    assert_the_limit_held(requests, &api, &key).await;
}
