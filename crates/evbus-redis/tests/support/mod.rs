//! Test helpers shared by the integration tests: a `redis-server` process the test owns.

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// A `redis-server` process with an append-only file, owned by this harness.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    child: Mutex<Option<Child>>,
}

impl RedisServer {
    pub fn start() -> std::io::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir =
            std::env::temp_dir().join(format!("evbus-redis-test-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let server = RedisServer {
            port,
            dir,
            child: Mutex::new(None),
        };
        server.spawn()?;
        server.wait_ready()?;
        Ok(server)
    }

    pub fn spawn(&self) -> std::io::Result<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--logfile", "redis.log"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        Ok(())
    }

    /// Waits until the server answers `PING` (and has loaded its append-only file).
    pub fn wait_ready(&self) -> std::io::Result<()> {
        use std::io::{Read, Write};
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let answered =
                std::net::TcpStream::connect(("127.0.0.1", self.port)).and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(1)))?;
                    s.write_all(b"PING\r\n")?;
                    let mut reply = [0u8; 7];
                    let n = s.read(&mut reply)?;
                    Ok(reply[..n].starts_with(b"+PONG"))
                });
            if let Ok(true) = answered {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(std::io::Error::other(format!(
                    "redis-server on port {} did not answer PING within 30s (log: {})",
                    self.port,
                    self.dir.join("redis.log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn io_error(what: &str, e: std::io::Error) -> evbus::Error {
    evbus::Error::new(evbus::ErrorKind::Internal, format!("{what}: {e}"))
}
