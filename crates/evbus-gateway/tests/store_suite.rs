//! The store suite: the same cases against every [`Store`] (the embedded SQLite store and the
//! PostgreSQL store), the way the conformance suite runs against every transport.
//!
//! PostgreSQL: the server at `EVBUS_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), each test in a schema of its own (dropped at
//! the end). Without a reachable server each PostgreSQL test says so loudly and passes,
//! unless CI=true or EVBUS_REQUIRE_BROKERS=1 (then it fails).

mod support;

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use evbus_gateway::store::{
    Attempt, Delivery, DeliveryOutcome, Ingested, NewEvent, PUBLISH_CLAIM_LEASE, PublishClaim,
    ReplayBudget, ReplayLimits, Revocation, Signal, Store,
};
use evbus_gateway::{
    KeyRecord, PostgresStore, RateLimit, SecretsKey, SqliteStore, WebhookChange, WebhookRecord,
};
use support::{postgres_reachable, postgres_url};

fn unique_schema() -> String {
    // 36 characters: within the 40 a schema name may have.
    format!("gwt_{}", uuid::Uuid::now_v7().simple())
}

fn with_params(url: &str, params: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{params}")
}

/// Two handles on one store (two instances sharing it), cleaned up by [`Fixture::finish`].
struct Fixture {
    store: Arc<dyn Store>,
    other: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
    pg: Option<PostgresStore>,
    /// How the store is reopened (another instance, or with a secrets key).
    reopen: Reopen,
}

#[derive(Clone)]
enum Reopen {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Reopen {
    async fn open(&self, key: Option<SecretsKey>) -> Result<Arc<dyn Store>, String> {
        match self {
            Reopen::Sqlite(dir) => {
                let s = SqliteStore::open_dir(dir)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(match key {
                    Some(k) => Arc::new(s.seal_secrets(k).await.map_err(|e| e.to_string())?),
                    None => Arc::new(s),
                })
            }
            Reopen::Postgres(url) => {
                let s = PostgresStore::open(url).await.map_err(|e| e.to_string())?;
                Ok(match key {
                    Some(k) => Arc::new(s.seal_secrets(k).await.map_err(|e| e.to_string())?),
                    None => Arc::new(s),
                })
            }
        }
    }
}

impl Fixture {
    async fn sqlite() -> Option<Fixture> {
        let dir = tempfile::tempdir().unwrap();
        let reopen = Reopen::Sqlite(dir.path().to_owned());
        let store = reopen.open(None).await.unwrap();
        let other = reopen.open(None).await.unwrap();
        Some(Fixture {
            store,
            other,
            _dir: Some(dir),
            pg: None,
            reopen,
        })
    }

    async fn postgres() -> Option<Fixture> {
        let url = with_params(
            &postgres_url(),
            &format!("schema={}&max_connections=4", unique_schema()),
        );
        // Reachable? (Anything else failing afterwards is a failure, never a skip.)
        if !postgres_reachable().await {
            return None;
        }
        let first = PostgresStore::open(&url).await.unwrap();
        let reopen = Reopen::Postgres(url);
        let other = reopen.open(None).await.unwrap();
        Some(Fixture {
            store: Arc::new(first.clone()),
            other,
            _dir: None,
            pg: Some(first),
            reopen,
        })
    }

    async fn finish(self) {
        if let Some(pg) = &self.pg {
            pg.drop_schema().await.unwrap();
            pg.close().await;
        }
    }
}

/// Millisecond times (what both stores keep).
fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap()
}

fn key(id: &str) -> KeyRecord {
    KeyRecord {
        id: id.to_owned(),
        name: format!("key {id}"),
        secret_hash: vec![1, 2, 3, id.len() as u8],
        subscribe: vec!["afterOrder*".into(), "afterProductUpdate".into()],
        publish: vec!["afterOrderCreate".into()],
        sources: vec!["/shop".into(), "https://shop.example/a,b/*".into()],
        admin: false,
        created_at: now(),
        expires_at: None,
        revoked_at: None,
        rate_limit: None,
        publish_bytes_per_second: Some(3 * 1024 * 1024),
    }
}

fn webhook(id: &str, owner: &str, types: &[&str]) -> WebhookRecord {
    WebhookRecord {
        id: id.to_owned(),
        owner_key_id: owner.to_owned(),
        url: format!("https://example.com/{id}"),
        event_types: types.iter().map(|t| t.to_string()).collect(),
        description: "a hook".into(),
        allow: None,
        secret: format!("whsec_{id}"),
        previous_secret: None,
        previous_secret_until: None,
        enabled: true,
        disabled_reason: None,
        failing_since: None,
        created_at: now(),
    }
}

async fn ingest(store: &dyn Store, id: &str, ty: &str, at: DateTime<Utc>) -> Ingested {
    store
        .ingest(&NewEvent {
            source: "/suite",
            id,
            ty,
            fingerprint: &format!("fp-{id}"),
            received_at: at,
            body: &format!(r#"{{"id":"{id}","type":"{ty}"}}"#),
        })
        .await
        .unwrap()
}

/// Replay limits of `per_replay` events per replay, and budgets that never run out.
fn unbudgeted(per_replay: u32) -> ReplayLimits {
    ReplayLimits {
        per_replay,
        per_webhook: u64::MAX,
        per_key: u64::MAX,
        window: Duration::hours(24),
    }
}

/// Replays without budgets (at most `max`); how many were queued.
async fn replay(
    store: &dyn Store,
    webhook_id: &str,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
    max: u32,
) -> u64 {
    store
        .replay(webhook_id, since, now, &unbudgeted(max))
        .await
        .unwrap()
        .queued
}

fn logged(i: Ingested) -> i64 {
    match i {
        Ingested::Logged(seq) => seq,
        other => panic!("expected Logged, got {other:?}"),
    }
}

const ORDER: &str = "afterOrderCreate";
const PRODUCT: &str = "afterProductUpdate";

// ---- cases ---------------------------------------------------------------------------------

async fn keys_and_revocation(f: &Fixture) {
    let s = &*f.store;
    let mut k = key("k1");
    k.admin = true;
    k.expires_at = Some(now() + Duration::hours(1));
    s.insert_key(&k).await.unwrap();
    s.insert_key(&key("k2")).await.unwrap();
    assert_eq!(s.get_key("k1").await.unwrap().as_ref(), Some(&k));
    assert_eq!(s.get_key("nope").await.unwrap(), None);
    let ids: Vec<String> = s
        .list_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&"k1".to_owned()) && ids.contains(&"k2".to_owned()));
    // A duplicate id is refused.
    assert!(s.insert_key(&key("k1")).await.is_err());
    // A key's own rate limit is kept (a key without one keeps none: the gateway's default).
    assert_eq!(s.get_key("k2").await.unwrap().unwrap().rate_limit, None);
    let mut limited = key("k3");
    limited.rate_limit = Some(RateLimit::new(5, 7).unwrap());
    s.insert_key(&limited).await.unwrap();
    assert_eq!(
        f.other.get_key("k3").await.unwrap().as_ref(),
        Some(&limited)
    );
    let listed = s.list_keys().await.unwrap();
    let by_id = |id: &str| listed.iter().find(|k| k.id == id).unwrap().rate_limit;
    assert_eq!(by_id("k3"), Some(RateLimit::new(5, 7).unwrap()));
    assert_eq!(by_id("k1"), None);

    assert_eq!(s.revoked_keys().await.unwrap(), 0);
    let at = now();
    assert!(s.revoke_key("k2", at).await.unwrap());
    assert!(!s.revoke_key("k2", at).await.unwrap(), "revoked twice");
    assert!(!s.revoke_key("nope", at).await.unwrap());
    assert_eq!(s.revoked_keys().await.unwrap(), 1);
    // Another instance sees the revocation at its next read (no cache in the store).
    let seen = f.other.get_key("k2").await.unwrap().unwrap();
    assert_eq!(seen.revoked_at, Some(at));
    assert!(!seen.is_active(now()));
    assert!(
        f.other
            .get_key("k1")
            .await
            .unwrap()
            .unwrap()
            .is_active(now())
    );
}

