//! The containerd Task service: one shim serves one sandbox (one VM) and its containers.

pub mod events;
pub mod state;
pub mod stdio;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::protos::events::task::{TaskCreate, TaskDelete, TaskExit, TaskIO, TaskStart};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
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
use crate::ids::{validate, IdError};
use crate::sandbox::mounts::RootfsMount;
use crate::sandbox::spec::{to_guest, SpecError};
use crate::sandbox::{Sandbox, SandboxError};
use crate::timing::Timings;
use events::EventSender;
use state::{wait_exit, Exit, Process, StateError, Status};
use stdio::{StdioError, StdioPaths};

/// How long an exit waits for the last output to reach containerd's FIFOs.
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);
/// Exit status reported when the VM died under a process: killed, never 0.
const VM_GONE_STATUS: u32 = 137;
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

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
    /// No such container or process.
    #[error("{0} not found")]
    NotFound(String),
    /// A container with this id exists.
    #[error("container {0} already exists")]
    Exists(String),
    /// The container belongs to a sandbox this shim does not run.
    #[error("container {id} names sandbox {sandbox}, which this shim does not run")]
    ForeignSandbox { id: String, sandbox: String },
    /// The process already exited.
    #[error("process already finished")]
    Finished,
    /// Not implemented yet.
    #[error("{0} is not implemented by hako yet")]
    Unimplemented(&'static str),
}

