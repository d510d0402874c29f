//! A typed client for Cloud Hypervisor's HTTP API on its `--api-socket` unix socket.
//!
//! Every call is bounded by a timeout (per client, `DEFAULT_TIMEOUT` unless set) and fails with
//! an `ApiError` that names the endpoint. Calls go through `reqwest` over the unix socket,
//! except `vm.add-net` with tap fds: see `ApiClient::add_net`.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

use super::types::{
    FsConfig, NetConfig, PciDeviceInfo, VmConfig, VmInfo, VmRemoveDevice, VmResize,
    VmmPingResponse, VsockConfig,
};

/// The API's root. The host part is never resolved: every connection goes to the socket.
pub const BASE_URL: &str = "http://localhost/api/v1/";
/// Long enough for `vm.create` and `vm.boot`, which allocate guest memory and set up devices
/// before they answer; short enough that a wedged VMM does not hold a containerd call for long.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer the hand-written `vm.add-net` exchange accepts (a `PciDeviceInfo` is tiny).
const MAX_RAW_RESPONSE: usize = 64 * 1024;
/// How much of an unparseable body an error message quotes.
const QUOTE_LEN: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Nothing at the socket path: the VMM is not running, or not yet listening.
    #[error("cloud-hypervisor {endpoint}: API socket {} does not exist", socket.display())]
    SocketMissing {
        endpoint: &'static str,
        socket: PathBuf,
    },
    /// The socket exists but the connection failed (refused: the VMM is gone).
    #[error("cloud-hypervisor {endpoint}: cannot connect to {}: {message}", socket.display())]
    Connect {
        endpoint: &'static str,
        socket: PathBuf,
        message: String,
    },
    /// No complete answer in time.
    #[error("cloud-hypervisor {endpoint}: no answer within {timeout:?}")]
    Timeout {
        endpoint: &'static str,
        timeout: Duration,
    },
    /// The API answered with an error status; `message` is its body.
    #[error("cloud-hypervisor {endpoint}: HTTP {status}: {message}")]
    Status {
        endpoint: &'static str,
        status: u16,
        message: String,
    },
    /// A success status with a body that is not what the endpoint returns.
    #[error("cloud-hypervisor {endpoint}: bad response: {message}")]
    BadResponse {
        endpoint: &'static str,
        message: String,
    },
    /// The connection broke before a full answer (typically the VMM died mid-call).
    #[error("cloud-hypervisor {endpoint}: connection lost before a full answer: {message}")]
    Disconnected {
        endpoint: &'static str,
        message: String,
    },
    /// The HTTP client itself could not be set up.
    #[error("cloud-hypervisor API client: {message}")]
    Setup { message: String },
}

impl ApiError {
    /// The HTTP status of an error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A status and body, before they are checked.
struct Answer {
    status: u16,
    body: Vec<u8>,
}

/// One VMM's API.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    http: reqwest::Client,
    timeout: Duration,
}

impl ApiClient {
    pub fn new(socket: impl Into<PathBuf>) -> Result<Self, ApiError> {
        Self::with_timeout(socket, DEFAULT_TIMEOUT)
    }

    pub fn with_timeout(socket: impl Into<PathBuf>, timeout: Duration) -> Result<Self, ApiError> {
        let socket = socket.into();
        let http = reqwest::Client::builder()
            .unix_socket(socket.clone())
            // A fresh connection per call: an idle pooled connection to a VMM that has since
            // exited would turn the next call into a confusing "connection closed" error.
            .pool_max_idle_per_host(0)
            // Never replay a call: a second `vm.create` or `vm.add-net` is not harmless.
            .retry(reqwest::retry::never())
            .build()
            .map_err(|e| ApiError::Setup {
                message: error_chain(&e),
            })?;
        Ok(Self {
            socket,
            http,
            timeout,
        })
    }

