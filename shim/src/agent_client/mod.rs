//! The host's side of the agent channel: reaching the agent (`dial`), and a typed client with a
//! timeout on every call that is not a wait or a read.

mod dial;
pub mod guest;
mod ps;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hako_protocol as pb;
use tokio::net::UnixStream;

use crate::metrics::{RpcFailure, ShimMetrics};

pub use dial::{connect, dial, read_line, ReadyListener};
pub use ps::{GuestProcess, ProcessList};

/// Largest stdout/stderr chunk asked for in one read: what the agent has queued, up to this,
/// comes in one answer.
const READ_LEN: u32 = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent did not answer while the guest booted.
    #[error("cannot reach the agent on {socket} within {timeout:?} (last error: {last})")]
    Dial {
        socket: PathBuf,
        timeout: Duration,
        last: String,
    },
    /// The VM exited while we were dialling.
    #[error("the VM exited (status {status}) before the agent answered")]
    VmExited { status: i32 },
    /// A call did not finish in time.
    #[error("agent call {call} timed out after {timeout:?}")]
    Timeout {
        call: &'static str,
        timeout: Duration,
    },
    /// The agent refused the request.
    #[error("agent call {call} failed: {message}")]
    Rpc {
        call: &'static str,
        code: ttrpc::Code,
        message: String,
    },
    /// The connection broke.
    #[error("agent call {call} failed: connection error: {message}")]
    Transport { call: &'static str, message: String },
    /// The answer is not one the call can have.
    #[error("agent call {call} failed: a malformed answer: {reason}")]
    Malformed { call: &'static str, reason: String },
}

impl AgentError {
    /// The ttrpc code to hand on to containerd.
    pub fn code(&self) -> ttrpc::Code {
        match self {
            AgentError::Rpc { code, .. } => *code,
            AgentError::Timeout { .. } => ttrpc::Code::DEADLINE_EXCEEDED,
            _ => ttrpc::Code::UNAVAILABLE,
        }
    }
}

/// Which standard streams a guest process gets (`stderr` is false behind a terminal, which
/// carries both).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestStdio {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub terminal: bool,
}

impl GuestStdio {
    pub fn create_request(
        self,
        container_id: &str,
        oci_spec: Vec<u8>,
    ) -> pb::CreateContainerRequest {
        pb::CreateContainerRequest {
            container_id: container_id.to_string(),
            oci_spec,
            stdin: self.stdin,
            stdout: self.stdout,
            stderr: self.stderr,
            terminal: self.terminal,
            ..Default::default()
        }
    }

    pub fn exec_request(
        self,
        container_id: &str,
        exec_id: &str,
        process: Vec<u8>,
    ) -> pb::ExecProcessRequest {
        pb::ExecProcessRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            process,
            stdin: self.stdin,
            stdout: self.stdout,
            stderr: self.stderr,
            terminal: self.terminal,
            ..Default::default()
        }
    }
}

