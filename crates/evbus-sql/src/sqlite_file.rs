//! The single-process rule of an SQLite database file: the first process to open it holds an
//! exclusive lock (`flock`) on `<file>.lock` until its last transport on the file closes or
//! the process exits (the kernel releases it even on SIGKILL). Another process is refused
//! with an error naming the holder's pid. Transports of one process share the hold and the
//! consumers' wake-up signals. `<file>` is the file's real path (symbolic links resolved), and
//! a file with several names (hard links) is refused: each name would get its own lock file
//! and its own SQLite `-wal`/`-shm`. The lock is never taken on the database file itself:
//! closing any descriptor of it would drop this process's POSIX locks SQLite holds on it.

use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use evbus::{Error, ErrorKind, Result};

use crate::wake::Wakers;

/// This process's hold on one database file.
#[derive(Debug)]
pub(crate) struct SqliteFile {
    path: PathBuf,
    _lock: File,
    wakers: Arc<Wakers>,
}

fn open_files() -> &'static Mutex<HashMap<PathBuf, Weak<SqliteFile>>> {
    static OPEN: OnceLock<Mutex<HashMap<PathBuf, Weak<SqliteFile>>>> = OnceLock::new();
    OPEN.get_or_init(Default::default)
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e: std::io::Error| Error::client(ErrorKind::InvalidConfig, what, e)
}

/// Takes the exclusive lock (`flock`) on `lock_path`, writing this process's id in it for
/// whoever is refused next; `refused(holder, lock_path)` is the error when another open file
/// holds it, in this process or another ("process 1234", or "another process").
pub(crate) fn hold(lock_path: &Path, refused: impl FnOnce(&str, &Path) -> Error) -> Result<File> {
    let mut lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(lock_path)
        .map_err(io(format!("opening the lock file {}", lock_path.display())))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = lock.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() {
                "another process".to_owned()
            } else {
                format!("process {holder}")
            };
            return Err(refused(&holder, lock_path));
        }
        Err(TryLockError::Error(e)) => {
            return Err(io(format!("locking {}", lock_path.display()))(e));
        }
    }
    // Name the holder for whoever is refused next (best effort).
    let _ = lock
        .set_len(0)
        .and_then(|()| lock.rewind())
        .and_then(|()| write!(lock, "{}", std::process::id()))
        .and_then(|()| lock.flush());
    Ok(lock)
}

/// The path that names `path`'s file for the single-process rule: the file itself with every
/// symbolic link resolved when it exists (a link to the file leads to the file's own lock),
/// else its resolved directory joined with its name (SQLite creates it there). A symbolic
/// link to a file not created yet is followed too, so the file it creates has the same lock
/// as when it is opened by its own name later.
fn canonical(path: &Path) -> Result<PathBuf> {
    let mut path = path.to_path_buf();
    // As the kernel does, give up on a chain of more than 40 links (a loop).
    for _ in 0..40 {
        if let Ok(resolved) = path.canonicalize() {
            return Ok(resolved);
        }
        match std::fs::read_link(&path) {
            // A dangling link: resolve its target, relative to the link's directory.
            Ok(target) => {
                path = match path.parent() {
                    Some(dir) if target.is_relative() => dir.join(target),
                    _ => target,
                };
            }
            Err(_) => break,
        }
    }
    let absolute =
        std::path::absolute(&path).map_err(io(format!("resolving {}", path.display())))?;
    Ok(match (absolute.parent(), absolute.file_name()) {
        (Some(dir), Some(name)) => dir
            .canonicalize()
            .map_err(io(format!("resolving {}", dir.display())))?
            .join(name),
        _ => absolute,
    })
}

/// Refuses a database file with more than one name (hard link): SQLite keeps its `-wal` and
/// `-shm` files, and this crate its lock files, beside the name it was opened by, so two
/// processes writing through two names are not coordinated and corrupt the file. A file that
/// does not exist yet is fine.
pub(crate) fn refuse_extra_links(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.is_file()
            && meta.nlink() > 1
        {
            return Err(Error::invalid_config(format!(
                "the SQLite database {} has {} names (hard links); SQLite cannot coordinate \
                 two names of one file: each name gets its own -wal and -shm files (and its \
                 own lock file), so processes opening it by different names would corrupt it",
                path.display(),
                meta.nlink()
            ))
            .with_hint(
                "remove the extra link (`find / -xdev -samefile <file>` lists them) and open \
                 the database by one path only (a symbolic link is fine)",
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

impl SqliteFile {
    /// Takes (or shares, within this process) the hold on `path`, creating its directory.
    /// The hold belongs to the file, whatever name (symbolic links resolved) opens it; a
    /// file with several names (hard links) is refused.
    pub(crate) fn open(path: &Path) -> Result<Arc<SqliteFile>> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(io(format!("creating the directory {}", parent.display())))?;
        }
        let canonical = canonical(path)?;
        refuse_extra_links(&canonical)?;
        let mut open = open_files()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        open.retain(|_, file| file.strong_count() > 0);
        if let Some(file) = open.get(&canonical).and_then(Weak::upgrade) {
            return Ok(file);
        }
        let mut lock_path = canonical.clone().into_os_string();
        lock_path.push(".lock");
        let lock = hold(&PathBuf::from(lock_path), |holder, lock_path| {
            Error::invalid_config(format!(
                "the SQLite database {} is already open in {holder} (it holds {}); an \
                 SQLite bus belongs to one process",
                canonical.display(),
                lock_path.display()
            ))
            .with_hint(
                "stop the other process, give this one its own file, or use postgres:// \
                 for a bus shared by several processes",
            )
        })?;
        let file = Arc::new(SqliteFile {
            path: canonical.clone(),
            _lock: lock,
            wakers: Arc::default(),
        });
        open.insert(canonical, Arc::downgrade(&file));
        Ok(file)
    }

    /// The database file (absolute).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The wake-up signals of every consumer of this file in this process.
    pub(crate) fn wakers(&self) -> &Arc<Wakers> {
        &self.wakers
    }
}