    /// The same VMM with another timeout per call (such as a stop's grace period).
    pub fn with_call_timeout(&self, timeout: Duration) -> Self {
        Self {
            timeout,
            ..self.clone()
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `GET vmm.ping`: the VMM's version, pid and build features.
    pub async fn ping(&self) -> Result<VmmPingResponse, ApiError> {
        let endpoint = "vmm.ping";
        let answer = self.call(Method::GET, endpoint, None).await?;
        parse_json(endpoint, &answer.body)
    }

    /// `PUT vm.create`: defines the VM; it does not run until `boot`.
    pub async fn create(&self, config: &VmConfig) -> Result<(), ApiError> {
        self.put_json("vm.create", config).await.map(drop)
    }

    /// `GET vm.info`.
    pub async fn info(&self) -> Result<VmInfo, ApiError> {
        let endpoint = "vm.info";
        let answer = self.call(Method::GET, endpoint, None).await?;
        parse_json(endpoint, &answer.body)
    }

    /// `PUT vm.boot`.
    pub async fn boot(&self) -> Result<(), ApiError> {
        self.put_empty("vm.boot").await
    }

    /// `PUT vm.pause`.
    pub async fn pause(&self) -> Result<(), ApiError> {
        self.put_empty("vm.pause").await
    }

    /// `PUT vm.resume`.
    pub async fn resume(&self) -> Result<(), ApiError> {
        self.put_empty("vm.resume").await
    }

    /// `PUT vm.shutdown`: stops the guest; the VMM stays up.
    pub async fn shutdown(&self) -> Result<(), ApiError> {
        self.put_empty("vm.shutdown").await
    }

    /// `PUT vm.delete`: forgets the VM; the VMM stays up.
    pub async fn delete(&self) -> Result<(), ApiError> {
        self.put_empty("vm.delete").await
    }

    /// `PUT vmm.shutdown`: the VMM process exits.
    pub async fn vmm_shutdown(&self) -> Result<(), ApiError> {
        self.put_empty("vmm.shutdown").await
    }

    /// `PUT vm.resize`.
    pub async fn resize(&self, resize: &VmResize) -> Result<(), ApiError> {
        self.put_json("vm.resize", resize).await.map(drop)
    }

    /// `PUT vm.remove-device`: unplugs the device `id` (a NIC the pod lost).
    pub async fn remove_device(&self, id: &str) -> Result<(), ApiError> {
        let body = VmRemoveDevice { id: id.to_string() };
        self.put_json("vm.remove-device", &body).await.map(drop)
    }

    /// `PUT vm.add-fs`. `None` when the VM is not booted yet (the device is part of the boot).
    pub async fn add_fs(&self, fs: &FsConfig) -> Result<Option<PciDeviceInfo>, ApiError> {
        let endpoint = "vm.add-fs";
        let answer = self.put_json(endpoint, fs).await?;
        parse_device(endpoint, &answer)
    }

    /// `PUT vm.add-vsock`. `None` when the VM is not booted yet.
    pub async fn add_vsock(&self, vsock: &VsockConfig) -> Result<Option<PciDeviceInfo>, ApiError> {
        let endpoint = "vm.add-vsock";
        let answer = self.put_json(endpoint, vsock).await?;
        parse_device(endpoint, &answer)
    }

    /// `PUT vm.add-net`, with `fds` (tap queue fds, one per queue pair, still owned by the
    /// caller) handed over to the VMM. `None` when the VM is not booted yet.
    ///
    /// Cloud Hypervisor takes tap fds only as SCM_RIGHTS ancillary data on the API socket,
    /// received together with the bytes of the request they belong to (numbers in the
    /// body's `fds` are discarded), and only on `vm.add-net`: `vm.create` drops them. reqwest
    /// (hyper) writes requests with plain writes and has no way to attach ancillary data, so
    /// with fds this one call is a small hand-written HTTP/1.1 exchange: the whole request
    /// goes out in one `sendmsg` that carries the fds, as Cloud Hypervisor's own `ch-remote`
    /// does it.
    pub async fn add_net(
        &self,
        net: &NetConfig,
        fds: &[RawFd],
    ) -> Result<Option<PciDeviceInfo>, ApiError> {
        let endpoint = "vm.add-net";
        if fds.is_empty() {
            let answer = self.put_json(endpoint, net).await?;
            return parse_device(endpoint, &answer);
        }
        let body = encode(endpoint, net)?;
        let exchange = self.raw_put_with_fds(endpoint, &body, fds);
        let answer = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ApiError::Timeout {
                endpoint,
                timeout: self.timeout,
            })??;
        let answer = check_status(endpoint, answer)?;
        parse_device(endpoint, &answer)
    }

    async fn put_empty(&self, endpoint: &'static str) -> Result<(), ApiError> {
        self.call(Method::PUT, endpoint, None).await.map(drop)
    }

    async fn put_json<T: Serialize>(
        &self,
        endpoint: &'static str,
        body: &T,
    ) -> Result<Answer, ApiError> {
        let body = encode(endpoint, body)?;
        self.call(Method::PUT, endpoint, Some(body)).await
    }

    /// One request through reqwest; a success status or an `ApiError`.
    async fn call(
        &self,
        method: Method,
        endpoint: &'static str,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, ApiError> {
        let mut request = self.http.request(method, format!("{BASE_URL}{endpoint}"));
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        // The timeout covers the answer's body too, not only its head.
        let exchange = async {
            let response = request
                .send()
                .await
                .map_err(|e| self.transport_error(endpoint, e))?;
            let status = response.status().as_u16();
            let body = response
                .bytes()
                .await
                .map_err(|e| self.transport_error(endpoint, e))?;
            Ok::<_, ApiError>(Answer {
                status,
                body: body.to_vec(),
            })
        };
        let answer = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ApiError::Timeout {
                endpoint,
                timeout: self.timeout,
            })??;
        check_status(endpoint, answer)
    }