async fn webhooks_crud(f: &Fixture) {
    let s = &*f.store;
    let mut w = webhook("wh_a", "k1", &[ORDER, PRODUCT]);
    w.allow = Some(vec!["/order/id".into()]);
    w.description = "with a NUL \0 inside".into();
    s.insert_webhook(&w).await.unwrap();
    s.insert_webhook(&webhook("wh_b", "k2", &[ORDER]))
        .await
        .unwrap();
    let got = s.get_webhook("wh_a").await.unwrap().unwrap();
    assert_eq!(got.event_types, w.event_types);
    assert_eq!(got.allow, w.allow);
    assert_eq!(got.secret, w.secret);
    assert_eq!(got.created_at, w.created_at);
    assert!(got.description.starts_with("with a NUL"));
    assert_eq!(s.list_webhooks(None).await.unwrap().len(), 2);
    let mine = s.list_webhooks(Some("k1")).await.unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].id, "wh_a");

    let mut changed = got.clone();
    changed.previous_secret = Some(std::mem::replace(&mut changed.secret, "whsec_new".into()));
    changed.previous_secret_until = Some(now() + Duration::hours(24));
    changed.enabled = false;
    changed.disabled_reason = Some("the endpoint answered 410 Gone".into());
    changed.failing_since = Some(now());
    changed.event_types = vec![PRODUCT.to_owned()];
    changed.description = "edited".into();
    changed.allow = None;
    s.update_webhook(&changed).await.unwrap();
    let seen = f.other.get_webhook("wh_a").await.unwrap().unwrap();
    assert_eq!(seen.secret, "whsec_new");
    assert_eq!(seen.previous_secret.as_deref(), Some("whsec_wh_a"));
    assert_eq!(seen.previous_secret_until, changed.previous_secret_until);
    assert!(!seen.enabled);
    assert_eq!(seen.disabled_reason, changed.disabled_reason);
    assert_eq!(seen.failing_since, changed.failing_since);
    assert_eq!(seen.event_types, vec![PRODUCT.to_owned()]);
    assert_eq!(seen.description, "edited");
    assert_eq!(seen.allow, None);
    assert_eq!(
        (seen.url.as_str(), seen.owner_key_id.as_str()),
        (w.url.as_str(), "k1")
    );

    // Deleting drops its pending deliveries.
    logged(ingest(s, "e1", ORDER, now()).await);
    assert!(s.delete_webhook("wh_b").await.unwrap());
    assert!(!s.delete_webhook("wh_b").await.unwrap());
    assert_eq!(s.get_webhook("wh_b").await.unwrap(), None);
    let later = now() + Duration::seconds(5);
    let claimed = s
        .claim_deliveries(later, later + Duration::seconds(60), &[], 10, 10, 100)
        .await
        .unwrap();
    assert!(claimed.is_empty(), "{claimed:?}");
}

async fn ingest_dedup_and_conflict(f: &Fixture) {
    let s = &*f.store;
    s.insert_webhook(&webhook("wh_o", "k1", &[ORDER]))
        .await
        .unwrap();
    s.insert_webhook(&webhook("wh_p", "k1", &[PRODUCT]))
        .await
        .unwrap();
    let mut off = webhook("wh_off", "k1", &[ORDER]);
    off.enabled = false;
    s.insert_webhook(&off).await.unwrap();

    let t = now();
    let first = logged(ingest(s, "e1", ORDER, t).await);
    assert_eq!(ingest(s, "e1", ORDER, t).await, Ingested::Redelivered);
    assert_eq!(
        ingest(&*f.other, "e1", ORDER, t).await,
        Ingested::Redelivered
    );
    let conflict = s
        .ingest(&NewEvent {
            source: "/suite",
            id: "e1",
            ty: ORDER,
            fingerprint: "something else",
            received_at: t,
            body: "{}",
        })
        .await
        .unwrap();
    assert_eq!(conflict, Ingested::Conflict);
    // Unique per (source, id): another source's e1 is another event.
    let other_source = s
        .ingest(&NewEvent {
            source: "/elsewhere",
            id: "e1",
            ty: ORDER,
            fingerprint: "fp",
            received_at: t,
            body: "{}",
        })
        .await
        .unwrap();
    let second = logged(other_source);
    assert!(second > first);
    assert_eq!(s.latest_seq().await.unwrap(), second);
    let e = s.get_event(first).await.unwrap().unwrap();
    assert_eq!(
        (e.source.as_str(), e.id.as_str(), e.ty.as_str()),
        ("/suite", "e1", ORDER)
    );
    assert_eq!(e.received_at, t);
    assert!(s.get_event(second + 100).await.unwrap().is_none());

    // One delivery per enabled webhook of the type, per logged event.
    let later = t + Duration::seconds(1);
    let claimed = s
        .claim_deliveries(later, later + Duration::seconds(60), &[], 10, 10, 100)
        .await
        .unwrap();
    let mut got: Vec<(String, i64)> = claimed
        .iter()
        .map(|d| (d.webhook_id.clone(), d.event_seq))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![("wh_o".to_owned(), first), ("wh_o".to_owned(), second)]
    );
    assert!(claimed.iter().all(|d| d.attempts == 0));

    // Publish claims.
    assert_eq!(
        s.claim_publish("/p", "1", "fa", t).await.unwrap(),
        PublishClaim::New
    );
    // Identical, while the first claim is young: another request is sending it.
    assert_eq!(
        s.claim_publish("/p", "1", "fa", t).await.unwrap(),
        PublishClaim::InFlight
    );
    assert_eq!(
        s.claim_publish("/p", "1", "fb", t).await.unwrap(),
        PublishClaim::Conflict
    );
    // A claim never settled is taken over once its lease is past, by one caller.
    let later = t + Duration::from_std(PUBLISH_CLAIM_LEASE).unwrap() + Duration::seconds(1);
    assert_eq!(
        s.claim_publish("/p", "1", "fa", later).await.unwrap(),
        PublishClaim::Unsent
    );
    assert_eq!(
        f.other.claim_publish("/p", "1", "fa", later).await.unwrap(),
        PublishClaim::InFlight
    );
    s.settle_publish("/p", "1", later, true).await.unwrap();
    assert_eq!(
        f.other.claim_publish("/p", "1", "fa", t).await.unwrap(),
        PublishClaim::Sent
    );
    assert_eq!(
        s.claim_publish("/p", "2", "fa", t).await.unwrap(),
        PublishClaim::New
    );
    s.settle_publish("/p", "2", t, false).await.unwrap();
    assert_eq!(
        s.claim_publish("/p", "2", "fa", t).await.unwrap(),
        PublishClaim::New
    );
    // A request whose claim was taken over, refused by the bus, leaves the claim of the
    // request that took it over (which may be sending the event) in place.
    assert_eq!(
        s.claim_publish("/p", "2", "fa", later).await.unwrap(),
        PublishClaim::Unsent
    );
    s.settle_publish("/p", "2", t, false).await.unwrap();
    assert_eq!(
        f.other.claim_publish("/p", "2", "fa", later).await.unwrap(),
        PublishClaim::InFlight
    );
    s.settle_publish("/p", "2", later, false).await.unwrap();
    assert_eq!(
        f.other.claim_publish("/p", "2", "fa", later).await.unwrap(),
        PublishClaim::New
    );
}

