//! Reaching the agent through the hybrid-vsock backend's unix socket: `CONNECT <port>`, then
//! `OK <port>`, then the agent's stream; dialling until it answers; and the host end of the
//! agent's readiness message.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hako_protocol as pb;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::watch;

use super::AgentError;

/// Longest line the vsock backend answers a CONNECT with.
const MAX_HANDSHAKE: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Opens one hybrid-vsock connection to `port` through the backend's unix socket.
pub async fn connect(socket: &Path, port: u32) -> Result<UnixStream, String> {
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|e| format!("connect {}: {e}", socket.display()))?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| format!("write CONNECT: {e}"))?;
    // Whatever follows the newline is the agent's stream.
    let line = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_line(&mut stream, MAX_HANDSHAKE))
        .await
        .map_err(|_| "no handshake answer".to_string())?
        .map_err(|e| format!("read handshake: {e}"))?;
    let line = String::from_utf8_lossy(&line);
    if line.starts_with("OK ") {
        Ok(stream)
    } else {
        Err(format!("unexpected handshake answer {line:?}"))
    }
}

/// Reads one line of at most `max` bytes (returned without its newline), byte by byte, so that
/// whatever follows it stays in the stream.
pub async fn read_line(
    stream: &mut (impl AsyncRead + Unpin),
    max: usize,
) -> Result<Vec<u8>, String> {
    let mut line = Vec::with_capacity(16);
    loop {
        let byte = stream.read_u8().await.map_err(|e| e.to_string())?;
        if byte == b'\n' {
            return Ok(line);
        }
        line.push(byte);
        if line.len() > max {
            return Err(format!("a line longer than {max} bytes"));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    fn temp_socket(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("hako-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    /// A stand-in for the vsock backend: answers the handshake like hako-vsock.
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