    fn transport_error(&self, endpoint: &'static str, e: reqwest::Error) -> ApiError {
        if e.is_timeout() {
            return ApiError::Timeout {
                endpoint,
                timeout: self.timeout,
            };
        }
        if e.is_connect() {
            return self.connect_error(endpoint, io_error_kind(&e), error_chain(&e));
        }
        ApiError::Disconnected {
            endpoint,
            message: error_chain(&e),
        }
    }

    fn connect_error(
        &self,
        endpoint: &'static str,
        kind: Option<std::io::ErrorKind>,
        message: String,
    ) -> ApiError {
        if kind == Some(std::io::ErrorKind::NotFound) || !self.socket.exists() {
            ApiError::SocketMissing {
                endpoint,
                socket: self.socket.clone(),
            }
        } else {
            ApiError::Connect {
                endpoint,
                socket: self.socket.clone(),
                message,
            }
        }
    }

    /// `PUT /api/v1/<endpoint>` with a JSON body and `fds` as SCM_RIGHTS, on a connection of
    /// its own. Not bounded in time: the caller is.
    async fn raw_put_with_fds(
        &self,
        endpoint: &'static str,
        body: &[u8],
        fds: &[RawFd],
    ) -> Result<Answer, ApiError> {
        let mut stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| self.connect_error(endpoint, Some(e.kind()), e.to_string()))?;
        let lost = |what: &str, e: std::io::Error| ApiError::Disconnected {
            endpoint,
            message: format!("{what}: {e}"),
        };
        let mut request = format!(
            "PUT /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        let sent = send_with_fds(&stream, &request, fds)
            .await
            .map_err(|e| lost("sendmsg", e))?;
        // The fds went with the first bytes; the server keeps them for the request those bytes
        // start, so the rest can follow as plain writes.
        if let Some(rest) = request.get(sent..).filter(|rest| !rest.is_empty()) {
            stream.write_all(rest).await.map_err(|e| lost("write", e))?;
        }
        read_answer(endpoint, &mut stream).await
    }
}

/// Writes as much of `bytes` as one `sendmsg` takes, with `fds` attached; returns how much.
async fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<usize> {
    let fd = stream.as_raw_fd();
    stream
        .async_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(bytes)];
            let rights = [ControlMessage::ScmRights(fds)];
            // MSG_NOSIGNAL: a VMM that hung up must be an error here, not a SIGPIPE.
            sendmsg::<UnixAddr>(fd, &iov, &rights, MsgFlags::MSG_NOSIGNAL, None)
                .map_err(std::io::Error::from)
        })
        .await
}

