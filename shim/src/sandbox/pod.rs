//! The shim's one sandbox, from its first container's Create to its last Delete: what the task
//! service asks of it, each step in the order it must happen, and the rollback when one fails.
//!
//! Create: the first container loads the configuration, refuses the host's network, prepares
//! the sandbox dir, chooses the network, runs its create hooks and boots the VM; every
//! container is then attached to the share and created in the guest. Delete of the last
//! container tears the sandbox down.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Instant;

use async_trait::async_trait;
use oci_spec::runtime::Spec;
use tokio::sync::{watch, Mutex};

use super::mounts::RootfsMount;
use super::sizing::{self, Needs};
use super::spec::{host_submounts, plain_mount_points, to_guest};
use super::{ContainerRootfs, Sandbox, SandboxError};
use crate::agent_client::{AgentClient, GuestStdio};
use crate::config::Config;
use crate::hooks::{self, LaterHooks};
use crate::ids::validate;
use crate::net::{NetError, NetworkMode};
use crate::timing::Timings;

/// The CRI's annotation naming a container's pod sandbox.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
/// The CRI's annotation telling a pod's sandbox (`sandbox`) from its containers.
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";
/// The largest spec the agent channel carries: ttrpc's 4 MiB message limit, less room for the
/// rest of the request.
pub const MAX_GUEST_SPEC: usize = 4 * 1024 * 1024 - 64 * 1024;
/// SIGKILL, as containerd and the agent number it.
pub const SIGKILL: u32 = 9;

/// Whether `spec` is a Kubernetes pod's sandbox, the only kind of pod that port forwarding
/// (CRI's PortForward) can reach.
pub fn is_kubernetes_pod(spec: &Spec) -> bool {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get(CONTAINER_TYPE_ANNOTATION))
        .is_some_and(|t| t == "sandbox")
}

/// The sandbox a container belongs to: the CRI annotation; else the sandbox whose VM holds the
/// network namespace the spec names (Docker's `--network container:<x>`), as `holding` finds
/// it; else the container is a sandbox of its own.
pub fn sandbox_id_for(
    spec: &Spec,
    container_id: &str,
    holding: impl FnOnce(&Path) -> Option<String>,
) -> String {
    let annotated = spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(SANDBOX_ID_ANNOTATION))
        .cloned();
    let sharing = || match crate::net::mode(spec) {
        NetworkMode::Namespace(path) => holding(&path),
        _ => None,
    };
    annotated
        .or_else(sharing)
        .unwrap_or_else(|| container_id.to_string())
}

/// What every RPC needs from a booted sandbox, without locking the sandbox itself.
#[derive(Clone)]
pub struct Running {
    pub agent: Arc<dyn AgentClient>,
    /// The sandbox's instruments, for what the watchers refuse.
    pub metrics: Arc<crate::metrics::ShimMetrics>,
    pub vm_exit: Option<watch::Receiver<Option<i32>>>,
    pub vmm_pid: u32,
}

impl Running {
    pub fn vm_alive(&self) -> bool {
        self.vm_exit.as_ref().is_none_or(|rx| rx.borrow().is_none())
    }

    /// Resolves with the VMM's exit code when it exits (never, without a watch).
    pub async fn vm_gone(&self) -> i32 {
        match self.vm_exit.clone() {
            Some(mut rx) => loop {
                if let Some(code) = *rx.borrow_and_update() {
                    return code;
                }
                if rx.changed().await.is_err() {
                    return 255;
                }
            },
            None => std::future::pending().await,
        }
    }

    /// Ends the VM at once: for a sandbox whose agent stopped answering. Every process of the
    /// sandbox then exits (published as failed), and Delete tears down the rest.
    pub fn kill_vm(&self) {
        crate::vmm::kill_failed_vm(self.vmm_pid);
    }
}

