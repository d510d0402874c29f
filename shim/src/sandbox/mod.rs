//! The sandbox: one VM per pod, with its directory, share mounts and helper processes.
//!
//! Layout of `<sandbox_root>/<namespace>/<sandbox id>/`:
//! `rw/` (the host writes here) and `ro/` (a read-only bind of `rw/`, a slave of it so later
//! mounts under `rw/` appear; virtiofsd serves only `ro/`), the sockets `fs.sock`, `vhu.sock`,
//! `agent.sock`, `qmp.sock`, logs (`console.log`, `vmm.log`, `virtiofsd.log`, `vsock.log`), the
//! pod's own network namespace `netns` when the shim made one, and
//! pid files. Each container gets `rw/<cid>/rootfs` (a bind of its rootfs) and
//! `rw/<cid>/mounts/<n>-<name>` for its bind mounts.

pub mod mounts;
pub mod spec;

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::mount::MsFlags;
use tokio::sync::watch;

use crate::agent_client::{dial, AgentClient, AgentError, ReadyListener, TtrpcAgent};
use crate::config::{Config, SharedFsKind};
use crate::daemon::{kill_from_pid_file, tail, wait_gone, DaemonError};
use crate::fs::{FsPaths, SharedFs, Virtiofsd};
use crate::hooks::{self, HookError};
use crate::ids::{validate, IdError};
use crate::net::watch::Watch;
use crate::net::{NetError, NetnsHolder, NetworkMode, PodNetwork};
use crate::timing::Timings;
use crate::vmm::{kernel_cmdline, Hypervisor, Share, VmSpec, VmmError};
use mounts::{MountError, RootfsMount};
use spec::SharedBind;

