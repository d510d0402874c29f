//! Every connection of one guest, and the host's side of them: a unix listener that host
//! clients dial (`CONNECT <port>\n`, answered `OK <port>\n` once the guest accepts), host
//! listeners the guest dials (`<uds_path>_<port>`), and one epoll set, edge-triggered, over all
//! their sockets. The device asks it for the next packet whenever the guest has a receive
//! buffer free; connections take turns.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::conn::{Conn, Key};
use crate::header::{op, Header, HOST_CID, TYPE_STREAM};

/// Connections at once; a guest asking for more is refused (reset).
pub const MAX_CONNS: usize = 128;
/// Host clients that have connected but not yet said which port they want.
const MAX_GREETINGS: usize = 16;
/// The longest `CONNECT <port>\n` line.
const MAX_GREETING: usize = 32;
/// Resets for unknown connections waiting for a receive buffer; more are dropped (the guest's
/// own timeout then ends its socket).
const MAX_ORPHAN_RSTS: usize = 256;
/// Where the ports of host clients' connections start: far from any port the host listens on.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("cannot listen on {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    #[error("cannot create the epoll set: {0}")]
    Epoll(io::Error),
}

/// A host client that has connected and not yet named the guest port.
struct Greeting {
    stream: UnixStream,
}

enum Slot {
    Listener,
    Greeting,
    Conn(Key),
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    /// What each registered descriptor is.
    slots: HashMap<RawFd, Slot>,
    greetings: HashMap<RawFd, Greeting>,
    conns: HashMap<Key, Conn>,
    /// Connections with a packet to send, in turn, each at most once.
    ready: VecDeque<Key>,
    queued: HashSet<Key>,
    orphan_rsts: VecDeque<Header>,
    local_ports: HashSet<u32>,
    next_local_port: u32,
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Muxer, MuxerError> {
        let _ = std::fs::remove_file(uds_path);
        let listen_err = |source| MuxerError::Listen {
            path: uds_path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        let mut m = Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            slots: HashMap::new(),
            greetings: HashMap::new(),
            conns: HashMap::new(),
            ready: VecDeque::new(),
            queued: HashSet::new(),
            orphan_rsts: VecDeque::new(),
            local_ports: HashSet::new(),
            next_local_port: FIRST_LOCAL_PORT,
        };
        let fd = m.listener.as_raw_fd();
        m.watch(fd, Slot::Listener).map_err(MuxerError::Epoll)?;
        Ok(m)
    }