/// Reads one HTTP/1.1 answer: the head, then a body of its Content-Length. Cloud Hypervisor's
/// server always sends Content-Length with a body and never chunks.
async fn read_answer(endpoint: &'static str, stream: &mut UnixStream) -> Result<Answer, ApiError> {
    let bad = |message: String| ApiError::BadResponse { endpoint, message };
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(pos) = find(&buf, b"\r\n\r\n") {
            break pos;
        }
        if buf.len() > MAX_RAW_RESPONSE {
            return Err(bad("answer head too long".to_string()));
        }
        if read_more(endpoint, stream, &mut buf).await? == 0 {
            return Err(ApiError::Disconnected {
                endpoint,
                message: if buf.is_empty() {
                    "closed without answering".to_string()
                } else {
                    format!("closed in the answer's head: {}", quote(&buf))
                },
            });
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = match status_line
        .split_whitespace()
        .collect::<Vec<_>>()
        .as_slice()
    {
        [version, code, ..] if version.starts_with("HTTP/1.") => code
            .parse::<u16>()
            .map_err(|_| bad(format!("bad status line {status_line:?}")))?,
        _ => return Err(bad(format!("bad status line {status_line:?}"))),
    };
    let mut content_length = 0usize;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad(format!("bad header line {line:?}")));
        };
        if name.trim().eq_ignore_ascii_case("content-length") {
            content_length = value
                .trim()
                .parse()
                .map_err(|_| bad(format!("bad Content-Length {value:?}")))?;
        } else if name.trim().eq_ignore_ascii_case("transfer-encoding")
            && !value.trim().eq_ignore_ascii_case("identity")
        {
            return Err(bad(format!("unsupported Transfer-Encoding {value:?}")));
        }
    }
    if content_length > MAX_RAW_RESPONSE {
        return Err(bad(format!(
            "answer body of {content_length} bytes is too long"
        )));
    }
    let body_start = head_end + 4;
    while buf.len() < body_start + content_length {
        if read_more(endpoint, stream, &mut buf).await? == 0 {
            return Err(ApiError::Disconnected {
                endpoint,
                message: format!(
                    "closed after {} of {content_length} body bytes",
                    buf.len() - body_start
                ),
            });
        }
    }
    Ok(Answer {
        status,
        body: buf[body_start..body_start + content_length].to_vec(),
    })
}

async fn read_more(
    endpoint: &'static str,
    stream: &mut UnixStream,
    buf: &mut Vec<u8>,
) -> Result<usize, ApiError> {
    let mut chunk = [0u8; 4096];
    let n = stream
        .read(&mut chunk)
        .await
        .map_err(|e| ApiError::Disconnected {
            endpoint,
            message: format!("read: {e}"),
        })?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn encode<T: Serialize>(endpoint: &'static str, body: &T) -> Result<Vec<u8>, ApiError> {
    // Cannot fail for these types (no maps with non-string keys); still not a panic.
    serde_json::to_vec(body).map_err(|e| ApiError::Setup {
        message: format!("{endpoint}: cannot encode the request: {e}"),
    })
}

/// Turns an error status into `ApiError::Status` with the API's message.
fn check_status(endpoint: &'static str, answer: Answer) -> Result<Answer, ApiError> {
    if (200..300).contains(&answer.status) {
        return Ok(answer);
    }
    Err(ApiError::Status {
        endpoint,
        status: answer.status,
        message: api_message(&answer.body),
    })
}

/// Cloud Hypervisor's error bodies are a JSON array of the error's chain, outermost first
/// (`["Error from API","The VM could not boot","..."]`); anything else is quoted as it is.
fn api_message(body: &[u8]) -> String {
    if let Ok(chain) = serde_json::from_slice::<Vec<String>>(body) {
        if !chain.is_empty() {
            return chain.join(": ");
        }
    }
    let text = String::from_utf8_lossy(body);
    if text.trim().is_empty() {
        "(no message)".to_string()
    } else {
        quote(body)
    }
}

fn parse_json<T: DeserializeOwned>(endpoint: &'static str, body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadResponse {
        endpoint,
        message: format!("{e} in {}", quote(body)),
    })
}

/// 204 (cold-plugged into a VM not yet booted) has no body; 200 carries the new device.
fn parse_device(
    endpoint: &'static str,
    answer: &Answer,
) -> Result<Option<PciDeviceInfo>, ApiError> {
    if answer.status == 204 || answer.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    parse_json(endpoint, &answer.body).map(Some)
}

fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(QUOTE_LEN) {
        Some((cut, _)) => format!("{:?}...", &text[..cut]),
        None => format!("{text:?}"),
    }
}

/// reqwest's own message is terse ("error sending request"); the causes say what happened.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn io_error_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        source = cause.source();
    }
    None
}

#[cfg(test)]
pub(super) mod test_support {
    //! A fake Cloud Hypervisor API server for the tests of this module and its parent.
    use super::find;
    use std::io::IoSliceMut;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
    use tokio::net::{UnixListener, UnixStream};
    use tokio::sync::mpsc;

    /// A private dir per test, removed at the end.
    pub struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new(name: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "hako-ch-api-{}-{}-{name}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).expect("mkdir");
            Self(dir)
        }

