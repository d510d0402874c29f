//! The sandbox: one VM per pod, with its directory (`paths`), share mounts, helper processes,
//! network, cgroup and the VMM's user.

mod boot;
pub mod devices;
mod dns;
pub mod exec_limits;
mod forward;
pub mod mounts;
mod network;
pub mod paths;
pub mod pod;
pub mod resolve;
pub mod share;
pub mod sizing;
pub mod spec;
pub mod standalone;
pub mod user;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::agent_client::{AgentClient, AgentError};
use crate::cgroup::{CgroupError, PodCgroup};
use crate::config::{Config, ConfigError, SharedFsKind};
use crate::daemon::{kill_from_pid_file, wait_gone, DaemonError};
use crate::hooks::HookError;
use crate::ids::{validate, IdError};
use crate::metrics::{AppContainers, MetricsServer, ShimMetrics};
use crate::net::{NetError, NetnsHolder, PodNetwork};
use crate::timing::Timings;
use crate::vmm::{Hypervisor, VmmError};
use mounts::MountError;
pub use paths::SandboxPaths;
use paths::{MAX_SOCKET_PATH, PID_FILES};
pub use share::virtiofsd::SharedFs;
pub use share::ContainerRootfs;
use spec::SpecError;
use user::UserError;
const STOP_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Id(#[from] IdError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    ShareNamespace(#[from] share::namespace::NamespaceError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Hook(#[from] HookError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    User(#[from] UserError),
    #[error(transparent)]
    Resolve(#[from] resolve::ResolveError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Sizing(#[from] sizing::SizingError),
    /// The container's spec, as the guest would get it, is unusable.
    #[error("the container's OCI spec cannot go to the guest: {0}")]
    SpecTooLarge(String),
    /// The container belongs to a sandbox this shim does not run.
    #[error("container {id} names sandbox {sandbox}, which this shim does not run")]
    Foreign { id: String, sandbox: String },
    /// A container with this id is in the sandbox already.
    #[error("container {0} already exists")]
    Exists(String),
    /// A step that needs the VM came before it was booted.
    #[error("the sandbox VM is not running")]
    NotBooted,
    /// The VM did not come up; carries the end of the guest console.
    #[error("the sandbox VM did not come up: {reason}; guest console: {console}")]
    Boot { reason: String, console: String },
    /// A path would be too long for a unix socket.
    #[error("socket path {0} is too long (at most {MAX_SOCKET_PATH} bytes); use shorter ids or a shorter runtime.sandbox_root")]
    PathTooLong(PathBuf),
    /// A file or directory operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SandboxError {
    let path = path.to_path_buf();
    move |source| SandboxError::Io { what, path, source }
}

pub struct Sandbox {
    pub id: String,
    pub namespace: String,
    pub paths: SandboxPaths,
    config: Config,
    fs: Option<Box<dyn SharedFs>>,
    vmm: Option<Box<dyn Hypervisor>>,
    agent: Option<Arc<dyn AgentClient>>,
    /// The pod's network namespace: the VMM runs in it and takes its interfaces over.
    netns: Option<PathBuf>,
    /// A thread in `netns`, whose id hooks get as the container's pid before the VMM exists.
    holder: Option<NetnsHolder>,
    network: Option<PodNetwork>,
    /// Set when the namespace changed since the VM last matched it (`net::watch`).
    network_dirty: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The task that follows the namespace while the pod runs; ends with the sandbox.
    network_watch: Option<tokio::task::JoinHandle<()>>,
    /// Whether the pod gets a port forwarder: Kubernetes pods only (`choose_network`).
    forward_ports: bool,
    /// Carries `kubectl port-forward` into the pod (`forward`).
    port_forward: Option<forward::PortForward>,
    /// Answers Docker's DNS server in the guest (`dns`), from the first container that asks.
    dns_relay: Option<dns::DnsRelay>,
    /// Stops the VM when virtiofsd dies under it (see `watch_shared_fs`).
    fs_watch: Option<tokio::task::JoinHandle<()>>,
    /// The pod's cgroup on the host, which the VMM and its helpers join.
    cgroup: Option<PodCgroup>,
    /// The unprivileged user the VMM runs as.
    vmm_user: Option<user::Claim>,
    /// Directories the guest can write into (read-write volumes, root filesystems), by
    /// identity: bind sources are never resolved through a symlink in one of them.
    guest_writable: Vec<resolve::Identity>,
    /// The containers attached to the share, by id.
    containers: BTreeSet<String>,
    /// Where the share's mounts live (`share::namespace`): made with the share.
    share_ns: Option<share::namespace::ShareNamespace>,
    /// For a pod without a sandbox container (`standalone`): what the guest makes in its place,
    /// sent at boot; and the pid of the pod init it started, which containers join.
    pod_init: Option<hako_protocol::PodInit>,
    pod_init_pid: u32,
    pod_hostname: String,
    pub timings: Timings,
    /// The sandbox's instruments (start phases, agent calls, hot-plugs).
    pub metrics: Arc<ShimMetrics>,
    /// Serves them on `metrics.sock` from `prepare` to teardown.
    metrics_server: Option<MetricsServer>,
    /// The pod's app containers and their names, for the guest's metrics.
    pub app_containers: Arc<AppContainers>,
}

impl Sandbox {
    /// Makes the sandbox dir, its share mounts, the pod's cgroup (`cgroups_path`, the first
    /// container's) and claims the VMM's user. On error nothing is left behind.
    pub async fn prepare(
        config: &Config,
        namespace: &str,
        sandbox_id: &str,
        cgroups_path: Option<&str>,
    ) -> Result<Self, SandboxError> {
        let paths = SandboxPaths::new(&config.runtime.sandbox_root, namespace, sandbox_id)?;
        if paths.dir.exists() {
            log::warn!(
                "sandbox dir {} exists from an earlier run; cleaning it up",
                paths.dir.display()
            );
            cleanup_on_disk(&config.runtime.sandbox_root, namespace, sandbox_id).await?;
        }
        let sandbox = Self {
            id: sandbox_id.to_string(),
            namespace: namespace.to_string(),
            paths,
            config: config.clone(),
            fs: None,
            vmm: None,
            agent: None,
            netns: None,
            holder: None,
            network: None,
            network_dirty: None,
            network_watch: None,
            forward_ports: false,
            port_forward: None,
            dns_relay: None,
            fs_watch: None,
            cgroup: None,
            vmm_user: None,
            guest_writable: Vec::new(),
            containers: BTreeSet::new(),
            share_ns: None,
            pod_init: None,
            pod_init_pid: 0,
            pod_hostname: String::new(),
            timings: Timings::new(),
            metrics: Arc::new(ShimMetrics::new()),
            metrics_server: None,
            app_containers: Arc::default(),
        };
        let mut sandbox = sandbox;
        if let Err(e) = sandbox.make_dirs(cgroups_path) {
            let _ = sandbox.unmount_share();
            sandbox.release_host_resources().await;
            let _ = remove_sandbox_dir(&sandbox.paths.dir);
            return Err(e);
        }
        sandbox.serve_metrics();
        Ok(sandbox)
    }

    /// Metrics are for watching the pod, not for running it: a socket that cannot be bound is
    /// logged and the pod starts without it.
    fn serve_metrics(&mut self) {
        let paths = &self.paths;
        let source = crate::metrics::Source::new(self.metrics.clone(), &paths.dir).with_guest(
            crate::metrics::GuestSource {
                agent_socket: paths.agent_socket.clone(),
                containers: self.app_containers.clone(),
            },
        );
        match MetricsServer::bind(&paths.metrics_socket, Arc::new(source)) {
            Ok(server) => self.metrics_server = Some(server),
            Err(e) => log::warn!("sandbox {}: no metrics: {e}", self.id),
        }
    }

    /// The sandbox dir (`rw/`, `ro/`, and `vmm/` owned by the VMM's user), the pod's cgroup
    /// and the VMM's user, each recorded for `cleanup_on_disk`.
    fn make_dirs(&mut self, cgroups_path: Option<&str>) -> Result<(), SandboxError> {
        self.make_share()?;
        let root = &self.config.runtime.sandbox_root;
        if let Some(path) = cgroups_path.filter(|p| !p.is_empty()) {
            let cgroup = PodCgroup::create(path, root)?;
            let record = serde_json::to_vec(&cgroup).unwrap_or_default();
            let at = &self.paths.cgroup_record;
            self.cgroup = Some(cgroup);
            fs::write(at, record).map_err(io_err("writing", at))?;
        }
        // QEMU serves 9p itself and must open the share's files as their owners: it stays root
        // there (ADR 9: not for production).
        let count = self.config.runtime.vmm_uid_count;
        if count > 0 && self.config.hypervisor.shared_fs == SharedFsKind::VirtioFs {
            let key = format!("{}/{}", self.namespace, self.id);
            let claim = user::claim(root, &key, self.config.runtime.vmm_uid_base, count)?;
            let at = &self.paths.vmm_user_record;
            let file = claim.file().to_path_buf();
            self.vmm_user = Some(claim);
            fs::write(at, file.as_os_str().as_encoded_bytes()).map_err(io_err("writing", at))?;
        }
        let vmm_dir = &self.paths.vmm_dir;
        fs::DirBuilder::new()
            .mode(0o700)
            .create(vmm_dir)
            .map_err(io_err("creating", vmm_dir))?;
        crate::vmm::hand_to(self.vmm_user(), vmm_dir)?;
        Ok(())
    }

    fn vmm_user(&self) -> Option<&crate::vmm::VmmUser> {
        self.vmm_user.as_ref().map(|c| &c.user)
    }

    /// Gives back the pod's cgroup and the VMM's uid, once their processes are gone.
    async fn release_host_resources(&mut self) {
        if let Some(cgroup) = self.cgroup.take() {
            cgroup
                .remove_when_empty(&self.config.runtime.sandbox_root, STOP_GRACE)
                .await;
        }
        if let Some(claim) = self.vmm_user.take() {
            claim.release();
        }
    }

    /// Gives a prepared sandbox a VM and an agent without booting: for tests of the layers
    /// above, with a stand-in VMM and agent.
    #[cfg(test)]
    pub fn install(&mut self, vmm: Box<dyn Hypervisor>, agent: Arc<dyn AgentClient>) {
        self.vmm = Some(vmm);
        self.agent = Some(agent);
    }

    /// Whether a container's limits fit this sandbox's running VM (`sizing`).
    pub fn check_fits(&self, needs: &sizing::Needs) -> Result<(), SandboxError> {
        let hv = &self.config.hypervisor;
        Ok(sizing::check(hv.vcpus, hv.memory_mib, needs)?)
    }

    pub fn has_container(&self, id: &str) -> bool {
        self.containers.contains(id)
    }

    pub fn has_containers(&self) -> bool {
        !self.containers.is_empty()
    }

    pub fn agent(&self) -> Option<Arc<dyn AgentClient>> {
        self.agent.clone()
    }

    /// Whether `netns` is the namespace this sandbox's VM runs in.
    pub fn holds_netns(&self, netns: &Path) -> bool {
        let identity = crate::net::namespace::identity;
        match (&self.netns, identity(netns)) {
            (Some(own), Ok(given)) => identity(own).is_ok_and(|id| id == given),
            _ => false,
        }
    }

    pub fn vm_exit(&self) -> Option<watch::Receiver<Option<i32>>> {
        self.vmm.as_ref().and_then(|v| v.exit_watch())
    }

    pub fn vmm_pid(&self) -> u32 {
        self.vmm.as_ref().and_then(|v| v.pid()).unwrap_or(0)
    }

    /// Stops the VM and daemons and removes the sandbox dir. Safe to call at any stage.
    pub async fn shutdown(&mut self) -> Result<(), SandboxError> {
        let started = std::time::Instant::now();
        let result = self.stop_everything().await;
        log::info!(
            "sandbox {} teardown={:.1}ms",
            self.id,
            started.elapsed().as_secs_f64() * 1000.0
        );
        result
    }

    async fn stop_everything(&mut self) -> Result<(), SandboxError> {
        // First, so a scrape during teardown finds no sandbox rather than a dying one.
        self.metrics_server.take();
        self.dns_relay.take();
        if let Some(port_forward) = self.port_forward.take() {
            // The shim's own namespace goes with the sandbox dir; a pod's (CRI, Docker) may
            // outlive the VM.
            let own = self.netns.as_deref() == Some(self.paths.netns.as_path());
            port_forward.stop(!own);
        }
        self.holder.take();
        if let Some(task) = self.network_watch.take() {
            task.abort();
        }
        // Stopping virtiofsd below is on purpose.
        if let Some(watch) = self.fs_watch.take() {
            watch.abort();
        }
        if let Some(agent) = self.agent.take() {
            let vm_alive = self.vm_exit().is_some_and(|rx| rx.borrow().is_none());
            if vm_alive {
                if let Err(e) = agent.destroy_sandbox().await {
                    log::warn!("sandbox {}: DestroySandbox: {e}", self.id);
                }
            }
        }
        if let Some(vmm) = self.vmm.as_mut() {
            vmm.stop(STOP_GRACE).await;
        }
        if let Some(fs) = self.fs.take() {
            fs.process().stop(STOP_GRACE).await;
        }
        if let Some(network) = self.network.take() {
            network.teardown();
        }
        self.release_host_resources().await;
        self.unmount_share()?;
        mounts::unmount_all_under(&self.paths.dir)?;
        remove_sandbox_dir(&self.paths.dir)
    }
}

fn remove_sandbox_dir(dir: &Path) -> Result<(), SandboxError> {
    mounts::remove_tree(dir)?;
    // The namespace dir goes when its last sandbox does; another shim may race us to it.
    if let Some(parent) = dir.parent() {
        let _ = fs::remove_dir(parent);
    }
    Ok(())
}

/// The sandbox of `namespace` whose VM runs in the network namespace `netns`, if any: a
/// container given another sandbox's network namespace (Docker's `--network container:<x>`
/// names `/proc/<x's VMM>/ns/net`) shares that sandbox's network stack, which only its VM has.
pub fn holding_netns(root: &Path, namespace: &str, netns: &Path) -> Option<String> {
    let wanted = crate::net::namespace::identity(netns).ok()?;
    validate("namespace", namespace).ok()?;
    fs::read_dir(root.join(namespace))
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let id = entry.file_name().to_str()?.to_string();
            validate("sandbox id", &id).ok()?;
            let pid = crate::daemon::live_pid(&entry.path().join("vmm.pid"))?;
            let held = crate::net::namespace::identity(Path::new(&format!("/proc/{pid}/ns/net")));
            (held.ok()? == wanted).then_some(id)
        })
        .next()
}