/// Many writes at once (the SQLite store makes those waiting in one transaction): each gets
/// its own answer, a failing one does not take the others with it, and all are kept.
async fn concurrent_writes_get_their_own_answers(f: &Fixture) {
    let t = now();
    // 10 ids, each claimed 5 times at once: exactly one claim per id is new, and the others
    // are told it is being sent (none sends it again).
    let claims = futures::future::join_all((0..50).map(|i| {
        let s = Arc::clone(&f.store);
        async move {
            let id = format!("c{}", i % 10);
            let claim = s.claim_publish("/many", &id, "f", t).await.unwrap();
            (id, claim)
        }
    }))
    .await;
    for id in (0..10).map(|i| format!("c{i}")) {
        let mine: Vec<_> = claims
            .iter()
            .filter(|(c, _)| *c == id)
            .map(|(_, k)| *k)
            .collect();
        assert_eq!(
            mine.iter().filter(|k| **k == PublishClaim::New).count(),
            1,
            "{id}: {mine:?}"
        );
        assert_eq!(
            mine.iter()
                .filter(|k| **k == PublishClaim::InFlight)
                .count(),
            4,
            "{id}: {mine:?}"
        );
    }
    // 40 events at once: 30 ids, 10 of them twice with other content. Each id is logged once,
    // at its own position, and the other of each pair is a conflict, whichever came first.
    let results = futures::future::join_all((0..40).map(|i| {
        let s = Arc::clone(&f.store);
        async move {
            let (id, body) = if i < 30 {
                (format!("m{i}"), "a")
            } else {
                (format!("m{}", i - 30), "b")
            };
            s.ingest(&NewEvent {
                source: "/many",
                id: &id,
                ty: ORDER,
                fingerprint: body,
                received_at: t,
                body,
            })
            .await
            .unwrap()
        }
    }))
    .await;
    let mut seqs: Vec<i64> = results
        .iter()
        .filter_map(|r| match r {
            Ingested::Logged(seq) => Some(*seq),
            _ => None,
        })
        .collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), 30, "{results:?}");
    assert_eq!(
        results.iter().filter(|r| **r == Ingested::Conflict).count(),
        10,
        "{results:?}"
    );
    // All kept: a fresh look (another handle on the same store) finds every claim settled as
    // it was left and every event logged.
    for i in 0..10 {
        assert_eq!(
            f.other
                .claim_publish("/many", &format!("c{i}"), "f", t)
                .await
                .unwrap(),
            PublishClaim::InFlight
        );
    }
    for seq in seqs {
        assert!(f.other.get_event(seq).await.unwrap().is_some(), "{seq}");
    }
}

