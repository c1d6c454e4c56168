//! Broker processes owned by a test: what an adapter's tests need to run the outage cases
//! ([`BrokerControl`](crate::BrokerControl)) against a broker of their own, never the shared
//! one.
//!
//! [`BrokerProcess`] runs one broker on a free local port with its data in a fresh
//! directory, kills it with `SIGKILL` (no chance to write anything more) and starts it again
//! on the same port and data. The adapter keeps what is specific to its broker: the command
//! line, and the readiness probe (a broker that accepts TCP connections is not always ready
//! to serve).
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use std::process::Command;
//! use std::time::Duration;
//!
//! use evbus_conformance::process::{BrokerProcess, free_port};
//!
//! # fn main() -> std::io::Result<()> {
//! let server = BrokerProcess::builder("redis-server", |dir, port| {
//!     let mut command = Command::new("redis-server");
//!     command
//!         .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
//!         .args(["--appendonly", "yes", "--appendfsync", "always"])
//!         .arg("--dir")
//!         .arg(dir);
//!     command
//! })
//! .port(free_port()?)
//! .ready_when(Duration::from_secs(30), |port| {
//!     let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
//!     stream.set_read_timeout(Some(Duration::from_secs(1)))?;
//!     stream.write_all(b"PING\r\n")?;
//!     let mut reply = [0u8; 5];
//!     stream.read_exact(&mut reply)?;
//!     Ok(&reply == b"+PONG")
//! })
//! .start()?;
//! server.kill(); // the outage
//! server.restart()?; // same port, same data
//! assert!(server.is_running());
//! # Ok(()) }
//! ```

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound, then released, so another process can take it
/// first; good enough for tests).
///
/// The port is drawn at random from below the kernel's ephemeral range where there is room
/// (Linux: `net.ipv4.ip_local_port_range`), so the source port of some other program's
/// outgoing connection, or another caller's `bind(0)`, cannot take it between this call and
/// the broker's bind. Without that room it falls back to a port the kernel picks.
pub fn free_port() -> io::Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static DRAWS: AtomicU64 = AtomicU64::new(0);
    const LOWEST: u16 = 20_000;

    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > LOWEST + 1_000 {
        let span = u64::from(ephemeral_low - LOWEST);
        for _ in 0..64 {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u64(DRAWS.fetch_add(1, Ordering::Relaxed));
            hasher.write_u32(std::process::id());
            let port = LOWEST + (hasher.finish() % span) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A readiness probe that only checks that `127.0.0.1:port` accepts TCP connections.
pub fn accepts_connections(port: u16) -> io::Result<bool> {
    std::net::TcpStream::connect(("127.0.0.1", port)).map(|_| true)
}

type CommandFn = dyn Fn(&Path, u16) -> Command + Send + Sync;
type ProbeFn = dyn Fn(u16) -> io::Result<bool> + Send + Sync;

/// Settings of a [`BrokerProcess`], from [`BrokerProcess::builder`].
pub struct BrokerProcessBuilder {
    name: String,
    command: Box<CommandFn>,
    port: Option<u16>,
    probe: Box<ProbeFn>,
    ready_within: Duration,
    process_group: bool,
    log_file: Option<String>,
    keep_data: bool,
}

impl std::fmt::Debug for BrokerProcessBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerProcessBuilder")
            .field("name", &self.name)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl BrokerProcessBuilder {
    /// The port the broker listens on; a [`free_port`] by default.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// How to tell the broker is ready: `probe(port)` is called every 50 ms until it returns
    /// `Ok(true)`, for at most `within`. By default, [`accepts_connections`] for 30 s.
    pub fn ready_when(
        mut self,
        within: Duration,
        probe: impl Fn(u16) -> io::Result<bool> + Send + Sync + 'static,
    ) -> Self {
        self.ready_within = within;
        self.probe = Box::new(probe);
        self
    }

    /// Runs the broker in a process group of its own and kills the whole group: for a broker
    /// started through a script (RabbitMQ's `rabbitmq-server` runs an Erlang VM), so that
    /// `SIGKILL` reaches the broker and not only the script. Unix only.
    pub fn process_group(mut self) -> Self {
        self.process_group = true;
        self
    }

    /// Writes the broker's standard output and error to `name` in its data directory
    /// (otherwise they are discarded).
    pub fn log_file(mut self, name: impl Into<String>) -> Self {
        self.log_file = Some(name.into());
        self
    }

    /// Keeps the data directory when the [`BrokerProcess`] is dropped (for a post-mortem).
    pub fn keep_data(mut self, keep: bool) -> Self {
        self.keep_data = keep;
        self
    }

    /// Creates the (empty) data directory without starting the broker: write configuration
    /// files into [`BrokerProcess::data_dir`], then call [`BrokerProcess::restart`].
    pub fn build(self) -> io::Result<BrokerProcess> {
        let port = match self.port {
            Some(port) => port,
            None => free_port()?,
        };
        let slug: String = self
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let dir =
            std::env::temp_dir().join(format!("evbus-test-{slug}-{}-{port}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(|| sweep_orphans(&std::env::temp_dir()));
        std::fs::create_dir_all(&dir)?;
        if self.keep_data {
            std::fs::write(dir.join(KEEP_MARKER), b"")?;
        }
        Ok(BrokerProcess {
            name: self.name,
            command: self.command,
            port,
            dir,
            probe: self.probe,
            ready_within: self.ready_within,
            process_group: self.process_group,
            log_file: self.log_file,
            keep_data: self.keep_data,
            child: Mutex::new(None),
        })
    }

    /// [`build`](Self::build)s, starts the broker and waits until it is ready.
    pub fn start(self) -> io::Result<BrokerProcess> {
        let broker = self.build()?;
        broker.restart()?;
        Ok(broker)
    }
}

/// A broker process owned by a test: started on a fixed port with its data in a directory
/// of its own, killed with `SIGKILL` and restarted on the same port and data. Dropping it
/// kills the broker and removes the data directory.
pub struct BrokerProcess {
    name: String,
    command: Box<CommandFn>,
    port: u16,
    dir: PathBuf,
    probe: Box<ProbeFn>,
    ready_within: Duration,
    process_group: bool,
    log_file: Option<String>,
    keep_data: bool,
    child: Mutex<Option<Child>>,
}

impl std::fmt::Debug for BrokerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerProcess")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl BrokerProcess {
    /// A broker named `name` (in error messages) that `command(data_dir, port)` starts. The
    /// command runs in the data directory with no standard input; its output is discarded
    /// unless [`log_file`](BrokerProcessBuilder::log_file) says where to write it.
    pub fn builder(
        name: impl Into<String>,
        command: impl Fn(&Path, u16) -> Command + Send + Sync + 'static,
    ) -> BrokerProcessBuilder {
        BrokerProcessBuilder {
            name: name.into(),
            command: Box::new(command),
            port: None,
            probe: Box::new(accepts_connections),
            ready_within: Duration::from_secs(30),
            process_group: false,
            log_file: None,
            keep_data: false,
        }
    }

    /// The port the broker listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's data directory (kept across restarts).
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the broker process (without waiting until it is ready).
    pub fn spawn(&self) -> io::Result<()> {
        let mut command = (self.command)(&self.dir, self.port);
        command.current_dir(&self.dir).stdin(Stdio::null());
        match &self.log_file {
            Some(name) => {
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join(name))?;
                command.stdout(log.try_clone()?).stderr(log);
            }
            None => {
                command.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        #[cfg(unix)]
        if self.process_group {
            use std::os::unix::process::CommandExt;
            command.process_group(0);
        }
        let child = command
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {}: {e}", self.name)))?;
        *self.child() = Some(child);
        Ok(())
    }

    /// Waits until the readiness probe passes; fails if the process exits meanwhile or the
    /// probe does not pass in time.
    pub fn wait_ready(&self) -> io::Result<()> {
        let deadline = Instant::now() + self.ready_within;
        loop {
            if let Ok(true) = (self.probe)(self.port) {
                return Ok(());
            }
            if !self.is_running() {
                return Err(io::Error::other(format!(
                    "{} on port {} exited while starting (data and logs: {})",
                    self.name,
                    self.port,
                    self.dir.display()
                )));
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "{} on port {} was not ready within {:?} (data and logs: {})",
                    self.name,
                    self.port,
                    self.ready_within,
                    self.dir.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the broker again on the same port and data if it is not running, and waits
    /// until it is ready.
    pub fn restart(&self) -> io::Result<()> {
        if !self.is_running() {
            self.spawn()?;
        }
        self.wait_ready()
    }

    /// Kills the broker with `SIGKILL` (its whole process group with
    /// [`process_group`](BrokerProcessBuilder::process_group)), then waits (up to 10 s) until
    /// its port is closed, so a restart can bind it.
    pub fn kill(&self) {
        let Some(mut child) = self.child().take() else {
            return;
        };
        if self.process_group {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = child.kill();
        let _ = child.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the broker process is running (it was started and has not exited).
    pub fn is_running(&self) -> bool {
        self.child()
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

/// Written into a data directory kept after the broker is dropped
/// ([`keep_data`](BrokerProcessBuilder::keep_data)), so that [`sweep_orphans`] keeps it too.
const KEEP_MARKER: &str = ".evbus-keep";

/// Kills the brokers of test processes that died without dropping them (a crash, a
/// `SIGKILL`: no destructor ran), and removes their data directories.
///
/// A broker runs in its data directory, `evbus-test-<name>-<test pid>-<port>` under `tmp`.
/// For each such directory whose test process is gone, every process whose working
/// directory it is gets `SIGKILL` (with its process group, for a broker that leads one).
/// Runs once per test process, before its first broker; a no-op where `/proc` is missing.
fn sweep_orphans(tmp: &Path) {
    if !Path::new("/proc/self/cwd").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    let orphaned: Vec<PathBuf> = entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|dir| {
            let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
                return false;
            };
            let Some(rest) = name.strip_prefix("evbus-test-") else {
                return false;
            };
            // `<name>-<pid>-<port>`: the owner is the second number from the end.
            let mut numbers = rest.rsplit('-');
            let (Some(_port), Some(owner)) = (numbers.next(), numbers.next()) else {
                return false;
            };
            owner.parse::<u32>().is_ok_and(|pid| {
                pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
            })
        })
        .collect();
    if orphaned.is_empty() {
        return;
    }
    if let Ok(processes) = std::fs::read_dir("/proc") {
        for process in processes.flatten() {
            let Some(pid) = process
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(cwd) = std::fs::read_link(process.path().join("cwd")) else {
                continue;
            };
            if orphaned.contains(&cwd) {
                for target in [format!("-{pid}"), pid.to_string()] {
                    let _ = Command::new("kill")
                        .args(["-KILL", "--", &target])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
    }
    for dir in orphaned {
        if !dir.join(KEEP_MARKER).exists() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill();
        if !self.keep_data {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_can_be_bound() {
        let port = free_port().unwrap();
        assert_ne!(port, 0);
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
    }

    #[test]
    fn free_ports_stay_out_of_the_range_outgoing_connections_take() {
        let Ok(range) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
            return;
        };
        let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
        if low <= 21_000 {
            return;
        }
        let ports: Vec<u16> = (0..32).map(|_| free_port().unwrap()).collect();
        assert!(
            ports.iter().all(|&port| (20_000..low).contains(&port)),
            "{ports:?}"
        );
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() > 16, "not drawn at random: {ports:?}");
    }

    #[test]
    fn a_process_that_exits_is_reported_while_waiting() {
        let process = BrokerProcess::builder("a broker that exits", |_, _| Command::new("true"))
            .ready_when(Duration::from_secs(5), |_| Ok(false))
            .build()
            .unwrap();
        let dir = process.data_dir().to_owned();
        assert!(dir.is_dir());
        let err = process.restart().unwrap_err();
        assert!(err.to_string().contains("exited while starting"), "{err}");
        drop(process);
        assert!(!dir.exists());
    }

    #[test]
    fn brokers_of_a_test_process_that_died_are_killed_by_the_next_one() {
        let tmp = std::env::temp_dir().join(format!("evbus-sweep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        // A test process that is gone: one that ran and was reaped.
        let mut gone = Command::new("true").spawn().unwrap();
        let owner = gone.id();
        gone.wait().unwrap();
        let orphan_dir = tmp.join(format!("evbus-test-sleep-{owner}-1234"));
        // A broker of a test process still alive (this one): left alone.
        let live_dir = tmp.join(format!("evbus-test-sleep-{}-1235", std::process::id()));
        for dir in [&orphan_dir, &live_dir] {
            std::fs::create_dir_all(dir).unwrap();
        }
        let start = |dir: &Path| {
            Command::new("sleep")
                .arg("60")
                .current_dir(dir)
                .spawn()
                .unwrap()
        };
        let mut orphan = start(&orphan_dir);
        let mut live = start(&live_dir);

        sweep_orphans(&tmp);

        let deadline = Instant::now() + Duration::from_secs(10);
        while orphan.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the orphaned broker still runs");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!orphan_dir.exists(), "the orphan's data directory is gone");
        assert!(
            live.try_wait().unwrap().is_none(),
            "a live test's broker was killed"
        );
        assert!(live_dir.exists());
        let _ = live.kill();
        let _ = live.wait();
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn a_running_process_is_killed_and_restarted() {
        let process = BrokerProcess::builder("sleep", |_, _| {
            let mut command = Command::new("sleep");
            command.arg("30");
            command
        })
        .ready_when(Duration::from_secs(5), |_| Ok(true))
        .start()
        .unwrap();
        assert!(process.is_running());
        process.kill();
        assert!(!process.is_running());
        process.restart().unwrap();
        assert!(process.is_running());
    }
}
