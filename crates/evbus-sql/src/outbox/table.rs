//! The outbox table's name, its DDL for each database, and the SQL the outbox runs on it.

use evbus::{Error, ErrorKind, Result};

/// Number of key-hash buckets. Rows are assigned a bucket when staged (a stable hash of the
/// partition key); relays lease whole buckets, so every key is relayed by one relay at a
/// time and its order is kept. A constant of the table format: changing it would need a
/// migration of the staged rows.
pub(crate) const BUCKETS: i32 = 64;

/// The default table name.
pub(crate) const DEFAULT_TABLE: &str = "evbus_outbox";

/// A validated outbox table name (`name` or `schema.name`), and the names derived from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Table {
    /// As given: `evbus_outbox` or `app.evbus_outbox`.
    pub(crate) name: String,
    /// The table's own name, without its schema (for index names).
    pub(crate) base: String,
    /// The schema, if one was given (`app.` included), else empty.
    pub(crate) schema_prefix: String,
}

impl Table {
    /// Checks `name`: one or two dot-separated parts of lowercase ASCII letters, digits and
    /// `_`, not starting with a digit, each at most 48 characters (PostgreSQL identifiers are
    /// at most 63 bytes; the derived names add up to 11).
    pub(crate) fn new(name: &str) -> Result<Table> {
        let parts: Vec<&str> = name.split('.').collect();
        let valid = |p: &str| {
            !p.is_empty()
                && p.len() <= 48
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                && !p.as_bytes()[0].is_ascii_digit()
        };
        if parts.len() > 2 || !parts.iter().all(|p| valid(p)) {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "invalid outbox table name `{name}`: use `table` or `schema.table`, each part \
                     1 to 48 lowercase ASCII letters, digits or `_`, not starting with a digit"
                ),
            ));
        }
        let (schema_prefix, base) = match parts.as_slice() {
            [schema, base] => (format!("{schema}."), (*base).to_owned()),
            _ => (String::new(), name.to_owned()),
        };
        Ok(Table {
            name: name.to_owned(),
            base,
            schema_prefix,
        })
    }

    /// The leases table (PostgreSQL): one row per bucket, with its owner and expiry.
    pub(crate) fn leases(&self) -> String {
        format!("{}_leases", self.name)
    }

    /// The relays table (PostgreSQL): one heartbeat row per live relay.
    pub(crate) fn relays(&self) -> String {
        format!("{}_relays", self.name)
    }

    /// The `LISTEN`/`NOTIFY` channel (PostgreSQL).
    pub(crate) fn channel(&self) -> &str {
        &self.name
    }

    /// PostgreSQL DDL, idempotent.
    pub(crate) fn postgres_ddl(&self) -> Vec<String> {
        let t = &self.name;
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                    bucket INTEGER NOT NULL,
                    topic TEXT NOT NULL,
                    event_id TEXT NOT NULL,
                    event_type TEXT NOT NULL,
                    partition_key TEXT,
                    event TEXT NOT NULL,
                    staged_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                    attempts INTEGER NOT NULL DEFAULT 0,
                    last_error TEXT
                )"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {}_bucket_seq ON {t} (bucket, seq)",
                self.base
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                    bucket INTEGER PRIMARY KEY,
                    owner TEXT,
                    expires_at TIMESTAMPTZ NOT NULL DEFAULT now()
                )",
                self.leases()
            ),
            format!(
                "INSERT INTO {} (bucket) SELECT generate_series(0, {}) ON CONFLICT DO NOTHING",
                self.leases(),
                BUCKETS - 1
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                    id TEXT PRIMARY KEY,
                    seen_at TIMESTAMPTZ NOT NULL
                )",
                self.relays()
            ),
        ]
    }

    /// SQLite DDL, idempotent. `AUTOINCREMENT` so a sequence number is never reused.
    pub(crate) fn sqlite_ddl(&self) -> Vec<String> {
        vec![format!(
            "CREATE TABLE IF NOT EXISTS {} (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                bucket INTEGER NOT NULL,
                topic TEXT NOT NULL,
                event_id TEXT NOT NULL,
                event_type TEXT NOT NULL,
                partition_key TEXT,
                event TEXT NOT NULL,
                staged_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
                attempts INTEGER NOT NULL DEFAULT 0,
                last_error TEXT
            )",
            self.name
        )]
    }

    /// The insert run when staging; `mark` is the placeholder sigil (`$` for PostgreSQL,
    /// `?` for SQLite).
    pub(crate) fn insert(&self, mark: char) -> String {
        format!(
            "INSERT INTO {} (bucket, topic, event_id, event_type, partition_key, event) \
             VALUES ({mark}1, {mark}2, {mark}3, {mark}4, {mark}5, {mark}6)",
            self.name
        )
    }

    /// The PostgreSQL insert that also notifies the relays (delivered on commit only).
    pub(crate) fn insert_notify(&self) -> String {
        format!(
            "WITH staged AS ({} RETURNING 1) SELECT pg_notify($7, '') FROM staged",
            self.insert('$')
        )
    }
}

/// The bucket of a staged event: FNV-1a (32 bits) of the partition key, or of the event id
/// when it has none, modulo [`BUCKETS`]. Stable across processes and versions: it is stored.
pub(crate) fn bucket_of(key: &str) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    // BUCKETS is a small positive constant: the remainder fits an i32.
    (hash % BUCKETS as u32) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(Table::new("evbus_outbox").is_ok());
        let t = Table::new("app.outbox_1").unwrap();
        assert_eq!(t.base, "outbox_1");
        assert_eq!(t.schema_prefix, "app.");
        assert_eq!(t.leases(), "app.outbox_1_leases");
        for bad in [
            "",
            "Outbox",
            "a.b.c",
            "1table",
            "x;drop",
            "a b",
            &"x".repeat(49),
        ] {
            let e = Table::new(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{bad}");
        }
    }

    #[test]
    fn buckets_are_stable_and_in_range() {
        // FNV-1a 32 of "" is the offset basis; of "a" is 0xe40c292c.
        assert_eq!(bucket_of(""), (0x811c_9dc5_u32 % 64) as i32);
        assert_eq!(bucket_of("a"), (0xe40c_292c_u32 % 64) as i32);
        for i in 0..1000 {
            let b = bucket_of(&format!("key-{i}"));
            assert!((0..BUCKETS).contains(&b));
        }
    }
}