    /// Readable when a host socket has news: then call `poll_host`.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn watch(&mut self, fd: RawFd, slot: Slot) -> io::Result<()> {
        let events = EventSet::IN
            | EventSet::OUT
            | EventSet::READ_HANG_UP
            | EventSet::HANG_UP
            | EventSet::ERROR
            | EventSet::EDGE_TRIGGERED;
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, fd as u64),
        )?;
        self.slots.insert(fd, slot);
        Ok(())
    }

    fn unwatch(&mut self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.slots.remove(&fd);
    }

    pub fn has_work(&self) -> bool {
        !self.orphan_rsts.is_empty() || !self.ready.is_empty()
    }

    /// Connections open now.
    #[cfg(test)]
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Drops every connection: the guest's driver was reset.
    pub fn reset(&mut self) {
        let fds: Vec<RawFd> = self
            .slots
            .iter()
            .filter(|(_, s)| !matches!(s, Slot::Listener))
            .map(|(fd, _)| *fd)
            .collect();
        for fd in fds {
            self.unwatch(fd);
        }
        self.greetings.clear();
        self.conns.clear();
        self.ready.clear();
        self.queued.clear();
        self.orphan_rsts.clear();
        self.local_ports.clear();
    }

    /// A packet the guest sent.
    pub fn guest_sent(&mut self, h: &Header, data: &[u8]) {
        log::trace!("from guest: {h:?}");
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            log::debug!(
                "dropping a packet from cid {} to cid {}",
                h.src_cid,
                h.dst_cid
            );
            return;
        }
        let key = Key {
            local_port: h.dst_port,
            peer_port: h.src_port,
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.on_guest_packet(h, data);
            self.settle(key);
            return;
        }
        match h.op {
            op::REQUEST if h.kind == TYPE_STREAM => self.guest_connects(key, h),
            // A reset of something already gone needs no answer.
            op::RST => {}
            _ => self.orphan_rst(h),
        }
    }

    fn guest_connects(&mut self, key: Key, h: &Header) {
        if self.conns.len() >= MAX_CONNS {
            log::warn!(
                "guest port {} asked for host port {}: {MAX_CONNS} connections already open",
                key.peer_port,
                key.local_port
            );
            self.orphan_rst(h);
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), key.local_port);
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                let fd = stream.as_raw_fd();
                let conn = Conn::from_guest(key, stream, h);
                if self.watch(fd, Slot::Conn(key)).is_err() {
                    self.orphan_rst(h);
                    return;
                }
                self.conns.insert(key, conn);
                self.settle(key);
            }
            Err(e) => {
                log::debug!("guest asked for host port {}: {path}: {e}", key.local_port);
                self.orphan_rst(h);
            }
        }
    }

    fn orphan_rst(&mut self, h: &Header) {
        if self.orphan_rsts.len() >= MAX_ORPHAN_RSTS {
            return;
        }
        self.orphan_rsts.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            kind: TYPE_STREAM,
            op: op::RST,
            ..Header::default()
        });
    }

    /// After anything happened to a connection: remove it if it is over, or queue it if it
    /// has something to send.
    fn settle(&mut self, key: Key) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        if conn.is_closed() {
            let fd = conn.stream().as_raw_fd();
            self.unwatch(fd);
            self.conns.remove(&key);
            self.local_ports.remove(&key.local_port);
            self.queued.remove(&key);
        } else if conn.has_work() && self.queued.insert(key) {
            self.ready.push_back(key);
        }
    }

    /// The next packet for the guest, with its payload (if any) in `buf`.
    pub fn next_for_guest(&mut self, buf: &mut [u8]) -> Option<(Header, usize)> {
        if let Some(h) = self.orphan_rsts.pop_front() {
            return Some((h, 0));
        }
        while let Some(key) = self.ready.pop_front() {
            self.queued.remove(&key);
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let out = conn.next_packet(buf);
            let packet = out.map(|out| (conn.header(self.guest_cid, &out), out.len));
            log::trace!("to guest: {packet:?}");
            self.settle(key);
            if packet.is_some() {
                return packet;
            }
        }
        None
    }

    /// Takes in whatever happened on the host's sockets since the last call.
    pub fn poll_host(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("epoll_wait: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                self.host_event(event.data() as RawFd, event.event_set());
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn host_event(&mut self, fd: RawFd, set: EventSet) {
        match self.slots.get(&fd) {
            Some(Slot::Listener) => self.accept_all(),
            Some(Slot::Greeting) => self.read_greeting(fd),
            Some(Slot::Conn(key)) => {
                let key = *key;
                let hung_up = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
                if let Some(conn) = self.conns.get_mut(&key) {
                    if hung_up || set.intersects(EventSet::IN | EventSet::READ_HANG_UP) {
                        conn.host_readable();
                    }
                    if hung_up || set.contains(EventSet::OUT) {
                        conn.host_writable();
                    }
                }
                self.settle(key);
            }
            None => {}
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.greetings.len() >= MAX_GREETINGS
                        || self.conns.len() >= MAX_CONNS
                        || stream.set_nonblocking(true).is_err()
                    {
                        log::warn!("refusing a host client: too many connections");
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if self.watch(fd, Slot::Greeting).is_ok() {
                        self.greetings.insert(fd, Greeting { stream });
                        // Its line may be there already; with edge-triggered events, look now.
                        self.read_greeting(fd);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        log::warn!("accepting a host client: {e}");
                    }
                    return;
                }
            }
        }
    }

    /// Reads a host client's `CONNECT <port>\n` once it is all there, and nothing after it.
    fn read_greeting(&mut self, fd: RawFd) {
        let Some(g) = self.greetings.get(&fd) else {
            return;
        };
        let mut line = [0u8; MAX_GREETING];
        // SAFETY: recv into a buffer we own, of the length given; MSG_PEEK leaves the bytes.
        let n = unsafe {
            libc::recv(
                fd,
                line.as_mut_ptr().cast(),
                line.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                return;
            }
            self.drop_greeting(fd);
            return;
        }
        let n = n as usize;
        let Some(end) = line[..n].iter().position(|b| *b == b'\n') else {
            if n == 0 || n == line.len() {
                self.drop_greeting(fd);
            }
            return;
        };
        let port = parse_connect(&line[..end]);
        let mut consumed = vec![0u8; end + 1];
        let read_ok = (&g.stream).read_exact(&mut consumed).is_ok();
        let Some(port) = port.filter(|_| read_ok) else {
            log::warn!(
                "a host client sent {:?}, not CONNECT <port>",
                String::from_utf8_lossy(&line[..end])
            );
            self.drop_greeting(fd);
            return;
        };
        let Some(g) = self.greetings.remove(&fd) else {
            return;
        };
        let local_port = self.allocate_local_port();
        let key = Key {
            local_port,
            peer_port: port,
        };
        self.slots.insert(fd, Slot::Conn(key));
        self.local_ports.insert(local_port);
        self.conns.insert(key, Conn::from_host(key, g.stream));
        self.settle(key);
    }

    fn drop_greeting(&mut self, fd: RawFd) {
        self.unwatch(fd);
        self.greetings.remove(&fd);
    }

    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.local_ports.contains(&port) {
                return port;
            }
        }
    }
}

/// `CONNECT <port>` (any case), the port a decimal u32.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let (verb, port) = line.trim_end_matches('\r').split_once(' ')?;
    if !verb.eq_ignore_ascii_case("connect") {
        return None;
    }
    port.parse().ok()
}

/// Connects without waiting: a host listener whose backlog is full refuses, rather than
/// stalling every other connection of the guest.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: a plain socket(2) call; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: addr is a valid sockaddr_un and len does not exceed its size.
    let rc = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

#[cfg(test)]
mod tests;