async fn events_after_pages(f: &Fixture) {
    let s = &*f.store;
    assert_eq!(s.latest_seq().await.unwrap(), 0);
    let t = now();
    let mut orders = Vec::new();
    for i in 0..250 {
        let ty = if i % 5 == 0 { PRODUCT } else { ORDER };
        let seq = logged(ingest(s, &format!("e{i}"), ty, t).await);
        if ty == ORDER {
            orders.push(seq);
        }
    }
    let types = vec![ORDER.to_owned()];
    let mut after = 0;
    let mut seen = Vec::new();
    loop {
        let page = f
            .other
            .events_after(after, &types, 64, usize::MAX)
            .await
            .unwrap();
        assert!(page.len() <= 64);
        if page.is_empty() {
            break;
        }
        assert!(page.iter().all(|e| e.ty == ORDER));
        after = page.last().unwrap().seq;
        seen.extend(page.iter().map(|e| e.seq));
    }
    assert_eq!(seen, orders, "every order event, in order, once");
    // The byte bound: events while the bodies before them add up to less than `max_bytes`,
    // the first always; the count bound still holds.
    let ten = s.events_after(0, &types, 10, usize::MAX).await.unwrap();
    let sizes: Vec<usize> = ten.iter().map(|e| e.body.len()).collect();
    for k in 1..10 {
        let bytes: usize = sizes[..k].iter().sum();
        let page = s.events_after(0, &types, 10, bytes).await.unwrap();
        assert_eq!(page.len(), k, "{k} events hold {bytes} bytes");
        let page = s.events_after(0, &types, 10, bytes + 1).await.unwrap();
        assert_eq!(page.len(), k + 1, "one more once it is past {bytes} bytes");
        assert_eq!(
            s.events_after(0, &types, 3, bytes).await.unwrap().len(),
            k.min(3)
        );
    }
    let one = s.events_after(0, &types, 10, 1).await.unwrap();
    assert_eq!(one.len(), 1, "a page holds its first event however large");
    assert_eq!(one[0].seq, ten[0].seq);
    let both = vec![ORDER.to_owned(), PRODUCT.to_owned()];
    assert_eq!(
        s.events_after(0, &both, 1000, usize::MAX)
            .await
            .unwrap()
            .len(),
        250
    );
    assert!(
        s.events_after(0, &[], 10, usize::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.events_after(0, &["nope".to_owned()], 10, usize::MAX)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn claims_are_exclusive_and_leases_expire(f: &Fixture) {
    let s = &*f.store;
    s.insert_webhook(&webhook("wh_1", "k1", &[ORDER]))
        .await
        .unwrap();
    s.insert_webhook(&webhook("wh_2", "k1", &[ORDER]))
        .await
        .unwrap();
    s.insert_webhook(&webhook("wh_3", "k2", &[ORDER]))
        .await
        .unwrap();
    let t = now();
    for i in 0..40 {
        logged(ingest(s, &format!("e{i}"), ORDER, t).await);
    }
    // Two instances claim at once, many times, a few each time (every lease counts against
    // `per_webhook`, so it is high enough to let the claims drain the outbox): no delivery
    // twice.
    let at = t + Duration::seconds(1);
    let lease = at + Duration::seconds(30);
    let mut taken = HashSet::new();
    let mut total = 0;
    loop {
        let (a, b) = tokio::join!(
            f.store.claim_deliveries(at, lease, &[], 40, 100, 5),
            f.other.claim_deliveries(at, lease, &[], 40, 100, 5),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        if a.is_empty() && b.is_empty() {
            break;
        }
        for d in a.iter().chain(&b) {
            assert!(taken.insert(d.id), "delivery {} claimed twice", d.id);
            total += 1;
        }
        assert!(total <= 120, "claimed more deliveries than exist");
    }
    assert_eq!(total, 120, "3 webhooks x 40 events, each claimed once");

    // Leased: nothing to claim before the lease ends; all of it after (the instance died).
    let before = lease - Duration::milliseconds(1);
    assert!(
        s.claim_deliveries(before, before + Duration::seconds(30), &[], 100, 100, 1000)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.next_due().await.unwrap(), Some(lease));
    let after = lease + Duration::milliseconds(1);
    let again = f
        .other
        .claim_deliveries(after, after + Duration::seconds(30), &[], 100, 100, 1000)
        .await
        .unwrap();
    let again: HashSet<i64> = again.iter().map(|d| d.id).collect();
    assert_eq!(again, taken, "every expired lease is claimed again");
}

async fn claim_limits(f: &Fixture) {
    let s = &*f.store;
    s.insert_webhook(&webhook("wh_1", "k1", &[ORDER]))
        .await
        .unwrap();
    s.insert_webhook(&webhook("wh_2", "k1", &[ORDER]))
        .await
        .unwrap();
    s.insert_webhook(&webhook("wh_3", "k2", &[ORDER]))
        .await
        .unwrap();
    let t = now();
    for i in 0..10 {
        logged(ingest(s, &format!("e{i}"), ORDER, t).await);
    }
    let at = t + Duration::seconds(1);
    let lease = at + Duration::seconds(30);
    // Busy endpoints are skipped; at most `per_webhook` each.
    let c = s
        .claim_deliveries(at, lease, &["wh_1".to_owned()], 2, 100, 100)
        .await
        .unwrap();
    let mut by: Vec<&str> = c.iter().map(|d| d.webhook_id.as_str()).collect();
    by.sort();
    assert_eq!(by, vec!["wh_2", "wh_2", "wh_3", "wh_3"]);
    // Owner k1 holds 2 leases: with per_owner 3 it gets one more, k2 (2 held) one more too.
    let c = f
        .other
        .claim_deliveries(at, lease, &[], 10, 3, 100)
        .await
        .unwrap();
    let k1 = c.iter().filter(|d| d.webhook_id != "wh_3").count();
    let k2 = c.iter().filter(|d| d.webhook_id == "wh_3").count();
    assert_eq!((k1, k2), (1, 1), "{c:?}");
    // Owners take turns within `limit`.
    let c = s
        .claim_deliveries(at, lease, &[], 10, 100, 2)
        .await
        .unwrap();
    let owners: HashSet<bool> = c.iter().map(|d| d.webhook_id == "wh_3").collect();
    assert_eq!(owners.len(), 2, "one delivery of each owner first: {c:?}");
    // A disabled endpoint's deliveries are not claimed.
    let mut w = s.get_webhook("wh_3").await.unwrap().unwrap();
    w.enabled = false;
    s.update_webhook(&w).await.unwrap();
    let c = s
        .claim_deliveries(at, lease, &[], 100, 100, 100)
        .await
        .unwrap();
    assert!(c.iter().all(|d| d.webhook_id != "wh_3"), "{c:?}");
}

/// A claim reads each endpoint's own first due deliveries: another endpoint's long backlog,
/// due earlier, neither hides a later endpoint's delivery nor changes the order each
/// endpoint's deliveries go in; the leases any instance holds count against `per_webhook`;
/// retries not yet due wait, expired leases come back in due order; `next_due` is the
/// earliest of an enabled endpoint's pending deliveries and the leases.
async fn claims_read_each_endpoint_past_a_backlog(f: &Fixture) {
    let s = &*f.store;
    s.insert_webhook(&webhook("wh_1", "k1", &[ORDER]))
        .await
        .unwrap();
    let t = now();
    for i in 0..150 {
        logged(ingest(s, &format!("e{i}"), ORDER, t).await);
    }
    // Registered after the backlog: it gets only the last event.
    s.insert_webhook(&webhook("wh_2", "k2", &[ORDER]))
        .await
        .unwrap();
    logged(ingest(s, "last", ORDER, t + Duration::milliseconds(5)).await);
    let at = t + Duration::seconds(1);
    let lease = at + Duration::seconds(30);

    let first = s.claim_deliveries(at, lease, &[], 3, 100, 4).await.unwrap();
    let by = |c: &[Delivery], w: &str| -> Vec<i64> {
        let mut ids: Vec<i64> = c
            .iter()
            .filter(|d| d.webhook_id == w)
            .map(|d| d.id)
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(by(&first, "wh_2").len(), 1, "{first:?}");
    let wh_1 = by(&first, "wh_1");
    assert_eq!(wh_1.len(), 3, "{first:?}");
    // Its three leases are all `per_webhook` 3 allows wh_1, whichever instance claims.
    assert!(
        f.other
            .claim_deliveries(at, lease, &[], 3, 100, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // With room for six, three more: wh_1's next oldest, the rest of its backlog after them.
    let second = f
        .other
        .claim_deliveries(at, lease, &[], 6, 100, 10)
        .await
        .unwrap();
    let next = by(&second, "wh_1");
    assert_eq!(next.len(), 3, "{second:?}");
    assert!(
        wh_1.iter().all(|a| next.iter().all(|b| a < b)),
        "{wh_1:?} then {next:?}"
    );
    assert!(
        by(&second, "wh_2").is_empty(),
        "wh_2 had one delivery: {second:?}"
    );

    // The first wh_1 delivery fails and is retried later; the second is delivered; the third
    // is left to its lease (its instance stopped).
    let retry_at = at + Duration::seconds(10);
    s.finish_delivery(wh_1[0], DeliveryOutcome::RetryAt(retry_at))
        .await
        .unwrap();
    s.finish_delivery(wh_1[1], DeliveryOutcome::Delivered)
        .await
        .unwrap();
    // Still 144 pending and due at `t` for wh_1: the earliest due.
    assert_eq!(s.next_due().await.unwrap(), Some(t));
    let after_lease = lease + Duration::milliseconds(1);
    let third = s
        .claim_deliveries(
            after_lease,
            after_lease + Duration::seconds(30),
            &[],
            3,
            100,
            10,
        )
        .await
        .unwrap();
    let again = by(&third, "wh_1");
    // Every lease of the first two claims expired: they rank with wh_1's pending deliveries
    // by due time, then id. The third of the first claim is the oldest left (the second was
    // delivered); the retry, due after the whole backlog, waits its turn.
    assert_eq!(again, vec![wh_1[2], next[0], next[1]], "{third:?}");
    assert_eq!(
        by(&third, "wh_2").len(),
        1,
        "wh_2's expired lease: {third:?}"
    );
}

async fn finish_and_attempts(f: &Fixture) {
    let s = &*f.store;
    s.insert_webhook(&webhook("wh_1", "k1", &[ORDER]))
        .await
        .unwrap();
    let t = now();
    for i in 0..3 {
        logged(ingest(s, &format!("e{i}"), ORDER, t).await);
    }
    let at = t + Duration::seconds(1);
    let lease = at + Duration::seconds(30);
    let c = s
        .claim_deliveries(at, lease, &[], 10, 10, 10)
        .await
        .unwrap();
    assert_eq!(c.len(), 3);
    let retry_at = at + Duration::seconds(10);
    s.finish_delivery(c[0].id, DeliveryOutcome::Delivered)
        .await
        .unwrap();
    s.finish_delivery(c[1].id, DeliveryOutcome::RetryAt(retry_at))
        .await
        .unwrap();
    s.finish_delivery(c[2].id, DeliveryOutcome::Failed)
        .await
        .unwrap();
    for (n, d) in c.iter().enumerate() {
        s.record_attempt(&Attempt {
            id: 0,
            webhook_id: "wh_1".into(),
            delivery_id: d.id,
            event_id: format!("e{n}"),
            attempt: 1,
            at,
            status: if n == 0 { Some(200) } else { Some(500) },
            latency_ms: 12,
            error: (n == 2).then(|| "connection failed".to_owned()),
            response: Some("body with NUL \0".into()),
        })
        .await
        .unwrap();
    }
    // Only the retry is left, due at its time.
    assert_eq!(s.next_due().await.unwrap(), Some(retry_at));
    assert!(
        f.other
            .claim_deliveries(retry_at - Duration::milliseconds(1), lease, &[], 10, 10, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let again = f
        .other
        .claim_deliveries(retry_at, retry_at + Duration::seconds(30), &[], 10, 10, 10)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].id, again[0].attempts), (c[1].id, 1));
    s.finish_delivery(again[0].id, DeliveryOutcome::Delivered)
        .await
        .unwrap();
    assert_eq!(s.next_due().await.unwrap(), None);

    let log = f.other.list_attempts("wh_1", 2).await.unwrap();
    assert_eq!(log.len(), 2, "limited");
    assert_eq!(log[0].event_id, "e2", "newest first");
    assert_eq!(log[0].error.as_deref(), Some("connection failed"));
    assert_eq!(log[1].status, Some(500));
    assert_eq!(log[1].latency_ms, 12);
    assert_eq!(log[1].at, at);
    assert!(
        log[1]
            .response
            .as_deref()
            .unwrap()
            .starts_with("body with NUL")
    );
    assert_eq!(s.list_attempts("wh_1", 100).await.unwrap().len(), 3);
    assert!(s.list_attempts("wh_x", 100).await.unwrap().is_empty());

    // An attempt logged and its delivery settled in one call.
    logged(ingest(s, "e3", ORDER, t).await);
    let later = retry_at + Duration::seconds(1);
    let d = s
        .claim_deliveries(later, later + Duration::seconds(30), &[], 10, 10, 10)
        .await
        .unwrap();
    assert_eq!(d.len(), 1);
    let next = later + Duration::seconds(5);
    s.finish_attempt(
        &Attempt {
            id: 0,
            webhook_id: "wh_1".into(),
            delivery_id: d[0].id,
            event_id: "e3".into(),
            attempt: 1,
            at: later,
            status: Some(503),
            latency_ms: 3,
            error: None,
            response: None,
        },
        DeliveryOutcome::RetryAt(next),
    )
    .await
    .unwrap();
    assert_eq!(f.other.next_due().await.unwrap(), Some(next));
    let log = f.other.list_attempts("wh_1", 1).await.unwrap();
    assert_eq!((log[0].event_id.as_str(), log[0].status), ("e3", Some(503)));
    assert_eq!(s.list_attempts("wh_1", 100).await.unwrap().len(), 4);
}

async fn replay_is_idempotent(f: &Fixture) {
    let s = &*f.store;
    let t = now();
    for i in 0..5 {
        logged(ingest(s, &format!("old{i}"), ORDER, t - Duration::hours(2)).await);
    }
    for i in 0..4 {
        logged(ingest(s, &format!("new{i}"), ORDER, t).await);
    }
    logged(ingest(s, "p", PRODUCT, t).await);
    // Registered after the events: nothing queued until a replay.
    s.insert_webhook(&webhook("wh_1", "k1", &[ORDER]))
        .await
        .unwrap();
    let since = t - Duration::hours(1);
    assert_eq!(replay(s, "wh_1", since, t, 100).await, 4);
    assert_eq!(
        replay(&*f.other, "wh_1", since, t, 100).await,
        0,
        "still pending"
    );
    assert_eq!(
        replay(s, "wh_1", t - Duration::hours(3), t, 3).await,
        3,
        "max"
    );
    let at = t + Duration::seconds(1);
    let c = s
        .claim_deliveries(at, at + Duration::seconds(30), &[], 100, 100, 100)
        .await
        .unwrap();
    assert_eq!(c.len(), 7);
    for d in &c {
        s.finish_delivery(d.id, DeliveryOutcome::Delivered)
            .await
            .unwrap();
    }
    // Delivered: a replay queues them again.
    assert_eq!(replay(s, "wh_1", since, at, 100).await, 4);
    assert_eq!(replay(s, "wh_nope", since, at, 100).await, 0);
}

/// Replays are bounded per webhook and per owner key within fixed windows, counted by every
/// instance, and a deleted webhook's window still counts for its key.
async fn replay_budgets_bound_webhooks_and_keys(f: &Fixture) {
    let s = &*f.store;
    let t = now();
    for i in 0..5 {
        logged(ingest(s, &format!("e{i}"), ORDER, t).await);
    }
    for (id, owner) in [
        ("wh_1", "k1"),
        ("wh_2", "k1"),
        ("wh_3", "k2"),
        ("wh_p", "k2"),
    ] {
        let types: &[&str] = if id == "wh_p" { &[PRODUCT] } else { &[ORDER] };
        s.insert_webhook(&webhook(id, owner, types)).await.unwrap();
    }
    let limits = ReplayLimits {
        per_replay: 100,
        per_webhook: 3,
        per_key: 5,
        window: Duration::hours(24),
    };
    let since = t - Duration::hours(1);
    let day = Duration::hours(24);

    // Nothing to queue: no window opens, nothing is spent.
    let none = s.replay("wh_p", since, t, &limits).await.unwrap();
    assert_eq!((none.queued, none.remaining), (0, 3));
    assert_eq!((none.exhausted, none.resets_at), (None, None));
    assert!(!none.refused());

    // The webhook's budget: what fits is queued.
    let first = s.replay("wh_1", since, t, &limits).await.unwrap();
    assert_eq!((first.queued, first.remaining), (3, 0));
    assert_eq!(first.exhausted, Some(ReplayBudget::Webhook));
    assert_eq!(first.resets_at, Some(t + day));
    // Spent, on every instance (even with events left to queue): nothing queued.
    let t1 = t + Duration::seconds(1);
    let spent = f.other.replay("wh_1", since, t1, &limits).await.unwrap();
    assert!(spent.refused(), "{spent:?}");
    assert_eq!(spent.exhausted, Some(ReplayBudget::Webhook));
    assert_eq!(spent.resets_at, Some(t + day));

    // The key's budget: wh_2 gets what the key has left, and the key's first window to close
    // is when more frees up.
    let second = s.replay("wh_2", since, t1, &limits).await.unwrap();
    assert_eq!((second.queued, second.remaining), (2, 0));
    assert_eq!(second.exhausted, Some(ReplayBudget::Key));
    assert_eq!(second.resets_at, Some(t + day));
    // Another key's budget is its own.
    let other_key = s.replay("wh_3", since, t1, &limits).await.unwrap();
    assert_eq!(
        (other_key.queued, other_key.exhausted),
        (3, Some(ReplayBudget::Webhook))
    );

    // Deleting a webhook and registering another gives the key nothing more.
    assert!(s.delete_webhook("wh_1").await.unwrap());
    s.insert_webhook(&webhook("wh_1b", "k1", &[ORDER]))
        .await
        .unwrap();
    let again = s
        .replay("wh_1b", since, t + Duration::seconds(2), &limits)
        .await
        .unwrap();
    assert!(again.refused(), "{again:?}");
    assert_eq!(again.exhausted, Some(ReplayBudget::Key));

    // wh_1's window closed: the key has room again, wh_2 only what its own window leaves
    // (its two deliveries are still pending, so three events are candidates).
    let later = t + day + Duration::milliseconds(500);
    let third = s.replay("wh_2", since, later, &limits).await.unwrap();
    assert_eq!((third.queued, third.remaining), (1, 0));
    assert_eq!(third.exhausted, Some(ReplayBudget::Webhook));
    assert_eq!(third.resets_at, Some(t1 + day));
    let fourth = f
        .other
        .replay("wh_1b", since, later, &limits)
        .await
        .unwrap();
    assert_eq!((fourth.queued, fourth.remaining), (2, 0), "{fourth:?}");
    assert_eq!(fourth.exhausted, Some(ReplayBudget::Key));
    assert_eq!(
        fourth.resets_at,
        Some(t1 + day),
        "wh_2's window closes first"
    );

    // Every window closed: whole budgets again, a new window from then.
    let next_day = t + day * 2;
    let fresh = s.replay("wh_3", since, next_day, &limits).await.unwrap();
    assert_eq!((fresh.queued, fresh.remaining), (2, 1), "{fresh:?}");
    assert_eq!(fresh.exhausted, None);
    assert_eq!(fresh.resets_at, Some(next_day + day));
    // At most `per_replay` a replay, counted as well.
    let small = ReplayLimits {
        per_replay: 1,
        ..limits
    };
    let capped = s.replay("wh_2", since, next_day, &small).await.unwrap();
    assert_eq!((capped.queued, capped.remaining), (1, 2));
    // A webhook that does not exist gets nothing.
    let missing = s.replay("wh_nope", since, t, &limits).await.unwrap();
    assert_eq!(missing.queued, 0);
    assert!(!missing.refused());
}

/// Found by an outsider review: a key creating, replaying and deleting webhooks left a budget
/// row and the attempts of each behind, so every replay check summed more rows (under the
/// writer lock) and the attempts grew until retention. A deleted webhook's replays still
/// count for its key, folded into one row; its attempts go with it.
async fn deleted_webhooks_keep_their_replays_counted_and_leave_no_attempts(f: &Fixture) {
    let s = &*f.store;
    let t = now();
    for i in 0..3 {
        logged(ingest(s, &format!("e{i}"), ORDER, t).await);
    }
    let limits = ReplayLimits {
        per_replay: 1,
        per_webhook: 10,
        per_key: 12,
        window: Duration::hours(24),
    };
    let since = t - Duration::hours(1);
    for i in 0..10 {
        let id = format!("wh_churn_{i}");
        s.insert_webhook(&webhook(&id, "k1", &[ORDER]))
            .await
            .unwrap();
        let r = s.replay(&id, since, t, &limits).await.unwrap();
        assert_eq!(r.queued, 1, "{id}: {r:?}");
        s.record_attempt(&Attempt {
            id: 0,
            webhook_id: id.clone(),
            delivery_id: 0,
            event_id: "e0".into(),
            attempt: 1,
            at: t,
            status: Some(500),
            latency_ms: 1,
            error: None,
            response: None,
        })
        .await
        .unwrap();
        assert_eq!(s.list_attempts(&id, 10).await.unwrap().len(), 1, "{id}");
        assert!(s.delete_webhook(&id).await.unwrap());
        assert!(s.list_attempts(&id, 10).await.unwrap().is_empty(), "{id}");
    }
    // Ten replays of deleted webhooks still count: the key has two left.
    s.insert_webhook(&webhook("wh_last", "k1", &[ORDER]))
        .await
        .unwrap();
    let more = ReplayLimits {
        per_replay: 100,
        ..limits
    };
    let last = f.other.replay("wh_last", since, t, &more).await.unwrap();
    assert_eq!((last.queued, last.remaining), (2, 0), "{last:?}");
    assert_eq!(last.exhausted, Some(ReplayBudget::Key));
    // And their window closes when theirs did.
    assert_eq!(last.resets_at, Some(t + Duration::hours(24)));
}

/// The attempt log keeps at most 1 KiB of a response and each webhook's newest attempts.
async fn attempt_log_is_bounded(f: &Fixture) {
    let s = &*f.store;
    let t = now();
    let attempt = |webhook: &str, event: String, response: Option<String>| Attempt {
        id: 0,
        webhook_id: webhook.into(),
        delivery_id: 1,
        event_id: event,
        attempt: 1,
        at: t,
        status: Some(200),
        latency_ms: 1,
        error: None,
        response,
    };
    // Cut on a character boundary: "é" is 2 bytes, U+FFFD (a lossy decoding's) 3.
    for (n, (text, kept)) in [
        ("é".repeat(1500), "é".repeat(512)),
        ("\u{fffd}".repeat(1000), "\u{fffd}".repeat(341)),
        ("short".to_owned(), "short".to_owned()),
    ]
    .into_iter()
    .enumerate()
    {
        s.record_attempt(&attempt("wh_cut", format!("c{n}"), Some(text)))
            .await
            .unwrap();
        let logged = f.other.list_attempts("wh_cut", 1).await.unwrap();
        let response = logged[0].response.as_deref().unwrap();
        assert!(response.len() <= Attempt::MAX_RESPONSE_BYTES);
        assert_eq!(response, kept);
    }

    // Each webhook's newest attempts only: trimmed as they are logged, exactly at pruning.
    let kept = Attempt::KEPT_PER_WEBHOOK as usize;
    for i in 0..5 {
        s.record_attempt(&attempt("wh_quiet", format!("q{i}"), None))
            .await
            .unwrap();
    }
    for i in 0..kept + 100 {
        f.store
            .record_attempt(&attempt("wh_busy", format!("b{i}"), None))
            .await
            .unwrap();
    }
    let count = |id: &'static str| async move {
        s.list_attempts(id, 10 * Attempt::KEPT_PER_WEBHOOK)
            .await
            .unwrap()
    };
    let busy = count("wh_busy").await;
    assert!(
        (kept..kept + 64).contains(&busy.len()),
        "{} attempts kept while logging",
        busy.len()
    );
    assert_eq!(
        busy[0].event_id,
        format!("b{}", kept + 99),
        "the newest kept"
    );
    s.prune(t - Duration::hours(72)).await.unwrap();
    let busy = count("wh_busy").await;
    assert_eq!(busy.len(), kept);
    assert_eq!(busy[0].event_id, format!("b{}", kept + 99));
    assert_eq!(busy[kept - 1].event_id, "b100", "the oldest kept");
    assert_eq!(
        count("wh_quiet").await.len(),
        5,
        "other webhooks keep theirs"
    );
    assert_eq!(count("wh_cut").await.len(), 3);
}

async fn cursor_key_is_shared(f: &Fixture) {
    let a = f.store.stream_cursor_key().await.unwrap();
    assert_eq!(a.len(), 32);
    assert_eq!(f.store.stream_cursor_key().await.unwrap(), a);
    assert_eq!(f.other.stream_cursor_key().await.unwrap(), a);
    let reopened = f.reopen.open(None).await.unwrap();
    assert_eq!(reopened.stream_cursor_key().await.unwrap(), a);
}

async fn prune_keeps_what_is_needed(f: &Fixture) {
    let s = &*f.store;
    let old = now() - Duration::hours(100);
    let t = now();
    let old_seqs: Vec<i64> = {
        let mut v = Vec::new();
        for i in 0..3 {
            v.push(logged(ingest(s, &format!("old{i}"), ORDER, old).await));
        }
        v
    };
    // A pending delivery of an old event keeps it.
    s.insert_webhook(&webhook("wh_1", "k1", &[ORDER]))
        .await
        .unwrap();
    replay(s, "wh_1", old, old, 1).await;
    let fresh = logged(ingest(s, "new", ORDER, t).await);
    s.record_attempt(&Attempt {
        id: 0,
        webhook_id: "wh_1".into(),
        delivery_id: 1,
        event_id: "old0".into(),
        attempt: 1,
        at: old,
        status: None,
        latency_ms: 1,
        error: None,
        response: None,
    })
    .await
    .unwrap();
    let dropped = s.prune(t - Duration::hours(72)).await.unwrap();
    assert_eq!(dropped, 2);
    assert!(
        s.get_event(old_seqs[0]).await.unwrap().is_some(),
        "still needed"
    );
    assert!(s.get_event(old_seqs[1]).await.unwrap().is_none());
    assert!(s.get_event(fresh).await.unwrap().is_some());
    assert!(s.list_attempts("wh_1", 10).await.unwrap().is_empty());
    // Positions keep growing past pruned ones.
    let next = logged(ingest(s, "newer", ORDER, t).await);
    assert!(next > fresh);
}

async fn secrets_are_sealed(f: &Fixture) {
    let key = || SecretsKey::from_bytes(&[9u8; 32]).unwrap();
    // Written in clear, then an instance opens the store with the key: sealed, readable.
    f.store
        .insert_webhook(&webhook("wh_clear", "k1", &[ORDER]))
        .await
        .unwrap();
    let sealed = f.reopen.open(Some(key())).await.unwrap();
    sealed
        .insert_webhook(&webhook("wh_sealed", "k1", &[ORDER]))
        .await
        .unwrap();
    for id in ["wh_clear", "wh_sealed"] {
        let w = sealed.get_webhook(id).await.unwrap().unwrap();
        assert_eq!(w.secret, format!("whsec_{id}"));
    }
    // Without the key (or with another), the sealed secrets do not open.
    let e = f.store.get_webhook("wh_sealed").await.unwrap_err();
    assert!(e.to_string().contains("EVBUS_SECRETS_KEY"), "{e}");
    let wrong = SecretsKey::from_bytes(&[1u8; 32]).unwrap();
    assert!(f.reopen.open(Some(wrong)).await.is_err());
}

/// Owner changes, rotations and the dispatcher's bookkeeping write only their own columns,
/// in place: what another instance wrote meanwhile stays (secrets sealed or not).
async fn webhook_changes_are_made_in_place(f: &Fixture) {
    let s = &*f.store;
    let other = &*f.other;
    s.insert_webhook(&webhook("wh_c", "k1", &[ORDER]))
        .await
        .unwrap();
    let stale = s.get_webhook("wh_c").await.unwrap().unwrap();

    // A rotation on one instance, then changes on the other: both kept.
    let until = now() + Duration::hours(24);
    assert!(
        s.rotate_webhook_secret("wh_c", "whsec_two", until, None)
            .await
            .unwrap()
    );
    assert!(
        !s.rotate_webhook_secret("wh_none", "whsec_x", until, None)
            .await
            .unwrap()
    );
    // While the previous secret still signs, a conditional rotation changes nothing: of two
    // rotations at once, only one takes effect.
    assert!(
        !other
            .rotate_webhook_secret("wh_c", "whsec_raced", until, Some(now()))
            .await
            .unwrap()
    );
    let kept = s.get_webhook("wh_c").await.unwrap().unwrap();
    assert_eq!(kept.secret, "whsec_two");
    assert_eq!(
        kept.previous_secret_until.map(|t| t.timestamp_millis()),
        Some(until.timestamp_millis())
    );
    // Up to the last millisecond of the overlap.
    assert!(
        !s.rotate_webhook_secret(
            "wh_c",
            "whsec_x",
            until,
            Some(until - Duration::milliseconds(1))
        )
        .await
        .unwrap()
    );
    let change = WebhookChange {
        event_types: Some(vec![ORDER.to_owned(), PRODUCT.to_owned()]),
        description: Some("renamed \0 here".into()),
        enabled: None,
    };
    assert!(other.change_webhook("wh_c", &change).await.unwrap());
    assert!(!other.change_webhook("wh_none", &change).await.unwrap());
    let since = other.webhook_failed("wh_c", now()).await.unwrap().unwrap();
    let later = since + Duration::seconds(5);
    assert_eq!(
        s.webhook_failed("wh_c", later).await.unwrap(),
        Some(since),
        "a run of failures keeps its start"
    );
    assert_eq!(s.webhook_failed("wh_none", later).await.unwrap(), None);
    let w = s.get_webhook("wh_c").await.unwrap().unwrap();
    assert_eq!(w.secret, "whsec_two");
    assert_eq!(w.previous_secret.as_deref(), Some(stale.secret.as_str()));
    assert_eq!(w.previous_secret_until, Some(until));
    assert_eq!(w.event_types, vec![ORDER.to_owned(), PRODUCT.to_owned()]);
    assert!(w.description.starts_with("renamed"));
    assert_eq!(w.failing_since, Some(since));
    assert!(w.enabled);

    // Disabling: by the owner (its reason), then the dispatcher's disable changes nothing.
    let off = WebhookChange {
        enabled: Some(false),
        ..WebhookChange::default()
    };
    assert!(s.change_webhook("wh_c", &off).await.unwrap());
    assert!(
        !other
            .disable_webhook("wh_c", "the endpoint answered 410 Gone")
            .await
            .unwrap()
    );
    let w = other.get_webhook("wh_c").await.unwrap().unwrap();
    assert!(!w.enabled);
    assert_eq!(
        w.disabled_reason.as_deref(),
        Some(WebhookChange::DISABLED_BY_OWNER)
    );
    assert_eq!(
        w.failing_since,
        Some(since),
        "disabling keeps the failure state"
    );
    assert_eq!(w.secret, "whsec_two");
    // Disabling again keeps the first reason; re-enabling clears the failure state.
    assert!(s.change_webhook("wh_c", &off).await.unwrap());
    let on = WebhookChange {
        enabled: Some(true),
        ..WebhookChange::default()
    };
    assert!(other.change_webhook("wh_c", &on).await.unwrap());
    let w = s.get_webhook("wh_c").await.unwrap().unwrap();
    assert!(w.enabled);
    assert_eq!((w.disabled_reason, w.failing_since), (None, None));
    assert_eq!(w.event_types, vec![ORDER.to_owned(), PRODUCT.to_owned()]);

    // The dispatcher: a failure, a success, a disable.
    s.webhook_failed("wh_c", later).await.unwrap();
    other.webhook_succeeded("wh_c").await.unwrap();
    assert_eq!(
        s.get_webhook("wh_c").await.unwrap().unwrap().failing_since,
        None
    );
    assert!(
        s.disable_webhook("wh_c", "the endpoint answered 410 Gone")
            .await
            .unwrap()
    );
    assert!(!s.disable_webhook("wh_none", "x").await.unwrap());
    let w = other.get_webhook("wh_c").await.unwrap().unwrap();
    assert!(!w.enabled);
    assert_eq!(
        w.disabled_reason.as_deref(),
        Some("the endpoint answered 410 Gone")
    );

    // Sealed secrets rotate too: the sealed current one becomes the previous one.
    let sealed = f
        .reopen
        .open(Some(SecretsKey::from_bytes(&[7u8; 32]).unwrap()))
        .await
        .unwrap();
    assert!(
        sealed
            .rotate_webhook_secret("wh_c", "whsec_three", until, None)
            .await
            .unwrap()
    );
    let w = sealed.get_webhook("wh_c").await.unwrap().unwrap();
    assert_eq!(w.secret, "whsec_three");
    assert_eq!(w.previous_secret.as_deref(), Some("whsec_two"));
}

/// Revoking keeps an admin key: the last active one is refused, an expired one does not count.
async fn revocation_keeps_an_admin_key(f: &Fixture) {
    let s = &*f.store;
    let admin = |id: &str| KeyRecord {
        admin: true,
        ..key(id)
    };
    s.insert_key(&admin("ad1")).await.unwrap();
    s.insert_key(&admin("ad2")).await.unwrap();
    s.insert_key(&KeyRecord {
        expires_at: Some(now() - Duration::seconds(1)),
        ..admin("ad_expired")
    })
    .await
    .unwrap();
    s.insert_key(&key("plain")).await.unwrap();
    let at = now();
    assert_eq!(
        s.revoke_key_keeping_an_admin("plain", at).await.unwrap(),
        Revocation::Revoked
    );
    assert_eq!(
        s.revoke_key_keeping_an_admin("plain", at).await.unwrap(),
        Revocation::NotActive
    );
    assert_eq!(
        s.revoke_key_keeping_an_admin("nobody", at).await.unwrap(),
        Revocation::NotActive
    );
    assert_eq!(
        f.other
            .revoke_key_keeping_an_admin("ad2", at)
            .await
            .unwrap(),
        Revocation::Revoked
    );
    assert_eq!(
        s.revoke_key_keeping_an_admin("ad1", at).await.unwrap(),
        Revocation::LastAdmin
    );
    assert!(
        s.get_key("ad1")
            .await
            .unwrap()
            .unwrap()
            .revoked_at
            .is_none()
    );
    assert_eq!(
        s.revoke_key_keeping_an_admin("ad_expired", at)
            .await
            .unwrap(),
        Revocation::Revoked
    );
}

/// The per-key webhook limit holds under concurrent registrations through two handles on the
/// store (two instances sharing it): 48 registrations for one key at once with room for 3
/// register exactly 3; the other 45 are refused and store nothing. Another key's webhooks
/// neither count nor are counted, and a deleted webhook makes room for one more.
async fn webhook_limit_holds_under_concurrent_registrations(f: &Fixture) {
    const LIMIT: usize = 3;
    let s = &*f.store;
    s.insert_webhook(&webhook("wh_other_1", "k_other", &[ORDER]))
        .await
        .unwrap();
    let results = futures::future::join_all((0..48).map(|i| {
        let s = Arc::clone(if i % 2 == 0 { &f.store } else { &f.other });
        async move {
            let w = webhook(&format!("wh_lim_{i}"), "k_lim", &[ORDER]);
            s.insert_webhook_within(&w, LIMIT).await.unwrap()
        }
    }))
    .await;
    let inserted = results.iter().filter(|r| **r).count();
    let held = f.other.list_webhooks(Some("k_lim")).await.unwrap();
    assert_eq!(
        (inserted, held.len()),
        (LIMIT, LIMIT),
        "registrations made at once passed the per-key limit: {results:?}"
    );
    // Refused ones stored nothing: the webhooks held are exactly those answered `true`.
    let mut answered: Vec<String> = (0..48)
        .filter(|i| results[*i])
        .map(|i| format!("wh_lim_{i}"))
        .collect();
    let mut stored: Vec<String> = held.into_iter().map(|w| w.id).collect();
    answered.sort();
    stored.sort();
    assert_eq!(answered, stored);
    // Per key: the other key's webhook did not count, and it has room for more.
    assert!(
        s.insert_webhook_within(&webhook("wh_other_2", "k_other", &[ORDER]), LIMIT)
            .await
            .unwrap()
    );
    assert!(
        !s.insert_webhook_within(&webhook("wh_lim_more", "k_lim", &[ORDER]), LIMIT)
            .await
            .unwrap()
    );
    assert!(s.delete_webhook(&stored[0]).await.unwrap());
    assert!(
        f.other
            .insert_webhook_within(&webhook("wh_lim_more", "k_lim", &[ORDER]), LIMIT)
            .await
            .unwrap()
    );
    assert_eq!(s.list_webhooks(Some("k_lim")).await.unwrap().len(), LIMIT);
}

// ---- one test per case and store -------------------------------------------------------------

macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let f = Fixture::sqlite().await.unwrap();
                    super::$case(&f).await;
                    f.finish().await;
                }
            )*
        }
        mod postgres {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(f) = Fixture::postgres().await else { return };
                    super::$case(&f).await;
                    f.finish().await;
                }
            )*
        }
    };
}

