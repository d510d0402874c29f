//! QEMU's machine protocol on the VM's control socket. QEMU serves one client at a time, so
//! each operation opens its own connection: greeting, capabilities, then commands, each
//! answered by a `return` or an `error`; events arrive in between and are kept for
//! `wait_event`. File descriptors (tap queues) go with a `getfd` command as SCM_RIGHTS.
//!
//! QEMU runs the guest's devices, so what it sends is read with a bound on its length.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

/// The longest message read from QEMU.
const MAX_MESSAGE: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connecting to {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("QMP {0}")]
    Io(#[from] std::io::Error),
    /// QEMU answered the command with an error.
    #[error("{command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP: {0}")]
    Protocol(String),
    #[error("QMP: no {what} within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
}

pub struct Qmp {
    stream: UnixStream,
    buffer: Vec<u8>,
    events: VecDeque<Value>,
}

impl Qmp {
    /// Connects and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let mut qmp = Qmp {
            stream,
            buffer: Vec::new(),
            events: VecDeque::new(),
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "unexpected greeting {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let line = request_line(command, arguments);
        self.stream.write_all(line.as_bytes()).await?;
        self.answer(command).await
    }

    /// Hands QEMU a file descriptor under `name` (`getfd`), for a later command to use.
    pub async fn send_fd(&mut self, name: &str, fd: RawFd) -> Result<(), QmpError> {
        let line = request_line("getfd", Some(json!({ "fdname": name })));
        let bytes = line.as_bytes();
        let mut sent = 0;
        while sent < bytes.len() {
            self.stream.writable().await?;
            // The descriptor travels with the first byte of the command; the rest follows.
            let chunk = &bytes[sent..];
            let with_fd = sent == 0;
            let raw = self.stream.as_raw_fd();
            let result = self.stream.try_io(Interest::WRITABLE, || {
                let fds = [fd];
                let control = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
                let control: &[nix::sys::socket::ControlMessage] =
                    if with_fd { &control } else { &[] };
                nix::sys::socket::sendmsg::<()>(
                    raw,
                    &[IoSlice::new(chunk)],
                    control,
                    nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match result {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
        self.answer("getfd").await.map(drop)
    }

    /// Waits for an event called `name` for which `matches` holds (one that came earlier, while
    /// a command was answered, counts).
    pub async fn wait_event(
        &mut self,
        name: &str,
        matches: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let started = Instant::now();
        let is_it = |e: &Value| e.get("event").and_then(Value::as_str) == Some(name) && matches(e);
        if let Some(at) = self.events.iter().position(is_it) {
            return Ok(self.events.remove(at).unwrap_or_default());
        }
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            let message = tokio::time::timeout(left, self.read_message())
                .await
                .map_err(|_| QmpError::Timeout {
                    what: format!("{name} event"),
                    timeout,
                })??;
            if is_it(&message) {
                return Ok(message);
            }
            if message.get("event").is_some() {
                self.events.push_back(message);
            }
        }
    }

    async fn answer(&mut self, command: &str) -> Result<Value, QmpError> {
        loop {
            let message = self.read_message().await?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let text = |key: &str| {
                    error
                        .get(key)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string()
                };
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: text("class"),
                    desc: text("desc"),
                });
            }
            if message.get("event").is_some() {
                self.events.push_back(message);
            }
        }
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                return serde_json::from_slice(&line)
                    .map_err(|e| QmpError::Protocol(format!("unreadable message: {e}")));
            }
            if self.buffer.len() > MAX_MESSAGE {
                return Err(QmpError::Protocol(format!(
                    "a message longer than {MAX_MESSAGE} bytes"
                )));
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(QmpError::Protocol("QEMU closed the connection".to_string()));
            }
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }
}

fn request_line(command: &str, arguments: Option<Value>) -> String {
    let mut request = json!({ "execute": command });
    if let Some(arguments) = arguments {
        request["arguments"] = arguments;
    }
    format!("{request}\n")
}

/// A stand-in for QEMU's monitor, for tests: greets, then answers each command line with the
/// next reply, and stays connected (quiet) until the client goes; yields the lines it got.
#[cfg(test)]
pub mod fake {
    use std::path::Path;

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixListener;

    pub async fn qemu(
        path: &Path,
        replies: Vec<&'static str>,
    ) -> tokio::task::JoinHandle<Vec<String>> {
        qemu_sessions(path, vec![replies]).await
    }

    /// As `qemu`, for clients that connect one after another, each given its own replies.
    pub async fn qemu_sessions(
        path: &Path,
        sessions: Vec<Vec<&'static str>>,
    ) -> tokio::task::JoinHandle<Vec<String>> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind");
        tokio::spawn(async move {
            let mut seen = Vec::new();
            for replies in sessions {
                seen.extend(session(&listener, replies).await);
            }
            seen
        })
    }

    /// One client of `listener`: greeted, answered `replies` in turn; what it sent, once it
    /// has gone.
    pub async fn session(listener: &UnixListener, replies: Vec<&'static str>) -> Vec<String> {
        {
            let (stream, _) = listener.accept().await.expect("accept");
            let (read, mut write) = stream.into_split();
            write
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .expect("greet");
            let mut lines = BufReader::new(read).lines();
            let mut seen = Vec::new();
            for reply in replies {
                let Ok(Some(line)) = lines.next_line().await else {
                    break;
                };
                seen.push(line);
                write.write_all(reply.as_bytes()).await.expect("reply");
            }
            while let Ok(Some(line)) = lines.next_line().await {
                seen.push(line);
            }
            seen
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commands_errors_and_events() {
        let dir = std::env::temp_dir().join(format!("hako-qmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("qmp.sock");
        let server = fake::qemu(
            &path,
            vec![
                "{\"return\": {}}\n",
                "{\"event\": \"DEVICE_DELETED\", \"data\": {\"device\": \"nic1\"}}\n{\"return\": {}}\n",
                "{\"error\": {\"class\": \"DeviceNotFound\", \"desc\": \"Device 'x' not found\"}}\n",
            ],
        )
        .await;
        let mut qmp = Qmp::connect(&path).await.expect("connects");
        qmp.execute("device_del", Some(json!({"id": "nic1"})))
            .await
            .expect("answered");
        let err = qmp
            .execute("device_del", Some(json!({"id": "x"})))
            .await
            .expect_err("error");
        assert!(err.to_string().contains("DeviceNotFound"), "{err}");
        // The event that came before the answer is still there to wait for.
        let event = qmp
            .wait_event(
                "DEVICE_DELETED",
                |e| e["data"]["device"] == "nic1",
                Duration::from_secs(1),
            )
            .await
            .expect("event");
        assert_eq!(event["data"]["device"], "nic1");
        let timed_out = qmp
            .wait_event("DEVICE_DELETED", |_| true, Duration::from_millis(50))
            .await;
        assert!(matches!(timed_out, Err(QmpError::Timeout { .. })));
        drop(qmp);
        let seen = server.await.expect("server");
        assert_eq!(seen[0], r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(
            seen[1],
            r#"{"arguments":{"id":"nic1"},"execute":"device_del"}"#
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
