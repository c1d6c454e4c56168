//! Test helpers shared by the integration tests: a `nats-server` process the test owns.

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// The nats-server binary: `EVBUS_NATS_SERVER`, else `/usr/sbin/nats-server` if present, else
/// `nats-server` on `PATH`.
fn binary() -> String {
    if let Ok(path) = std::env::var("EVBUS_NATS_SERVER") {
        return path;
    }
    if std::path::Path::new("/usr/sbin/nats-server").exists() {
        return "/usr/sbin/nats-server".to_owned();
    }
    "nats-server".to_owned()
}

/// A `nats-server -js` process with a file store in a temporary directory, owned by this
/// harness.
pub struct NatsServer {
    pub port: u16,
    dir: tempfile::TempDir,
    config: Option<PathBuf>,
    child: Mutex<Option<Child>>,
}

impl NatsServer {
    pub fn start() -> std::io::Result<Self> {
        Self::start_inner(None)
    }

    /// Starts a server that also reads `config` (nats-server configuration syntax).
    pub fn start_with_config(config: &str) -> std::io::Result<Self> {
        Self::start_inner(Some(config))
    }

    fn start_inner(config: Option<&str>) -> std::io::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = tempfile::Builder::new()
            .prefix("evbus-nats-test-")
            .tempdir()?;
        let config = match config {
            Some(text) => {
                let path = dir.path().join("nats-server.conf");
                std::fs::write(&path, text)?;
                Some(path)
            }
            None => None,
        };
        let server = NatsServer {
            port,
            dir,
            config,
            child: Mutex::new(None),
        };
        server.spawn()?;
        server.wait_ready()?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// Starts the server on this harness's port and store directory.
    pub fn spawn(&self) -> std::io::Result<()> {
        let mut command = Command::new(binary());
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js"])
            .arg("-sd")
            .arg(self.dir.path().join("store"))
            .arg("-l")
            .arg(self.log())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        Ok(())
    }

    /// Waits until the server greets a client with `INFO` (JetStream has recovered its store
    /// by then: the server opens the client port after enabling JetStream).
    pub fn wait_ready(&self) -> std::io::Result<()> {
        use std::io::{BufRead, BufReader};
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let answered = std::net::TcpStream::connect(("127.0.0.1", self.port)).and_then(|s| {
                s.set_read_timeout(Some(Duration::from_secs(1)))?;
                let mut reader = BufReader::new(s);
                let mut info = String::new();
                reader.read_line(&mut info)?;
                Ok(info.starts_with("INFO"))
            });
            if let Ok(true) = answered {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(std::io::Error::other(format!(
                    "nats-server on port {} did not greet a client within 30s (log: {})",
                    self.port,
                    self.log().display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the server gets no chance to write anything more.
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

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn io_error(what: &str, e: std::io::Error) -> evbus::Error {
    evbus::Error::new(evbus::ErrorKind::Internal, format!("{what}: {e}"))
}
