//! Brokers in containers (feature `containers`): the suite against a broker image instead of a
//! broker installed on the machine, and the outage cases through the container itself.
//!
//! An adapter's conformance target switches to container mode when
//! [`IMAGE_VAR`] (`EVBUS_CONFORMANCE_IMAGE`) names an image ([`image_from_env`]): it starts
//! one [`BrokerContainer`] from it for the ordinary cases (its URL points at the container's
//! published port instead of `EVBUS_<ADAPTER>_URL`) and a second one for the outage cases,
//! wrapped in a [`ContainerControl`]: *interrupt* kills the container with `SIGKILL` (or
//! pauses it, for a broker that keeps its data in memory, see [`Outage`]) and *resume*
//! starts it again on the same published port and the same data (or unpauses it). Both
//! containers are removed when dropped. `cargo xtask conformance --containers` sets the
//! variable for each adapter; anyone can set it by hand:
//!
//! ```sh
//! EVBUS_CONFORMANCE_IMAGE=evbus/redis:7.0 cargo test -p evbus-redis --test conformance
//! ```
//!
//! Containers are managed through the Docker Engine API with [`bollard`] (the client
//! testcontainers is built on), at the API version the daemon speaks: the client negotiates
//! it first, so Docker 20.10 (API 1.41) works as well as current releases. The daemon is the
//! one `DOCKER_HOST` names, else the local socket. See `docs/adr/0011-containers.md`.
//!
//! A broker port is published on `127.0.0.1` only, on a fixed free host port, so that it stays
//! the same across a restart of the container and clients reconnect to the same address.
//! Readiness is the image's `HEALTHCHECK` when it has one (the images in `docker/` all do),
//! else the probe given to [`ContainerSpec::ready_when`], else the published port accepting
//! TCP connections (which, through Docker's port proxy, says little: give a probe).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bollard::Docker;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HealthStatusEnum, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, KillContainerOptions, RemoveContainerOptions,
};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};

use crate::BrokerControl;
use crate::process::free_port;

/// The variable naming the broker image of container mode (`EVBUS_CONFORMANCE_IMAGE`).
pub const IMAGE_VAR: &str = "EVBUS_CONFORMANCE_IMAGE";

/// The label every container started here carries (its value is the process id), so that
/// leftovers of a crashed run can be found: `docker ps -aq --filter label=org.evbus.conformance`.
pub const LABEL: &str = "org.evbus.conformance";

/// The image named by [`IMAGE_VAR`], if it is set and not empty.
pub fn image_from_env() -> Option<String> {
    std::env::var(IMAGE_VAR)
        .ok()
        .map(|image| image.trim().to_owned())
        .filter(|image| !image.is_empty())
}

/// How [`BrokerContainer::interrupt`] makes the broker unavailable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outage {
    /// `SIGKILL` to the container (no clean shutdown); resume starts it again with the same
    /// filesystem and published port. For brokers that keep acknowledged data on disk.
    Kill,
    /// Freezes every process of the container (`docker pause`); resume thaws them. For brokers
    /// that keep their data in memory only, where a restart would lose it: connections stay
    /// open but nothing answers until the resume.
    Pause,
}

type ProbeFn = dyn Fn(u16) -> io::Result<bool> + Send + Sync;

/// What container to run: image, broker port, outage mode, readiness.
#[derive(Clone)]
pub struct ContainerSpec {
    image: String,
    port: u16,
    same_port_var: Option<String>,
    env: Vec<String>,
    outage: Outage,
    before_interrupt: Option<Vec<String>>,
    probe: Option<Arc<ProbeFn>>,
    ready_within: Duration,
}

impl fmt::Debug for ContainerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContainerSpec")
            .field("image", &self.image)
            .field("port", &self.port)
            .field("same_port_var", &self.same_port_var)
            .field("env", &self.env)
            .field("outage", &self.outage)
            .field("before_interrupt", &self.before_interrupt)
            .field("probe", &self.probe.is_some())
            .field("ready_within", &self.ready_within)
            .finish()
    }
}

