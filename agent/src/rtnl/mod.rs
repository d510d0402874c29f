//! rtnetlink, the kernel's own interface to links, addresses, routes and neighbours. The agent
//! configures the guest's network with it: the guest has no `ip` binary.
//!
//! Messages are built and parsed by hand (a header, a fixed family struct, then attributes,
//! each padded to four bytes, in native byte order), which keeps the static agent small.

pub mod addr;
pub mod link;
pub mod neigh;
pub mod route;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
/// Multicast group of link changes (RTMGRP_LINK).
pub const GROUP_LINK: u32 = 0x1;
/// The biggest answer the kernel sends in one datagram to a dump is a page or two.
const RECV_BUFFER: usize = 64 * 1024;

/// Rounds up to netlink's four-byte alignment.
fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// A request: its type, flags beyond REQUEST/ACK, the family struct and the attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: u16,
    pub flags: u16,
    pub body: Vec<u8>,
}

impl Request {
    pub fn new(kind: u16, flags: u16, header: &[u8]) -> Self {
        Self {
            kind,
            flags,
            body: header.to_vec(),
        }
    }

    /// Appends one attribute (`rtattr`), padded.
    pub fn attr(mut self, kind: u16, data: &[u8]) -> Self {
        let len = 4 + data.len();
        self.body.extend_from_slice(&(len as u16).to_ne_bytes());
        self.body.extend_from_slice(&kind.to_ne_bytes());
        self.body.extend_from_slice(data);
        self.body.resize(align(self.body.len()), 0);
        self
    }

    /// The whole message, with its header.
    pub fn encode(&self, extra_flags: u16, seq: u32) -> Vec<u8> {
        let mut message = Vec::with_capacity(NLMSG_HDRLEN + self.body.len());
        message.extend_from_slice(&((NLMSG_HDRLEN + self.body.len()) as u32).to_ne_bytes());
        message.extend_from_slice(&self.kind.to_ne_bytes());
        message.extend_from_slice(&(NLM_F_REQUEST | self.flags | extra_flags).to_ne_bytes());
        message.extend_from_slice(&seq.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes());
        message.extend_from_slice(&self.body);
        message
    }
}

/// One message the kernel sent: its type and what follows the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: u16,
    pub seq: u32,
    pub payload: Vec<u8>,
}

/// Splits a datagram into messages; a truncated one ends the list.
pub fn parse_messages(buffer: &[u8]) -> Vec<Message> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + NLMSG_HDRLEN <= buffer.len() {
        let len = u32_at(buffer, at) as usize;
        if len < NLMSG_HDRLEN || at + len > buffer.len() {
            break;
        }
        out.push(Message {
            kind: u16::from_ne_bytes([buffer[at + 4], buffer[at + 5]]),
            seq: u32_at(buffer, at + 8),
            payload: buffer[at + NLMSG_HDRLEN..at + len].to_vec(),
        });
        at += align(len);
    }
    out
}

fn u32_at(buffer: &[u8], at: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&buffer[at..at + 4]);
    u32::from_ne_bytes(bytes)
}