suite!(
    keys_and_revocation,
    webhooks_crud,
    ingest_dedup_and_conflict,
    concurrent_writes_get_their_own_answers,
    events_after_pages,
    claims_are_exclusive_and_leases_expire,
    claim_limits,
    claims_read_each_endpoint_past_a_backlog,
    finish_and_attempts,
    replay_is_idempotent,
    replay_budgets_bound_webhooks_and_keys,
    deleted_webhooks_keep_their_replays_counted_and_leave_no_attempts,
    attempt_log_is_bounded,
    cursor_key_is_shared,
    prune_keeps_what_is_needed,
    secrets_are_sealed,
    webhook_changes_are_made_in_place,
    revocation_keeps_an_admin_key,
    webhook_limit_holds_under_concurrent_registrations,
);

/// PostgreSQL only: commits are told to every instance (`LISTEN/NOTIFY`), in log order, and
/// concurrent ingests by several instances never leave a position behind one already visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_signals_and_positions_in_commit_order() {
    let Some(f) = Fixture::postgres().await else {
        return;
    };
    assert!(f.store.shared());
    let mut signals = f
        .other
        .signals()
        .await
        .unwrap()
        .expect("PostgreSQL pushes signals");
    // Listening (the first signal says so).
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), signals.recv())
        .await
        .unwrap();
    assert_eq!(first, Some(Signal::Lost));
    let seq = logged(ingest(&*f.store, "e1", ORDER, now()).await);
    f.store.insert_key(&key("k1")).await.unwrap();
    f.store.revoke_key("k1", now()).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let s = tokio::time::timeout(std::time::Duration::from_secs(10), signals.recv())
            .await
            .expect("signals arrive")
            .unwrap();
        got.push(s);
    }
    assert_eq!(got, vec![Signal::Logged(seq), Signal::Revoked]);

    // Three writers and a reader that follows the log like a stream: whenever it sees
    // position N, nothing below N shows up later.
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let s = if w == 0 {
                Arc::clone(&f.store)
            } else {
                Arc::clone(&f.other)
            };
            tokio::spawn(async move {
                for i in 0..60 {
                    logged(ingest(&*s, &format!("w{w}-{i}"), ORDER, now()).await);
                }
            })
        })
        .collect();
    let reader = {
        let s = Arc::clone(&f.other);
        tokio::spawn(async move {
            let types = vec![ORDER.to_owned()];
            let mut after = seq;
            let mut seen = Vec::new();
            while seen.len() < 180 {
                for e in s.events_after(after, &types, 7, usize::MAX).await.unwrap() {
                    after = e.seq;
                    seen.push(e.seq);
                }
            }
            seen
        })
    };
    for w in writers {
        w.await.unwrap();
    }
    let seen = tokio::time::timeout(std::time::Duration::from_secs(30), reader)
        .await
        .expect("the reader sees every position")
        .unwrap();
    let all: Vec<i64> = f
        .store
        .events_after(seq, &[ORDER.to_owned()], 1000, usize::MAX)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seen, all, "a reader following the log missed no position");
    f.finish().await;
}

/// The store chosen from a location: SQLite by default, PostgreSQL for a URL, a clear error
/// otherwise.
#[tokio::test]
async fn open_picks_the_store_from_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let s = evbus_gateway::store::open(None, dir.path(), None)
        .await
        .unwrap();
    assert!(!s.shared());
    assert!(dir.path().join(evbus_gateway::store::DB_FILE).exists());
    let s = evbus_gateway::store::open(Some("sqlite"), dir.path(), None)
        .await
        .unwrap();
    assert!(!s.shared());
    let e = evbus_gateway::store::open(Some("mysql://h/db"), dir.path(), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("postgres://"), "{e}");
    let e = evbus_gateway::store::open(Some("postgres://h/db?schema=a;b"), dir.path(), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("schema"), "{e}");
}