impl ContainerSpec {
    /// A container of `image` whose broker listens on `port` inside; [`Outage::Kill`], ready
    /// within 120 s.
    pub fn new(image: impl Into<String>, port: u16) -> Self {
        ContainerSpec {
            image: image.into(),
            port,
            same_port_var: None,
            env: Vec::new(),
            outage: Outage::Kill,
            before_interrupt: None,
            probe: None,
            ready_within: Duration::from_secs(120),
        }
    }

    /// How the container is interrupted ([`Outage::Kill`] by default).
    pub fn outage(mut self, outage: Outage) -> Self {
        self.outage = outage;
        self
    }

    /// Publishes the host port as the *same* port inside the container and passes it in the
    /// environment variable `var`: for a broker that advertises its own address to clients
    /// (Kafka), which must then be the address clients reach.
    pub fn same_port_inside(mut self, var: impl Into<String>) -> Self {
        self.same_port_var = Some(var.into());
        self
    }

    /// Adds `NAME=value` to the container's environment.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push(format!("{name}={value}"));
        self
    }

    /// A command run in the container before every [`Outage::Kill`] interrupt, which must
    /// succeed: for a broker that needs something flushed that it should have flushed itself
    /// (RabbitMQ 3.10's Ra registry).
    pub fn exec_before_interrupt(mut self, command: &[&str]) -> Self {
        self.before_interrupt = Some(command.iter().map(|s| (*s).to_owned()).collect());
        self
    }

    /// How to tell the broker is ready when the image has no `HEALTHCHECK`: `probe(host_port)`
    /// is called every 100 ms until it returns `Ok(true)`, for at most `within`.
    pub fn ready_when(
        mut self,
        within: Duration,
        probe: impl Fn(u16) -> io::Result<bool> + Send + Sync + 'static,
    ) -> Self {
        self.ready_within = within;
        self.probe = Some(Arc::new(probe));
        self
    }

    /// The image.
    pub fn image(&self) -> &str {
        &self.image
    }
}

/// A Docker client at the API version the daemon speaks.
async fn docker() -> io::Result<Docker> {
    let docker = Docker::connect_with_defaults().map_err(|e| docker_error("connecting", e))?;
    docker
        .negotiate_version()
        .await
        .map_err(|e| docker_error("asking the Docker daemon for its API version", e))
}

fn docker_error(what: &str, e: bollard::errors::Error) -> io::Error {
    io::Error::other(format!("Docker: {what}: {e}"))
}

/// A broker container owned by a test: published on a fixed port of 127.0.0.1, interrupted
/// and resumed as its [`Outage`] says, removed (with its data) when dropped.
pub struct BrokerContainer {
    docker: Docker,
    id: String,
    name: String,
    host_port: u16,
    spec: ContainerSpec,
    removed: AtomicBool,
}

impl fmt::Debug for BrokerContainer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerContainer")
            .field("name", &self.name)
            .field("image", &self.spec.image)
            .field("host_port", &self.host_port)
            .finish_non_exhaustive()
    }
}

impl BrokerContainer {
    /// Creates and starts a container as `spec` says and waits until it is ready.
    pub async fn start(spec: ContainerSpec) -> io::Result<Self> {
        let docker = docker().await?;
        let mut last = None;
        // The free port may be taken before Docker binds it: try a few.
        for _ in 0..3 {
            let host_port = free_port()?;
            match Self::create(&docker, &spec, host_port).await {
                Ok(container) => {
                    container.wait_ready().await?;
                    return Ok(container);
                }
                Err(e) if e.to_string().contains("already") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no free port")))
    }

    /// [`start`](Self::start) from synchronous code running inside a multi-thread tokio
    /// runtime (the build closure of [`crate::main`]).
    pub fn start_blocking(spec: ContainerSpec) -> io::Result<Self> {
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(Self::start(spec))
        })
    }