/// How a prepared sandbox gets its VM and agent: `VmBoot` boots the VM (`Sandbox::boot`); the
/// task service's tests stand a process and a fake agent in for them.
#[async_trait]
pub trait Boot: Send + Sync {
    async fn boot(&self, sandbox: &mut Sandbox, hostname: &str) -> Result<(), SandboxError>;
}

pub struct VmBoot;

#[async_trait]
impl Boot for VmBoot {
    async fn boot(&self, sandbox: &mut Sandbox, hostname: &str) -> Result<(), SandboxError> {
        sandbox.boot(hostname).await
    }
}

/// A container to add, as containerd asked for it.
pub struct NewContainer<'a> {
    pub id: &'a str,
    pub bundle: &'a Path,
    pub spec: &'a Spec,
    /// containerd's rootfs mounts; none when the caller mounted the rootfs itself.
    pub rootfs: &'a [RootfsMount],
    /// The configuration file the runtime options name; read when this container boots the
    /// sandbox.
    pub config_path: Option<&'a Path>,
    pub stdio: GuestStdio,
}

/// A container the guest has created.
pub struct AddedContainer {
    pub running: Running,
    /// Its root filesystem on the host.
    pub rootfs: PathBuf,
    pub hooks: LaterHooks,
    /// The host file bound at its /etc/resolv.conf, read at Start (`dns`).
    pub resolv_conf: Option<PathBuf>,
    /// Whether this container booted the sandbox.
    pub booted: bool,
}

pub struct Pod {
    pub(super) namespace: String,
    pub(super) boot: Arc<dyn Boot>,
    /// Held across boot, network changes and teardown only.
    pub(super) sandbox: Arc<Mutex<Option<Sandbox>>>,
    running: StdMutex<Option<Running>>,
    /// Guest pid of the sandbox's first container (or of the pod init, `standalone`), whose
    /// namespaces pod members join.
    pub(super) init_pid: AtomicU32,
    /// Made through the Sandbox API (`standalone`): the pod outlives its containers.
    pub(super) standalone: AtomicBool,
}

impl Pod {
    pub fn new(namespace: &str) -> Self {
        Self::with_boot(namespace, Arc::new(VmBoot))
    }

    pub fn with_boot(namespace: &str, boot: Arc<dyn Boot>) -> Self {
        Self {
            namespace: namespace.to_string(),
            boot,
            sandbox: Arc::new(Mutex::new(None)),
            running: StdMutex::new(None),
            init_pid: AtomicU32::new(0),
            standalone: AtomicBool::new(false),
        }
    }

    /// The booted sandbox's agent and VM, if there is one.
    pub fn running(&self) -> Option<Running> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(super) fn set_running(&self, running: Option<Running>) {
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = running;
    }

    /// Whether new limits for a container fit the VM it runs in (an Update).
    pub async fn check_fits(&self, needs: &Needs) -> Result<(), SandboxError> {
        match self.sandbox.lock().await.as_ref() {
            Some(sandbox) => sandbox.check_fits(needs),
            None => Err(SandboxError::NotBooted),
        }
    }

    /// Whether no sandbox exists (none was booted, or the last one is torn down).
    pub async fn is_empty(&self) -> bool {
        self.sandbox.lock().await.is_none()
    }

