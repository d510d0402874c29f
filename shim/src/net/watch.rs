//! Watches the pod's network namespace for changes made while the pod runs (`docker network
//! connect`/`disconnect`, a plugin changing an address): an rtnetlink socket inside the
//! namespace, subscribed to link, address, route and neighbour events. A burst of events (a
//! plugin makes several changes in a row) becomes one notice, once the namespace has been quiet
//! for `QUIET`, and never later than `MAX_DELAY` after the burst began.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use super::namespace::on_thread_in;
use super::{NetError, TAP_SUFFIX};

const QUIET: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_millis(500);
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
const IFLA_IFNAME: u16 = 3;
const NUD_PERMANENT: u16 = 0x80;

/// A running watch; dropping it stops it.
pub struct Watch {
    changes: mpsc::Receiver<()>,
    /// Set at the first event of a change, before the burst is over; the owner clears it when
    /// it reads the namespace again.
    pub dirty: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    pub fn start(netns: &Path) -> Result<Watch, NetError> {
        let socket = open_in(netns)?;
        // SAFETY: the socket is an OwnedFd that the AsyncFd owns from here on: it stays open,
        // and always the same descriptor, until the AsyncFd is dropped.
        let socket = unsafe { AsyncFd::register(socket) }.map_err(|e| NetError::Namespace {
            path: netns.to_path_buf(),
            reason: format!("watching: {e}"),
        })?;
        let (tx, changes) = mpsc::channel(1);
        let dirty = Arc::new(AtomicBool::new(false));
        let flag = dirty.clone();
        let task = tokio::spawn(async move {
            loop {
                // Wait for the first event of a burst, then for the burst to end.
                if !next_relevant(&socket, None).await {
                    return;
                }
                flag.store(true, Ordering::SeqCst);
                let burst = tokio::time::Instant::now();
                loop {
                    let left = MAX_DELAY.saturating_sub(burst.elapsed());
                    if !next_relevant(&socket, Some(QUIET.min(left))).await || left.is_zero() {
                        break;
                    }
                }
                // A notice already waiting covers this burst too.
                if let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                    return;
                }
            }
        });
        Ok(Watch {
            changes,
            dirty,
            task,
        })
    }

    /// Resolves after each burst of changes; `false` once the watch has ended.
    pub async fn changed(&mut self) -> bool {
        self.changes.recv().await.is_some()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits (up to `timeout`, or for ever) for an event that matters; `false` on timeout or when
/// the socket failed.
async fn next_relevant(socket: &AsyncFd<OwnedFd>, timeout: Option<Duration>) -> bool {
    let read = async {
        loop {
            let Ok(mut ready) = socket.readable().await else {
                return false;
            };
            let mut buffer = vec![0u8; 64 * 1024];
            let got = ready.try_io(|fd| {
                // SAFETY: receives into a live buffer of the given length.
                let n = unsafe {
                    libc::recv(
                        fd.as_raw_fd(),
                        buffer.as_mut_ptr().cast(),
                        buffer.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match got {
                Ok(Ok(n)) if relevant(&buffer[..n]) => return true,
                Ok(Ok(_)) => continue,
                // The kernel dropped events (ENOBUFS): something changed.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => return true,
                Ok(Err(_)) => return false,
                Err(_would_block) => continue,
            }
        }
    };
    match timeout {
        Some(t) => tokio::time::timeout(t, read).await.unwrap_or(false),
        None => read.await,
    }
}

/// Whether a datagram of rtnetlink messages holds a change that matters: hako's own taps and
/// learnt (not permanent) neighbour entries do not.
pub fn relevant(datagram: &[u8]) -> bool {
    let mut at = 0;
    while at + 16 <= datagram.len() {
        let len = u32::from_ne_bytes([
            datagram[at],
            datagram[at + 1],
            datagram[at + 2],
            datagram[at + 3],
        ]) as usize;
        if len < 16 || at + len > datagram.len() {
            return false;
        }
        let kind = u16::from_ne_bytes([datagram[at + 4], datagram[at + 5]]);
        let payload = &datagram[at + 16..at + len];
        let matters = match kind {
            RTM_NEWLINK | RTM_DELLINK => !link_name(payload).ends_with(TAP_SUFFIX),
            RTM_NEWNEIGH | RTM_DELNEIGH => payload
                .get(8..10)
                .is_some_and(|s| u16::from_ne_bytes([s[0], s[1]]) & NUD_PERMANENT != 0),
            _ => true,
        };
        if matters {
            return true;
        }
        at += (len + 3) & !3;
    }
    false
}

/// IFLA_IFNAME of an RTM_NEWLINK/RTM_DELLINK payload (after the 16-byte ifinfomsg).
fn link_name(payload: &[u8]) -> String {
    let mut at = 16;
    while at + 4 <= payload.len() {
        let len = u16::from_ne_bytes([payload[at], payload[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([payload[at + 2], payload[at + 3]]);
        if len < 4 || at + len > payload.len() {
            break;
        }
        if kind == IFLA_IFNAME {
            let name = &payload[at + 4..at + len];
            let name = name.split(|b| *b == 0).next().unwrap_or_default();
            return String::from_utf8_lossy(name).into_owned();
        }
        at += (len + 3) & !3;
    }
    String::new()
}

/// An rtnetlink socket that belongs to `netns`: made by a thread that entered it (a socket
/// stays in the namespace it was made in).
fn open_in(netns: &Path) -> Result<OwnedFd, NetError> {
    let path = netns.to_path_buf();
    on_thread_in(netns, "watching", move || {
        subscribed_socket().map_err(|e| NetError::Namespace {
            path,
            reason: format!("watching: {e}"),
        })
    })
}

/// A non-blocking rtnetlink socket of this thread's namespace, subscribed to the groups whose
/// events `relevant` reads.
fn subscribed_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: a plain socket(2) call; the result is checked and owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is plain data; zeroed is a valid value for it.
    let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    address.nl_family = libc::AF_NETLINK as u16;
    address.nl_groups = RTMGRP_LINK
        | RTMGRP_NEIGH
        | RTMGRP_IPV4_IFADDR
        | RTMGRP_IPV4_ROUTE
        | RTMGRP_IPV6_IFADDR
        | RTMGRP_IPV6_ROUTE;
    // SAFETY: binds with a live, correctly sized sockaddr_nl.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&address as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(body);
        m.resize((m.len() + 3) & !3, 0);
        m
    }

    fn link(name: &str) -> Vec<u8> {
        let mut body = vec![0u8; 16];
        let data = [name.as_bytes(), &[0]].concat();
        body.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        body.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
        body.extend_from_slice(&data);
        message(RTM_NEWLINK, &body)
    }

    fn neighbour(state: u16) -> Vec<u8> {
        let mut body = vec![0u8; 12];
        body[8..10].copy_from_slice(&state.to_ne_bytes());
        message(RTM_NEWNEIGH, &body)
    }

    #[test]
    fn own_taps_and_learnt_neighbours_do_not_count() {
        assert!(relevant(&link("eth1")));
        assert!(!relevant(&link("tap3_hk")));
        assert!(!relevant(&neighbour(0x02)), "a reachable entry is learnt");
        assert!(relevant(&neighbour(NUD_PERMANENT)));
        // One relevant message among others is enough; garbage is not.
        assert!(relevant(&[link("tap0_hk"), message(20, &[0; 8])].concat()));
        assert!(!relevant(&[1, 2, 3]));
    }
}
