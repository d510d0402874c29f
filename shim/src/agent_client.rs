//! The host's side of the agent channel: a hybrid-vsock dialer (unix socket, `CONNECT <port>`,
//! `OK <port>`) and a typed client with a timeout on every call that is not a wait or a read.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hako_protocol as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::watch;

/// Longest line the vsock backend answers a CONNECT with.
const MAX_HANDSHAKE: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest stdout/stderr chunk asked for in one read.
const READ_LEN: u32 = 64 * 1024;

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

/// Opens one hybrid-vsock connection to `port` through the backend's unix socket.
pub async fn connect(socket: &Path, port: u32) -> Result<UnixStream, String> {
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|e| format!("connect {}: {e}", socket.display()))?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| format!("write CONNECT: {e}"))?;
    // Read the answer byte by byte: whatever follows the newline is the agent's ttrpc stream.
    let read_line = async {
        let mut line = Vec::with_capacity(16);
        loop {
            let byte = stream
                .read_u8()
                .await
                .map_err(|e| format!("read handshake: {e}"))?;
            if byte == b'\n' {
                return Ok::<_, String>(line);
            }
            line.push(byte);
            if line.len() > MAX_HANDSHAKE {
                return Err("handshake answer too long".to_string());
            }
        }
    };
    let line = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_line)
        .await
        .map_err(|_| "no handshake answer".to_string())??;
    let line = String::from_utf8_lossy(&line);
    if line.starts_with("OK ") {
        Ok(stream)
    } else {
        Err(format!("unexpected handshake answer {line:?}"))
    }
}

/// Dials until the agent answers, the VM exits, or `timeout` passes. The guest boots while we
/// dial, so refusals are expected at first.
pub async fn dial(
    socket: &Path,
    port: u32,
    timeout: Duration,
    mut vm_exit: Option<watch::Receiver<Option<i32>>>,
) -> Result<UnixStream, AgentError> {
    let started = Instant::now();
    let mut attempts = 0u32;
    loop {
        let last = match connect(socket, port).await {
            Ok(stream) => {
                log::debug!(
                    "agent answered after {attempts} refused dials, {:?}",
                    started.elapsed()
                );
                return Ok(stream);
            }
            Err(e) => e,
        };
        attempts += 1;
        if let Some(status) = vm_exit.as_ref().and_then(|rx| *rx.borrow()) {
            return Err(AgentError::VmExited { status });
        }
        if started.elapsed() >= timeout {
            return Err(AgentError::Dial {
                socket: socket.to_path_buf(),
                timeout,
                last,
            });
        }
        // Back off a little; wake at once if the VM dies.
        let pause = Duration::from_millis(10);
        match vm_exit.as_mut() {
            Some(rx) => {
                let _ = tokio::time::timeout(pause, rx.changed()).await;
            }
            None => tokio::time::sleep(pause).await,
        }
    }
}

/// The host end of the agent's readiness signal: the vsock backend turns the guest's connection
/// to host port P into a connection to the unix socket `<agent socket>_P`.
pub struct ReadyListener {
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

impl ReadyListener {
    pub fn path_for(agent_socket: &Path, port: u32) -> PathBuf {
        let mut path = agent_socket.as_os_str().to_owned();
        path.push(format!("_{port}"));
        PathBuf::from(path)
    }

    pub fn bind(agent_socket: &Path, port: u32) -> std::io::Result<Self> {
        let path = Self::path_for(agent_socket, port);
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        Ok(Self { listener, path })
    }

    /// Waits for the agent's readiness message, the VM's exit, or `timeout`, and returns the
    /// agent's Health answer the message carries.
    pub async fn wait(
        &self,
        timeout: Duration,
        vm_exit: Option<watch::Receiver<Option<i32>>>,
    ) -> Result<pb::HealthResponse, AgentError> {
        let accept = async {
            loop {
                let (stream, _) = self.listener.accept().await.map_err(|e| e.to_string())?;
                // The agent closes after its message; a guest may send at most the limit.
                let mut got = Vec::new();
                let limit = pb::MAX_READY_MESSAGE as u64 + 1;
                if let Err(e) = stream.take(limit).read_to_end(&mut got).await {
                    log::warn!("reading the readiness message: {e}");
                    continue;
                }
                if let Some(health) = pb::parse_ready_message(&got) {
                    return Ok::<_, String>(health);
                }
                log::warn!(
                    "unexpected message on the readiness socket: {:?}",
                    String::from_utf8_lossy(&got[..got.len().min(64)])
                );
            }
        };
        let vm_gone = async {
            match vm_exit {
                Some(mut rx) => loop {
                    if let Some(status) = *rx.borrow_and_update() {
                        return status;
                    }
                    if rx.changed().await.is_err() {
                        return 255;
                    }
                },
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = tokio::time::timeout(timeout, accept) => match result {
                Ok(Ok(health)) => Ok(health),
                Ok(Err(last)) => Err(AgentError::Dial { socket: self.path.clone(), timeout, last }),
                Err(_) => Err(AgentError::Dial {
                    socket: self.path.clone(),
                    timeout,
                    last: "the agent never announced itself".to_string(),
                }),
            },
            status = vm_gone => Err(AgentError::VmExited { status }),
        }
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
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
    ) -> Result<(), AgentError>;
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
    async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>, AgentError>;
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
    call_timeout: Duration,
}

impl TtrpcAgent {
    pub fn new(stream: UnixStream, call_timeout: Duration) -> Self {
        let socket = ttrpc::r#async::transport::Socket::from(stream);
        let client = ttrpc::r#async::Client::new(socket);
        Self {
            client: pb::AgentServiceClient::new(client),
            call_timeout,
        }
    }