    /// Adds a container: boots the sandbox for the first, attaches the container to the share
    /// and creates it in the guest. On error everything this call did is undone, the sandbox
    /// too when this call booted it.
    pub async fn add_container(
        &self,
        new: &NewContainer<'_>,
    ) -> Result<AddedContainer, SandboxError> {
        validate("namespace", &self.namespace)?;
        validate("container id", new.id)?;
        let mut slot = self.sandbox.lock().await;
        let sandbox_id = sandbox_id_for(new.spec, new.id, |netns| {
            slot.as_ref()
                .filter(|sandbox| sandbox.holds_netns(netns))
                .map(|sandbox| sandbox.id.clone())
        });
        validate("sandbox id", &sandbox_id)?;
        if let Some(sandbox) = slot.as_ref() {
            if sandbox.id != sandbox_id {
                return Err(SandboxError::Foreign {
                    id: new.id.to_string(),
                    sandbox: sandbox_id,
                });
            }
            if sandbox.has_container(new.id) {
                return Err(SandboxError::Exists(new.id.to_string()));
            }
        }
        let needs = Needs::of(
            new.spec
                .linux()
                .as_ref()
                .and_then(|l| l.resources().as_ref()),
        )?;
        let join = (sandbox_id != new.id)
            .then(|| self.init_pid.load(Ordering::SeqCst))
            .filter(|pid| *pid != 0);
        let (mut guest_spec, binds) = to_guest(
            new.spec,
            new.id,
            Path::new(hako_protocol::GUEST_SHARED_DIR),
            join,
            &host_submounts,
        )?;
        let pod_files = if self.is_standalone() {
            super::standalone::bind_pod_files(&mut guest_spec, new.spec)
        } else {
            Vec::new()
        };
        let guest_spec_json = super::exec_limits::guest_spec_json(&mut guest_spec)?;
        let network = crate::net::mode(new.spec);
        let booting = slot.is_none();
        if booting && self.is_standalone() {
            // The Sandbox API's pod is booted by StartSandbox; once stopped it stays stopped.
            return Err(SandboxError::NotBooted);
        }
        if booting {
            if network == NetworkMode::Host {
                return Err(NetError::HostNetwork.into());
            }
            let mut config = load_config(new.config_path, new.spec)?;
            sizing::grow(&mut config.hypervisor, &needs)?;
            let pod_needs = Needs::of_pod(new.spec.annotations().iter().flatten());
            sizing::grow_towards(&mut config.hypervisor, &pod_needs);
            let cgroups_path = new
                .spec
                .linux()
                .as_ref()
                .and_then(|l| l.cgroups_path().as_ref())
                .map(|p| p.to_string_lossy().into_owned());
            let sandbox = Sandbox::prepare(
                &config,
                &self.namespace,
                &sandbox_id,
                cgroups_path.as_deref(),
            )
            .await?;
            *slot = Some(sandbox);
        }
        let Some(sandbox) = slot.as_mut() else {
            return Err(SandboxError::NotBooted);
        };
        if !booting {
            sandbox.check_fits(&needs)?;
        }

        let rootfs_dir = host_rootfs(new.bundle, new.spec, !new.rootfs.is_empty());
        let rootfs = ContainerRootfs {
            dir: &rootfs_dir,
            mounts: new.rootfs,
            readonly: new
                .spec
                .root()
                .as_ref()
                .and_then(|r| r.readonly())
                .unwrap_or(false),
        };
        let targets: Vec<(PathBuf, bool)> = plain_mount_points(&guest_spec, &binds)
            .into_iter()
            .map(|t| {
                let is_dir = !pod_files.contains(&t);
                (t, is_dir)
            })
            .collect();
        let attached = sandbox.attach_container(new.id, &rootfs, &binds, &targets);
        let created = match attached {
            // attach_container undoes its own work.
            Err(e) => Err(e),
            Ok(()) => {
                let created = self
                    .start_in_guest(sandbox, new, booting, guest_spec_json)
                    .await;
                if created.is_err() {
                    sandbox.detach_container(new.id, &rootfs_dir, !new.rootfs.is_empty());
                }
                created
            }
        };
        let running = match created {
            Ok(running) => running,
            Err(e) => {
                if booting {
                    if let Some(mut sandbox) = slot.take() {
                        self.set_running(None);
                        if let Err(cleanup) = sandbox.shutdown().await {
                            log::error!("cleaning up after a failed create: {cleanup}");
                        }
                    }
                }
                return Err(e);
            }
        };
        Ok(AddedContainer {
            running,
            rootfs: rootfs_dir,
            hooks: LaterHooks::new(new.spec, new.id, new.bundle),
            resolv_conf: super::dns::resolv_conf_source(new.spec),
            booted: booting,
        })
    }

