//! The ttrpc service: decodes requests, calls into `Containers`, and maps errors to ttrpc codes
//! in one place.

use std::sync::Arc;

use async_trait::async_trait;
use hako_protocol as pb;
use ttrpc::r#async::TtrpcContext;
use ttrpc::{get_status, Code};

use crate::container::{ContainerError, Containers, CreateOptions};

/// Largest chunk one ReadStdout/ReadStderr answer carries.
const MAX_READ: usize = 1024 * 1024;

pub struct Agent {
    pub containers: Arc<Containers>,
    pub kernel_release: String,
    pub ready_since_boot_ms: u64,
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
        ContainerError::Init { .. } | ContainerError::Io { .. } => Code::INTERNAL,
    };
    log::warn!("request failed: {e}");
    get_rpc_status(code, e.to_string())
}

fn only_init(exec_id: &str) -> ttrpc::Result<()> {
    if exec_id.is_empty() {
        Ok(())
    } else {
        Err(get_rpc_status(
            Code::UNIMPLEMENTED,
            "exec processes are not supported yet",
        ))
    }
}

#[async_trait]
impl pb::AgentService for Agent {
    async fn health(
        &self,
        _ctx: &TtrpcContext,
        _req: pb::HealthRequest,
    ) -> ttrpc::Result<pb::HealthResponse> {
        Ok(pb::HealthResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel_release: self.kernel_release.clone(),
            ready_since_boot_ms: self.ready_since_boot_ms,
            ..Default::default()
        })
    }

    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: pb::CreateSandboxRequest,
    ) -> ttrpc::Result<pb::Empty> {
        if !req.hostname.is_empty() {
            nix::unistd::sethostname(&req.hostname)
                .map_err(|e| get_rpc_status(Code::INVALID_ARGUMENT, format!("sethostname: {e}")))?;
        }
        log::info!("sandbox {} ready", req.sandbox_id);
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
        if req.terminal {
            return Err(get_rpc_status(
                Code::UNIMPLEMENTED,
                "terminals are not supported yet",
            ));
        }
        let opts = CreateOptions {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
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
        self.containers
            .start(&req.container_id)
            .await
            .map_err(to_status)?;
        log::info!("container {} started", req.container_id);
        Ok(pb::Empty::default())
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
        only_init(&req.exec_id)?;
        let status = self
            .containers
            .wait(&req.container_id)
            .await
            .map_err(to_status)?;
        log::info!("container {} exited with status {status}", req.container_id);
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
        only_init(&req.exec_id)?;
        self.containers
            .signal(&req.container_id, req.signal, req.all)
            .await
            .map_err(to_status)?;
        Ok(pb::Empty::default())
    }

    async fn write_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: pb::WriteStreamRequest,
    ) -> ttrpc::Result<pb::WriteStreamResponse> {
        only_init(&req.exec_id)?;
        let len = self
            .containers
            .write_stdin(&req.container_id, &req.data)
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
        only_init(&req.exec_id)?;
        self.containers
            .close_stdin(&req.container_id)
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
    async fn read(
        &self,
        req: pb::ReadStreamRequest,
        stderr: bool,
    ) -> ttrpc::Result<pb::ReadStreamResponse> {
        only_init(&req.exec_id)?;
        let max = (req.len as usize).clamp(1, MAX_READ);
        let chunk = self
            .containers
            .read_output(&req.container_id, stderr, max)
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