/// Cleanup from what is on disk, for the `delete` subcommand and stale dirs: kills the
/// processes the pid files name (only if they are still the same processes), unmounts
/// everything under the sandbox dir and removes it. Idempotent.
pub async fn cleanup_on_disk(
    root: &Path,
    namespace: &str,
    sandbox_id: &str,
) -> Result<(), SandboxError> {
    let paths = SandboxPaths::new(root, namespace, sandbox_id)?;
    if !paths.dir.exists() {
        return Ok(());
    }
    if let Ok(bytes) = fs::read(&paths.net_record) {
        if let Ok(record) = serde_json::from_slice::<crate::net::NetRecord>(&bytes) {
            crate::net::teardown_record(&record);
        }
    }
    for name in PID_FILES {
        let pid_file = paths.dir.join(name);
        if kill_from_pid_file(&pid_file) {
            log::info!("killed the process in {}", pid_file.display());
        }
        wait_gone(&pid_file, STOP_GRACE).await;
    }
    if let Ok(bytes) = fs::read(&paths.cgroup_record) {
        if let Ok(cgroup) = serde_json::from_slice::<PodCgroup>(&bytes) {
            cgroup.remove_when_empty(root, STOP_GRACE).await;
        }
    }
    if let Ok(bytes) = fs::read(&paths.vmm_user_record) {
        user::release_file(Path::new(&String::from_utf8_lossy(&bytes).into_owned()));
    }
    mounts::unmount_all_under(&paths.dir)?;
    remove_sandbox_dir(&paths.dir)
}
