//! Permissions of the gateway's data files: the database holds webhook signing secrets, so
//! the data directory is made `0700` and the database files (`gateway.sqlite3`, its `-wal`
//! and `-shm`) `0600`, whatever the umask, on creation and on every open (unix; elsewhere the
//! platform's defaults apply).

use std::path::{Path, PathBuf};

/// The SQLite files of database `db`: the file itself, its write-ahead log and shared memory.
fn database_files(db: &Path) -> [PathBuf; 3] {
    let with = |suffix: &str| {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    [db.to_path_buf(), with("-wal"), with("-shm")]
}

/// Creates `dir` (and its parents) if needed and makes it `0700`, warning when an existing
/// directory was open to other users.
pub(crate) fn prepare_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(dir)
            .map_err(|e| format!("cannot read the permissions of {}: {e}", dir.display()))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            tracing::warn!(
                dir = %dir.display(),
                mode = format!("{mode:o}"),
                "the gateway data directory was accessible to every user; it holds webhook \
                 secrets: setting it to 0700 (check who could read it before)"
            );
        }
        if mode != 0o700 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| format!("cannot make {} private (0700): {e}", dir.display()))?;
        }
    }
    Ok(())
}

/// Creates database file `db` empty with mode `0600` if it does not exist (SQLite then gives
/// its `-wal` and `-shm` files the same mode), and sets `0600` on every database file present.
pub(crate) fn restrict_database(db: &Path) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(db)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", db.display())),
        }
        for file in database_files(db) {
            match std::fs::metadata(&file) {
                Ok(meta) if meta.permissions().mode() & 0o777 != 0o600 => {
                    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                        .map_err(|e| {
                            format!("cannot make {} private (0600): {e}", file.display())
                        })?;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(format!(
                        "cannot read the permissions of {}: {e}",
                        file.display()
                    ));
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = database_files(db);
    Ok(())
}
