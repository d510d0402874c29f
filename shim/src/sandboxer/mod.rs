//! containerd's Sandbox API (`containerd.runtime.sandbox.v1.Sandbox`), served beside the Task
//! API when a runtime handler says `sandboxer = "shim"` (containerd 2.x): the pod is the VM,
//! created and started on its own, and no pause container is made. Each RPC checks and
//! converts the request and asks the pod (`sandbox::standalone`) for one thing.

mod pod_config;

use std::sync::{Arc, Mutex as StdMutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::sandbox_api as api;
use containerd_shim_protos::sandbox_async::Sandbox as SandboxApi;
use containerd_shim_protos::types::platform::Platform;
use tokio::sync::watch;
use ttrpc::r#async::TtrpcContext;

use crate::ids::validate;
use crate::sandbox::sizing::Needs;
use crate::sandbox::standalone::StandalonePod;
use crate::task::{timestamp, to_ttrpc, TaskError, TaskService, UNKNOWN_EXIT_STATUS};
pub use pod_config::{PodConfig, PodConfigError};

/// CRI's names for a pod's states.
const READY: &str = "SANDBOX_READY";
const NOT_READY: &str = "SANDBOX_NOTREADY";

/// How the pod ended: exit status and time.
type Exit = Option<(u32, SystemTime)>;

pub struct SandboxService {
    tasks: Arc<TaskService>,
    /// The one pod this shim serves, once CreateSandbox named it.
    state: StdMutex<State>,
    exit: watch::Sender<Exit>,
}

#[derive(Default)]
struct State {
    id: Option<String>,
    created_at: Option<SystemTime>,
    pid: u32,
    netns: String,
}

impl SandboxService {
    pub fn new(tasks: Arc<TaskService>) -> Self {
        Self {
            tasks,
            state: StdMutex::new(State::default()),
            exit: watch::channel(None).0,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The request's sandbox must be this shim's.
    fn check_id(&self, id: &str) -> Result<(), TaskError> {
        match &self.state().id {
            Some(ours) if ours == id => Ok(()),
            _ => Err(TaskError::NotFound(format!("sandbox {id}"))),
        }
    }

    fn mark_exited(&self, status: u32) {
        record_exit(&self.exit, status);
    }

    async fn create(&self, req: &api::CreateSandboxRequest) -> Result<(), TaskError> {
        validate("sandbox id", &req.sandbox_id)?;
        let (type_url, value) = req
            .options
            .as_ref()
            .map(|a| (a.type_url.as_str(), a.value.as_slice()))
            .unwrap_or_default();
        let config =
            PodConfig::from_any(type_url, value).map_err(|e| TaskError::Invalid(e.to_string()))?;
        {
            let mut state = self.state();
            if state.id.is_some() {
                return Err(TaskError::Exists(format!("sandbox {}", req.sandbox_id)));
            }
            state.id = Some(req.sandbox_id.clone());
        }
        // CRI gives a hostNetwork pod no namespace; the pod is refused for that.
        let netns = if config.host_network {
            ""
        } else {
            req.netns_path.as_str()
        };
        let pod = StandalonePod {
            id: &req.sandbox_id,
            netns,
            hostname: &config.hostname,
            resolv_conf: config
                .dns
                .as_ref()
                .filter(|d| !d.servers.is_empty() || !d.searches.is_empty())
                .map(|d| d.resolv_conf()),
            annotations: &config.annotations,
            cgroup_parent: &config.cgroup_parent,
            sysctls: &config.sysctls,
            host_pid: config.host_pid,
            host_ipc: config.host_ipc,
            needs: Needs::of_pod_resources(
                config.memory_limit,
                config.cpu_quota,
                config.cpu_period,
            ),
        };
        if let Err(e) = self.tasks.pod().create_standalone(&pod).await {
            self.state().id = None;
            return Err(e.into());
        }
        let mut state = self.state();
        state.created_at = Some(SystemTime::now());
        state.netns = req.netns_path.clone();
        Ok(())
    }

    async fn start(&self) -> Result<(u32, SystemTime), TaskError> {
        let running = self.tasks.pod().start_standalone().await?;
        let pid = running.vmm_pid;
        let created_at = {
            let mut state = self.state();
            state.pid = pid;
            *state.created_at.get_or_insert_with(SystemTime::now)
        };
        self.tasks.spawn_oom_watcher(running.clone());
        // The VM ending on its own ends the pod: WaitSandbox answers.
        let exit = self.exit.clone();
        tokio::spawn(async move {
            running.vm_gone().await;
            record_exit(&exit, UNKNOWN_EXIT_STATUS);
        });
        Ok((pid, created_at))
    }

    /// The pod's state; `verbose` adds what `crictl inspectp` shows under "info", in the
    /// names CRI's pause-container pods use.
    fn status(&self, id: &str, verbose: bool) -> api::SandboxStatusResponse {
        let state = self.state();
        let exit = *self.exit.borrow();
        let ready = exit.is_none() && self.tasks.pod().running().is_some_and(|r| r.vm_alive());
        let mut info = std::collections::HashMap::new();
        if verbose {
            let details = serde_json::json!({
                "pid": state.pid,
                "runtimeType": crate::shim::RUNTIME_ID,
                "sandboxer": "shim",
                "netNamespacePath": state.netns,
            });
            info.insert("info".to_string(), details.to_string());
        }
        api::SandboxStatusResponse {
            sandbox_id: id.to_string(),
            pid: state.pid,
            state: if ready { READY } else { NOT_READY }.to_string(),
            info,
            created_at: state.created_at.map(timestamp).into(),
            exited_at: exit.map(|(_, at)| timestamp(at)).into(),
            ..Default::default()
        }
    }
}

/// Records how the pod ended, once: the first end (a stop, or the VM's own) is the one told.
fn record_exit(exit: &watch::Sender<Exit>, status: u32) {
    exit.send_if_modified(|ended| {
        if ended.is_some() {
            return false;
        }
        *ended = Some((status, SystemTime::now()));
        true
    });
}

/// The platform containerd pulls images for: the guest's, which is the host's architecture.
fn platform() -> Platform {
    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    Platform {
        os: "linux".to_string(),
        architecture: architecture.to_string(),
        ..Default::default()
    }
}

#[async_trait]
impl SandboxApi for SandboxService {
    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateSandboxRequest,
    ) -> ttrpc::Result<api::CreateSandboxResponse> {
        self.create(&req).await.map_err(to_ttrpc)?;
        log::info!("sandbox {} created", req.sandbox_id);
        Ok(api::CreateSandboxResponse::default())
    }

    async fn start_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartSandboxRequest,
    ) -> ttrpc::Result<api::StartSandboxResponse> {
        self.check_id(&req.sandbox_id).map_err(to_ttrpc)?;
        let (pid, created_at) = self.start().await.map_err(to_ttrpc)?;
        Ok(api::StartSandboxResponse {
            pid,
            created_at: MessageField::some(timestamp(created_at)),
            ..Default::default()
        })
    }

    async fn platform(
        &self,
        _ctx: &TtrpcContext,
        req: api::PlatformRequest,
    ) -> ttrpc::Result<api::PlatformResponse> {
        self.check_id(&req.sandbox_id).map_err(to_ttrpc)?;
        Ok(api::PlatformResponse {
            platform: MessageField::some(platform()),
            ..Default::default()
        })
    }

    async fn stop_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: api::StopSandboxRequest,
    ) -> ttrpc::Result<api::StopSandboxResponse> {
        self.check_id(&req.sandbox_id).map_err(to_ttrpc)?;
        // CRI has stopped the containers already; what still runs dies with the VM.
        self.tasks.pod().shutdown().await;
        self.mark_exited(0);
        log::info!("sandbox {} stopped", req.sandbox_id);
        Ok(api::StopSandboxResponse::default())
    }

    async fn wait_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitSandboxRequest,
    ) -> ttrpc::Result<api::WaitSandboxResponse> {
        self.check_id(&req.sandbox_id).map_err(to_ttrpc)?;
        let mut exit = self.exit.subscribe();
        let (status, at) = loop {
            if let Some(ended) = *exit.borrow_and_update() {
                break ended;
            }
            if exit.changed().await.is_err() {
                break (UNKNOWN_EXIT_STATUS, SystemTime::now());
            }
        };
        Ok(api::WaitSandboxResponse {
            exit_status: status,
            exited_at: MessageField::some(timestamp(at)),
            ..Default::default()
        })
    }

    async fn sandbox_status(
        &self,
        _ctx: &TtrpcContext,
        req: api::SandboxStatusRequest,
    ) -> ttrpc::Result<api::SandboxStatusResponse> {
        self.check_id(&req.sandbox_id).map_err(to_ttrpc)?;
        Ok(self.status(&req.sandbox_id, req.verbose))
    }

    async fn ping_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: api::PingRequest,
    ) -> ttrpc::Result<api::PingResponse> {
        self.check_id(&req.sandbox_id).map_err(to_ttrpc)?;
        Ok(api::PingResponse::default())
    }

    async fn shutdown_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: api::ShutdownSandboxRequest,
    ) -> ttrpc::Result<api::ShutdownSandboxResponse> {
        // containerd shuts down a shim whose CreateSandbox failed too: it has no pod then.
        if self.state().id.is_some() {
            self.check_id(&req.sandbox_id).map_err(to_ttrpc)?;
        }
        self.tasks.pod().shutdown().await;
        self.mark_exited(0);
        log::info!("sandbox {} shut down; the shim exits", req.sandbox_id);
        self.tasks.exit();
        Ok(api::ShutdownSandboxResponse::default())
    }

    async fn sandbox_metrics(
        &self,
        _ctx: &TtrpcContext,
        req: api::SandboxMetricsRequest,
    ) -> ttrpc::Result<api::SandboxMetricsResponse> {
        self.check_id(&req.sandbox_id).map_err(to_ttrpc)?;
        Err(to_ttrpc(TaskError::Unimplemented("SandboxMetrics")))
    }
}
