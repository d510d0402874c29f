//! One bounded fetch of a sandbox's snapshot over its metrics socket: one HTTP/1.1 request,
//! at most `MAX_REPLY` bytes read, the whole of it within the caller's deadline. A shim is
//! root's own process, but a wedged or broken one must cost the monitor a bounded amount and
//! never hold up the other sandboxes.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::metrics::snapshot::{Snapshot, MAX_SNAPSHOT_BYTES};

/// The snapshot and room for the response head.
const MAX_REPLY: usize = MAX_SNAPSHOT_BYTES + 4096;

/// Why a sandbox's scrape failed, as `hako_monitor_sandbox_scrape_failures_total{reason}`
/// says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    Timeout,
    Oversize,
    Malformed,
    Http,
    Io,
}

impl Failure {
    pub const ALL: [Failure; 5] = [
        Failure::Timeout,
        Failure::Oversize,
        Failure::Malformed,
        Failure::Http,
        Failure::Io,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Oversize => "oversize",
            Failure::Malformed => "malformed",
            Failure::Http => "http",
            Failure::Io => "io",
        }
    }
}

#[derive(Debug, PartialEq)]
pub enum Outcome {
    Up(Snapshot),
    Failed(Failure),
    /// Nobody listens on the socket (the shim died and containerd has not deleted the
    /// sandbox yet) or it went away: not a running sandbox, so no series at all.
    Gone,
}

pub async fn fetch(socket: &Path, deadline: Duration) -> Outcome {
    match tokio::time::timeout(deadline, exchange(socket)).await {
        Err(_) => Outcome::Failed(Failure::Timeout),
        Ok(outcome) => outcome,
    }
}

async fn exchange(socket: &Path) -> Outcome {
    let mut stream = match UnixStream::connect(socket).await {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            ) =>
        {
            return Outcome::Gone
        }
        Err(_) => return Outcome::Failed(Failure::Io),
    };
    let request = b"GET /v1/snapshot HTTP/1.1\r\nHost: hako\r\nConnection: close\r\n\r\n";
    if stream.write_all(request).await.is_err() {
        return Outcome::Failed(Failure::Io);
    }
    let mut reply = Vec::with_capacity(16 * 1024);
    // One byte over the cap tells an oversize reply from one exactly at it.
    let read = (&mut stream)
        .take(MAX_REPLY as u64 + 1)
        .read_to_end(&mut reply)
        .await;
    if read.is_err() {
        return Outcome::Failed(Failure::Io);
    }
    parse_reply(&reply)
}

/// A whole reply: a 200 status line, a head, and a body of the length it says.
pub fn parse_reply(reply: &[u8]) -> Outcome {
    if reply.len() > MAX_REPLY {
        return Outcome::Failed(Failure::Oversize);
    }
    let Some(end) = reply.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Outcome::Failed(Failure::Http);
    };
    let Ok(head) = std::str::from_utf8(&reply[..end]) else {
        return Outcome::Failed(Failure::Http);
    };
    let body = &reply[end + 4..];
    let mut lines = head.split("\r\n");
    let status_ok = lines
        .next()
        .is_some_and(|l| l.starts_with("HTTP/1.") && l.split(' ').nth(1) == Some("200"));
    if !status_ok {
        return Outcome::Failed(Failure::Http);
    }
    let length = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())
    });
    match length {
        Some(Some(n)) if n == body.len() => {}
        _ => return Outcome::Failed(Failure::Http),
    }
    if body.len() > MAX_SNAPSHOT_BYTES {
        return Outcome::Failed(Failure::Oversize);
    }
    match Snapshot::parse(body) {
        Ok(snapshot) => Outcome::Up(snapshot),
        Err(_) => Outcome::Failed(Failure::Malformed),
    }
}

#[cfg(test)]
#[path = "scrape_tests.rs"]
mod tests;
