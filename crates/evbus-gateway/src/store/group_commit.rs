//! Group commit for the SQLite store.
//!
//! Every commit of a SQLite database in WAL mode with `synchronous=FULL` waits for an
//! `fsync` of the log: about 0.4 ms on this project's test machine, ten times the write
//! itself. A posted event made three commits (its publish claim, its settlement, its log row),
//! one after another behind the store's writer lock, so the gateway accepted fewer than a
//! thousand events a second whatever the CPU. Here the hot writes are queued instead, and one
//! task makes all those waiting in one transaction: N concurrent writes wait for one `fsync`,
//! and each caller gets its answer only once its write is durable.
//!
//! A write that fails must not take the others with it, nor leave half of itself behind. A
//! savepoint per write would do that, but costs two more statements per write, each a round
//! trip to sqlx's connection thread: a third of the webhook throughput. So writes run without
//! savepoints, and a write is a function of owned arguments that can run again: when one fails,
//! the transaction is rolled back, that write gets its error, and the others are made again,
//! each in its own transaction (rare: the store's statements do not fail on conflicts). If a
//! transaction cannot begin or commit, every write in it gets that error and none was made.

use std::sync::Arc;

use futures::future::BoxFuture;
use sqlx::{Connection, SqliteConnection, SqlitePool};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{StoreError, StoreResult};

/// Most writes made in one transaction.
const MAX_BATCH: usize = 256;

/// Writes queued at most; beyond, callers wait for room (memory stays bounded under load).
const QUEUE: usize = 4096;

/// The statements of one write: run on a connection inside a transaction, with the write's
/// own arguments. A plain function (no captures), so it can run again.
pub(super) type Statements<A, T> =
    for<'c> fn(&'c mut SqliteConnection, &'c A) -> BoxFuture<'c, StoreResult<T>>;

/// One queued write, its arguments and result type erased.
trait Write: Send {
    /// Runs the write (again, if it ran in a transaction that was rolled back), keeping its
    /// result; whether it succeeded.
    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, bool>;

    /// Hands the result to the caller: `committed` is `Ok` if the transaction it last ran in
    /// was committed (then the write's own result is given), else that error.
    fn finish(self: Box<Self>, committed: StoreResult<()>);
}

struct Pending<A, T> {
    args: A,
    statements: Statements<A, T>,
    result: Option<StoreResult<T>>,
    reply: oneshot::Sender<StoreResult<T>>,
}

impl<A: Send + Sync, T: Send> Write for Pending<A, T> {
    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, bool> {
        Box::pin(async move {
            let result = (self.statements)(conn, &self.args).await;
            let ok = result.is_ok();
            self.result = Some(result);
            ok
        })
    }

    fn finish(self: Box<Self>, committed: StoreResult<()>) {
        let result = match (committed, self.result) {
            (Err(e), _) => Err(e),
            (Ok(()), Some(result)) => result,
            (Ok(()), None) => Err(StoreError("the write was never made".into())),
        };
        // The caller may have stopped waiting.
        let _ = self.reply.send(result);
    }
}

/// The queue of the store's batched writes and the task making them.
#[derive(Clone, Debug)]
pub(super) struct GroupCommit {
    queue: mpsc::Sender<Box<dyn Write>>,
}

impl GroupCommit {
    /// Starts the writing task. It takes `lock` around each transaction, so the store's other
    /// writes (made directly under the same lock) never wait in SQLite's busy handler. It ends
    /// once every handle is dropped.
    pub(super) fn start(pool: SqlitePool, lock: Arc<Mutex<()>>) -> Self {
        let (queue, writes) = mpsc::channel(QUEUE);
        tokio::spawn(run(pool, lock, writes));
        GroupCommit { queue }
    }

