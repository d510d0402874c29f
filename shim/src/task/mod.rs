//! The containerd Task service: one shim serves one sandbox (one VM) and its containers.

pub mod container;
pub mod events;
pub mod state;
pub mod stdio;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex as StdMutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::r#async::TtrpcContext;
use containerd_shim::ExitSignal;
use hako_protocol as pb;
use oci_spec::runtime::Spec;
use tokio::sync::{watch, Mutex};
use ttrpc::{Code, Error as TtrpcError};

use crate::agent_client::{AgentClient, AgentError};
use crate::config::{Config, ConfigError};
use crate::hooks;
use crate::ids::{validate, IdError};
use crate::sandbox::mounts::RootfsMount;
use crate::sandbox::spec::{to_guest, SpecError};
use crate::sandbox::{Sandbox, SandboxError};
use crate::timing::Timings;
use container::{Container, ContainerInfo, ProcEntry};
use events::EventSender;
use state::{wait_exit, Exit, StateError, Status};
use stdio::{StdioError, StdioPaths};

/// How long an exit waits for the last output to reach containerd's FIFOs.
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);
/// Exit status reported when the VM died under a process: killed, never 0.
const VM_GONE_STATUS: u32 = 137;
const SIGKILL: u32 = 9;
/// The largest spec the agent channel carries: ttrpc's 4 MiB message limit, less room for the
/// rest of the request.
const MAX_GUEST_SPEC: usize = 4 * 1024 * 1024 - 64 * 1024;
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
const METRICS_V2_TYPE: &str = "io.containerd.cgroups.v2.Metrics";
/// The most OOM events a guest may report per second.
const OOM_EVENTS_PER_SECOND: u32 = 10;

/// A token bucket: `take` returns at once while tokens last, then waits for the next one.
struct RateLimit {
    per_second: u32,
    tokens: u32,
    refilled: tokio::time::Instant,
}

impl RateLimit {
    fn new(per_second: u32) -> Self {
        Self {
            per_second,
            tokens: per_second,
            refilled: tokio::time::Instant::now(),
        }
    }

