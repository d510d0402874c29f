//! `<sandbox dir>/metrics.sock`: an idle accept until someone asks. One request per
//! connection, from root only (SO_PEERCRED), its head capped at 4 KiB and read within 1 s;
//! `GET /v1/snapshot` answers JSON for the monitor, `GET /metrics` Prometheus text of this
//! sandbox for `curl --unix-socket`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Mutex, Semaphore};

use super::guest::{self, GuestSource};
use super::host::HostReader;
use super::registry::ShimMetrics;
use super::snapshot::Snapshot;
use super::{text, MetricsError};

pub const MAX_REQUEST_HEAD: usize = 4096;
pub const READ_DEADLINE: Duration = Duration::from_secs(1);
/// A reader that stops reading must not hold a connection slot for long either.
const WRITE_DEADLINE: Duration = Duration::from_secs(1);
/// Two Prometheus servers scraping together get one computation.
const REUSE_WITHIN: Duration = Duration::from_secs(1);
/// Connections served at once; more are closed at accept. Only root can connect, so this
/// bounds mistakes rather than attacks.
const MAX_CONNECTIONS: usize = 4;

/// What the socket serves: the shim's instruments and the host's processes, read on request,
/// and the guest's figures when it has a guest to ask.
#[derive(Debug)]
pub struct Source {
    metrics: Arc<ShimMetrics>,
    host: HostReader,
    guest: Option<GuestSource>,
    last: Mutex<Option<(Instant, Arc<Snapshot>)>>,
}

impl Source {
    pub fn new(metrics: Arc<ShimMetrics>, sandbox_dir: &Path) -> Self {
        Self {
            metrics,
            host: HostReader::new(sandbox_dir),
            guest: None,
            last: Mutex::new(None),
        }
    }

    /// Asks the guest too, at each snapshot, within `guest::GUEST_DEADLINE`.
    pub fn with_guest(mut self, guest: GuestSource) -> Self {
        self.guest = Some(guest);
        self
    }

    /// The guest's figures and the containers asked about, or none when it has no VM yet or its answer is refused (counted
    /// by reason in `hako_guest_metrics_rejected_total`).
    async fn guest_figures(
        &self,
    ) -> Option<(
        crate::agent_client::guest::GuestFigures,
        Vec<guest::AppContainer>,
    )> {
        let guest = self.guest.as_ref()?;
        // No socket is no VM yet (or any more): nothing to ask, nothing refused.
        if !guest.agent_socket.exists() {
            return None;
        }
        let containers = guest.containers.app_containers();
        let ids: Vec<String> = containers.iter().map(|c| c.id.clone()).collect();
        let fetched =
            crate::agent_client::guest::fetch(&guest.agent_socket, &ids, guest::GUEST_DEADLINE)
                .await;
        match fetched {
            Ok(figures) => Some((figures, containers)),
            Err(rejection) => {
                log::debug!("guest metrics: {rejection}");
                self.metrics.guest_metrics_rejected(rejection.reason());
                None
            }
        }
    }

    /// One snapshot computed at a time; the `/proc` reads run off the async threads.
    pub async fn snapshot(self: &Arc<Self>) -> Arc<Snapshot> {
        let mut last = self.last.lock().await;
        if let Some((at, snapshot)) = last.as_ref() {
            if at.elapsed() < REUSE_WITHIN {
                return snapshot.clone();
            }
        }
        let this = self.clone();
        let host = async {
            tokio::task::spawn_blocking(move || this.host.samples())
                .await
                .unwrap_or_default()
        };
        // The host's part and the guest's at once: a slow guest delays neither.
        let (host, figures) = tokio::join!(host, self.guest_figures());
        // After the guest's fetch, so a rejection is in this very snapshot.
        let mut samples = self.metrics.samples();
        if let Some((figures, containers)) = &figures {
            samples.extend(guest::samples(figures, containers));
            samples.extend(guest::overhead(&host, figures));
        }
        samples.extend(host);
        let mut snapshot = Snapshot::new(samples);
        snapshot.pod = self.metrics.pod();
        let snapshot = Arc::new(snapshot);
        *last = Some((Instant::now(), snapshot.clone()));
        snapshot
    }
}

