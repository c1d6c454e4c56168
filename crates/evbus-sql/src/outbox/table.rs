//! The outbox table's name, its DDL for each database, and the SQL the outbox runs on it.

use evbus::{Error, ErrorKind, Result};

/// Number of key-hash buckets. Rows are assigned a bucket when staged (a stable hash of the
/// partition key); relays lease whole buckets, so every key is relayed by one relay at a
/// time and its order is kept. A constant of the table format: changing it would need a
/// migration of the staged rows.
pub(crate) const BUCKETS: i32 = 64;

/// The default table name.
pub(crate) const DEFAULT_TABLE: &str = "evbus_outbox";

/// The longest name PostgreSQL keeps (`NAMEDATALEN` - 1 bytes): a longer identifier is
/// silently truncated, and `pg_notify` refuses a longer channel.
const PG_NAME_MAX: usize = 63;

/// The suffix of the index name, the longest added to the table's own name.
const INDEX_SUFFIX: &str = "_bucket_seq";

/// One statement of a PostgreSQL migration ([`Table::postgres_steps`]).
#[derive(Clone, Debug)]
pub(crate) struct Step {
    pub(crate) creates: Creates,
    /// Idempotent.
    pub(crate) statement: String,
}

/// What a migration step creates, so that a migration can look for it first and run only
/// the steps whose object is missing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Creates {
    /// A table or index: its name, quoted for SQL (and for `to_regclass`).
    Relation(String),
    /// The lease table's bucket rows.
    LeaseRows,
}

/// A validated outbox table name (`name` or `schema.name`), and the names derived from it.
///
/// SQL statements use the quoted forms ([`sql`](Self::sql), [`leases`](Self::leases), ...),
/// so that a name that is also an SQL keyword (`order`, `user`) works; the name is already
/// lowercase, so quoting names the same table as the unquoted name did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Table {
    /// As given: `evbus_outbox` or `app.evbus_outbox`.
    pub(crate) name: String,
    /// The table's own name, without its schema (for index names).
    pub(crate) base: String,
    /// The schema, if one was given (`app.` included), else empty.
    pub(crate) schema_prefix: String,
}

/// `part` as an SQL identifier. Validated parts hold only `[a-z0-9_]`: nothing to escape.
fn quote(part: &str) -> String {
    format!("\"{part}\"")
}