    /// From an attached container to one created in the guest: for the first container the
    /// network, the create hooks (Docker's network set-up among them, before the VM takes the
    /// namespace's interfaces over) and the boot; for the others their hooks.
    async fn start_in_guest(
        &self,
        sandbox: &mut Sandbox,
        new: &NewContainer<'_>,
        booting: bool,
        guest_spec_json: Vec<u8>,
    ) -> Result<Running, SandboxError> {
        let mut timings = Timings::new();
        if booting {
            sandbox.choose_network(&crate::net::mode(new.spec), is_kubernetes_pod(new.spec))?;
        }
        let state = hooks::State::new(new.spec, new.id, "creating", 0, new.bundle);
        sandbox
            .run_create_hooks(&hooks::create_hooks(new.spec), state)
            .await?;
        if booting {
            let hostname = new.spec.hostname().clone().unwrap_or_default();
            self.boot.boot(sandbox, &hostname).await?;
            self.follow_network(sandbox)?;
            timings = sandbox.timings.clone();
        }
        let agent = sandbox.agent().ok_or(SandboxError::NotBooted)?;
        let running = Running {
            agent: agent.clone(),
            metrics: sandbox.metrics.clone(),
            vm_exit: sandbox.vm_exit(),
            vmm_pid: sandbox.vmm_pid(),
        };
        let called = Instant::now();
        let guest_pid = agent
            .create_container(new.stdio.create_request(new.id, guest_spec_json))
            .await?;
        timings.mark("container_created");
        timings.detail("guest.create_container", called.elapsed());
        log::info!("container {} start phases: {}", new.id, timings.summary());
        sandbox.metrics.observe_start(&timings);
        if let Some(annotations) = new.spec.annotations() {
            sandbox.metrics.note_pod(annotations);
        }
        sandbox
            .app_containers
            .add(new.id, new.spec.annotations().as_ref());
        if booting {
            self.init_pid.store(guest_pid, Ordering::SeqCst);
            self.set_running(Some(running.clone()));
        }
        Ok(running)
    }

    /// Keeps the VM's network in step with the pod's namespace while the pod runs: each burst
    /// of changes there (`docker network connect`, a plugin re-addressing) is synced under the
    /// sandbox's lock.
    pub(super) fn follow_network(&self, sandbox: &mut Sandbox) -> Result<(), SandboxError> {
        let Some(mut watch) = sandbox.watch_network()? else {
            return Ok(());
        };
        let slot = self.sandbox.clone();
        let task = tokio::spawn(async move {
            while watch.changed().await {
                let mut guard = slot.lock().await;
                let Some(sandbox) = guard.as_mut() else {
                    return;
                };
                if let Err(e) = sandbox.sync_network().await {
                    log::warn!("sandbox {}: following a network change: {e}", sandbox.id);
                }
            }
        });
        sandbox.keep_network_watch(task);
        Ok(())
    }

    /// Before a container's process runs: Docker 28 and later network the pod after Create,
    /// and what appeared in its namespace since then reaches the VM now; and if the container's
    /// resolv.conf (`resolv_conf`, as Docker left it by now) names Docker's DNS server, the
    /// guest answers there (ADR 12).
    pub async fn catch_up_network(&self, resolv_conf: Option<&Path>) -> Result<(), SandboxError> {
        let mut slot = self.sandbox.lock().await;
        let Some(sandbox) = slot.as_mut() else {
            return Ok(());
        };
        if sandbox.network_changed() {
            // The process must not start on a half-made network; one failure is retried with
            // a fresh look at the namespace (a NIC not plugged is planned again).
            if let Err(first) = sandbox.sync_network().await {
                log::warn!(
                    "sandbox {}: the pod's network did not reach the VM ({first}); trying once more",
                    sandbox.id
                );
                sandbox.sync_network().await?;
            }
        }
        if let Some(resolv_conf) = resolv_conf {
            sandbox.relay_docker_dns(resolv_conf).await;
        }
        Ok(())
    }