/// The listening socket; dropping it stops serving and removes the socket file.
#[derive(Debug)]
pub struct MetricsServer {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// Binds `path` (mode 0600) and serves it from a task of the current runtime.
    pub fn bind(path: &Path, source: Arc<Source>) -> Result<Self, MetricsError> {
        let err = |source| MetricsError::Bind {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        // Until the chmod the socket has the umask's mode; the peer check below holds anyway.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        let task = tokio::spawn(serve(listener, source));
        Ok(Self {
            path: path.to_path_buf(),
            task,
        })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve(listener: UnixListener, source: Arc<Source>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of fds, most likely: wait instead of spinning on the error.
                log::warn!("metrics socket: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let source = source.clone();
        tokio::spawn(async move {
            let _slot = slot;
            handle(stream, &source).await;
        });
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Snapshot,
    Metrics,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("the request head is over {MAX_REQUEST_HEAD} bytes")]
    TooLarge,
    #[error("the connection closed before the request head ended")]
    Truncated,
    #[error("malformed request")]
    Malformed,
    #[error("only GET is served")]
    Method,
    #[error("no such path")]
    NotFound,
    #[error("reading the request: {0}")]
    Io(std::io::ErrorKind),
}

impl RequestError {
    pub fn status(&self) -> &'static str {
        match self {
            RequestError::TooLarge => "431 Request Header Fields Too Large",
            RequestError::Method => "405 Method Not Allowed",
            RequestError::NotFound => "404 Not Found",
            _ => "400 Bad Request",
        }
    }
}

/// Reads up to the blank line ending the head, never more than `MAX_REQUEST_HEAD` bytes.
pub async fn read_head(stream: &mut (impl AsyncRead + Unpin)) -> Result<Vec<u8>, RequestError> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let room = (MAX_REQUEST_HEAD + 1 - head.len()).min(chunk.len());
        let n = stream
            .read(&mut chunk[..room])
            .await
            .map_err(|e| RequestError::Io(e.kind()))?;
        if n == 0 {
            return Err(RequestError::Truncated);
        }
        // The end may straddle two reads: look from a few bytes back.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            head.truncate(from + end);
            return Ok(head);
        }
        if head.len() > MAX_REQUEST_HEAD {
            return Err(RequestError::TooLarge);
        }
    }
}

/// The path of a head's request line, `GET <path>[?query] HTTP/1.x`, without the query.
pub fn request_path(head: &[u8]) -> Result<&str, RequestError> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = std::str::from_utf8(line).map_err(|_| RequestError::Malformed)?;
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(RequestError::Malformed);
    };
    if !version.starts_with("HTTP/1.") {
        return Err(RequestError::Malformed);
    }
    if method != "GET" {
        return Err(RequestError::Method);
    }
    Ok(target.split('?').next().unwrap_or_default())
}

/// The route of a head on the sandbox's socket.
pub fn parse_head(head: &[u8]) -> Result<Route, RequestError> {
    match request_path(head)? {
        "/v1/snapshot" => Ok(Route::Snapshot),
        "/metrics" => Ok(Route::Metrics),
        _ => Err(RequestError::NotFound),
    }
}

/// Writes one whole response and closes the writing side, within `WRITE_DEADLINE`: a reader
/// that stops reading is dropped.
pub async fn respond(
    stream: &mut (impl AsyncWrite + Unpin),
    status: &str,
    content_type: &str,
    body: &[u8],
) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(WRITE_DEADLINE, write).await;
}

async fn handle(mut stream: UnixStream, source: &Arc<Source>) {
    // The socket's mode already keeps others out; this holds even if it were loosened.
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == 0 => {}
        _ => return,
    }
    let route = match tokio::time::timeout(READ_DEADLINE, read_head(&mut stream)).await {
        // A slow or silent client is cut without an answer.
        Err(_) => return,
        Ok(Err(RequestError::Io(_) | RequestError::Truncated)) => return,
        Ok(Err(e)) => Err(e),
        Ok(Ok(head)) => parse_head(&head),
    };
    let (status, content_type, body) = match route {
        Ok(route) => {
            let snapshot = source.snapshot().await;
            match route {
                Route::Snapshot => (
                    "200 OK",
                    "application/json",
                    serde_json::to_vec(&*snapshot).unwrap_or_default(),
                ),
                Route::Metrics => ("200 OK", text::CONTENT_TYPE, text::render(snapshot).into()),
            }
        }
        Err(e) => (e.status(), "text/plain", format!("{e}\n").into_bytes()),
    };
    respond(&mut stream, status, content_type, &body).await;
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