/// The attributes after a family struct of `header_len` bytes: (type, data) pairs. Malformed
/// attributes end the list; the kernel's nested-attribute bit is cleared from the type.
pub fn attributes(payload: &[u8], header_len: usize) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = align(header_len);
    while at + 4 <= payload.len() {
        let len = u16::from_ne_bytes([payload[at], payload[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([payload[at + 2], payload[at + 3]]) & 0x3fff;
        if len < 4 || at + len > payload.len() {
            break;
        }
        out.push((kind, &payload[at + 4..at + len]));
        at += align(len);
    }
    out
}

/// The errno of an NLMSG_ERROR message (0 is an acknowledgement).
fn error_code(payload: &[u8]) -> Option<i32> {
    payload
        .get(..4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// A NETLINK_ROUTE socket.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    /// Opens a socket, subscribed to the multicast `groups` (0 for none).
    pub fn open(groups: u32) -> io::Result<Self> {
        // SAFETY: a plain socket(2) call; the result is checked and owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if groups != 0 {
            // SAFETY: sockaddr_nl is plain data; zeroed is a valid value for it.
            let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            address.nl_family = libc::AF_NETLINK as u16;
            address.nl_groups = groups;
            // SAFETY: binds with a live, correctly sized sockaddr_nl.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&address as *const libc::sockaddr_nl).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as u32,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Self { fd, seq: 0 })
    }

    fn send(&mut self, request: &Request, extra_flags: u16) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let message = request.encode(extra_flags, self.seq);
        // The kernel is the default destination of a netlink socket.
        // SAFETY: sends `message.len()` bytes from a live buffer.
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    fn recv(&self) -> io::Result<Vec<Message>> {
        let mut buffer = vec![0u8; RECV_BUFFER];
        // SAFETY: receives into a live buffer of the given length.
        let got = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(parse_messages(&buffer[..got as usize]))
    }

    /// Sends a request and waits for the kernel's acknowledgement.
    pub fn request(&mut self, request: &Request) -> io::Result<()> {
        let seq = self.send(request, NLM_F_ACK)?;
        loop {
            for message in self.recv()? {
                if message.seq != seq || message.kind != NLMSG_ERROR {
                    continue;
                }
                return match error_code(&message.payload) {
                    Some(0) => Ok(()),
                    Some(e) => Err(io::Error::from_raw_os_error(-e)),
                    None => Err(io::Error::other("truncated netlink acknowledgement")),
                };
            }
        }
    }

    /// Sends a dump request and collects every answer up to NLMSG_DONE.
    pub fn dump(&mut self, request: &Request) -> io::Result<Vec<Message>> {
        let seq = self.send(request, NLM_F_DUMP)?;
        let mut out = Vec::new();
        loop {
            for message in self.recv()? {
                if message.seq != seq {
                    continue;
                }
                match message.kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        return match error_code(&message.payload) {
                            Some(e) if e < 0 => Err(io::Error::from_raw_os_error(-e)),
                            _ => Ok(out),
                        }
                    }
                    _ => out.push(message),
                }
            }
        }
    }

    /// Waits up to `timeout` for multicast messages; an empty list when none came.
    pub fn wait(&self, timeout: Duration) -> io::Result<Vec<Message>> {
        let mut poll = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: polls one live pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, millis) };
        match ready {
            r if r < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(Vec::new())
                } else {
                    Err(e)
                }
            }
            0 => Ok(Vec::new()),
            _ => self.recv(),
        }
    }
}

/// Runs `check` after each batch of link events until it returns `Some`, or `timeout` passes.
/// Subscribing before the first check means no change can slip between check and wait.
pub fn wait_for_link<T>(
    timeout: Duration,
    mut check: impl FnMut(&mut Socket) -> io::Result<Option<T>>,
) -> io::Result<Option<T>> {
    let events = Socket::open(GROUP_LINK)?;
    let mut query = Socket::open(0)?;
    let started = Instant::now();
    loop {
        if let Some(found) = check(&mut query)? {
            return Ok(Some(found));
        }
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Ok(None);
        }
        events.wait(left)?;
        // Drain what else arrived; the next check reads the current state anyway.
        while !events.wait(Duration::ZERO)?.is_empty() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_header_and_padded_attributes() {
        let request = Request::new(20, NLM_F_CREATE, &[1, 2, 3, 4, 5, 6, 7, 8]).attr(3, b"eth");
        let bytes = request.encode(NLM_F_ACK, 9);
        // 16 header + 8 family struct + 4 attribute header + 3 data + 1 padding.
        assert_eq!(bytes.len(), 32);
        assert_eq!(u32_at(&bytes, 0), 32);
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), 20);
        assert_eq!(
            u16::from_ne_bytes([bytes[6], bytes[7]]),
            NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK
        );
        assert_eq!(u32_at(&bytes, 8), 9);
        assert_eq!(&bytes[24..26], &7u16.to_ne_bytes());
        assert_eq!(&bytes[28..31], b"eth");
        assert_eq!(bytes[31], 0);
    }

    #[test]
    fn messages_and_attributes_parse_and_stop_at_garbage() {
        let first = Request::new(16, 0, &[0; 16])
            .attr(3, b"eth0\0")
            .encode(0, 1);
        let second = Request::new(NLMSG_DONE, 0, &[0; 4]).encode(0, 1);
        let mut buffer = [first.clone(), second].concat();
        buffer.extend_from_slice(&[0xff; 7]);
        let messages = parse_messages(&buffer);
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].kind, 16);
        assert_eq!(
            attributes(&messages[0].payload, 16),
            vec![(3u16, &b"eth0\0"[..])]
        );
        // An attribute that claims more than is there ends the list.
        let mut broken = messages[0].payload.clone();
        broken[16] = 200;
        assert!(attributes(&broken, 16).is_empty());
        // A length field beyond the buffer ends the messages.
        assert!(parse_messages(&first[..20]).is_empty());
    }
}
