//! The transactional outbox run by roles with the least rights it needs, on real PostgreSQL
//! (`EVBUS_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`; the roles log in
//! as the server's `pg_hba.conf` lets that URL's user). Each test makes its own role and
//! drops it at the end. Without a reachable server the test says so loudly and passes,
//! unless `CI` or `EVBUS_REQUIRE_BROKERS` is set.

mod outbox_support;

use std::collections::HashSet;
use std::sync::Arc;

use evbus::bus::Emit;
use evbus::memory::MemoryBroker;
use evbus_sql::outbox::{Outbox, Relay};
use outbox_support::*;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// A relay whose role may read and update the lease table but not insert into it (all it
/// needs once the tables are migrated) publishes: it looks the lease rows up before it
/// would add missing ones. Before, it tried the `INSERT` at every start and retried the
/// refusal for ever, publishing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_without_insert_on_the_lease_table_publishes() {
    let Some(owner) = pg_pool().await else { return };
    let table = table_name();
    let role = format!("obx_relay_{}", std::process::id());
    let outbox = Outbox::with_table(&bus(), &table).unwrap();
    outbox.migrate(&owner).await.unwrap();
    for statement in [
        format!("DROP ROLE IF EXISTS {role}"),
        format!("CREATE ROLE {role} LOGIN"),
        format!("GRANT SELECT, UPDATE ON {table}_leases TO {role}"),
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON {table}, {table}_relays TO {role}"),
    ] {
        sqlx::query(&statement).execute(&owner).await.unwrap();
    }
    let options: PgConnectOptions = pg_url().parse().unwrap();
    let relay_pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options.username(&role))
        .await
        .unwrap();
    let transport = MemoryBroker::new(Default::default()).connect();
    let mut sub = subscribe(&transport, TYPE).await;
    let relay = Relay::postgres(relay_pool.clone(), Arc::new(transport.clone()))
        .table(&table)
        .spawn()
        .unwrap();
    let mut ids = HashSet::new();
    let mut tx = owner.begin().await.unwrap();
    for n in 0..8u64 {
        let emit =
            Emit::new(TYPE, json!({"orderId": format!("o{n}"), "seq": 0})).key(format!("k{n}"));
        ids.insert(outbox.stage(&mut tx, emit).await.unwrap());
    }
    tx.commit().await.unwrap();
    let mut seen = Seen::default();
    seen.until_all(&mut sub, &ids).await;
    relay.shutdown().await.unwrap();
    relay_pool.close().await;
    drop_tables(&owner, &table).await;
    for statement in [format!("DROP OWNED BY {role}"), format!("DROP ROLE {role}")] {
        sqlx::query(&statement).execute(&owner).await.unwrap();
    }
}