/// Longest unix socket path the kernel takes (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
const PID_FILES: [&str; 3] = ["vmm.pid", "virtiofsd.pid", "vsock.pid"];
/// The pod network's veths and taps, for cleanup when the shim is gone.
const NET_RECORD: &str = "net.json";
/// Mount point of the network namespace the shim makes when the caller's hooks set up the
/// network (Docker, nerdctl) instead of handing over a namespace path.
const OWN_NETNS: &str = "netns";
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long a guest may take to let go of a NIC the pod lost.
const NIC_UNPLUG_TIMEOUT: Duration = Duration::from_secs(10);
const FS_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Once the agent announced itself, its port answers at once; this only covers slow hosts.
const DIAL_AFTER_READY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Id(#[from] IdError),
    #[error(transparent)]
    Mount(#[from] MountError),
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

/// Where everything of one sandbox lives.
#[derive(Debug, Clone)]
pub struct SandboxPaths {
    pub dir: PathBuf,
    pub rw: PathBuf,
    pub ro: PathBuf,
    pub fs_socket: PathBuf,
    pub agent_socket: PathBuf,
    pub console_log: PathBuf,
}

impl SandboxPaths {
    /// Checks the ids, then builds the paths. Nothing is touched on disk.
    pub fn new(root: &Path, namespace: &str, sandbox_id: &str) -> Result<Self, SandboxError> {
        validate("namespace", namespace)?;
        validate("sandbox id", sandbox_id)?;
        let dir = root.join(namespace).join(sandbox_id);
        let paths = Self {
            rw: dir.join("rw"),
            ro: dir.join("ro"),
            fs_socket: dir.join("fs.sock"),
            agent_socket: dir.join("agent.sock"),
            console_log: dir.join("console.log"),
            dir,
        };
        let ready = ReadyListener::path_for(&paths.agent_socket, hako_protocol::READY_VSOCK_PORT);
        for socket in [&paths.fs_socket, &ready, &paths.dir.join("vhu.sock")] {
            if socket.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(SandboxError::PathTooLong(socket.clone()));
            }
        }
        Ok(paths)
    }

    pub fn container_dir(&self, container_id: &str) -> PathBuf {
        self.rw.join(container_id)
    }
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
    /// Stops the VM when virtiofsd dies under it (see `watch_shared_fs`).
    fs_watch: Option<tokio::task::JoinHandle<()>>,
    pub timings: Timings,
}

impl Sandbox {
    /// Makes the sandbox dir and its share mounts. On error nothing is left behind.
    pub async fn prepare(
        config: &Config,
        namespace: &str,
        sandbox_id: &str,
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
            fs_watch: None,
            timings: Timings::new(),
        };
        if let Err(e) = sandbox.make_share() {
            let _ = remove_sandbox_dir(&sandbox.paths.dir);
            return Err(e);
        }
        Ok(sandbox)
    }

    fn make_share(&self) -> Result<(), SandboxError> {
        let p = &self.paths;
        if let Some(parent) = p.dir.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(parent)
                .map_err(io_err("creating", parent))?;
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&p.dir)
            .map_err(io_err("creating", &p.dir))?;
        for dir in [&p.rw, &p.ro] {
            fs::create_dir(dir).map_err(io_err("creating", dir))?;
        }
        // rw/ gets a peer group of its own (private first, so nothing leaks to the host's
        // groups), ro/ is a read-only slave copy of it: mounts added under rw/ later show up in
        // ro/ and in virtiofsd's namespace, but nothing propagates back.
        mounts::bind(&p.rw, &p.rw, false)?;
        mounts::set_propagation(&p.rw, MsFlags::MS_PRIVATE)?;
        mounts::set_propagation(&p.rw, MsFlags::MS_SHARED)?;
        mounts::bind(&p.rw, &p.ro, true)?;
        mounts::set_propagation(&p.ro, MsFlags::MS_SLAVE)?;
        Ok(())
    }

    /// Mounts a container's rootfs (containerd's `rootfs` mounts on `bundle_rootfs`, or nothing
    /// when the caller mounted it there itself, as Docker does) and binds it and the container's
    /// volumes into the share. On error nothing is left.
    pub fn attach_container(
        &self,
        container_id: &str,
        bundle_rootfs: &Path,
        rootfs: &[RootfsMount],
        binds: &[SharedBind],
    ) -> Result<(), SandboxError> {
        validate("container id", container_id)?;
        let result = self.try_attach(container_id, bundle_rootfs, rootfs, binds);
        if result.is_err() {
            self.detach_container(container_id, bundle_rootfs, !rootfs.is_empty());
        }
        result
    }

    fn try_attach(
        &self,
        container_id: &str,
        bundle_rootfs: &Path,
        rootfs: &[RootfsMount],
        binds: &[SharedBind],
    ) -> Result<(), SandboxError> {
        if !rootfs.is_empty() {
            fs::create_dir_all(bundle_rootfs).map_err(io_err("creating", bundle_rootfs))?;
            mounts::mount_rootfs(rootfs, bundle_rootfs)?;
        }
        let dir = self.paths.container_dir(container_id);
        let target = dir.join("rootfs");
        fs::create_dir_all(&target).map_err(io_err("creating", &target))?;
        mounts::bind(bundle_rootfs, &target, false)?;
        if !binds.is_empty() {
            let mounts_dir = dir.join("mounts");
            fs::create_dir_all(&mounts_dir).map_err(io_err("creating", &mounts_dir))?;
            for b in binds {
                let target = mounts_dir.join(&b.name);
                let meta =
                    fs::metadata(&b.host_source).map_err(io_err("bind source", &b.host_source))?;
                if meta.is_dir() {
                    fs::create_dir(&target).map_err(io_err("creating", &target))?;
                } else {
                    fs::File::create(&target).map_err(io_err("creating", &target))?;
                }
                if b.readonly {
                    self.bind_readonly(
                        &b.host_source,
                        &target,
                        &format!("{container_id}-{}", b.name),
                    )?;
                } else {
                    mounts::bind(&b.host_source, &target, false)?;
                }
            }
        }
        Ok(())
    }

    /// Binds `source` read-only at `target` so that every copy of the mount is read-only: the one
    /// propagated into `ro/` and the one in virtiofsd's namespace. A read-only remount of a bind
    /// does not propagate, so the mount is made read-only in a private staging place first and
    /// only then bound under `rw/`; a bind of a read-only mount is read-only from the start.
    fn bind_readonly(&self, source: &Path, target: &Path, name: &str) -> Result<(), SandboxError> {
        let staging_dir = self.paths.dir.join("staging");
        fs::create_dir_all(&staging_dir).map_err(io_err("creating", &staging_dir))?;
        let staging = staging_dir.join(name);
        let is_dir = fs::metadata(source)
            .map_err(io_err("bind source", source))?
            .is_dir();
        if is_dir {
            fs::create_dir_all(&staging).map_err(io_err("creating", &staging))?;
        } else {
            fs::File::create(&staging).map_err(io_err("creating", &staging))?;
        }
        let result = (|| {
            mounts::bind(source, &staging, false)?;
            mounts::set_propagation(&staging, MsFlags::MS_PRIVATE)?;
            mounts::remount_readonly(&staging)?;
            mounts::bind(&staging, target, false)
        })();
        let cleanup = mounts::unmount(&staging);
        if is_dir {
            let _ = fs::remove_dir(&staging);
        } else {
            let _ = fs::remove_file(&staging);
        }
        result?;
        cleanup?;
        Ok(())
    }

    /// Undoes `attach_container`. Best effort: every step runs, failures are logged.
    pub fn detach_container(&self, container_id: &str, bundle_rootfs: &Path, rootfs_mounted: bool) {
        let dir = self.paths.container_dir(container_id);
        if let Err(e) = mounts::unmount_all_under(&dir) {
            log::error!("container {container_id}: {e}");
        }
        if let Err(e) = mounts::remove_tree(&dir) {
            log::error!("container {container_id}: {e}");
        }
        if rootfs_mounted {
            if let Err(e) = mounts::unmount_all_under(bundle_rootfs) {
                log::error!("container {container_id}: {e}");
            }
        }
    }

    fn vm_spec(&self) -> VmSpec {
        let h = &self.config.hypervisor;
        VmSpec {
            sandbox_id: self.id.clone(),
            dir: self.paths.dir.clone(),
            vcpus: h.vcpus,
            memory_mib: h.memory_mib,
            kernel: h.kernel.clone(),
            vmlinux: h.vmlinux.clone(),
            initrd: h.initrd.clone(),
            cmdline: kernel_cmdline(&self.config.agent.log_level, &h.kernel_params, h.shared_fs),
            share: match h.shared_fs {
                SharedFsKind::VirtioFs => Share::VirtioFs {
                    socket: self.paths.fs_socket.clone(),
                },
                SharedFsKind::Virtio9p => Share::Virtio9p {
                    dir: self.paths.ro.clone(),
                },
            },
            fs_tag: hako_protocol::SHARED_FS_TAG.to_string(),
            agent_socket: self.paths.agent_socket.clone(),
            console_log: self.paths.console_log.clone(),
            net: self
                .network
                .iter()
                .flat_map(|n| n.links.iter())
                .map(nic_of)
                .collect(),
            netns: self.netns.clone(),
            hotplug_slots: h.hotplug_slots,
        }
    }

    /// Decides where the pod's network lives, before `boot`: the namespace the spec names
    /// (never the host's own), or, when the spec asks for a new one, one the shim makes.
    /// Either way the VMM runs in it, and what appears there (from a hook, a plugin, or
    /// Docker after Create) reaches the VM.
    pub fn choose_network(&mut self, mode: &NetworkMode) -> Result<(), SandboxError> {
        self.netns = match mode {
            NetworkMode::Host => return Err(NetError::HostNetwork.into()),
            NetworkMode::Namespace(path) => {
                crate::net::namespace::refuse_host(path)?;
                Some(path.clone())
            }
            NetworkMode::Isolated => {
                let path = self.paths.dir.join(OWN_NETNS);
                self.holder = Some(NetnsHolder::create(&path)?);
                Some(path)
            }
        };
        Ok(())
    }

    /// Runs a container's `prestart` and `createRuntime` hooks on the host, with a thread in
    /// the pod's network namespace standing in for the container's process.
    pub async fn run_create_hooks(
        &mut self,
        hook_list: &[oci_spec::runtime::Hook],
        mut state: hooks::State,
    ) -> Result<(), SandboxError> {
        if hook_list.is_empty() {
            return Ok(());
        }
        if self.holder.is_none() {
            if let Some(netns) = &self.netns {
                self.holder = Some(NetnsHolder::enter(netns)?);
            }
        }
        state.pid = self.holder.as_ref().map(NetnsHolder::pid).unwrap_or(0);
        hooks::run("prestart/createRuntime", hook_list, &state).await?;
        Ok(())
    }

    /// Starts virtiofsd and the VM and waits for the agent. The VM takes over the interfaces of
    /// the namespace `choose_network` picked. On error the caller runs `shutdown`, which stops
    /// whatever did start.
    pub async fn boot(&mut self, hostname: &str) -> Result<(), SandboxError> {
        if let Some(netns) = self.netns.clone() {
            let mut network = PodNetwork::new(&netns, self.config.hypervisor.vcpus);
            // What the namespace holds now is plugged in at boot; what comes later, hot.
            let scan = crate::net::ip::scan(&netns)?;
            for link in scan.links.clone() {
                if let Err(e) = network.attach(link) {
                    network.teardown();
                    return Err(e.into());
                }
            }
            network.refresh(&scan);
            log::info!(
                "sandbox {}: {} interface(s) from {}",
                self.id,
                network.links.len(),
                netns.display()
            );
            self.network = Some(network);
            self.write_net_record()?;
        }
        self.timings.mark("sandbox_prepare");
        let spec = self.vm_spec();
        let dir = &self.paths.dir;
        // With virtio-9p the VMM serves the share itself: no daemon.
        if let Share::VirtioFs { socket } = &spec.share {
            let fs = Virtiofsd::spawn(
                &self.config.virtiofs,
                &self.paths.ro,
                FsPaths {
                    socket,
                    log: &dir.join("virtiofsd.log"),
                    pid_file: &dir.join("virtiofsd.pid"),
                },
            )?;
            self.fs = Some(Box::new(fs));
        }
        let mut vmm = crate::vmm::for_config(&self.config)?;
        // The vsock backend comes up while virtiofsd does.
        vmm.prepare(&spec).await?;
        let vmm = self.vmm.insert(vmm);
        let ready = ReadyListener::bind(&self.paths.agent_socket, hako_protocol::READY_VSOCK_PORT)
            .map_err(io_err("listening on", &self.paths.agent_socket))?;
        if let Some(fs) = &self.fs {
            fs.wait_ready(FS_READY_TIMEOUT).await?;
        }
        self.timings.mark("virtiofsd_ready");
        vmm.start(&spec).await?;
        self.timings.mark("vmm_started");
        self.fs_watch = self.watch_shared_fs();
        let Some(vmm) = self.vmm.as_ref() else {
            return Err(VmmError::NotRunning.into());
        };

        // Dial only once the agent says it serves: a connection that reaches the guest before
        // its vsock driver is up can stall in the vsock backend. The readiness message carries
        // the agent's Health answer (guest input, quoted when logged), so no call is made for it.
        let connected = match ready
            .wait(self.config.agent.dial_timeout(), vmm.exit_watch())
            .await
        {
            Ok(health) => {
                self.timings.mark("agent_ready");
                dial(
                    &self.paths.agent_socket,
                    hako_protocol::AGENT_VSOCK_PORT,
                    DIAL_AFTER_READY,
                    vmm.exit_watch(),
                )
                .await
                .map(|stream| (stream, health))
            }
            Err(e) => Err(e),
        };
        drop(ready);
        let (stream, health) = match connected {
            Ok(connected) => connected,
            Err(e) => {
                return Err(SandboxError::Boot {
                    reason: format!("{e}; qemu: {}", vmm.log_tail()),
                    console: tail(&self.paths.console_log, 3000),
                })
            }
        };
        let agent: Arc<dyn AgentClient> =
            Arc::new(TtrpcAgent::new(stream, self.config.agent.call_timeout()));
        self.timings.mark("agent_connected");
        self.record_boot_details(&health);
        log::info!(
            "sandbox {}: agent {:?} on guest kernel {:?} ready {} ms after guest boot",
            self.id,
            health.agent_version,
            health.kernel_release,
            health.ready_since_boot_ms
        );
        let (interfaces, routes) = match &self.network {
            Some(n) => (n.interfaces(), n.routes.clone()),
            None => (Vec::new(), Vec::new()),
        };
        let called = std::time::Instant::now();
        agent
            .create_sandbox(&self.id, hostname, interfaces, routes)
            .await?;
        self.timings
            .detail("guest.create_sandbox", called.elapsed());
        self.agent = Some(agent);
        Ok(())
    }

    fn write_net_record(&self) -> Result<(), SandboxError> {
        let Some(network) = &self.network else {
            return Ok(());
        };
        let record = serde_json::to_vec(&network.record()).unwrap_or_default();
        let record_path = self.paths.dir.join(NET_RECORD);
        fs::write(&record_path, record).map_err(io_err("writing", &record_path))
    }

    /// Starts following the pod's network namespace; `resync` is called after each change
    /// (with the sandbox's lock, by the caller that owns the sandbox).
    pub fn watch_network(&mut self) -> Result<Option<Watch>, SandboxError> {
        let Some(netns) = &self.netns else {
            return Ok(None);
        };
        let watch = Watch::start(netns)?;
        self.network_dirty = Some(watch.dirty.clone());
        Ok(Some(watch))
    }

    /// Keeps the task that follows the namespace, to end it with the sandbox.
    pub fn keep_network_watch(&mut self, task: tokio::task::JoinHandle<()>) {
        self.network_watch = Some(task);
    }

    /// Whether the namespace changed since the VM last matched it.
    pub fn network_changed(&self) -> bool {
        self.network_dirty
            .as_ref()
            .is_some_and(|d| d.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Makes the VM's network match the pod's namespace: NICs for new veths are hot-plugged,
    /// the guest is told the whole picture (it waits for the new NICs, configures them and
    /// releases those the pod lost), and then the lost NICs are unplugged and their taps go.
    pub async fn sync_network(&mut self) -> Result<(), SandboxError> {
        if let Some(dirty) = &self.network_dirty {
            dirty.store(false, std::sync::atomic::Ordering::SeqCst);
        }
        let (Some(network), Some(vmm), Some(agent)) = (
            self.network.as_mut(),
            self.vmm.as_mut(),
            self.agent.as_ref(),
        ) else {
            return Ok(());
        };
        let scan = crate::net::ip::scan(&network.netns)?;
        let plan = network.plan(&scan);
        if plan.is_empty() {
            return Ok(());
        }
        let mut gone = Vec::new();
        for nic in &plan.removed {
            gone.extend(network.take(nic));
        }
        let mut plugged = Vec::new();
        let mut failed = None;
        for link in plan.added {
            let name = link.name.clone();
            let nic = match network.attach(link) {
                Ok(attached) => nic_of(attached),
                Err(e) => {
                    failed = Some(SandboxError::from(e));
                    break;
                }
            };
            if let Err(e) = vmm.add_nic(&nic).await {
                if let Some(link) = network.take(&nic.id) {
                    network.release(link);
                }
                failed = Some(e.into());
                break;
            }
            plugged.push(format!("{name} as {}", nic.id));
        }
        network.refresh(&scan);
        let updated = agent
            .update_interfaces(network.interfaces(), network.routes.clone())
            .await;
        for link in gone {
            if let Err(e) = vmm.remove_nic(&link.nic, NIC_UNPLUG_TIMEOUT).await {
                log::warn!("sandbox {}: unplugging {}: {e}", self.id, link.nic);
            }
            log::info!(
                "sandbox {}: {} left the pod; NIC {} unplugged",
                self.id,
                link.veth.name,
                link.nic
            );
            network.release(link);
        }
        if !plugged.is_empty() {
            log::info!("sandbox {}: hot-plugged {}", self.id, plugged.join(", "));
        }
        self.write_net_record()?;
        updated?;
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Without virtiofsd the guest has lost every container's root filesystem and its requests
    /// hang or fail: the sandbox has failed. The VM is stopped, so every process's exit is
    /// published (as for a VM that died) and Delete tears down the rest.
    fn watch_shared_fs(&self) -> Option<tokio::task::JoinHandle<()>> {
        let mut fs_exit = self.fs.as_ref()?.process().exit_watch();
        let mut vm_exit = self.vm_exit()?;
        let vmm_pid = self.vmm_pid();
        let id = self.id.clone();
        Some(tokio::spawn(async move {
            let code = tokio::select! {
                code = fs_exit.wait_for(Option::is_some) => match code {
                    Ok(code) => *code,
                    Err(_) => return,
                },
                // The VM went first: nothing to stop, and its pid may be reused.
                _ = vm_exit.wait_for(Option::is_some) => return,
            };
            log::error!(
                "sandbox {id}: virtiofsd exited ({code:?}) under the running VM; the guest lost its root filesystems, stopping the VM"
            );
            crate::vmm::kill_failed_vm(vmm_pid);
        }))
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

    /// Splits `agent_ready` by the guest's clock: the VMM and firmware up to the kernel's first
    /// tick (with the kernel's decompression), the kernel until it ran /init, and the agent's
    /// own start. The guest clock keeps the host's rate (see `vmm::clock_params`).
    fn record_boot_details(&mut self, health: &hako_protocol::agent::HealthResponse) {
        let Some(ready) = self.timings.phase("agent_ready") else {
            return;
        };
        let ms = Duration::from_millis;
        let guest_ready = ms(health.ready_since_boot_ms);
        let kernel = ms(health.init_since_boot_ms.min(health.ready_since_boot_ms));
        self.timings
            .detail("agent_ready.firmware", ready.saturating_sub(guest_ready));
        self.timings.detail("agent_ready.kernel", kernel);
        self.timings
            .detail("agent_ready.agent", guest_ready.saturating_sub(kernel));
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
        mounts::unmount_all_under(&self.paths.dir)?;
        remove_sandbox_dir(&self.paths.dir)
    }
}

/// The VMM's view of a NIC: its id, tap queues and MAC.
fn nic_of(link: &crate::net::TapLink) -> crate::vmm::NetDevice {
    crate::vmm::NetDevice {
        id: link.nic.clone(),
        tap_fds: link
            .fds
            .iter()
            .map(std::os::fd::AsRawFd::as_raw_fd)
            .collect(),
        mac: link.veth.mac.clone(),
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
    if let Ok(bytes) = fs::read(paths.dir.join(NET_RECORD)) {
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
    mounts::unmount_all_under(&paths.dir)?;
    remove_sandbox_dir(&paths.dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_before_paths_are_built() {
        let root = Path::new("/run/hako");
        assert!(SandboxPaths::new(root, "default", "../etc").is_err());
        assert!(SandboxPaths::new(root, "a/b", "x").is_err());
        let p = SandboxPaths::new(root, "default", "t1").expect("valid");
        assert_eq!(p.dir, Path::new("/run/hako/default/t1"));
        assert_eq!(p.container_dir("c"), Path::new("/run/hako/default/t1/rw/c"));
    }

    #[test]
    fn overlong_socket_paths_are_refused() {
        let err = SandboxPaths::new(Path::new("/run/hako"), &"n".repeat(60), &"s".repeat(60))
            .expect_err("too long");
        assert!(matches!(err, SandboxError::PathTooLong(_)), "{err}");
    }
}