    async fn create(docker: &Docker, spec: &ContainerSpec, host_port: u16) -> io::Result<Self> {
        let inside = if spec.same_port_var.is_some() {
            host_port
        } else {
            spec.port
        };
        let mut env = spec.env.clone();
        if let Some(var) = &spec.same_port_var {
            env.push(format!("{var}={host_port}"));
        }
        let slug: String = spec
            .image
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let name = format!("evbus-ct-{slug}-{}-{host_port}", std::process::id());
        let bindings = HashMap::from([(
            format!("{inside}/tcp"),
            Some(vec![PortBinding {
                host_ip: Some("127.0.0.1".to_owned()),
                host_port: Some(host_port.to_string()),
            }]),
        )]);
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            env: Some(env),
            // A port is published only if it is exposed (the image may expose another one).
            exposed_ports: Some(vec![format!("{inside}/tcp")]),
            labels: Some(HashMap::from([(
                LABEL.to_owned(),
                std::process::id().to_string(),
            )])),
            host_config: Some(HostConfig {
                port_bindings: Some(bindings),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(name.clone()),
            ..Default::default()
        };
        let created = docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| {
                docker_error(
                    &format!(
                        "creating a container of `{}` (build the image first: `cargo xtask \
                         containers build`)",
                        spec.image
                    ),
                    e,
                )
            })?;
        let container = BrokerContainer {
            docker: docker.clone(),
            id: created.id,
            name,
            host_port,
            spec: spec.clone(),
            removed: AtomicBool::new(false),
        };
        // Dropped (and removed) if it cannot start.
        container
            .docker
            .start_container(&container.id, None)
            .await
            .map_err(|e| docker_error(&format!("starting {}", container.name), e))?;
        Ok(container)
    }

    /// The port on 127.0.0.1 where the broker is published (the same across restarts).
    pub fn host_port(&self) -> u16 {
        self.host_port
    }