/// The agent API as the shim uses it.
#[async_trait]
pub trait AgentClient: Send + Sync {
    async fn create_sandbox(
        &self,
        sandbox_id: &str,
        hostname: &str,
        interfaces: Vec<pb::Interface>,
        routes: Vec<pb::Route>,
        pod_init: Option<pb::PodInit>,
    ) -> Result<u32, AgentError>;
    /// Makes the guest's network the given picture (it waits for hot-plugged NICs).
    async fn update_interfaces(
        &self,
        interfaces: Vec<pb::Interface>,
        routes: Vec<pb::Route>,
    ) -> Result<(), AgentError>;
    async fn destroy_sandbox(&self) -> Result<(), AgentError>;
    async fn create_container(&self, req: pb::CreateContainerRequest) -> Result<u32, AgentError>;
    async fn start_process(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError>;
    async fn exec_process(&self, req: pb::ExecProcessRequest) -> Result<u32, AgentError>;
    async fn delete_process(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError>;
    async fn resize_pty(
        &self,
        container_id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), AgentError>;
    async fn set_paused(&self, container_id: &str, paused: bool) -> Result<(), AgentError>;
    async fn stats(&self, container_id: &str) -> Result<pb::StatsContainerResponse, AgentError>;
    async fn update(&self, container_id: &str, resources_json: Vec<u8>) -> Result<(), AgentError>;
    /// Blocks until a container is OOM-killed: no timeout.
    async fn oom_event(&self) -> Result<String, AgentError>;
    async fn remove_container(&self, container_id: &str) -> Result<(), AgentError>;
    /// Blocks until the process exits: no timeout.
    async fn wait_process(&self, container_id: &str, exec_id: &str) -> Result<u32, AgentError>;
    async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError>;
    async fn write_stdin(
        &self,
        container_id: &str,
        exec_id: &str,
        data: Vec<u8>,
    ) -> Result<(), AgentError>;
    async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError>;
    /// Next chunk of output; `None` at end of stream. Blocks until data: no timeout.
    async fn read_output(
        &self,
        container_id: &str,
        exec_id: &str,
        stderr: bool,
    ) -> Result<Option<Vec<u8>>, AgentError>;
}

pub struct TtrpcAgent {
    client: pb::AgentServiceClient,
    /// The same connection, for an answer decoded by hand (`ps`).
    raw: ttrpc::r#async::Client,
    call_timeout: Duration,
    /// The sandbox's instruments, when the agent is a sandbox's (not `hako`'s CLI).
    metrics: Option<Arc<ShimMetrics>>,
}

impl TtrpcAgent {
    pub fn new(stream: UnixStream, call_timeout: Duration) -> Self {
        let socket = ttrpc::r#async::transport::Socket::from(stream);
        let raw = ttrpc::r#async::Client::new(socket);
        Self {
            client: pb::AgentServiceClient::new(raw.clone()),
            raw,
            call_timeout,
            metrics: None,
        }
    }

    /// Records every timed call's duration and failure in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<ShimMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn ctx(&self) -> ttrpc::context::Context {
        ttrpc::context::with_timeout(self.call_timeout.as_nanos() as i64)
    }

    /// Only calls that answer at once go through here (never a wait or a read), so their
    /// durations are latencies and are recorded as such.
    async fn timed<T>(
        &self,
        call: &'static str,
        fut: impl std::future::Future<Output = ttrpc::Result<T>>,
    ) -> Result<T, AgentError> {
        let started = std::time::Instant::now();
        let result = self.call_with_deadline(call, started, fut).await;
        if let Some(metrics) = &self.metrics {
            let failure = result.as_ref().err().map(|e| match e {
                AgentError::Timeout { .. } => RpcFailure::Timeout,
                AgentError::Rpc { .. } => RpcFailure::Guest,
                _ => RpcFailure::Unavailable,
            });
            metrics.observe_rpc(call, started.elapsed(), failure);
        }
        result
    }

    async fn call_with_deadline<T>(
        &self,
        call: &'static str,
        started: std::time::Instant,
        fut: impl std::future::Future<Output = ttrpc::Result<T>>,
    ) -> Result<T, AgentError> {
        let timed_out = AgentError::Timeout {
            call,
            timeout: self.call_timeout,
        };
        match tokio::time::timeout(self.call_timeout, fut).await {
            Ok(Ok(value)) => Ok(value),
            // ttrpc's own deadline (the same, in the context) may fire first, as a transport
            // error: it is still the call timing out.
            Ok(Err(e))
                if !matches!(e, ttrpc::Error::RpcStatus(_))
                    && started.elapsed() >= self.call_timeout =>
            {
                Err(timed_out)
            }
            Ok(Err(e)) => Err(map_err(call, e)),
            Err(_) => Err(timed_out),
        }
    }
}

/// The host's wall clock for the guest, in nanoseconds since the epoch.
fn unix_now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Fresh random bytes for the guest's pool; none if the host cannot give them.
fn host_entropy() -> Vec<u8> {
    let mut bytes = vec![0u8; 64];
    // SAFETY: getrandom fills the buffer we own, of the length given.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n == bytes.len() as isize {
        bytes
    } else {
        Vec::new()
    }
}

/// The most of a guest's error message that is kept.
const MAX_GUEST_MESSAGE: usize = 4096;

fn map_err(call: &'static str, e: ttrpc::Error) -> AgentError {
    match e {
        // The message is the guest's: it reaches containerd's log and its clients' terminals,
        // so it is escaped and bounded.
        ttrpc::Error::RpcStatus(status) => AgentError::Rpc {
            call,
            code: status.code(),
            message: crate::logs::escape(status.message().as_bytes())
                .chars()
                .take(MAX_GUEST_MESSAGE)
                .collect(),
        },
        other => AgentError::Transport {
            call,
            message: other.to_string(),
        },
    }
}

#[async_trait]
impl AgentClient for TtrpcAgent {
    async fn create_sandbox(
        &self,
        sandbox_id: &str,
        hostname: &str,
        interfaces: Vec<pb::Interface>,
        routes: Vec<pb::Route>,
        pod_init: Option<pb::PodInit>,
    ) -> Result<u32, AgentError> {
        let req = pb::CreateSandboxRequest {
            sandbox_id: sandbox_id.to_string(),
            hostname: hostname.to_string(),
            interfaces,
            routes,
            now_unix_ns: unix_now_ns(),
            entropy: host_entropy(),
            pod_init: pod_init.into(),
            ..Default::default()
        };
        self.timed(
            "CreateSandbox",
            self.client.create_sandbox(self.ctx(), &req),
        )
        .await
        .map(|r| r.pod_init_pid)
    }

    async fn update_interfaces(
        &self,
        interfaces: Vec<pb::Interface>,
        routes: Vec<pb::Route>,
    ) -> Result<(), AgentError> {
        let req = pb::UpdateInterfacesRequest {
            interfaces,
            routes,
            ..Default::default()
        };
        self.timed(
            "UpdateInterfaces",
            self.client.update_interfaces(self.ctx(), &req),
        )
        .await
        .map(drop)
    }

