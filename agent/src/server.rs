//! The ttrpc service: decodes requests, calls into `Containers`, and maps errors to ttrpc codes
//! in one place.

use std::sync::Arc;

use async_trait::async_trait;
use hako_protocol as pb;
use ttrpc::r#async::TtrpcContext;
use ttrpc::{get_status, Code};

use tokio::sync::{mpsc, Mutex};

use crate::container::{ContainerError, Containers, StdioPlan};

/// Largest chunk one ReadStdout/ReadStderr answer carries.
const MAX_READ: usize = 1024 * 1024;

pub struct Agent {
    pub containers: Arc<Containers>,
    pub kernel_release: String,
    /// Set once the ttrpc server serves, just before the agent announces itself.
    pub ready_since_boot_ms: std::sync::atomic::AtomicU64,
    pub init_since_boot_ms: u64,
    /// Ids of OOM-killed containers, from `oom::OomMonitor`.
    pub oom_events: Mutex<mpsc::Receiver<String>>,
    #[cfg(feature = "hostile")]
    pub hostile: crate::hostile::Hostile,
}

/// How often the containers' memory.events are read for OOM kills of non-init processes (an
/// init's OOM kill is reported when it exits).
const OOM_POLL: std::time::Duration = std::time::Duration::from_millis(500);

pub fn poll_oom(containers: Arc<Containers>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(OOM_POLL).await;
            containers.check_oom().await;
        }
    });
}

/// `net::apply` off the async workers: it waits for hot-plugged NICs to appear.
async fn configure_network(
    interfaces: Vec<pb::Interface>,
    routes: Vec<pb::Route>,
) -> ttrpc::Result<()> {
    let applied = tokio::task::spawn_blocking(move || crate::net::apply(&interfaces, &routes))
        .await
        .map_err(|e| get_rpc_status(Code::INTERNAL, format!("configuring the network: {e}")))?;
    applied.map_err(|e| {
        let code = match e {
            crate::net::NetError::Invalid(_) | crate::net::NetError::TooMany { .. } => {
                Code::INVALID_ARGUMENT
            }
            _ => Code::INTERNAL,
        };
        log::warn!("configuring the network: {e}");
        get_rpc_status(code, format!("configuring the network: {e}"))
    })
}

fn get_rpc_status(code: Code, message: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(get_status(code, message))
}

fn to_status(e: ContainerError) -> ttrpc::Error {
    let code = match &e {
        ContainerError::InvalidId(_) | ContainerError::Spec { .. } => Code::INVALID_ARGUMENT,
        ContainerError::Exists(_) => Code::ALREADY_EXISTS,
        ContainerError::NotFound(_) => Code::NOT_FOUND,
        ContainerError::State { .. } => Code::FAILED_PRECONDITION,
        ContainerError::Init { .. } | ContainerError::Io { .. } | ContainerError::Cgroup(_) => {
            Code::INTERNAL
        }
    };
    log::warn!("request failed: {e}");
    get_rpc_status(code, e.to_string())
}