        pub fn socket(&self) -> PathBuf {
            self.0.join("api.sock")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// What the fake server does with a request once it has read it.
    pub enum Reply {
        /// Answers with this status and body.
        With(u16, &'static str),
        /// Keeps the connection open and never answers.
        Silent,
        /// Closes the connection without a word.
        Close,
    }

    /// A request as the fake server saw it.
    #[derive(Debug)]
    pub struct Seen {
        pub head: String,
        pub body: Vec<u8>,
        pub fds: Vec<OwnedFd>,
    }

    impl Seen {
        pub fn request_line(&self) -> &str {
            self.head.lines().next().unwrap_or_default()
        }

        pub fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).expect("request body is JSON")
        }
    }

    /// Serves one connection per reply, in order, on a unix socket in `dir`, and reports each
    /// request it read (with any SCM_RIGHTS fds) on the returned channel.
    pub fn fake_server(dir: &TempDir, replies: Vec<Reply>) -> mpsc::UnboundedReceiver<Seen> {
        let listener = UnixListener::bind(dir.socket()).expect("bind");
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            for reply in replies {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = read_request(&stream).await;
                let _ = tx.send(seen);
                match reply {
                    Reply::With(status, body) => {
                        let answer = format!(
                            "HTTP/1.1 {status} \r\nServer: Cloud Hypervisor API\r\n\
                             Connection: keep-alive\r\nContent-Type: application/json\r\n\
                             Content-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = stream.write_all(answer.as_bytes()).await;
                        // Hold the connection open as the real server does (keep-alive), so
                        // the client must go by Content-Length.
                        tokio::spawn(async move {
                            let mut sink = [0u8; 64];
                            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                        });
                    }
                    Reply::Silent => {
                        tokio::spawn(async move {
                            let _held = stream;
                            std::future::pending::<()>().await;
                        });
                    }
                    Reply::Close => drop(stream),
                }
            }
        });
        rx
    }

    /// Reads a request head and its Content-Length body with recvmsg, collecting fds.
    async fn read_request(stream: &UnixStream) -> Seen {
        let mut buf = Vec::new();
        let mut fds = Vec::new();
        loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let length = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
                    .map(|(_, v)| v.trim().parse::<usize>().expect("length"))
                    .unwrap_or(0);
                if buf.len() >= end + 4 + length {
                    return Seen {
                        head,
                        body: buf[end + 4..end + 4 + length].to_vec(),
                        fds,
                    };
                }
            }
            let fd = stream.as_raw_fd();
            let (chunk, got) = stream
                .async_io(Interest::READABLE, || {
                    let mut data = [0u8; 4096];
                    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
                    let mut iov = [IoSliceMut::new(&mut data)];
                    let msg = recvmsg::<UnixAddr>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty())
                        .map_err(std::io::Error::from)?;
                    let mut got = Vec::new();
                    for c in msg.cmsgs().map_err(std::io::Error::from)? {
                        if let ControlMessageOwned::ScmRights(received) = c {
                            got.extend(received);
                        }
                    }
                    let n = msg.bytes;
                    Ok((data[..n].to_vec(), got))
                })
                .await
                .expect("recvmsg");
            // SAFETY: SCM_RIGHTS gave this process new descriptors that nothing else owns.
            fds.extend(
                got.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
            if chunk.is_empty() {
                panic!("client closed before a full request: {buf:?}");
            }
            buf.extend_from_slice(&chunk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::types::{
        ConsoleConfig, ConsoleMode, CpusConfig, MemoryConfig, PayloadConfig,
    };
    use super::super::types::{SerialConfig, VmState};
    use super::test_support::{fake_server, Reply, TempDir};
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const SHORT: Duration = Duration::from_millis(200);

    fn client(dir: &TempDir) -> ApiClient {
        ApiClient::with_timeout(dir.socket(), Duration::from_secs(5)).expect("client")
    }

    fn small_config() -> VmConfig {
        VmConfig {
            payload: PayloadConfig {
                kernel: Some("/g/vmlinux".into()),
                initramfs: Some("/g/initramfs.cpio".into()),
                cmdline: Some("console=ttyS0".into()),
                firmware: None,
            },
            cpus: Some(CpusConfig {
                boot_vcpus: 1,
                max_vcpus: 1,
                kvm_hyperv: None,
                max_phys_bits: None,
                nested: None,
            }),
            memory: Some(MemoryConfig {
                size: 256 << 20,
                shared: Some(true),
                hugepages: None,
                mergeable: None,
                prefault: None,
                hotplug_size: None,
            }),
            serial: Some(SerialConfig {
                mode: ConsoleMode::File,
                file: Some("/run/sb/console.log".into()),
                socket: None,
            }),
            console: Some(ConsoleConfig {
                mode: ConsoleMode::Off,
                file: None,
                socket: None,
                iommu: None,
            }),
            ..VmConfig::default()
        }
    }

    #[tokio::test]
    async fn ping_is_a_get_and_parses_the_answer() {
        let dir = TempDir::new("ping");
        let mut seen = fake_server(
            &dir,
            vec![Reply::With(
                200,
                r#"{"build_version":"v48.0","version":"48.0.0","pid":77,"features":["kvm"]}"#,
            )],
        );
        let pong = client(&dir).ping().await.expect("ping");
        assert_eq!(pong.version, "48.0.0");
        assert_eq!(pong.pid, Some(77));
        let req = seen.recv().await.expect("request");
        assert_eq!(req.request_line(), "GET /api/v1/vmm.ping HTTP/1.1");
        assert!(req.body.is_empty());
    }

    #[tokio::test]
    async fn create_puts_the_config_as_json() {
        let dir = TempDir::new("create");
        let mut seen = fake_server(&dir, vec![Reply::With(204, "")]);
        client(&dir).create(&small_config()).await.expect("create");
        let req = seen.recv().await.expect("request");
        assert_eq!(req.request_line(), "PUT /api/v1/vm.create HTTP/1.1");
        assert!(
            req.head
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{}",
            req.head
        );
        let body = req.json();
        assert_eq!(body["payload"]["kernel"], "/g/vmlinux");
        assert_eq!(body["payload"]["initramfs"], "/g/initramfs.cpio");
        assert_eq!(body["cpus"]["boot_vcpus"], 1);
        assert_eq!(body["memory"]["size"], 268435456u64);
        assert_eq!(body["memory"]["shared"], true);
        assert_eq!(body["serial"]["mode"], "File");
        assert_eq!(body["console"]["mode"], "Off");
        assert!(body.get("net").is_none(), "{body}");
    }

    #[tokio::test]
    async fn info_parses_state_config_and_memory() {
        let dir = TempDir::new("info");
        let _seen = fake_server(
            &dir,
            vec![Reply::With(
                200,
                r#"{"config":{"payload":{"kernel":"/g/vmlinux"},
                    "cpus":{"boot_vcpus":2,"max_vcpus":2},
                    "memory":{"size":268435456,"shared":true},"iommu":false},
                    "state":"Running","memory_actual_size":268435456}"#,
            )],
        );
        let info = client(&dir).info().await.expect("info");
        assert_eq!(info.state, VmState::Running);
        assert_eq!(info.memory_actual_size, Some(256 << 20));
        assert_eq!(info.config.cpus.map(|c| c.max_vcpus), Some(2));
    }

    #[tokio::test]
    async fn actions_are_puts_without_a_body() {
        let dir = TempDir::new("actions");
        let mut seen = fake_server(&dir, (0..7).map(|_| Reply::With(204, "")).collect());
        let api = client(&dir);
        api.boot().await.expect("boot");
        api.pause().await.expect("pause");
        api.resume().await.expect("resume");
        api.shutdown().await.expect("shutdown");
        api.delete().await.expect("delete");
        api.vmm_shutdown().await.expect("vmm.shutdown");
        api.resize(&VmResize {
            desired_vcpus: Some(2),
            ..VmResize::default()
        })
        .await
        .expect("resize");
        for endpoint in [
            "vm.boot",
            "vm.pause",
            "vm.resume",
            "vm.shutdown",
            "vm.delete",
            "vmm.shutdown",
        ] {
            let req = seen.recv().await.expect("request");
            assert_eq!(
                req.request_line(),
                format!("PUT /api/v1/{endpoint} HTTP/1.1")
            );
            // Cloud Hypervisor refuses these with 400 when they carry a body.
            assert!(req.body.is_empty(), "{endpoint}: {:?}", req.body);
        }
        let resize = seen.recv().await.expect("resize");
        assert_eq!(resize.request_line(), "PUT /api/v1/vm.resize HTTP/1.1");
        assert_eq!(resize.json(), serde_json::json!({"desired_vcpus": 2}));
    }

    #[tokio::test]
    async fn device_adds_answer_none_when_cold_and_the_device_when_hot() {
        let dir = TempDir::new("add");
        let mut seen = fake_server(
            &dir,
            vec![
                Reply::With(204, ""),
                Reply::With(200, r#"{"id":"_vsock0","bdf":"0000:00:05.0"}"#),
            ],
        );
        let api = client(&dir);
        let fs = FsConfig {
            tag: "hakoShared".into(),
            socket: "/run/sb/fs.sock".into(),
            num_queues: 1,
            queue_size: 1024,
            id: None,
        };
        assert_eq!(api.add_fs(&fs).await.expect("add-fs"), None);
        let vsock = VsockConfig {
            cid: 3,
            socket: "/run/sb/agent.sock".into(),
            iommu: None,
            id: None,
        };
        let device = api.add_vsock(&vsock).await.expect("add-vsock");
        assert_eq!(
            device,
            Some(PciDeviceInfo {
                id: "_vsock0".into(),
                bdf: "0000:00:05.0".into()
            })
        );
        let req = seen.recv().await.expect("add-fs");
        assert_eq!(req.request_line(), "PUT /api/v1/vm.add-fs HTTP/1.1");
        assert_eq!(
            req.json(),
            serde_json::json!({"tag": "hakoShared", "socket": "/run/sb/fs.sock",
                               "num_queues": 1, "queue_size": 1024})
        );
        let req = seen.recv().await.expect("add-vsock");
        assert_eq!(req.request_line(), "PUT /api/v1/vm.add-vsock HTTP/1.1");
        assert_eq!(
            req.json(),
            serde_json::json!({"cid": 3, "socket": "/run/sb/agent.sock"})
        );
    }

    #[tokio::test]
    async fn add_net_hands_the_tap_fd_over_with_scm_rights() {
        let dir = TempDir::new("net");
        let mut seen = fake_server(
            &dir,
            vec![
                Reply::With(204, ""),
                Reply::With(200, r#"{"id":"_net1","bdf":"0000:00:06.0"}"#),
            ],
        );
        // Any open file stands in for a tap: what matters is that the server gets the same
        // open file, not a number.
        let file = std::fs::File::create(dir.0.join("stand-in-tap")).expect("file");
        let net = NetConfig {
            mac: Some("02:42:0a:58:00:02".into()),
            num_queues: Some(2),
            queue_size: Some(256),
            ..NetConfig::default()
        };
        let api = client(&dir);
        let cold = api
            .add_net(&net, &[file.as_raw_fd()])
            .await
            .expect("add-net");
        assert_eq!(cold, None);
        let hot = api
            .add_net(&net, &[file.as_raw_fd()])
            .await
            .expect("add-net");
        assert_eq!(hot.map(|d| d.id), Some("_net1".to_string()));

        let req = seen.recv().await.expect("request");
        assert_eq!(req.request_line(), "PUT /api/v1/vm.add-net HTTP/1.1");
        assert_eq!(
            req.json(),
            serde_json::json!({"mac": "02:42:0a:58:00:02", "num_queues": 2, "queue_size": 256})
        );
        assert_eq!(req.fds.len(), 1, "one fd per tap queue pair");
        let received = std::fs::File::from(req.fds.into_iter().next().expect("fd"));
        let (ours, theirs) = (
            file.metadata().expect("stat"),
            received.metadata().expect("stat"),
        );
        assert_eq!((ours.dev(), ours.ino()), (theirs.dev(), theirs.ino()));
    }

    #[tokio::test]
    async fn add_net_without_fds_goes_the_ordinary_way() {
        let dir = TempDir::new("net-nofd");
        let mut seen = fake_server(&dir, vec![Reply::With(204, "")]);
        let net = NetConfig {
            tap: Some("tap0".into()),
            ..NetConfig::default()
        };
        assert_eq!(client(&dir).add_net(&net, &[]).await.expect("add"), None);
        let req = seen.recv().await.expect("request");
        assert!(req.fds.is_empty());
        assert_eq!(req.json(), serde_json::json!({"tap": "tap0"}));
    }

    #[tokio::test]
    async fn error_statuses_carry_status_endpoint_and_the_api_message() {
        let dir = TempDir::new("status");
        let _seen = fake_server(
            &dir,
            vec![
                Reply::With(
                    500,
                    r#"["Error from API","The VM could not boot","Error loading kernel"]"#,
                ),
                Reply::With(404, ""),
                Reply::With(400, "Bad Request: invalid net config"),
            ],
        );
        let api = client(&dir);
        let err = api.boot().await.expect_err("500");
        assert_eq!(err.status(), Some(500));
        let text = err.to_string();
        assert!(
            text.contains("vm.boot") && text.contains("HTTP 500"),
            "{text}"
        );
        assert!(
            text.contains("The VM could not boot: Error loading kernel"),
            "{text}"
        );
        let err = api.info().await.expect_err("404");
        assert!(
            matches!(&err, ApiError::Status { endpoint: "vm.info", status: 404, message }
                if message == "(no message)"),
            "{err:?}"
        );
        let err = api
            .add_net(&NetConfig::default(), &[0])
            .await
            .expect_err("400");
        assert!(
            matches!(&err, ApiError::Status { endpoint: "vm.add-net", status: 400, message }
                if message.contains("invalid net config")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_missing_socket_is_named() {
        let dir = TempDir::new("missing");
        let api = client(&dir);
        let err = api.ping().await.expect_err("no socket");
        assert!(
            matches!(&err, ApiError::SocketMissing { endpoint: "vmm.ping", socket }
                if *socket == dir.socket()),
            "{err:?}"
        );
        assert!(err.to_string().contains("does not exist"), "{err}");
        let err = api
            .add_net(&NetConfig::default(), &[0])
            .await
            .expect_err("no socket");
        assert!(matches!(err, ApiError::SocketMissing { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn a_socket_nobody_listens_on_is_a_connect_error() {
        let dir = TempDir::new("refused");
        // Binding creates the socket file; dropping the listener leaves it behind, unserved,
        // as a VMM that died does.
        drop(std::os::unix::net::UnixListener::bind(dir.socket()).expect("bind"));
        let err = client(&dir).ping().await.expect_err("refused");
        assert!(matches!(err, ApiError::Connect { .. }), "{err:?}");
        assert!(err.to_string().contains("cannot connect"), "{err}");
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out() {
        let dir = TempDir::new("silent");
        let _seen = fake_server(&dir, vec![Reply::Silent, Reply::Silent]);
        let api = ApiClient::with_timeout(dir.socket(), SHORT).expect("client");
        let err = api.info().await.expect_err("timeout");
        assert!(
            matches!(err, ApiError::Timeout { endpoint: "vm.info", timeout } if timeout == SHORT),
            "{err:?}"
        );
        assert!(err.to_string().contains("no answer within 200ms"), "{err}");
        let err = api
            .add_net(&NetConfig::default(), &[0])
            .await
            .expect_err("timeout");
        assert!(matches!(err, ApiError::Timeout { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn a_connection_closed_early_is_reported_as_lost() {
        let dir = TempDir::new("close");
        let _seen = fake_server(&dir, vec![Reply::Close, Reply::Close]);
        let api = client(&dir);
        let err = api.create(&small_config()).await.expect_err("closed");
        assert!(
            matches!(
                err,
                ApiError::Disconnected {
                    endpoint: "vm.create",
                    ..
                }
            ),
            "{err:?}"
        );
        let err = api
            .add_net(&NetConfig::default(), &[0])
            .await
            .expect_err("closed");
        assert!(
            matches!(&err, ApiError::Disconnected { message, .. }
                if message.contains("closed without answering")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_body_that_is_not_the_expected_json_is_a_bad_response() {
        let dir = TempDir::new("bad");
        let _seen = fake_server(
            &dir,
            vec![
                Reply::With(200, "pong"),
                Reply::With(200, r#"{"state":"Running"}"#),
            ],
        );
        let api = client(&dir);
        let err = api.ping().await.expect_err("not json");
        assert!(
            matches!(&err, ApiError::BadResponse { endpoint: "vmm.ping", message }
                if message.contains("\"pong\"")),
            "{err:?}"
        );
        let err = api.info().await.expect_err("no config");
        assert!(
            matches!(&err, ApiError::BadResponse { message, .. } if message.contains("config")),
            "{err:?}"
        );
    }

    #[test]
    fn api_messages_join_the_error_chain_or_quote_the_body() {
        assert_eq!(api_message(br#"["a","b"]"#), "a: b");
        assert_eq!(api_message(b"  "), "(no message)");
        assert_eq!(api_message(b"oops"), "\"oops\"");
        let long = vec![b'x'; 2000];
        assert!(api_message(&long).ends_with("..."));
    }
}