    fn ctx(&self) -> ttrpc::context::Context {
        ttrpc::context::with_timeout(self.call_timeout.as_nanos() as i64)
    }

    async fn timed<T>(
        &self,
        call: &'static str,
        fut: impl std::future::Future<Output = ttrpc::Result<T>>,
    ) -> Result<T, AgentError> {
        let started = std::time::Instant::now();
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
    ) -> Result<(), AgentError> {
        let req = pb::CreateSandboxRequest {
            sandbox_id: sandbox_id.to_string(),
            hostname: hostname.to_string(),
            interfaces,
            routes,
            ..Default::default()
        };
        self.timed(
            "CreateSandbox",
            self.client.create_sandbox(self.ctx(), &req),
        )
        .await
        .map(drop)
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

    async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>, AgentError> {
        let req = pb::ListProcessesRequest {
            container_id: container_id.to_string(),
            ..Default::default()
        };
        self.timed(
            "ListProcesses",
            self.client.list_processes(self.ctx(), &req),
        )
        .await
        .map(|r| r.pids)
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    fn temp_socket(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("hako-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    /// A stand-in for the vsock backend: answers the handshake like vhost-device-vsock.
    async fn fake_backend(listener: UnixListener, answer: &'static [u8]) {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut buf = [0u8; 32];
        let n = s.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"CONNECT 1024\n");
        s.write_all(answer).await.expect("write");
        let _ = s.read(&mut buf).await;
    }

    #[tokio::test]
    async fn handshake_ok_leaves_the_stream_after_the_newline() {
        let path = temp_socket("hs-ok");
        let listener = UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(fake_backend(listener, b"OK 1024\nX"));
        let mut stream = connect(&path, 1024).await.expect("handshake");
        assert_eq!(stream.read_u8().await.expect("next byte"), b'X');
        drop(stream);
        server.await.expect("server");
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test]
    async fn handshake_refusal_is_an_error() {
        let path = temp_socket("hs-bad");
        let listener = UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(fake_backend(listener, b"FAILED\n"));
        let err = connect(&path, 1024).await.expect_err("refused");
        assert!(err.contains("FAILED"), "{err}");
        server.await.expect("server");
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test]
    async fn readiness_is_the_agents_message() {
        let agent = temp_socket("ready");
        let ready = ReadyListener::bind(&agent, 1025).expect("bind");
        let path = ReadyListener::path_for(&agent, 1025);
        assert!(path.to_string_lossy().ends_with(".sock_1025"));
        let health = pb::HealthResponse {
            agent_version: "9.9.9".into(),
            ready_since_boot_ms: 1234,
            ..Default::default()
        };
        let message = pb::ready_message(&health).expect("encode");
        let client = tokio::spawn(async move {
            // A stranger's bytes first: ignored, the wait goes on.
            let mut s = UnixStream::connect(&path).await.expect("connect");
            s.write_all(b"HELLO\n").await.expect("write");
            drop(s);
            let mut s = UnixStream::connect(&path).await.expect("connect");
            s.write_all(&message).await.expect("write");
        });
        let got = ready
            .wait(Duration::from_secs(10), None)
            .await
            .expect("ready");
        assert_eq!(got, health);
        client.await.expect("client");
        drop(ready);
        assert!(
            !ReadyListener::path_for(&agent, 1025).exists(),
            "socket removed on drop"
        );
    }

    #[tokio::test]
    async fn readiness_wait_ends_when_the_vm_exits() {
        let agent = temp_socket("ready-vm-gone");
        let ready = ReadyListener::bind(&agent, 1025).expect("bind");
        let (tx, rx) = watch::channel(None);
        let killer = tokio::spawn(async move {
            let _ = tx.send(Some(137));
            tx
        });
        let err = ready
            .wait(Duration::from_secs(30), Some(rx))
            .await
            .expect_err("vm gone");
        assert!(matches!(err, AgentError::VmExited { status: 137 }), "{err}");
        drop(killer.await);
    }

    #[tokio::test]
    async fn dial_gives_up_after_its_budget() {
        let path = temp_socket("dial-none");
        let started = Instant::now();
        let err = dial(&path, 1024, Duration::from_millis(100), None)
            .await
            .expect_err("nobody listens");
        assert!(matches!(err, AgentError::Dial { .. }), "{err}");
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn dial_stops_when_the_vm_exits() {
        let path = temp_socket("dial-vm-gone");
        let (tx, rx) = watch::channel(None);
        tx.send(Some(137)).expect("send");
        let err = dial(&path, 1024, Duration::from_secs(30), Some(rx))
            .await
            .expect_err("vm gone");
        assert!(matches!(err, AgentError::VmExited { status: 137 }), "{err}");
    }
}