    /// The container's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The container's name (`evbus-ct-<image>-<pid>-<port>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits until the container is ready: its health check passes (or, without one, the
    /// spec's probe or the published port). Fails if it stops meanwhile or is not ready in
    /// time, with the end of its log.
    pub async fn wait_ready(&self) -> io::Result<()> {
        let deadline = Instant::now() + self.spec.ready_within;
        loop {
            let inspect = self
                .docker
                .inspect_container(&self.id, None::<InspectContainerOptions>)
                .await
                .map_err(|e| docker_error(&format!("inspecting {}", self.name), e))?;
            let state = inspect.state.unwrap_or_default();
            if state.running != Some(true) {
                return Err(io::Error::other(format!(
                    "{} ({}) stopped while starting (exit code {:?}); its log ends with:\n{}",
                    self.name,
                    self.spec.image,
                    state.exit_code,
                    self.log_tail().await
                )));
            }
            let ready = match state.health.and_then(|h| h.status) {
                Some(HealthStatusEnum::HEALTHY) => true,
                Some(HealthStatusEnum::STARTING | HealthStatusEnum::UNHEALTHY) => false,
                _ => {
                    let port = self.host_port;
                    match &self.spec.probe {
                        Some(probe) => matches!(probe(port), Ok(true)),
                        None => crate::process::accepts_connections(port).unwrap_or(false),
                    }
                }
            };
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "{} ({}) was not ready within {:?}; its log ends with:\n{}",
                    self.name,
                    self.spec.image,
                    self.spec.ready_within,
                    self.log_tail().await
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines of the container's output, for error messages.
    async fn log_tail(&self) -> String {
        let options = bollard::query_parameters::LogsOptions {
            stdout: true,
            stderr: true,
            tail: "30".to_owned(),
            ..Default::default()
        };
        let mut logs = self.docker.logs(&self.id, Some(options));
        let mut text = String::new();
        while let Some(Ok(chunk)) = logs.next().await {
            text.push_str(&chunk.to_string());
        }
        text
    }

    /// Runs `command` in the container and returns its output; fails if it exits non-zero.
    pub async fn exec(&self, command: &[&str]) -> io::Result<String> {
        let shown = command.join(" ");
        let failed = |e| docker_error(&format!("running `{shown}` in {}", self.name), e);
        let exec = self
            .docker
            .create_exec(
                &self.id,
                CreateExecOptions {
                    cmd: Some(command.to_vec()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await
            .map_err(failed)?;
        let mut text = String::new();
        if let StartExecResults::Attached { mut output, .. } = self
            .docker
            .start_exec(&exec.id, None)
            .await
            .map_err(failed)?
        {
            while let Some(chunk) = output.next().await {
                text.push_str(&chunk.map_err(failed)?.to_string());
            }
        }
        let code = self
            .docker
            .inspect_exec(&exec.id)
            .await
            .map_err(failed)?
            .exit_code;
        if code == Some(0) {
            Ok(text)
        } else {
            Err(io::Error::other(format!(
                "`{shown}` in {} exited with {code:?}: {}",
                self.name,
                text.trim()
            )))
        }
    }

    /// Makes the broker unavailable: `SIGKILL` ([`Outage::Kill`], after the spec's
    /// [`exec_before_interrupt`](ContainerSpec::exec_before_interrupt) command) or a pause.
    pub async fn interrupt(&self) -> io::Result<()> {
        match self.spec.outage {
            Outage::Kill => {
                if let Some(command) = &self.spec.before_interrupt {
                    let command: Vec<&str> = command.iter().map(String::as_str).collect();
                    self.exec(&command).await?;
                }
                let options = KillContainerOptions {
                    signal: "SIGKILL".to_owned(),
                };
                self.docker
                    .kill_container(&self.id, Some(options))
                    .await
                    .map_err(|e| docker_error(&format!("killing {}", self.name), e))?;
                // Stopped once Docker says so: the published port is closed by then.
                let deadline = Instant::now() + Duration::from_secs(30);
                while self.state().await?.0 {
                    if Instant::now() >= deadline {
                        return Err(io::Error::other(format!(
                            "{} still runs 30 s after SIGKILL",
                            self.name
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(())
            }
            Outage::Pause => self
                .docker
                .pause_container(&self.id)
                .await
                .map_err(|e| docker_error(&format!("pausing {}", self.name), e)),
        }
    }

    /// Makes the broker available again: unpauses it, or starts it again (same filesystem,
    /// same published port) and waits until it is ready. A no-op on a running container.
    pub async fn resume(&self) -> io::Result<()> {
        let (running, paused) = self.state().await?;
        if paused {
            return self
                .docker
                .unpause_container(&self.id)
                .await
                .map_err(|e| docker_error(&format!("unpausing {}", self.name), e));
        }
        if !running {
            self.docker
                .start_container(&self.id, None)
                .await
                .map_err(|e| docker_error(&format!("starting {} again", self.name), e))?;
        }
        self.wait_ready().await
    }

    /// Whether the container is running, and whether it is paused.
    async fn state(&self) -> io::Result<(bool, bool)> {
        let inspect = self
            .docker
            .inspect_container(&self.id, None::<InspectContainerOptions>)
            .await
            .map_err(|e| docker_error(&format!("inspecting {}", self.name), e))?;
        let state = inspect.state.unwrap_or_default();
        Ok((state.running == Some(true), state.paused == Some(true)))
    }

    /// Removes the container and its data (also done on drop).
    pub async fn remove(&self) -> io::Result<()> {
        if self.removed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        remove(&self.docker, &self.id).await
    }
}

async fn remove(docker: &Docker, id: &str) -> io::Result<()> {
    let options = RemoveContainerOptions {
        force: true,
        v: true,
        ..Default::default()
    };
    docker
        .remove_container(id, Some(options))
        .await
        .map_err(|e| docker_error(&format!("removing container {id}"), e))
}

impl Drop for BrokerContainer {
    fn drop(&mut self) {
        if self.removed.swap(true, Ordering::SeqCst) {
            return;
        }
        // Drop cannot await, and may run inside a runtime: remove from a thread of its own.
        let id = self.id.clone();
        let done = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async { remove(&docker().await?, &id).await })
        })
        .join();
        if let Ok(Err(e)) = done {
            eprintln!("WARNING: {e}");
        }
    }
}

/// Starts the containers of an adapter's container mode, all at once, and waits until each
/// is ready. If one cannot start, removes those that did, prints the failure as the suite
/// would (`FAIL <adapter> (0.00s): container mode: <error>` and
/// `conformance <adapter>: 0 passed, 1 failed, 0 ignored`) and ends the process with a
/// failure: a container run that cannot run its broker must never pass. Call it from the
/// build closure of [`crate::main`] (inside its multi-thread runtime).
pub fn start_or_exit(adapter: &str, specs: Vec<ContainerSpec>) -> Vec<BrokerContainer> {
    let images: Vec<String> = specs.iter().map(|s| s.image.clone()).collect();
    let started = tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(futures::future::join_all(
            specs.into_iter().map(BrokerContainer::start),
        ))
    });
    let mut containers = Vec::new();
    let mut errors = Vec::new();
    for (result, image) in started.into_iter().zip(images) {
        match result {
            Ok(container) => containers.push(container),
            Err(e) => errors.push(format!("{image}: {e}")),
        }
    }
    if errors.is_empty() {
        return containers;
    }
    drop(containers);
    let reason = errors.join("; ").replace('\n', " | ");
    println!("FAIL {adapter} (0.00s): container mode ({IMAGE_VAR}): {reason}");
    println!("conformance {adapter}: 0 passed, 1 failed, 0 ignored");
    std::process::exit(1);
}

type ConnectFn<T> = dyn Fn(u16) -> BoxFuture<'static, evbus::Result<T>> + Send + Sync;

/// A [`BrokerControl`] over a [`BrokerContainer`]: the outage cases interrupt and resume the
/// container itself.
pub struct ContainerControl<T> {
    container: BrokerContainer,
    connect: Box<ConnectFn<T>>,
}

impl<T> fmt::Debug for ContainerControl<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContainerControl")
            .field("container", &self.container)
            .finish_non_exhaustive()
    }
}

impl<T: evbus::Transport + 'static> ContainerControl<T> {
    /// A control over `container`; `connect(host_port)` opens a connection to it (with
    /// settings fit for an outage: short timeouts and reconnection delays).
    pub fn new<F, Fut>(container: BrokerContainer, connect: F) -> Self
    where
        F: Fn(u16) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = evbus::Result<T>> + Send + 'static,
    {
        ContainerControl {
            container,
            connect: Box::new(move |port| connect(port).boxed()),
        }
    }

    /// The controlled container.
    pub fn container(&self) -> &BrokerContainer {
        &self.container
    }
}

fn control_error(e: io::Error) -> evbus::Error {
    evbus::Error::new(evbus::ErrorKind::Internal, e.to_string())
}

#[async_trait]
impl<T: evbus::Transport + 'static> BrokerControl for ContainerControl<T> {
    type Transport = T;

    async fn connect(&self) -> evbus::Result<T> {
        (self.connect)(self.container.host_port()).await
    }

    async fn interrupt(&self) -> evbus::Result<()> {
        self.container.interrupt().await.map_err(control_error)
    }

    async fn resume(&self) -> evbus::Result<()> {
        self.container.resume().await.map_err(control_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_keeps_its_settings() {
        let spec = ContainerSpec::new("evbus/tansu:x", 9092)
            .outage(Outage::Pause)
            .same_port_inside("TANSU_PORT")
            .env("A", "b")
            .exec_before_interrupt(&["true"]);
        assert_eq!(spec.image(), "evbus/tansu:x");
        assert_eq!(spec.outage, Outage::Pause);
        assert_eq!(spec.same_port_var.as_deref(), Some("TANSU_PORT"));
        assert_eq!(spec.env, ["A=b"]);
        assert_eq!(spec.before_interrupt, Some(vec!["true".to_owned()]));
    }
}