    async fn take(&mut self) {
        loop {
            let earned =
                self.refilled.elapsed().as_millis() as u64 * u64::from(self.per_second) / 1000;
            if earned > 0 {
                self.tokens =
                    (u64::from(self.tokens) + earned).min(u64::from(self.per_second)) as u32;
                self.refilled = tokio::time::Instant::now();
            }
            if self.tokens > 0 {
                self.tokens -= 1;
                return;
            }
            tokio::time::sleep(Duration::from_millis(
                1000 / u64::from(self.per_second.max(1)),
            ))
            .await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Id(#[from] IdError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Stdio(#[from] StdioError),
    /// config.json could not be read or parsed.
    #[error("cannot read the OCI spec {path}: {reason}")]
    Bundle { path: PathBuf, reason: String },
    /// A request carried something unusable.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// No such container or process.
    #[error("{0} not found")]
    NotFound(String),
    /// A container or exec with this id exists.
    #[error("{0} already exists")]
    Exists(String),
    /// The container belongs to a sandbox this shim does not run.
    #[error("container {id} names sandbox {sandbox}, which this shim does not run")]
    ForeignSandbox { id: String, sandbox: String },
    /// The process already exited.
    #[error("process already finished")]
    Finished,
    /// Not implemented.
    #[error("{0} is not implemented by hako")]
    Unimplemented(&'static str),
}

impl TaskError {
    fn code(&self) -> Code {
        match self {
            TaskError::Id(_)
            | TaskError::Config(_)
            | TaskError::Spec(_)
            | TaskError::Bundle { .. }
            | TaskError::Invalid(_) => Code::INVALID_ARGUMENT,
            TaskError::NotFound(_) | TaskError::Finished => Code::NOT_FOUND,
            TaskError::Exists(_) => Code::ALREADY_EXISTS,
            TaskError::State(_) | TaskError::ForeignSandbox { .. } => Code::FAILED_PRECONDITION,
            TaskError::Agent(e) => e.code(),
            TaskError::Unimplemented(_) => Code::UNIMPLEMENTED,
            TaskError::Sandbox(_) | TaskError::Stdio(_) => Code::INTERNAL,
        }
    }
}

/// The one mapping from our errors to ttrpc statuses at the service boundary.
fn to_ttrpc(e: TaskError) -> TtrpcError {
    log::error!("{e}");
    TtrpcError::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
}

fn timestamp(at: SystemTime) -> Timestamp {
    let d = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// What every RPC needs from a booted sandbox, without locking the sandbox itself.
#[derive(Clone)]
struct Running {
    agent: Arc<dyn AgentClient>,
    vm_exit: Option<watch::Receiver<Option<i32>>>,
    vmm_pid: u32,
}

impl Running {
    fn vm_alive(&self) -> bool {
        self.vm_exit.as_ref().is_none_or(|rx| rx.borrow().is_none())
    }

    /// Resolves with the VMM's exit code when it exits (never, without a watch).
    async fn vm_gone(&self) -> i32 {
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
}

pub struct TaskService {
    namespace: String,
    events: Arc<dyn EventSender>,
    exit_signal: Arc<ExitSignal>,
    /// Held across boot, network changes and teardown only.
    sandbox: Arc<Mutex<Option<Sandbox>>>,
    running: StdMutex<Option<Running>>,
    containers: Arc<StdMutex<HashMap<String, Arc<Container>>>>,
    /// Guest pid of the sandbox's first container, whose namespaces pod members join.
    sandbox_init_pid: AtomicU32,
}

impl TaskService {
    pub fn new(
        namespace: &str,
        events: Arc<dyn EventSender>,
        exit_signal: Arc<ExitSignal>,
    ) -> Self {
        Self {
            namespace: namespace.to_string(),
            events,
            exit_signal,
            sandbox: Arc::new(Mutex::new(None)),
            running: StdMutex::new(None),
            containers: Arc::new(StdMutex::new(HashMap::new())),
            sandbox_init_pid: AtomicU32::new(0),
        }
    }

    /// Ends the shim if containerd started it but never gave it a container within `patience`
    /// (containerd gave up after starting it): a shim with nothing to serve must not linger.
    pub fn exit_if_never_used(self: &Arc<Self>, patience: Duration) {
        let service = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(patience).await;
            let Some(service) = service.upgrade() else {
                return;
            };
            let idle = service.sandbox.lock().await.is_none() && service.containers().is_empty();
            if idle {
                log::warn!("no container came within {patience:?} of the shim's start; exiting");
                service.exit_signal.signal();
            }
        });
    }

    fn containers(&self) -> MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_running(&self, running: Option<Running>) {
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = running;
    }

    fn running(&self) -> Result<Running, TaskError> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| TaskError::NotFound("sandbox".to_string()))
    }

    fn container(&self, id: &str) -> Result<Arc<Container>, TaskError> {
        self.containers()
            .get(id)
            .cloned()
            .ok_or_else(|| TaskError::NotFound(format!("container {id}")))
    }

    fn vmm_pid(&self) -> u32 {
        self.running().map(|r| r.vmm_pid).unwrap_or(0)
    }

    async fn do_create(&self, req: &api::CreateTaskRequest) -> Result<u32, TaskError> {
        let mut timings = Timings::new();
        validate("namespace", &self.namespace)?;
        validate("container id", &req.id)?;
        if self.containers().contains_key(&req.id) {
            return Err(TaskError::Exists(format!("container {}", req.id)));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = read_spec(&bundle)?;
        let network_mode = crate::net::mode(&spec);
        let sandbox_id = match spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(SANDBOX_ID_ANNOTATION))
        {
            Some(annotated) => annotated.clone(),
            None => self
                .sharing_network(&network_mode)
                .await
                .unwrap_or_else(|| req.id.clone()),
        };
        validate("sandbox id", &sandbox_id)?;
        let join = (sandbox_id != req.id)
            .then(|| self.sandbox_init_pid.load(Ordering::SeqCst))
            .filter(|pid| *pid != 0);
        let (guest_spec, binds) = to_guest(
            &spec,
            &req.id,
            Path::new(hako_protocol::GUEST_SHARED_DIR),
            join,
            &crate::sandbox::spec::host_submounts,
        )?;
        let guest_spec_json = serde_json::to_vec(&guest_spec).map_err(|e| TaskError::Bundle {
            path: bundle.join("config.json"),
            reason: e.to_string(),
        })?;
        if guest_spec_json.len() > MAX_GUEST_SPEC {
            return Err(TaskError::Invalid(format!(
                "the container's OCI spec is {} bytes; hako passes at most {MAX_GUEST_SPEC} bytes to the guest (is the environment or the set of annotations that large on purpose?)",
                guest_spec_json.len()
            )));
        }
        let rootfs: Vec<RootfsMount> = req
            .rootfs
            .iter()
            .map(|m| RootfsMount {
                fstype: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();

        let create_hooks = hooks::create_hooks(&spec);
        let hook_state = hooks::State::new(&spec, &req.id, "creating", 0, &bundle);

        let mut sandbox_slot = self.sandbox.lock().await;
        let booting = sandbox_slot.is_none();
        if booting && network_mode == crate::net::NetworkMode::Host {
            return Err(TaskError::Sandbox(crate::net::NetError::HostNetwork.into()));
        }
        if booting {
            let loaded = Config::load(config_path_option(req).as_deref())?;
            log::info!(
                "configuration from {}",
                loaded
                    .source
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "built-in defaults".to_string())
            );
            let config = loaded
                .config
                .with_pod_annotations(spec.annotations().iter().flatten())?;
            let cgroups_path = spec
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
            *sandbox_slot = Some(sandbox);
        }
        let Some(sandbox) = sandbox_slot.as_mut() else {
            return Err(TaskError::NotFound("sandbox".to_string()));
        };
        if sandbox.id != sandbox_id {
            return Err(TaskError::ForeignSandbox {
                id: req.id.clone(),
                sandbox: sandbox_id,
            });
        }

        let rootfs_dir = host_rootfs(&bundle, &spec, !rootfs.is_empty());
        let container_rootfs = crate::sandbox::ContainerRootfs {
            dir: &rootfs_dir,
            mounts: &rootfs,
            readonly: spec
                .root()
                .as_ref()
                .and_then(|r| r.readonly())
                .unwrap_or(false),
        };
        let targets = crate::sandbox::spec::plain_mount_points(&guest_spec, &binds);
        let attached = sandbox.attach_container(&req.id, &container_rootfs, &binds, &targets);
        let result = match attached {
            Ok(()) => {
                let hostname = spec.hostname().clone().unwrap_or_default();
                let booted = async {
                    if booting {
                        sandbox.choose_network(&network_mode)?;
                    }
                    // Hooks (Docker's network set-up among them) run before the VM takes the
                    // namespace's interfaces over.
                    sandbox
                        .run_create_hooks(&create_hooks, hook_state.clone())
                        .await?;
                    if booting {
                        sandbox.boot(&hostname).await?;
                    }
                    Ok::<(), crate::sandbox::SandboxError>(())
                }
                .await;
                match booted {
                    Ok(()) => {
                        let created = ContainerInfo {
                            rootfs: rootfs_dir.clone(),
                            poststart: hooks::poststart_hooks(&spec),
                            poststop: hooks::poststop_hooks(&spec),
                            hook_state,
                        };
                        self.create_in_guest(sandbox, req, created, guest_spec_json)
                            .await
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        };
        match result {
            Ok((container, guest_pid, in_guest)) => {
                if booting {
                    timings = sandbox.timings.clone();
                    self.sandbox_init_pid.store(guest_pid, Ordering::SeqCst);
                    self.follow_network(sandbox)?;
                }
                timings.mark("container_created");
                timings.detail("guest.create_container", in_guest);
                log::info!("container {} start phases: {}", req.id, timings.summary());
                let pid = sandbox.vmm_pid();
                self.containers().insert(req.id.clone(), container);
                Ok(pid)
            }
            Err(e) => {
                sandbox.detach_container(&req.id, &rootfs_dir, !rootfs.is_empty());
                if booting {
                    if let Some(mut sandbox) = sandbox_slot.take() {
                        self.set_running(None);
                        if let Err(cleanup) = sandbox.shutdown().await {
                            log::error!("cleaning up after a failed create: {cleanup}");
                        }
                    }
                }
                Err(e)
            }
        }
    }

    /// The sandbox this shim runs, if the container is given its VM's network namespace
    /// (Docker's `--network container:<x>`): the container joins that VM.
    async fn sharing_network(&self, mode: &crate::net::NetworkMode) -> Option<String> {
        let crate::net::NetworkMode::Namespace(path) = mode else {
            return None;
        };
        let slot = self.sandbox.lock().await;
        slot.as_ref()
            .filter(|sandbox| sandbox.holds_netns(path))
            .map(|sandbox| sandbox.id.clone())
    }

    async fn create_in_guest(
        &self,
        sandbox: &Sandbox,
        req: &api::CreateTaskRequest,
        info: ContainerInfo,
        spec_json: Vec<u8>,
    ) -> Result<(Arc<Container>, u32, Duration), TaskError> {
        let agent = sandbox
            .agent()
            .ok_or_else(|| TaskError::NotFound("agent".to_string()))?;
        let running = Running {
            agent: agent.clone(),
            vm_exit: sandbox.vm_exit(),
            vmm_pid: sandbox.vmm_pid(),
        };
        if self.running().is_err() {
            self.set_running(Some(running.clone()));
            self.spawn_oom_watcher(running.clone());
        }
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let called = Instant::now();
        let guest_pid = agent
            .create_container(pb::CreateContainerRequest {
                container_id: req.id.clone(),
                oci_spec: spec_json,
                stdin: !stdio.stdin.is_empty(),
                stdout: !stdio.stdout.is_empty(),
                stderr: !stdio.stderr.is_empty() && !stdio.terminal,
                terminal: stdio.terminal,
                ..Default::default()
            })
            .await?;
        let in_guest = called.elapsed();
        let container = Arc::new(Container::new(
            &req.id,
            PathBuf::from(&req.bundle),
            info,
            !req.rootfs.is_empty(),
            stdio,
        ));
        let init = container.init.clone();
        if let Err(e) = self.attach_process(&container.id, init, &running) {
            let _ = agent.signal_process(&req.id, "", 9, true).await;
            let _ = agent.remove_container(&req.id).await;
            return Err(e);
        }
        Ok((container, guest_pid, in_guest))
    }

    /// Keeps the VM's network in step with the pod's namespace while the pod runs: each burst
    /// of changes there (`docker network connect`, a plugin re-addressing) is synced under the
    /// sandbox's lock.
    fn follow_network(&self, sandbox: &mut Sandbox) -> Result<(), TaskError> {
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

    /// Opens the process's FIFOs, starts the copies and the exit watcher.
    fn attach_process(
        &self,
        container_id: &str,
        entry: Arc<ProcEntry>,
        running: &Running,
    ) -> Result<(), TaskError> {
        let outputs = stdio::attach(
            running.agent.clone(),
            container_id,
            &entry.exec_id,
            &entry.stdio,
            entry.stdin_done.clone(),
        )?;
        self.spawn_exit_watcher(container_id.to_string(), entry, running.clone(), outputs);
        Ok(())
    }

    /// Waits for the process's exit (or the VM's death), lets the output drain, records the
    /// exit and publishes it.
    fn spawn_exit_watcher(
        &self,
        container_id: String,
        entry: Arc<ProcEntry>,
        running: Running,
        mut outputs: tokio::task::JoinSet<()>,
    ) {
        let events = self.events.clone();
        tokio::spawn(async move {
            let shown = if entry.exec_id.is_empty() {
                container_id.clone()
            } else {
                format!("{container_id}/{}", entry.exec_id)
            };
            let status = tokio::select! {
                result = running.agent.wait_process(&container_id, &entry.exec_id) => match result {
                    Ok(status) => status,
                    Err(e) => {
                        log::error!("{shown}: waiting for the exit failed: {e}");
                        VM_GONE_STATUS
                    }
                },
                code = running.vm_gone() => {
                    log::error!("{shown}: the VM exited (status {code}) under it");
                    VM_GONE_STATUS
                }
            };
            let drained = tokio::time::timeout(OUTPUT_DRAIN, async {
                while outputs.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                log::warn!("{shown}: output still open {OUTPUT_DRAIN:?} after exit");
                outputs.abort_all();
            }
            let exit = entry.state().set_exited(status);
            if let Some(exit) = exit {
                log::info!("{shown} exited with status {status}");
                let id = if entry.exec_id.is_empty() {
                    container_id.clone()
                } else {
                    entry.exec_id.clone()
                };
                events
                    .send(
                        topics::TASK_EXIT_EVENT_TOPIC,
                        Box::new(TaskExit {
                            container_id,
                            id,
                            pid: running.vmm_pid,
                            exit_status: exit.status,
                            exited_at: MessageField::some(timestamp(exit.at)),
                            ..Default::default()
                        }),
                    )
                    .await;
            }
        });
    }

    /// Publishes `/tasks/oom` for every OOM kill the agent reports, for the VM's lifetime. The
    /// agent is the guest's: an id that is not one of this sandbox's containers is refused (a
    /// guest must not mark another pod's container OOM-killed), ids are quoted in logs, and the
    /// loop takes at most `OOM_EVENTS_PER_SECOND`, however fast the guest answers.
    fn spawn_oom_watcher(&self, running: Running) {
        let events = self.events.clone();
        let containers = self.containers.clone();
        tokio::spawn(async move {
            let mut bucket = RateLimit::new(OOM_EVENTS_PER_SECOND);
            let mut refused = 0u64;
            loop {
                bucket.take().await;
                let event = tokio::select! {
                    event = running.agent.oom_event() => event,
                    _ = running.vm_gone() => return,
                };
                let container_id = match event {
                    Ok(id) => id,
                    Err(e) => {
                        log::debug!("OOM watcher stopped: {e}");
                        return;
                    }
                };
                let known = containers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(&container_id);
                if !known {
                    refused += 1;
                    // Said once, then at every power of two: a flood costs a few lines.
                    if refused.is_power_of_two() {
                        log::warn!(
                            "the guest reported an OOM kill of {container_id:?}, which is not a container of this sandbox: ignored ({refused} so far)"
                        );
                    }
                    continue;
                }
                log::warn!("container {container_id:?} was OOM-killed");
                events
                    .send(
                        topics::TASK_OOM_EVENT_TOPIC,
                        Box::new(TaskOOM {
                            container_id,
                            ..Default::default()
                        }),
                    )
                    .await;
            }
        });
    }

    async fn do_exec(&self, req: &api::ExecProcessRequest) -> Result<(), TaskError> {
        validate("exec id", &req.exec_id)?;
        let container = self.container(&req.id)?;
        let running = self.running()?;
        if container.init.state().status() != Status::Running {
            return Err(TaskError::State(StateError::Transition {
                action: "exec in",
                status: container.init.state().status(),
            }));
        }
        let process_json = req
            .spec
            .as_ref()
            .map(|any| any.value.clone())
            .ok_or_else(|| TaskError::Invalid("exec without a process spec".to_string()))?;
        let process: oci_spec::runtime::Process = serde_json::from_slice(&process_json)
            .map_err(|e| TaskError::Invalid(format!("exec process spec: {e}")))?;
        crate::sandbox::spec::check_env(process.env().as_deref().unwrap_or_default())?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let entry = Arc::new(ProcEntry::new(&req.exec_id, stdio.clone()));
        container.add_exec(entry.clone())?;
        let created = running
            .agent
            .exec_process(pb::ExecProcessRequest {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                process: process_json,
                stdin: !stdio.stdin.is_empty(),
                stdout: !stdio.stdout.is_empty(),
                stderr: !stdio.stderr.is_empty() && !stdio.terminal,
                terminal: stdio.terminal,
                ..Default::default()
            })
            .await;
        let attached = match created {
            Ok(_) => self.attach_process(&req.id, entry, &running),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = attached {
            container.remove_exec(&req.exec_id);
            let _ = running.agent.delete_process(&req.id, &req.exec_id).await;
            return Err(e);
        }
        self.events
            .send(
                topics::TASK_EXEC_ADDED_EVENT_TOPIC,
                Box::new(TaskExecAdded {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        Ok(())
    }

    async fn do_start(&self, req: &api::StartRequest) -> Result<u32, TaskError> {
        let started = Instant::now();
        let container = self.container(&req.id)?;
        let entry = container.process(&req.exec_id)?;
        let running = self.running()?;
        let status = entry.state().status();
        if status != Status::Created {
            return Err(StateError::Transition {
                action: "start",
                status,
            }
            .into());
        }
        if req.exec_id.is_empty() {
            // Docker 28 and later network the pod after Create: what appeared in its namespace
            // since then reaches the VM before the process runs.
            let mut slot = self.sandbox.lock().await;
            if let Some(sandbox) = slot.as_mut().filter(|s| s.network_changed()) {
                sandbox.sync_network().await?;
            }
        }
        running.agent.start_process(&req.id, &req.exec_id).await?;
        entry.state().start()?;
        if req.exec_id.is_empty() {
            // A failed poststart hook is worth a warning, not the container (OCI runtime spec).
            let state = container.hook_state("running", running.vmm_pid);
            if let Err(e) = hooks::run("poststart", &container.info.poststart, &state).await {
                log::warn!("container {}: {e}", req.id);
            }
            log::info!(
                "container {} start phases: process_started={:.1}ms",
                req.id,
                started.elapsed().as_secs_f64() * 1000.0
            );
            self.events
                .send(
                    topics::TASK_START_EVENT_TOPIC,
                    Box::new(TaskStart {
                        container_id: req.id.clone(),
                        pid: running.vmm_pid,
                        ..Default::default()
                    }),
                )
                .await;
        } else {
            self.events
                .send(
                    topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                    Box::new(TaskExecStarted {
                        container_id: req.id.clone(),
                        exec_id: req.exec_id.clone(),
                        pid: running.vmm_pid,
                        ..Default::default()
                    }),
                )
                .await;
        }
        Ok(running.vmm_pid)
    }

    async fn do_delete(&self, req: &api::DeleteRequest) -> Result<api::DeleteResponse, TaskError> {
        let container = self.container(&req.id)?;
        let entry = container.process(&req.exec_id)?;
        entry.state().check_delete()?;
        let running = self.running().ok();
        let pid = running.as_ref().map(|r| r.vmm_pid).unwrap_or(0);
        let exit = entry.state().exit().unwrap_or(Exit {
            status: VM_GONE_STATUS,
            at: SystemTime::now(),
        });
        let response = api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        };
        if !req.exec_id.is_empty() {
            if let Some(running) = running.as_ref().filter(|r| r.vm_alive()) {
                if let Err(e) = running.agent.delete_process(&req.id, &req.exec_id).await {
                    log::warn!("{}/{}: {e}", req.id, req.exec_id);
                }
            }
            container.remove_exec(&req.exec_id);
            return Ok(response);
        }

        if let Some(running) = running.as_ref().filter(|r| r.vm_alive()) {
            if let Err(e) = running.agent.remove_container(&req.id).await {
                log::warn!("container {}: {e}", req.id);
            }
        }
        self.containers().remove(&req.id);
        let last = self.containers().is_empty();
        {
            let mut slot = self.sandbox.lock().await;
            if let Some(sandbox) = slot.as_mut() {
                sandbox.detach_container(
                    &container.id,
                    &container.info.rootfs,
                    container.rootfs_mounted,
                );
            }
            if last {
                if let Some(mut sandbox) = slot.take() {
                    self.set_running(None);
                    // Sandbox::shutdown logs its own teardown time.
                    sandbox.shutdown().await?;
                }
            }
        }
        let state = container.hook_state("stopped", pid);
        if let Err(e) = hooks::run("poststop", &container.info.poststop, &state).await {
            log::warn!("container {}: {e}", req.id);
        }
        self.events
            .send(
                topics::TASK_DELETE_EVENT_TOPIC,
                Box::new(TaskDelete {
                    container_id: req.id.clone(),
                    id: req.id.clone(),
                    pid,
                    exit_status: exit.status,
                    exited_at: MessageField::some(timestamp(exit.at)),
                    ..Default::default()
                }),
            )
            .await;
        Ok(response)
    }

    async fn do_kill(&self, req: &api::KillRequest) -> Result<(), TaskError> {
        let container = self.container(&req.id)?;
        let entry = container.process(&req.exec_id)?;
        if entry.state().status() == Status::Stopped && !req.all {
            return Err(TaskError::Finished);
        }
        let running = self.running()?;
        match running
            .agent
            .signal_process(&req.id, &req.exec_id, req.signal, req.all)
            .await
        {
            Err(AgentError::Rpc {
                code: Code::FAILED_PRECONDITION,
                ..
            }) => Err(TaskError::Finished),
            // An agent that does not answer a SIGKILL has failed its sandbox: the kill still
            // has to happen, and the only way left is to end the VM. Every process of the
            // sandbox then exits (published as failed), and Delete tears down the rest.
            Err(e @ (AgentError::Timeout { .. } | AgentError::Transport { .. }))
                if req.signal == SIGKILL && running.vm_alive() =>
            {
                log::error!(
                    "container {}: {e}; the agent is not answering, so SIGKILL ends the whole VM (pid {})",
                    req.id,
                    running.vmm_pid
                );
                crate::vmm::kill_failed_vm(running.vmm_pid);
                Ok(())
            }
            other => other.map_err(Into::into),
        }
    }

    fn state_of(&self, req: &api::StateRequest) -> Result<api::StateResponse, TaskError> {
        let container = self.container(&req.id)?;
        let entry = container.process(&req.exec_id)?;
        let process = entry.state();
        let status = match process.status() {
            Status::Created => api::Status::CREATED,
            Status::Running if container.paused() => api::Status::PAUSED,
            Status::Running => api::Status::RUNNING,
            Status::Stopped => api::Status::STOPPED,
        };
        let exit = process.exit();
        Ok(api::StateResponse {
            id: container.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle: container.bundle.display().to_string(),
            pid: self.vmm_pid(),
            status: status.into(),
            stdin: entry.stdio.stdin.clone(),
            stdout: entry.stdio.stdout.clone(),
            stderr: entry.stdio.stderr.clone(),
            terminal: entry.stdio.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| timestamp(e.at)).into(),
            ..Default::default()
        })
    }

    async fn do_wait(&self, req: &api::WaitRequest) -> Result<api::WaitResponse, TaskError> {
        let rx = self
            .container(&req.id)?
            .process(&req.exec_id)?
            .state()
            .exit_watch();
        let exit = wait_exit(rx)
            .await
            .ok_or_else(|| TaskError::NotFound(format!("exit of {}", req.id)))?;
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn do_close_io(&self, req: &api::CloseIORequest) -> Result<(), TaskError> {
        let entry = self.container(&req.id)?.process(&req.exec_id)?;
        if req.stdin {
            if entry.stdio.stdin.is_empty() {
                self.running()?
                    .agent
                    .close_stdin(&req.id, &req.exec_id)
                    .await?;
            } else {
                // The copy closes stdin once the FIFO is drained, so no byte is lost.
                entry.stdin_done.notify_one();
            }
        }
        Ok(())
    }

    async fn do_resize(&self, req: &api::ResizePtyRequest) -> Result<(), TaskError> {
        let entry = self.container(&req.id)?.process(&req.exec_id)?;
        if !entry.stdio.terminal {
            return Err(TaskError::Invalid(format!("{} has no terminal", req.id)));
        }
        self.running()?
            .agent
            .resize_pty(&req.id, &req.exec_id, req.width, req.height)
            .await?;
        Ok(())
    }

    async fn do_pause(&self, id: &str, paused: bool) -> Result<(), TaskError> {
        let container = self.container(id)?;
        if container.init.state().status() != Status::Running {
            return Err(TaskError::State(StateError::Transition {
                action: if paused { "pause" } else { "resume" },
                status: container.init.state().status(),
            }));
        }
        self.running()?.agent.set_paused(id, paused).await?;
        container.set_paused(paused);
        if paused {
            let event = TaskPaused {
                container_id: id.to_string(),
                ..Default::default()
            };
            self.events
                .send(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(event))
                .await;
        } else {
            let event = TaskResumed {
                container_id: id.to_string(),
                ..Default::default()
            };
            self.events
                .send(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(event))
                .await;
        }
        Ok(())
    }

    async fn do_pids(&self, id: &str) -> Result<api::PidsResponse, TaskError> {
        self.container(id)?;
        let pids = self.running()?.agent.list_processes(id).await?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| containerd_shim::protos::types::task::ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn do_stats(&self, id: &str) -> Result<api::StatsResponse, TaskError> {
        self.container(id)?;
        let s = self.running()?.agent.stats(id).await?;
        let metrics = v2_metrics(&s);
        let value = metrics
            .write_to_bytes()
            .map_err(|e| TaskError::Invalid(format!("encoding metrics: {e}")))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(Any {
                type_url: METRICS_V2_TYPE.to_string(),
                value,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn do_update(&self, req: &api::UpdateTaskRequest) -> Result<(), TaskError> {
        self.container(&req.id)?;
        let resources = req
            .resources
            .as_ref()
            .map(|any| any.value.clone())
            .ok_or_else(|| TaskError::Invalid("update without resources".to_string()))?;
        // Refuse what the guest could not parse before sending it.
        serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources)
            .map_err(|e| TaskError::Invalid(format!("resources: {e}")))?;
        self.running()?.agent.update(&req.id, resources).await?;
        Ok(())
    }
}

/// The agent's cgroup v2 figures as containerd's `io.containerd.cgroups.v2.Metrics`.
fn v2_metrics(s: &pb::StatsContainerResponse) -> v2::Metrics {
    let stat = |key: &str| s.memory_stat.get(key).copied().unwrap_or(0);
    v2::Metrics {
        pids: MessageField::some(v2::PidsStat {
            current: s.pids_current,
            limit: s.pids_limit,
            ..Default::default()
        }),
        cpu: MessageField::some(v2::CPUStat {
            usage_usec: s.cpu_usage_usec,
            user_usec: s.cpu_user_usec,
            system_usec: s.cpu_system_usec,
            nr_periods: s.cpu_nr_periods,
            nr_throttled: s.cpu_nr_throttled,
            throttled_usec: s.cpu_throttled_usec,
            ..Default::default()
        }),
        memory: MessageField::some(v2::MemoryStat {
            anon: stat("anon"),
            file: stat("file"),
            kernel_stack: stat("kernel_stack"),
            slab: stat("slab"),
            sock: stat("sock"),
            shmem: stat("shmem"),
            file_mapped: stat("file_mapped"),
            file_dirty: stat("file_dirty"),
            file_writeback: stat("file_writeback"),
            inactive_anon: stat("inactive_anon"),
            active_anon: stat("active_anon"),
            inactive_file: stat("inactive_file"),
            active_file: stat("active_file"),
            unevictable: stat("unevictable"),
            pgfault: stat("pgfault"),
            pgmajfault: stat("pgmajfault"),
            usage: s.memory_usage,
            usage_limit: s.memory_limit,
            swap_usage: s.memory_swap_usage,
            ..Default::default()
        }),
        memory_events: MessageField::some(v2::MemoryEvents {
            oom: s.oom_events,
            oom_kill: s.oom_kill_events,
            ..Default::default()
        }),
        ..Default::default()
    }
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

fn read_spec(bundle: &Path) -> Result<Spec, TaskError> {
    let path = bundle.join("config.json");
    let bytes = std::fs::read(&path).map_err(|e| TaskError::Bundle {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| TaskError::Bundle {
        path,
        reason: e.to_string(),
    })
}
fn config_path_option(req: &api::CreateTaskRequest) -> Option<PathBuf> {
    let any = req.options.as_ref()?;
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    decode_string_field(&any.value, 2)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}
fn decode_string_field(bytes: &[u8], wanted: u64) -> Option<String> {
    let mut input = containerd_shim::protos::protobuf::CodedInputStream::from_bytes(bytes);
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        let (field, wire) = (u64::from(tag >> 3), tag & 7);
        match wire {
            0 => {
                input.read_raw_varint64().ok()?;
            }
            1 => {
                input.read_raw_little_endian64().ok()?;
            }
            2 => {
                let value = input.read_bytes().ok()?;
                if field == wanted {
                    return String::from_utf8(value).ok();
                }
            }
            5 => {
                input.read_raw_little_endian32().ok()?;
            }
            _ => return None,
        }
    }
    None
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> ttrpc::Result<api::CreateTaskResponse> {
        let pid = self.do_create(&req).await.map_err(to_ttrpc)?;
        self.events
            .send(
                topics::TASK_CREATE_EVENT_TOPIC,
                Box::new(TaskCreate {
                    container_id: req.id.clone(),
                    bundle: req.bundle.clone(),
                    rootfs: req.rootfs.clone(),
                    io: MessageField::some(TaskIO {
                        stdin: req.stdin.clone(),
                        stdout: req.stdout.clone(),
                        stderr: req.stderr.clone(),
                        terminal: req.terminal,
                        ..Default::default()
                    }),
                    checkpoint: req.checkpoint.clone(),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> ttrpc::Result<api::StartResponse> {
        let pid = self.do_start(&req).await.map_err(to_ttrpc)?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> ttrpc::Result<api::StateResponse> {
        self.state_of(&req).map_err(to_ttrpc)
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> ttrpc::Result<api::WaitResponse> {
        self.do_wait(&req).await.map_err(to_ttrpc)
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> ttrpc::Result<api::Empty> {
        self.do_kill(&req).await.map_err(to_ttrpc)?;
        Ok(api::Empty::default())
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> ttrpc::Result<api::DeleteResponse> {
        self.do_delete(&req).await.map_err(to_ttrpc)
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> ttrpc::Result<api::Empty> {
        self.do_exec(&req).await.map_err(to_ttrpc)?;
        Ok(api::Empty::default())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> ttrpc::Result<api::Empty> {
        self.do_resize(&req).await.map_err(to_ttrpc)?;
        Ok(api::Empty::default())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> ttrpc::Result<api::Empty> {
        self.do_close_io(&req).await.map_err(to_ttrpc)?;
        Ok(api::Empty::default())
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> ttrpc::Result<api::PidsResponse> {
        self.do_pids(&req.id).await.map_err(to_ttrpc)
    }

    async fn pause(
        &self,
        _ctx: &TtrpcContext,
        req: api::PauseRequest,
    ) -> ttrpc::Result<api::Empty> {
        self.do_pause(&req.id, true).await.map_err(to_ttrpc)?;
        Ok(api::Empty::default())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> ttrpc::Result<api::Empty> {
        self.do_pause(&req.id, false).await.map_err(to_ttrpc)?;
        Ok(api::Empty::default())
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> ttrpc::Result<api::StatsResponse> {
        self.do_stats(&req.id).await.map_err(to_ttrpc)
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> ttrpc::Result<api::Empty> {
        self.do_update(&req).await.map_err(to_ttrpc)?;
        Ok(api::Empty::default())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> ttrpc::Result<api::Empty> {
        Err(to_ttrpc(TaskError::Unimplemented("Checkpoint")))
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> ttrpc::Result<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.vmm_pid(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> ttrpc::Result<api::Empty> {
        if !self.containers().is_empty() {
            return Ok(api::Empty::default());
        }
        if let Some(mut sandbox) = self.sandbox.lock().await.take() {
            self.set_running(None);
            if let Err(e) = sandbox.shutdown().await {
                log::error!("shutdown: {e}");
            }
        }
        self.exit_signal.signal();
        Ok(api::Empty::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_path_is_read_from_runtime_options() {
        // runtimeoptions.v1.Options { type_url = "x", config_path = "/etc/hako/c.toml" }
        let mut value = vec![0x0a, 1, b'x', 0x12, 16];
        value.extend_from_slice(b"/etc/hako/c.toml");
        let req = api::CreateTaskRequest {
            options: MessageField::some(
                containerd_shim::protos::protobuf::well_known_types::any::Any {
                    type_url: "runtimeoptions.v1.Options".to_string(),
                    value,
                    ..Default::default()
                },
            ),
            ..Default::default()
        };
        assert_eq!(
            config_path_option(&req),
            Some(PathBuf::from("/etc/hako/c.toml"))
        );
    }

    #[test]
    fn other_option_types_are_ignored() {
        let req = api::CreateTaskRequest {
            options: MessageField::some(
                containerd_shim::protos::protobuf::well_known_types::any::Any {
                    type_url: "containerd.runc.v1.Options".to_string(),
                    value: vec![0x12, 1, b'x'],
                    ..Default::default()
                },
            ),
            ..Default::default()
        };
        assert_eq!(config_path_option(&req), None);
    }

    #[tokio::test(start_paused = true)]
    async fn guest_driven_loops_take_at_most_their_rate() {
        let mut bucket = RateLimit::new(10);
        let started = tokio::time::Instant::now();
        for _ in 0..100 {
            bucket.take().await;
        }
        // 10 at once, then 10 a second: 90 more take 9 seconds of (paused, virtual) time.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(8) && took <= Duration::from_secs(10),
            "{took:?}"
        );
    }

    #[test]
    fn errors_map_to_the_codes_containerd_expects() {
        assert_eq!(TaskError::Finished.code(), Code::NOT_FOUND);
        assert_eq!(TaskError::Unimplemented("x").code(), Code::UNIMPLEMENTED);
        let id = validate("container id", "a/b").expect_err("bad id");
        assert_eq!(TaskError::Id(id).code(), Code::INVALID_ARGUMENT);
    }
}