    /// Runs `statements` with `args` in the next transaction and returns their result once
    /// that transaction is committed. If the caller stops waiting, the write is still made.
    pub(super) async fn write<A, T>(&self, args: A, statements: Statements<A, T>) -> StoreResult<T>
    where
        A: Send + Sync + 'static,
        T: Send + 'static,
    {
        let (write, answer) = pending(args, statements);
        self.queue.send(write).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn pending<A, T>(
    args: A,
    statements: Statements<A, T>,
) -> (Box<dyn Write>, oneshot::Receiver<StoreResult<T>>)
where
    A: Send + Sync + 'static,
    T: Send + 'static,
{
    let (reply, answer) = oneshot::channel();
    let write = Pending {
        args,
        statements,
        result: None,
        reply,
    };
    (Box::new(write), answer)
}

fn stopped() -> StoreError {
    StoreError("the store's writer has stopped (the store was closed)".into())
}

async fn run(pool: SqlitePool, lock: Arc<Mutex<()>>, mut queue: mpsc::Receiver<Box<dyn Write>>) {
    let mut writes = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut writes, MAX_BATCH).await > 0 {
        let _write = lock.lock().await;
        commit(&pool, std::mem::take(&mut writes)).await;
    }
}

/// Makes `writes` in one transaction and completes them; if one fails, it gets its error and
/// the others are made one transaction each.
async fn commit(pool: &SqlitePool, mut writes: Vec<Box<dyn Write>>) {
    let mut conn = match pool.acquire().await {
        Ok(conn) => conn,
        Err(e) => return fail(writes, &e),
    };
    match transaction(&mut conn, &mut writes).await {
        Ok(None) => writes.into_iter().for_each(|w| w.finish(Ok(()))),
        Ok(Some(failed)) => {
            // Rolled back: the failed write gets its own error, the others go again alone.
            writes.remove(failed).finish(Ok(()));
            tracing::debug!(
                writes = writes.len(),
                "a batched store write failed; making the others one by one"
            );
            for mut write in writes {
                match transaction(&mut conn, std::slice::from_mut(&mut write)).await {
                    // Committed, or rolled back with the write's own error kept.
                    Ok(_) => write.finish(Ok(())),
                    Err(e) => fail(vec![write], &e),
                }
            }
        }
        Err(e) => fail(writes, &e),
    }
}

/// Runs `writes` in one transaction: committed (`None`), or rolled back at the first write that
/// failed (its index), or an error of the transaction itself (nothing was made).
async fn transaction(
    conn: &mut SqliteConnection,
    writes: &mut [Box<dyn Write>],
) -> Result<Option<usize>, sqlx::Error> {
    let mut tx = conn.begin().await?;
    for (i, write) in writes.iter_mut().enumerate() {
        if !write.run(&mut tx).await {
            // SQLite may have rolled back already (some errors end the transaction): then
            // this finds none to roll back, and that is no failure of the others.
            if let Err(e) = tx.rollback().await {
                tracing::debug!(error = %e, "rolling back a failed batch");
            }
            return Ok(Some(i));
        }
    }
    tx.commit().await?;
    Ok(None)
}

fn fail(writes: Vec<Box<dyn Write>>, error: &sqlx::Error) {
    let message = error.to_string();
    tracing::warn!(error = %message, writes = writes.len(), "gateway store writes failed; none of them was made");
    for write in writes {
        write.finish(Err(StoreError(message.clone())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Row;
    use sqlx::sqlite::SqlitePoolOptions;

    async fn pool() -> SqlitePool {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (k TEXT PRIMARY KEY)")
            .execute(&pool)
            .await
            .unwrap();
        pool
    }

    fn insert<'c>(
        conn: &'c mut SqliteConnection,
        k: &'c &'static str,
    ) -> BoxFuture<'c, StoreResult<u64>> {
        Box::pin(async move {
            let done = sqlx::query("INSERT INTO t (k) VALUES (?)")
                .bind(*k)
                .execute(&mut *conn)
                .await?;
            Ok(done.rows_affected())
        })
    }

    /// Two rows whose second breaks the key: neither may be kept.
    fn twice<'c>(
        conn: &'c mut SqliteConnection,
        k: &'c &'static str,
    ) -> BoxFuture<'c, StoreResult<()>> {
        Box::pin(async move {
            for _ in 0..2 {
                sqlx::query("INSERT INTO t (k) VALUES (?)")
                    .bind(*k)
                    .execute(&mut *conn)
                    .await?;
            }
            Ok(())
        })
    }

    async fn keys(pool: &SqlitePool) -> Vec<String> {
        sqlx::query("SELECT k FROM t ORDER BY k")
            .fetch_all(pool)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get("k"))
            .collect()
    }

    #[tokio::test]
    async fn writes_share_one_transaction_and_a_failing_one_alone_is_undone() {
        let pool = pool().await;
        let (a, a_answer) = pending("a", insert);
        let (dup, dup_answer) = pending("c", twice);
        let (b, b_answer) = pending("b", insert);
        commit(&pool, vec![a, dup, b]).await;
        assert_eq!(a_answer.await.unwrap().unwrap(), 1);
        assert_eq!(b_answer.await.unwrap().unwrap(), 1);
        let err = dup_answer
            .await
            .unwrap()
            .expect_err("the duplicate key fails");
        assert!(err.0.contains("UNIQUE"), "{}", err.0);
        // Nothing of the failed write is kept; the others are.
        assert_eq!(keys(&pool).await, ["a", "b"]);
    }

    #[tokio::test]
    async fn writes_in_one_transaction_see_each_other_in_order() {
        let pool = pool().await;
        let (a, a_answer) = pending("a", insert);
        // Made after `a` in the same transaction: it finds `a` and fails alone.
        let (again, again_answer) = pending("a", insert);
        let (b, b_answer) = pending("b", insert);
        commit(&pool, vec![a, again, b]).await;
        assert_eq!(a_answer.await.unwrap().unwrap(), 1);
        assert!(again_answer.await.unwrap().is_err());
        assert_eq!(b_answer.await.unwrap().unwrap(), 1);
        assert_eq!(keys(&pool).await, ["a", "b"]);
    }

    #[tokio::test]
    async fn when_the_transaction_cannot_start_every_write_gets_the_error() {
        let pool = pool().await;
        let (a, a_answer) = pending("a", insert);
        let (b, b_answer) = pending("b", insert);
        pool.close().await;
        commit(&pool, vec![a, b]).await;
        assert!(a_answer.await.unwrap().is_err());
        assert!(b_answer.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn a_write_gets_its_answer_only_after_the_commit_and_a_closed_pool_is_an_error() {
        let pool = pool().await;
        let writes = GroupCommit::start(pool.clone(), Arc::default());
        writes.write("x", insert).await.unwrap();
        // Committed: a read on another connection of the pool sees it.
        assert_eq!(keys(&pool).await, ["x"]);
        pool.close().await;
        let err = writes
            .write("y", insert)
            .await
            .expect_err("a closed pool refuses");
        assert!(!err.0.is_empty());
    }
}