    /// Removes a container from the guest (when the VM still runs) and from the share; the last
    /// one's removal tears the sandbox down.
    pub async fn remove_container(
        &self,
        id: &str,
        rootfs: &Path,
        rootfs_mounted: bool,
    ) -> Result<(), SandboxError> {
        if let Some(running) = self.running().filter(Running::vm_alive) {
            if let Err(e) = running.agent.remove_container(id).await {
                log::warn!("container {id}: {e}");
            }
        }
        let mut slot = self.sandbox.lock().await;
        let Some(sandbox) = slot.as_mut() else {
            return Ok(());
        };
        sandbox.detach_container(id, rootfs, rootfs_mounted);
        if sandbox.has_containers() || self.is_standalone() {
            return Ok(());
        }
        if let Some(mut sandbox) = slot.take() {
            self.set_running(None);
            // Sandbox::shutdown logs its own teardown time.
            sandbox.shutdown().await?;
        }
        Ok(())
    }

    /// Takes back a container created in the guest whose host side could not follow (its
    /// FIFOs would not open): killed, then removed as Delete would.
    pub async fn discard_container(&self, id: &str, rootfs: &Path, rootfs_mounted: bool) {
        if let Some(running) = self.running() {
            let _ = running.agent.signal_process(id, "", SIGKILL, true).await;
        }
        if let Err(e) = self.remove_container(id, rootfs, rootfs_mounted).await {
            log::error!("container {id}: cleaning up after a failed create: {e}");
        }
    }

    /// Tears the sandbox down, whatever it holds.
    pub async fn shutdown(&self) {
        if let Some(mut sandbox) = self.sandbox.lock().await.take() {
            self.set_running(None);
            if let Err(e) = sandbox.shutdown().await {
                log::error!("shutdown: {e}");
            }
        }
    }

    /// The VMM's pid, containerd's "task pid" for every process of the sandbox; 0 before boot.
    pub fn vmm_pid(&self) -> u32 {
        self.running().map(|r| r.vmm_pid).unwrap_or(0)
    }
}

/// The configuration for a new sandbox: the file the runtime options name, else the default
/// places, with the pod's annotations applied.
fn load_config(path: Option<&Path>, spec: &Spec) -> Result<Config, SandboxError> {
    let loaded = Config::load(path)?;
    log::info!(
        "configuration from {}",
        loaded
            .source
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "built-in defaults".to_string())
    );
    Ok(loaded
        .config
        .with_pod_annotations(spec.annotations().iter().flatten())?)
}

/// Where the container's root filesystem is on the host: containerd's rootfs mounts go on
/// `<bundle>/rootfs`; without them the caller has mounted it at the spec's `root.path` itself
/// (Docker's graph drivers do), relative to the bundle unless absolute.
fn host_rootfs(bundle: &Path, spec: &Spec, has_mounts: bool) -> PathBuf {
    match spec.root().as_ref().map(|r| r.path()) {
        Some(path) if !has_mounts && !path.as_os_str().is_empty() => bundle.join(path),
        _ => bundle.join("rootfs"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(annotations: &[(&str, &str)]) -> Spec {
        let mut spec = Spec::default();
        spec.set_annotations(Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ));
        spec
    }

    #[test]
    fn only_a_kubernetes_pod_sandbox_gets_port_forwarding() {
        let pod = spec_with(&[(CONTAINER_TYPE_ANNOTATION, "sandbox")]);
        assert!(is_kubernetes_pod(&pod));
        let container = spec_with(&[
            (CONTAINER_TYPE_ANNOTATION, "container"),
            (SANDBOX_ID_ANNOTATION, "p1"),
        ]);
        assert!(!is_kubernetes_pod(&container));
        assert!(!is_kubernetes_pod(&spec_with(&[])));
        assert!(!is_kubernetes_pod(&Spec::default()));
    }
}
