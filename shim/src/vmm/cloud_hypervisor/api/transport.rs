//! The two ways a request reaches the API socket: reqwest for every call, and one
//! hand-written HTTP/1.1 exchange for the call that hands tap fds over (`put_with_fds`).
//! Both are bounded by the transport's timeout and return a success answer or an `ApiError`.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use reqwest::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

use super::error::{api_message, error_chain, io_error_kind, quote, ApiError};

/// The API's root. The host part is never resolved: every connection goes to the socket.
pub const BASE_URL: &str = "http://localhost/api/v1/";
/// Largest answer the hand-written exchange accepts (a `PciDeviceInfo` is tiny).
const MAX_RAW_RESPONSE: usize = 64 * 1024;

/// A status and body, before they are checked.
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// One VMM's API socket.
#[derive(Debug, Clone)]
pub struct Transport {
    socket: PathBuf,
    http: reqwest::Client,
    timeout: Duration,
}

impl Transport {
    pub fn new(socket: PathBuf, timeout: Duration) -> Result<Self, ApiError> {
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

    /// The same socket with another timeout per call.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
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

    /// One request through reqwest; a success status or an `ApiError`.
    pub async fn call(
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
        self.bounded(endpoint, exchange).await
    }

    /// `exchange` within the timeout, as a success answer or an `ApiError`.
    async fn bounded(
        &self,
        endpoint: &'static str,
        exchange: impl std::future::Future<Output = Result<Answer, ApiError>>,
    ) -> Result<Answer, ApiError> {
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
    /// its own: see `ApiClient::add_net` for why this one call does not go through reqwest.
    pub async fn put_with_fds(
        &self,
        endpoint: &'static str,
        body: &[u8],
        fds: &[RawFd],
    ) -> Result<Answer, ApiError> {
        let exchange = async {
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
        };
        self.bounded(endpoint, exchange).await
    }
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