impl TaskError {
    fn code(&self) -> Code {
        match self {
            TaskError::Id(_)
            | TaskError::Config(_)
            | TaskError::Spec(_)
            | TaskError::Bundle { .. } => Code::INVALID_ARGUMENT,
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

struct Container {
    id: String,
    bundle: PathBuf,
    rootfs_mounted: bool,
    stdio: StdioPaths,
    /// Tells the stdin copy that containerd called CloseIO.
    stdin_done: Arc<tokio::sync::Notify>,
    init: StdMutex<Process>,
}

impl Container {
    fn init(&self) -> MutexGuard<'_, Process> {
        self.init.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What every RPC needs from a booted sandbox, without locking the sandbox itself.
#[derive(Clone)]
struct Running {
    agent: Arc<dyn AgentClient>,
    vm_exit: Option<watch::Receiver<Option<i32>>>,
    vmm_pid: u32,
}

pub struct TaskService {
    namespace: String,
    events: Arc<dyn EventSender>,
    exit_signal: Arc<ExitSignal>,
    /// Held across boot and teardown only.
    sandbox: Mutex<Option<Sandbox>>,
    running: StdMutex<Option<Running>>,
    containers: StdMutex<HashMap<String, Arc<Container>>>,
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
            sandbox: Mutex::new(None),
            running: StdMutex::new(None),
            containers: StdMutex::new(HashMap::new()),
        }
    }

    fn containers(&self) -> MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
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

    fn only_init(exec_id: &str) -> Result<(), TaskError> {
        if exec_id.is_empty() {
            Ok(())
        } else {
            Err(TaskError::Unimplemented("exec"))
        }
    }

    async fn do_create(&self, req: &api::CreateTaskRequest) -> Result<u32, TaskError> {
        let mut timings = Timings::new();
        validate("namespace", &self.namespace)?;
        validate("container id", &req.id)?;
        if self.containers().contains_key(&req.id) {
            return Err(TaskError::Exists(req.id.clone()));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = read_spec(&bundle)?;
        let sandbox_id = spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(SANDBOX_ID_ANNOTATION))
            .cloned()
            .unwrap_or_else(|| req.id.clone());
        validate("sandbox id", &sandbox_id)?;
        let (guest_spec, binds) =
            to_guest(&spec, &req.id, Path::new(hako_protocol::GUEST_SHARED_DIR))?;
        let guest_spec_json = serde_json::to_vec(&guest_spec).map_err(|e| TaskError::Bundle {
            path: bundle.join("config.json"),
            reason: e.to_string(),
        })?;
        let rootfs: Vec<RootfsMount> = req
            .rootfs
            .iter()
            .map(|m| RootfsMount {
                fstype: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();

        let mut sandbox_slot = self.sandbox.lock().await;
        let booting = sandbox_slot.is_none();
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
            let sandbox = Sandbox::prepare(&loaded.config, &self.namespace, &sandbox_id).await?;
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

        let attached = sandbox.attach_container(&req.id, &bundle, &rootfs, &binds);
        let result = match attached {
            Ok(()) => {
                let hostname = spec.hostname().clone().unwrap_or_default();
                let booted = if booting {
                    sandbox.boot(&hostname).await
                } else {
                    Ok(())
                };
                match booted {
                    Ok(()) => self.create_in_guest(sandbox, req, guest_spec_json).await,
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        };
        match result {
            Ok(container) => {
                if booting {
                    timings = sandbox.timings.clone();
                }
                timings.mark("container_created");
                log::info!("container {} start phases: {}", req.id, timings.summary());
                let pid = sandbox.vmm_pid();
                self.containers().insert(req.id.clone(), container);
                Ok(pid)
            }
            Err(e) => {
                sandbox.detach_container(&req.id, &bundle, !rootfs.is_empty());
                if booting {
                    if let Some(mut sandbox) = sandbox_slot.take() {
                        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = None;
                        if let Err(cleanup) = sandbox.shutdown().await {
                            log::error!("cleaning up after a failed create: {cleanup}");
                        }
                    }
                }
                Err(e)
            }
        }
    }

    async fn create_in_guest(
        &self,
        sandbox: &Sandbox,
        req: &api::CreateTaskRequest,
        spec_json: Vec<u8>,
    ) -> Result<Arc<Container>, TaskError> {
        let agent = sandbox
            .agent()
            .ok_or_else(|| TaskError::NotFound("agent".to_string()))?;
        let running = Running {
            agent: agent.clone(),
            vm_exit: sandbox.vm_exit(),
            vmm_pid: sandbox.vmm_pid(),
        };
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(running.clone());
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        if stdio.terminal {
            return Err(TaskError::Unimplemented("terminal (tty) containers"));
        }
        agent
            .create_container(pb::CreateContainerRequest {
                container_id: req.id.clone(),
                oci_spec: spec_json,
                stdin: !stdio.stdin.is_empty(),
                stdout: !stdio.stdout.is_empty(),
                stderr: !stdio.stderr.is_empty(),
                terminal: stdio.terminal,
                ..Default::default()
            })
            .await?;
        let stdin_done = Arc::new(tokio::sync::Notify::new());
        let outputs = match stdio::attach(agent.clone(), &req.id, "", &stdio, stdin_done.clone()) {
            Ok(outputs) => outputs,
            Err(e) => {
                let _ = agent.signal_process(&req.id, "", 9, true).await;
                let _ = agent.remove_container(&req.id).await;
                return Err(e.into());
            }
        };
        let container = Arc::new(Container {
            id: req.id.clone(),
            bundle: PathBuf::from(&req.bundle),
            rootfs_mounted: !req.rootfs.is_empty(),
            stdio,
            stdin_done,
            init: StdMutex::new(Process::new()),
        });
        self.spawn_exit_watcher(container.clone(), running, outputs);
        Ok(container)
    }

    /// Waits for the init process's exit (or the VM's death), lets the output drain, records
    /// the exit and publishes it.
    fn spawn_exit_watcher(
        &self,
        container: Arc<Container>,
        running: Running,
        mut outputs: tokio::task::JoinSet<()>,
    ) {
        let events = self.events.clone();
        tokio::spawn(async move {
            let vm_gone = async {
                match running.vm_exit.clone() {
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
            };
            let status = tokio::select! {
                result = running.agent.wait_process(&container.id, "") => match result {
                    Ok(status) => status,
                    Err(e) => {
                        log::error!("container {}: waiting for the exit failed: {e}", container.id);
                        VM_GONE_STATUS
                    }
                },
                code = vm_gone => {
                    log::error!("container {}: the VM exited (status {code}) under it", container.id);
                    VM_GONE_STATUS
                }
            };
            let drained = tokio::time::timeout(OUTPUT_DRAIN, async {
                while outputs.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                log::warn!(
                    "container {}: output still open {OUTPUT_DRAIN:?} after exit",
                    container.id
                );
                outputs.abort_all();
            }
            let exit = container.init().set_exited(status);
            if let Some(exit) = exit {
                log::info!("container {} exited with status {status}", container.id);
                events
                    .send(
                        topics::TASK_EXIT_EVENT_TOPIC,
                        Box::new(TaskExit {
                            container_id: container.id.clone(),
                            id: container.id.clone(),
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

    async fn do_start(&self, req: &api::StartRequest) -> Result<u32, TaskError> {
        Self::only_init(&req.exec_id)?;
        let started = std::time::Instant::now();
        let container = self.container(&req.id)?;
        let running = self.running()?;
        if container.init().status() != Status::Created {
            return Err(StateError::Transition {
                action: "start",
                status: container.init().status(),
            }
            .into());
        }
        running.agent.start_container(&req.id).await?;
        container.init().start()?;
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
        Ok(running.vmm_pid)
    }

    async fn do_delete(&self, req: &api::DeleteRequest) -> Result<api::DeleteResponse, TaskError> {
        Self::only_init(&req.exec_id)?;
        let container = self.container(&req.id)?;
        container.init().check_delete()?;
        let running = self.running().ok();
        if let Some(running) = &running {
            let vm_alive = running
                .vm_exit
                .as_ref()
                .is_none_or(|rx| rx.borrow().is_none());
            if vm_alive {
                if container.init().status() == Status::Created {
                    let _ = running.agent.signal_process(&req.id, "", 9, true).await;
                }
                if let Err(e) = running.agent.remove_container(&req.id).await {
                    log::warn!("container {}: {e}", req.id);
                }
            }
        }
        let exit = container.init().exit().unwrap_or(Exit {
            status: VM_GONE_STATUS,
            at: SystemTime::now(),
        });
        let pid = running.as_ref().map(|r| r.vmm_pid).unwrap_or(0);
        self.containers().remove(&req.id);
        let last = self.containers().is_empty();
        {
            let mut slot = self.sandbox.lock().await;
            if let Some(sandbox) = slot.as_mut() {
                sandbox.detach_container(
                    &container.id,
                    &container.bundle,
                    container.rootfs_mounted,
                );
            }
            if last {
                if let Some(mut sandbox) = slot.take() {
                    *self.running.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    let started = std::time::Instant::now();
                    sandbox.shutdown().await?;
                    log::info!(
                        "sandbox {} torn down in {:?}",
                        sandbox.id,
                        started.elapsed()
                    );
                }
            }
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
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn do_kill(&self, req: &api::KillRequest) -> Result<(), TaskError> {
        Self::only_init(&req.exec_id)?;
        let container = self.container(&req.id)?;
        if container.init().status() == Status::Stopped {
            return Err(TaskError::Finished);
        }
        let running = self.running()?;
        match running
            .agent
            .signal_process(&req.id, "", req.signal, req.all)
            .await
        {
            Err(AgentError::Rpc {
                code: Code::FAILED_PRECONDITION,
                ..
            }) => Err(TaskError::Finished),
            other => other.map_err(Into::into),
        }
    }

    fn state_of(&self, req: &api::StateRequest) -> Result<api::StateResponse, TaskError> {
        Self::only_init(&req.exec_id)?;
        let container = self.container(&req.id)?;
        let process = container.init();
        let status = match process.status() {
            Status::Created => api::Status::CREATED,
            Status::Running => api::Status::RUNNING,
            Status::Stopped => api::Status::STOPPED,
        };
        let exit = process.exit();
        Ok(api::StateResponse {
            id: container.id.clone(),
            bundle: container.bundle.display().to_string(),
            pid: self.running().map(|r| r.vmm_pid).unwrap_or(0),
            status: status.into(),
            stdin: container.stdio.stdin.clone(),
            stdout: container.stdio.stdout.clone(),
            stderr: container.stdio.stderr.clone(),
            terminal: container.stdio.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| timestamp(e.at)).into(),
            ..Default::default()
        })
    }

    async fn do_wait(&self, req: &api::WaitRequest) -> Result<api::WaitResponse, TaskError> {
        Self::only_init(&req.exec_id)?;
        let rx = self.container(&req.id)?.init().exit_watch();
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
        Self::only_init(&req.exec_id)?;
        let container = self.container(&req.id)?;
        if req.stdin {
            if container.stdio.stdin.is_empty() {
                self.running()?.agent.close_stdin(&req.id, "").await?;
            } else {
                // The copy closes stdin once the FIFO is drained, so no byte is lost.
                container.stdin_done.notify_one();
            }
        }
        Ok(())
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

/// `ConfigPath` from containerd's runtime options (`runtimeoptions.v1.Options`, field 2), as
/// CRI passes it for non-runc runtimes.
fn config_path_option(req: &api::CreateTaskRequest) -> Option<PathBuf> {
    let any = req.options.as_ref()?;
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    decode_string_field(&any.value, 2)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// Reads one length-delimited string field from a protobuf message.
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

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> ttrpc::Result<api::Empty> {
        self.do_close_io(&req).await.map_err(to_ttrpc)?;
        Ok(api::Empty::default())
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> ttrpc::Result<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.running().map(|r| r.vmm_pid).unwrap_or(0),
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
            if let Err(e) = sandbox.shutdown().await {
                log::error!("shutdown: {e}");
            }
        }
        self.exit_signal.signal();
        Ok(api::Empty::default())
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        _req: api::PidsRequest,
    ) -> ttrpc::Result<api::PidsResponse> {
        Err(to_ttrpc(TaskError::Unimplemented("Pids")))
    }

    async fn pause(
        &self,
        _ctx: &TtrpcContext,
        _req: api::PauseRequest,
    ) -> ttrpc::Result<api::Empty> {
        Err(to_ttrpc(TaskError::Unimplemented("Pause")))
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ResumeRequest,
    ) -> ttrpc::Result<api::Empty> {
        Err(to_ttrpc(TaskError::Unimplemented("Resume")))
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> ttrpc::Result<api::Empty> {
        Err(to_ttrpc(TaskError::Unimplemented("Checkpoint")))
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ExecProcessRequest,
    ) -> ttrpc::Result<api::Empty> {
        Err(to_ttrpc(TaskError::Unimplemented("Exec")))
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ResizePtyRequest,
    ) -> ttrpc::Result<api::Empty> {
        Err(to_ttrpc(TaskError::Unimplemented("ResizePty")))
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        _req: api::UpdateTaskRequest,
    ) -> ttrpc::Result<api::Empty> {
        Err(to_ttrpc(TaskError::Unimplemented("Update")))
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        _req: api::StatsRequest,
    ) -> ttrpc::Result<api::StatsResponse> {
        Err(to_ttrpc(TaskError::Unimplemented("Stats")))
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

    #[test]
    fn errors_map_to_the_codes_containerd_expects() {
        assert_eq!(TaskError::Finished.code(), Code::NOT_FOUND);
        assert_eq!(TaskError::Unimplemented("x").code(), Code::UNIMPLEMENTED);
        let id = validate("container id", "a/b").expect_err("bad id");
        assert_eq!(TaskError::Id(id).code(), Code::INVALID_ARGUMENT);
    }
}