impl Table {
    /// Checks `name`: one or two dot-separated parts of lowercase ASCII letters, digits and
    /// `_`, not starting with a digit, each at most 48 characters (PostgreSQL identifiers are
    /// at most 63 bytes; the derived names add up to 11), and every name derived from it at
    /// most 63 bytes: the whole name is also the `LISTEN`/`NOTIFY` channel (PostgreSQL).
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
        let table = Table {
            name: name.to_owned(),
            base,
            schema_prefix,
        };
        // The longest name PostgreSQL is given: the channel (the whole name) or the index.
        let (longest, what) = [
            (table.channel().to_owned(), "its LISTEN/NOTIFY channel"),
            (format!("{}{INDEX_SUFFIX}", table.base), "its index"),
        ]
        .into_iter()
        .max_by_key(|(derived, _)| derived.len())
        .expect("two names");
        if longest.len() > PG_NAME_MAX {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "invalid outbox table name `{name}`: {what}, `{longest}`, is {} bytes, over \
                     PostgreSQL's limit of {PG_NAME_MAX} bytes for a name; use a name (schema, \
                     dot and table together) of at most {PG_NAME_MAX} bytes",
                    longest.len()
                ),
            ));
        }
        Ok(table)
    }

    /// The outbox table, quoted for SQL: `"evbus_outbox"` or `"app"."evbus_outbox"`.
    pub(crate) fn sql(&self) -> String {
        self.sibling("")
    }

    /// The table `<name><suffix>` in the outbox table's schema, quoted for SQL.
    fn sibling(&self, suffix: &str) -> String {
        let table = quote(&format!("{}{suffix}", self.base));
        match self.schema_prefix.strip_suffix('.') {
            Some(schema) => format!("{}.{table}", quote(schema)),
            None => table,
        }
    }

    /// The leases table (PostgreSQL), quoted for SQL: one row per bucket, with its owner and
    /// expiry.
    pub(crate) fn leases(&self) -> String {
        self.sibling("_leases")
    }

    /// The relays table (PostgreSQL), quoted for SQL: one heartbeat row per live relay.
    pub(crate) fn relays(&self) -> String {
        self.sibling("_relays")
    }

    /// The `LISTEN`/`NOTIFY` channel (PostgreSQL).
    pub(crate) fn channel(&self) -> &str {
        &self.name
    }

    /// PostgreSQL DDL, idempotent.
    pub(crate) fn postgres_ddl(&self) -> Vec<String> {
        self.postgres_steps()
            .into_iter()
            .map(|step| step.statement)
            .collect()
    }

    /// The steps of a PostgreSQL migration, in order: each statement with what it creates.
    pub(crate) fn postgres_steps(&self) -> Vec<Step> {
        let t = &self.sql();
        vec![
            Step {
                creates: Creates::Relation(t.clone()),
                statement: format!(
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
            },
            Step {
                // An index is always in its table's schema, and named without it.
                creates: Creates::Relation(self.sibling(INDEX_SUFFIX)),
                statement: format!(
                    "CREATE INDEX IF NOT EXISTS {} ON {t} (bucket, seq)",
                    quote(&format!("{}{INDEX_SUFFIX}", self.base))
                ),
            },
            Step {
                creates: Creates::Relation(self.leases()),
                statement: format!(
                    "CREATE TABLE IF NOT EXISTS {} (
                    bucket INTEGER PRIMARY KEY,
                    owner TEXT,
                    expires_at TIMESTAMPTZ NOT NULL DEFAULT now()
                )",
                    self.leases()
                ),
            },
            Step {
                creates: Creates::LeaseRows,
                statement: self.seed_leases(),
            },
            Step {
                creates: Creates::Relation(self.relays()),
                statement: format!(
                    "CREATE TABLE IF NOT EXISTS {} (
                    id TEXT PRIMARY KEY,
                    seen_at TIMESTAMPTZ NOT NULL
                )",
                    self.relays()
                ),
            },
        ]
    }

    /// The number of the lease table's rows that are bucket rows (PostgreSQL):
    /// [`BUCKETS`] once they are all there.
    pub(crate) fn count_lease_rows(&self) -> String {
        format!(
            "SELECT count(*) FROM {} WHERE bucket >= 0 AND bucket < {BUCKETS}",
            self.leases()
        )
    }

    /// Inserts the lease table's missing bucket rows (PostgreSQL), idempotent: a relay leases
    /// only buckets that have a row.
    pub(crate) fn seed_leases(&self) -> String {
        format!(
            "INSERT INTO {} (bucket) SELECT generate_series(0, {}) ON CONFLICT DO NOTHING",
            self.leases(),
            BUCKETS - 1
        )
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
            self.sql()
        )]
    }

    /// The insert run when staging; `mark` is the placeholder sigil (`$` for PostgreSQL,
    /// `?` for SQLite).
    pub(crate) fn insert(&self, mark: char) -> String {
        format!(
            "INSERT INTO {} (bucket, topic, event_id, event_type, partition_key, event) \
             VALUES ({mark}1, {mark}2, {mark}3, {mark}4, {mark}5, {mark}6)",
            self.sql()
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
        assert_eq!(t.sql(), r#""app"."outbox_1""#);
        assert_eq!(t.leases(), r#""app"."outbox_1_leases""#);
        assert_eq!(t.relays(), r#""app"."outbox_1_relays""#);
        let t = Table::new("order").unwrap();
        assert_eq!(t.sql(), r#""order""#);
        assert_eq!(t.leases(), r#""order_leases""#);
        assert!(t.insert('$').starts_with(r#"INSERT INTO "order" ("#));
        assert!(
            t.postgres_ddl()[1]
                .starts_with(r#"CREATE INDEX IF NOT EXISTS "order_bucket_seq" ON "order" ("#)
        );
        assert!(t.sqlite_ddl()[0].starts_with(r#"CREATE TABLE IF NOT EXISTS "order" ("#));
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

    /// Every name PostgreSQL is given fits its 63 bytes: a longer `NOTIFY` channel failed
    /// every `stage` ("channel name too long") although `migrate` and the relay worked.
    #[test]
    fn names_whose_channel_is_over_63_bytes_are_refused() {
        // 30 + 1 + 32 = 63 bytes: the longest accepted.
        let longest = format!("{}.{}", "s".repeat(30), "t".repeat(32));
        assert_eq!(longest.len(), 63);
        let t = Table::new(&longest).unwrap();
        assert_eq!(t.channel().len(), 63);
        for name in [
            format!("{}.{}", "s".repeat(30), "t".repeat(33)),
            format!("{}.{}", "s".repeat(48), "t".repeat(48)),
            // The reviewer's name.
            "sqlrev_schema_for_the_orders_service.orders_outbox_events_v1_xyz".to_owned(),
        ] {
            let e = Table::new(&name).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{name}");
            assert!(e.to_string().contains("63 bytes"), "{e}");
        }
        // A table without a schema: the index name (48 + 11 bytes) is the longest, and fits.
        let t = Table::new(&"x".repeat(48)).unwrap();
        assert!(t.postgres_ddl()[1].contains(&format!("\"{}_bucket_seq\"", "x".repeat(48))));
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
