//! The sandbox: one VM per pod, with its directory (`paths`), share mounts, helper processes,
//! network, cgroup and the VMM's user.

pub mod mounts;
pub mod paths;
pub mod resolve;
pub mod spec;
pub mod user;

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::mount::MsFlags;
use tokio::sync::watch;

use crate::agent_client::{dial, AgentClient, AgentError, ReadyListener, TtrpcAgent};
use crate::cgroup::{CgroupError, PodCgroup};
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
pub use paths::SandboxPaths;
use paths::{MAX_SOCKET_PATH, PID_FILES};
use spec::SharedBind;
use user::UserError;
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
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    User(#[from] UserError),
    #[error(transparent)]
    Resolve(#[from] resolve::ResolveError),
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
    /// Stops the VM when virtiofsd dies under it (see `watch_shared_fs`).
    fs_watch: Option<tokio::task::JoinHandle<()>>,
    /// The pod's cgroup on the host, which the VMM and its helpers join.
    cgroup: Option<PodCgroup>,
    /// The unprivileged user the VMM runs as.
    vmm_user: Option<user::Claim>,
    /// Directories the guest can write into (read-write volumes, root filesystems), by
    /// identity: bind sources are never resolved through a symlink in one of them.
    guest_writable: Vec<resolve::Identity>,
    pub timings: Timings,
}

/// A container's root filesystem as containerd or Docker hands it over.
pub struct ContainerRootfs<'a> {
    /// Where it is (or is mounted) on the host: `<bundle>/rootfs` or the spec's `root.path`.
    pub dir: &'a Path,
    /// containerd's rootfs mounts; none when the caller mounted it itself.
    pub mounts: &'a [RootfsMount],
    /// The spec's `root.readonly`.
    pub readonly: bool,
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
            fs_watch: None,
            cgroup: None,
            vmm_user: None,
            guest_writable: Vec::new(),
            timings: Timings::new(),
        };
        let mut sandbox = sandbox;
        if let Err(e) = sandbox.make_dirs(cgroups_path) {
            sandbox.release_host_resources().await;
            let _ = remove_sandbox_dir(&sandbox.paths.dir);
            return Err(e);
        }
        Ok(sandbox)
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

    fn make_share(&self) -> Result<(), SandboxError> {
        let p = &self.paths;
        if let Some(parent) = p.dir.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(parent)
                .map_err(io_err("creating", parent))?;
        }
        // Others may pass through (the VMM's user reaches vmm/ and fs.sock), not list.
        fs::DirBuilder::new()
            .mode(0o711)
            .create(&p.dir)
            .map_err(io_err("creating", &p.dir))?;
        for dir in [&p.rw, &p.ro] {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(io_err("creating", dir))?;
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
    /// volumes into the share, every bind nosuid and nodev on the host. A read-only root is
    /// read-only on the host too; the mount points the container needs (`targets`: destination
    /// and whether it is a directory) are made in it first. Bind sources are opened without
    /// following what the guest may have planted in the pod's writable volumes and root
    /// filesystems (`resolve`). On error nothing is left.
    pub fn attach_container(
        &mut self,
        container_id: &str,
        rootfs: &ContainerRootfs<'_>,
        binds: &[SharedBind],
        targets: &[PathBuf],
    ) -> Result<(), SandboxError> {
        validate("container id", container_id)?;
        let result = self.try_attach(container_id, rootfs, binds, targets);
        if result.is_err() {
            self.detach_container(container_id, rootfs.dir, !rootfs.mounts.is_empty());
        }
        result
    }

    fn try_attach(
        &mut self,
        container_id: &str,
        rootfs: &ContainerRootfs<'_>,
        binds: &[SharedBind],
        targets: &[PathBuf],
    ) -> Result<(), SandboxError> {
        let bundle_rootfs = rootfs.dir;
        if !rootfs.mounts.is_empty() {
            fs::create_dir_all(bundle_rootfs).map_err(io_err("creating", bundle_rootfs))?;
            mounts::mount_rootfs(rootfs.mounts, bundle_rootfs)?;
        }
        let dir = self.paths.container_dir(container_id);
        fs::create_dir_all(&self.paths.staging).map_err(io_err("creating", &self.paths.staging))?;
        // Open every source first: their types say what mount points a read-only root needs.
        let mut sources = Vec::with_capacity(binds.len());
        for b in binds {
            let fd = resolve::open_source(&b.host_source, &self.guest_writable)?;
            let is_dir = fs::metadata(proc_fd(&fd))
                .map_err(io_err("bind source", &b.host_source))?
                .is_dir();
            sources.push((fd, is_dir));
        }
        if rootfs.readonly {
            let mut needed: Vec<(PathBuf, bool)> =
                targets.iter().map(|t| (t.clone(), true)).collect();
            needed.extend(
                binds
                    .iter()
                    .zip(&sources)
                    .map(|(b, (_, is_dir))| (b.destination.clone(), *is_dir)),
            );
            resolve::make_targets(bundle_rootfs, &needed)?;
        } else {
            let root = fs::File::open(bundle_rootfs).map_err(io_err("opening", bundle_rootfs))?;
            self.note_guest_writable(&root);
        }
        let target = dir.join("rootfs");
        fs::create_dir_all(&target).map_err(io_err("creating", &target))?;
        let staging = self.paths.staging.join(format!("{container_id}-rootfs"));
        let restrict = mounts::Restrict {
            readonly: rootfs.readonly,
            recursive_readonly: false,
        };
        mounts::bind_restricted(bundle_rootfs, &target, &staging, restrict)?;
        if binds.is_empty() {
            return Ok(());
        }
        let mounts_dir = dir.join("mounts");
        fs::create_dir_all(&mounts_dir).map_err(io_err("creating", &mounts_dir))?;
        for (b, (fd, is_dir)) in binds.iter().zip(&sources) {
            let target = mounts_dir.join(&b.name);
            if *is_dir {
                fs::create_dir(&target).map_err(io_err("creating", &target))?;
            } else {
                fs::File::create(&target).map_err(io_err("creating", &target))?;
            }
            if !b.readonly && !b.recursive_readonly && *is_dir {
                self.note_guest_writable(fd);
            }
            let staging = self
                .paths
                .staging
                .join(format!("{container_id}-{}", b.name));
            let restrict = mounts::Restrict {
                readonly: b.readonly,
                recursive_readonly: b.recursive_readonly,
            };
            mounts::bind_restricted(&proc_fd(fd), &target, &staging, restrict)?;
        }
        Ok(())
    }

    /// Remembers a directory the guest can write into, for `resolve::open_source`.
    fn note_guest_writable(&mut self, dir: impl std::os::fd::AsFd) {
        if let Ok(id) = resolve::identity(dir) {
            if !self.guest_writable.contains(&id) {
                self.guest_writable.push(id);
            }
        }
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
            files: self.paths.vm_files(self.config.runtime.log_max_bytes),
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
            net: self
                .network
                .iter()
                .flat_map(|n| n.links.iter())
                .map(nic_of)
                .collect(),
            netns: self.netns.clone(),
            hotplug_slots: h.hotplug_slots,
            user: self.vmm_user().cloned(),
            cgroups: self.cgroup.iter().flat_map(PodCgroup::procs).collect(),
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
                let path = self.paths.netns.clone();
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
        // With virtio-9p the VMM serves the share itself: no daemon.
        if let Share::VirtioFs { socket } = &spec.share {
            let fs = Virtiofsd::spawn(
                &self.config.virtiofs,
                &self.paths.ro,
                FsPaths {
                    socket,
                    log: &self.paths.virtiofsd_log,
                    log_max: self.config.runtime.log_max_bytes,
                    pid_file: &self.paths.virtiofsd_pid,
                    cgroups: &spec.cgroups,
                },
            )?;
            self.fs = Some(Box::new(fs));
        }
        let mut vmm = crate::vmm::for_config(&self.config)?;
        // The vsock backend comes up while virtiofsd does.
        vmm.prepare(&spec).await?;
        let vmm = self.vmm.insert(vmm);
        let ready = ReadyListener::bind(&spec.files.agent_socket, hako_protocol::READY_VSOCK_PORT)
            .map_err(io_err("listening on", &self.paths.ready_socket()))?;
        crate::vmm::hand_to(spec.user.as_ref(), &self.paths.ready_socket())?;
        if let Some(fs) = &self.fs {
            fs.wait_ready(FS_READY_TIMEOUT).await?;
            crate::vmm::hand_to(spec.user.as_ref(), fs.socket())?;
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
                    &spec.files.agent_socket,
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
        let at = &self.paths.net_record;
        fs::write(at, record).map_err(io_err("writing", at))
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
        self.release_host_resources().await;
        mounts::unmount_all_under(&self.paths.dir)?;
        remove_sandbox_dir(&self.paths.dir)
    }
}

/// The path that names an open descriptor: mounting it mounts exactly what was opened.
fn proc_fd(fd: &std::os::fd::OwnedFd) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
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