#[async_trait]
impl pb::AgentService for Agent {
    async fn health(
        &self,
        _ctx: &TtrpcContext,
        _req: pb::HealthRequest,
    ) -> ttrpc::Result<pb::HealthResponse> {
        Ok(self.health_response())
    }

    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: pb::CreateSandboxRequest,
    ) -> ttrpc::Result<pb::CreateSandboxResponse> {
        crate::boot::take_host_clock_and_entropy(req.now_unix_ns, &req.entropy)
            .map_err(|e| get_rpc_status(Code::INVALID_ARGUMENT, e))?;
        if !req.hostname.is_empty() {
            nix::unistd::sethostname(&req.hostname)
                .map_err(|e| get_rpc_status(Code::INVALID_ARGUMENT, format!("sethostname: {e}")))?;
        }
        configure_network(req.interfaces, req.routes).await?;
        let mut response = pb::CreateSandboxResponse::default();
        if let Some(pod) = req.pod_init.into_option() {
            let hostname = req.hostname;
            response.pod_init_pid =
                tokio::task::spawn_blocking(move || crate::pod::start(&hostname, &pod))
                    .await
                    .map_err(|e| get_rpc_status(Code::INTERNAL, format!("pod init: {e}")))?
                    .map_err(|e| {
                        let code = match e {
                            crate::pod::PodError::Invalid(_) => Code::INVALID_ARGUMENT,
                            crate::pod::PodError::Io { .. } => Code::INTERNAL,
                        };
                        get_rpc_status(code, e.to_string())
                    })?;
            log::info!("pod init started, pid {}", response.pod_init_pid);
        }
        log::info!("sandbox {} ready", req.sandbox_id);
        Ok(response)
    }

    async fn update_interfaces(
        &self,
        _ctx: &TtrpcContext,
        req: pb::UpdateInterfacesRequest,
    ) -> ttrpc::Result<pb::Empty> {
        configure_network(req.interfaces, req.routes).await?;
        Ok(pb::Empty::default())
    }

    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        _req: pb::DestroySandboxRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.containers.kill_all().await;
        // Flush guest page cache for anything not yet written back through virtio-fs.
        nix::unistd::sync();
        log::info!("sandbox destroyed; the host stops the VM");
        Ok(pb::Empty::default())
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::CreateContainerRequest,
    ) -> ttrpc::Result<pb::CreateContainerResponse> {
        let opts = StdioPlan {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            terminal: req.terminal,
        };
        let pid = self
            .containers
            .create(&req.container_id, &req.oci_spec, opts)
            .await
            .map_err(to_status)?;
        log::info!("container {} created, init pid {pid}", req.container_id);
        Ok(pb::CreateContainerResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::StartContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        let pid = self
            .containers
            .start(&req.container_id, &req.exec_id)
            .await
            .map_err(to_status)?;
        log::info!(
            "container {} process {:?} started, pid {pid}",
            req.container_id,
            req.exec_id
        );
        Ok(pb::Empty::default())
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ExecProcessRequest,
    ) -> ttrpc::Result<pb::CreateContainerResponse> {
        let plan = StdioPlan {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            terminal: req.terminal,
        };
        let pid = self
            .containers
            .exec(&req.container_id, &req.exec_id, &req.process, plan)
            .await
            .map_err(to_status)?;
        Ok(pb::CreateContainerResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::DeleteProcessRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.containers
            .delete_process(&req.container_id, &req.exec_id)
            .await
            .map_err(to_status)?;
        Ok(pb::Empty::default())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ResizePtyRequest,
    ) -> ttrpc::Result<pb::Empty> {
        let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        self.containers
            .resize(
                &req.container_id,
                &req.exec_id,
                clamp(req.width),
                clamp(req.height),
            )
            .await
            .map_err(to_status)?;
        Ok(pb::Empty::default())
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ListProcessesRequest,
    ) -> ttrpc::Result<pb::ListProcessesResponse> {
        let pids = self
            .containers
            .pids(&req.container_id)
            .await
            .map_err(to_status)?;
        tokio::task::spawn_blocking(move || crate::ps::list(std::path::Path::new("/proc"), &pids))
            .await
            .map_err(|e| get_rpc_status(Code::INTERNAL, format!("listing processes: {e}")))
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::PauseContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.containers
            .set_paused(&req.container_id, true)
            .await
            .map_err(to_status)?;
        Ok(pb::Empty::default())
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::PauseContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.containers
            .set_paused(&req.container_id, false)
            .await
            .map_err(to_status)?;
        Ok(pb::Empty::default())
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::StatsContainerRequest,
    ) -> ttrpc::Result<pb::StatsContainerResponse> {
        let s = self
            .containers
            .stats(&req.container_id)
            .await
            .map_err(to_status)?;
        Ok(pb::StatsContainerResponse {
            memory_usage: s.memory_usage,
            memory_limit: s.memory_limit,
            memory_swap_usage: s.memory_swap_usage,
            memory_stat: s.memory_stat,
            oom_events: s.oom_events,
            oom_kill_events: s.oom_kill_events,
            cpu_usage_usec: s.cpu_usage_usec,
            cpu_user_usec: s.cpu_user_usec,
            cpu_system_usec: s.cpu_system_usec,
            cpu_nr_periods: s.cpu_nr_periods,
            cpu_nr_throttled: s.cpu_nr_throttled,
            cpu_throttled_usec: s.cpu_throttled_usec,
            pids_current: s.pids_current,
            pids_limit: s.pids_limit,
            ..Default::default()
        })
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::UpdateContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.containers
            .update(&req.container_id, &req.resources)
            .await
            .map_err(to_status)?;
        Ok(pb::Empty::default())
    }

    async fn get_oom_event(
        &self,
        _ctx: &TtrpcContext,
        _req: pb::GetOomEventRequest,
    ) -> ttrpc::Result<pb::OomEvent> {
        #[cfg(feature = "hostile")]
        if let Some(container_id) = self.hostile.forged_oom() {
            return Ok(pb::OomEvent {
                container_id,
                ..Default::default()
            });
        }
        let mut rx = self.oom_events.lock().await;
        match rx.recv().await {
            Some(container_id) => Ok(pb::OomEvent {
                container_id,
                ..Default::default()
            }),
            None => Err(get_rpc_status(Code::UNAVAILABLE, "the OOM watcher stopped")),
        }
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::RemoveContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.containers
            .remove(&req.container_id)
            .await
            .map_err(to_status)?;
        Ok(pb::Empty::default())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::WaitProcessRequest,
    ) -> ttrpc::Result<pb::WaitProcessResponse> {
        let status = self
            .containers
            .wait(&req.container_id, &req.exec_id)
            .await
            .map_err(to_status)?;
        log::info!(
            "container {} process {:?} exited with status {status}",
            req.container_id,
            req.exec_id
        );
        Ok(pb::WaitProcessResponse {
            status,
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::SignalProcessRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.containers
            .signal(&req.container_id, &req.exec_id, req.signal, req.all)
            .await
            .map_err(to_status)?;
        Ok(pb::Empty::default())
    }

    async fn write_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: pb::WriteStreamRequest,
    ) -> ttrpc::Result<pb::WriteStreamResponse> {
        let len = self
            .containers
            .write_stdin(&req.container_id, &req.exec_id, &req.data)
            .await
            .map_err(to_status)?;
        Ok(pb::WriteStreamResponse {
            len: len as u32,
            ..Default::default()
        })
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: pb::CloseStdinRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.containers
            .close_stdin(&req.container_id, &req.exec_id)
            .await
            .map_err(to_status)?;
        Ok(pb::Empty::default())
    }

    async fn read_stdout(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ReadStreamRequest,
    ) -> ttrpc::Result<pb::ReadStreamResponse> {
        self.read(req, false).await
    }

    async fn read_stderr(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ReadStreamRequest,
    ) -> ttrpc::Result<pb::ReadStreamResponse> {
        self.read(req, true).await
    }
}

impl Agent {
    /// What Health answers, and what the readiness message carries.
    pub fn health_response(&self) -> pb::HealthResponse {
        pb::HealthResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel_release: self.kernel_release.clone(),
            ready_since_boot_ms: self
                .ready_since_boot_ms
                .load(std::sync::atomic::Ordering::SeqCst),
            init_since_boot_ms: self.init_since_boot_ms,
            ..Default::default()
        }
    }

    async fn read(
        &self,
        req: pb::ReadStreamRequest,
        stderr: bool,
    ) -> ttrpc::Result<pb::ReadStreamResponse> {
        let max = (req.len as usize).clamp(1, MAX_READ);
        let chunk = self
            .containers
            .read_output(&req.container_id, &req.exec_id, stderr, max)
            .await
            .map_err(to_status)?;
        Ok(match chunk {
            Some(data) => pb::ReadStreamResponse {
                data,
                ..Default::default()
            },
            None => pb::ReadStreamResponse {
                eof: true,
                ..Default::default()
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use hako_protocol as pb;
    use proptest::prelude::*;
    use protobuf::Message;

    proptest! {
        /// Whatever bytes arrive as a CreateContainer request, decoding it and its OCI spec
        /// fails cleanly or succeeds; it never panics.
        #[test]
        fn requests_decode_or_fail_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(req) = pb::CreateContainerRequest::parse_from_bytes(&bytes) {
                let _ = serde_json::from_slice::<oci_spec::runtime::Spec>(&req.oci_spec);
            }
        }

    }
}
