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
/// directory was open to other users. A directory made here is made `0700` from the start,
/// so a first run has nothing to warn about. Returns the mode of an existing directory that
/// was open to every user (the case warned about).
pub(crate) fn prepare_dir(dir: &Path) -> Result<Option<u32>, String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let existed = dir.is_dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let meta = std::fs::metadata(dir)
            .map_err(|e| format!("cannot read the permissions of {}: {e}", dir.display()))?;
        let mode = meta.permissions().mode() & 0o777;
        let open = existed && mode & 0o007 != 0;
        if open {
            tracing::warn!(
                dir = %dir.display(),
                mode = format!("{mode:o}"),
                "the gateway data directory was accessible to every user; it holds webhook \
                 secrets: setting it to 0700 (check who could read it before)"
            );
        }
        // Also for a directory made here under an unusual umask (one that removes owner bits).
        if mode != 0o700 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| format!("cannot make {} private (0700): {e}", dir.display()))?;
        }
        Ok(open.then_some(mode))
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(None)
    }
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

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_directory_made_here_is_private_from_the_start_and_not_warned_about() {
        let root = tempfile::tempdir().unwrap();
        let fresh = root.path().join("a/data");
        // What a first `evbus serve` does with `./.evbus`: no warning that the directory
        // "was accessible to every user" when nobody else could ever have seen it.
        assert_eq!(prepare_dir(&fresh), Ok(None));
        assert_eq!(mode(&fresh), 0o700);
        // Opening it again finds it private.
        assert_eq!(prepare_dir(&fresh), Ok(None));
        assert_eq!(mode(&fresh), 0o700);
    }

    #[test]
    fn an_existing_directory_open_to_every_user_is_reported_and_made_private() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(prepare_dir(&dir), Ok(Some(0o755)));
        assert_eq!(mode(&dir), 0o700);
        // Open to the group only: made private without the warning about every user.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        assert_eq!(prepare_dir(&dir), Ok(None));
        assert_eq!(mode(&dir), 0o700);
    }
}
