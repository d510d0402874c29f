//! A fake Cloud Hypervisor API server for the tests of the client and of the backend.

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

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