    async fn destroy_sandbox(&self) -> Result<(), AgentError> {
        let req = pb::DestroySandboxRequest::default();
        self.timed(
            "DestroySandbox",
            self.client.destroy_sandbox(self.ctx(), &req),
        )
        .await
        .map(drop)
    }

    async fn create_container(&self, req: pb::CreateContainerRequest) -> Result<u32, AgentError> {
        self.timed(
            "CreateContainer",
            self.client.create_container(self.ctx(), &req),
        )
        .await
        .map(|r| r.pid)
    }

    async fn start_process(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError> {
        let req = pb::StartContainerRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        self.timed(
            "StartContainer",
            self.client.start_container(self.ctx(), &req),
        )
        .await
        .map(drop)
    }

    async fn exec_process(&self, req: pb::ExecProcessRequest) -> Result<u32, AgentError> {
        self.timed("ExecProcess", self.client.exec_process(self.ctx(), &req))
            .await
            .map(|r| r.pid)
    }

    async fn delete_process(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError> {
        let req = pb::DeleteProcessRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        self.timed(
            "DeleteProcess",
            self.client.delete_process(self.ctx(), &req),
        )
        .await
        .map(drop)
    }

    async fn resize_pty(
        &self,
        container_id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), AgentError> {
        let req = pb::ResizePtyRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            width,
            height,
            ..Default::default()
        };
        self.timed("ResizePty", self.client.resize_pty(self.ctx(), &req))
            .await
            .map(drop)
    }

    async fn set_paused(&self, container_id: &str, paused: bool) -> Result<(), AgentError> {
        let req = pb::PauseContainerRequest {
            container_id: container_id.to_string(),
            ..Default::default()
        };
        if paused {
            self.timed(
                "PauseContainer",
                self.client.pause_container(self.ctx(), &req),
            )
            .await
        } else {
            self.timed(
                "ResumeContainer",
                self.client.resume_container(self.ctx(), &req),
            )
            .await
        }
        .map(drop)
    }

    async fn stats(&self, container_id: &str) -> Result<pb::StatsContainerResponse, AgentError> {
        let req = pb::StatsContainerRequest {
            container_id: container_id.to_string(),
            ..Default::default()
        };
        self.timed(
            "StatsContainer",
            self.client.stats_container(self.ctx(), &req),
        )
        .await
    }

    async fn update(&self, container_id: &str, resources_json: Vec<u8>) -> Result<(), AgentError> {
        let req = pb::UpdateContainerRequest {
            container_id: container_id.to_string(),
            resources: resources_json,
            ..Default::default()
        };
        self.timed(
            "UpdateContainer",
            self.client.update_container(self.ctx(), &req),
        )
        .await
        .map(drop)
    }

    async fn oom_event(&self) -> Result<String, AgentError> {
        let req = pb::GetOomEventRequest::default();
        self.client
            .get_oom_event(ttrpc::context::Context::default(), &req)
            .await
            .map(|e| e.container_id)
            .map_err(|e| map_err("GetOomEvent", e))
    }

    async fn remove_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = pb::RemoveContainerRequest {
            container_id: container_id.to_string(),
            ..Default::default()
        };
        self.timed(
            "RemoveContainer",
            self.client.remove_container(self.ctx(), &req),
        )
        .await
        .map(drop)
    }

    async fn wait_process(&self, container_id: &str, exec_id: &str) -> Result<u32, AgentError> {
        let req = pb::WaitProcessRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        self.client
            .wait_process(ttrpc::context::Context::default(), &req)
            .await
            .map(|r| r.status)
            .map_err(|e| map_err("WaitProcess", e))
    }

    async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        let req = pb::SignalProcessRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            signal,
            all,
            ..Default::default()
        };
        self.timed(
            "SignalProcess",
            self.client.signal_process(self.ctx(), &req),
        )
        .await
        .map(drop)
    }

    async fn write_stdin(
        &self,
        container_id: &str,
        exec_id: &str,
        data: Vec<u8>,
    ) -> Result<(), AgentError> {
        let req = pb::WriteStreamRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            data,
            ..Default::default()
        };
        self.timed("WriteStdin", self.client.write_stdin(self.ctx(), &req))
            .await
            .map(drop)
    }

    async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError> {
        let req = pb::CloseStdinRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        self.timed("CloseStdin", self.client.close_stdin(self.ctx(), &req))
            .await
            .map(drop)
    }

    async fn read_output(
        &self,
        container_id: &str,
        exec_id: &str,
        stderr: bool,
    ) -> Result<Option<Vec<u8>>, AgentError> {
        let req = pb::ReadStreamRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            len: READ_LEN,
            ..Default::default()
        };
        let ctx = ttrpc::context::Context::default();
        let resp = if stderr {
            self.client.read_stderr(ctx, &req).await
        } else {
            self.client.read_stdout(ctx, &req).await
        }
        .map_err(|e| map_err(if stderr { "ReadStderr" } else { "ReadStdout" }, e))?;
        Ok((!resp.eof).then_some(resp.data))
    }
}
