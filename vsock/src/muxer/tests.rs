//! The muxer against a simulated guest driver that keeps the credit rules as Linux does, and
//! real unix sockets on the host side.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::*;
use crate::conn::BUF_ALLOC;
use crate::header::{SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND};

const CID: u64 = 3;
/// A Linux guest's receive buffers: 4 KiB with the header.
const RX_BUFFER: usize = 4096 - HEADER_LEN;
use crate::header::{HEADER_LEN, MAX_PAYLOAD};

/// A scratch directory for one test's sockets, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "hako-vsock-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn uds(&self) -> PathBuf {
        self.0.join("hv.sock")
    }

    /// A host service the guest can dial on `port`.
    fn host_listener(&self, port: u32) -> UnixListener {
        UnixListener::bind(format!("{}_{port}", self.uds().display())).unwrap()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The guest's side of one connection.
#[derive(Default, Debug)]
struct GConn {
    established: bool,
    reset: bool,
    host_shutdown: u32,
    received: Vec<u8>,
    /// The guest's receive buffer and how much of it the application has read.
    buf_alloc: u32,
    fwd_cnt: u32,
    consume: bool,
    /// The device's credit as last heard.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    last_credit_sent: u32,
}

/// A guest driver: ports it listens on, its connections keyed by (guest port, host port).
struct Guest {
    m: Muxer,
    conns: HashMap<(u32, u32), GConn>,
    listening: Vec<u32>,
    /// Guest ports the host asked for that nobody listens on.
    refused: Vec<u32>,
    next_port: u32,
    buf: Vec<u8>,
    guest_buf_alloc: u32,
}

impl Guest {
    fn new(dir: &Dir) -> Guest {
        Guest {
            m: Muxer::new(CID, &dir.uds()).unwrap(),
            conns: HashMap::new(),
            listening: Vec::new(),
            refused: Vec::new(),
            next_port: 50000,
            buf: vec![0; RX_BUFFER],
            guest_buf_alloc: 256 * 1024,
        }
    }

    fn header(&self, key: (u32, u32), op: u16, len: usize) -> Header {
        let c = self.conns.get(&key);
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: key.0,
            dst_port: key.1,
            len: len as u32,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: c.map_or(self.guest_buf_alloc, |c| c.buf_alloc),
            fwd_cnt: c.map_or(0, |c| c.fwd_cnt),
        }
    }

    fn send(&mut self, key: (u32, u32), op: u16, data: &[u8]) {
        let h = self.header(key, op, data.len());
        if let Some(c) = self.conns.get_mut(&key) {
            c.last_credit_sent = c.fwd_cnt;
        }
        self.m.guest_sent(&h, data);
    }

    fn send_flags(&mut self, key: (u32, u32), op: u16, flags: u32) {
        let mut h = self.header(key, op, 0);
        h.flags = flags;
        self.m.guest_sent(&h, &[]);
    }

    /// Dials a host port; returns the connection's key once the device answered.
    fn connect(&mut self, host_port: u32) -> (u32, u32) {
        let key = (self.next_port, host_port);
        self.next_port += 1;
        self.conns.insert(
            key,
            GConn {
                buf_alloc: self.guest_buf_alloc,
                consume: true,
                ..GConn::default()
            },
        );
        self.send(key, op::REQUEST, &[]);
        self.pump_until(|g| g.conns[&key].established || g.conns[&key].reset);
        key
    }

    /// Delivers everything the device has for the guest and takes in host events; true if
    /// anything happened.
    fn pump(&mut self) -> bool {
        self.m.poll_host();
        let mut any = false;
        let mut buf = std::mem::take(&mut self.buf);
        while let Some((h, len)) = self.m.next_for_guest(&mut buf) {
            any = true;
            self.deliver(h, &buf[..len]);
        }
        self.buf = buf;
        any
    }

    /// Pumps until `done`, waiting on the muxer's epoll set when idle; a stall fails the test.
    fn pump_until(&mut self, done: impl Fn(&Guest) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done(self) {
            if !self.pump() {
                assert!(Instant::now() < deadline, "stalled: {:?}", self.conns);
                let mut pfd = libc::pollfd {
                    fd: self.m.epoll_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: poll on one descriptor we own.
                unsafe { libc::poll(&mut pfd, 1, 100) };
            }
        }
    }

    fn deliver(&mut self, h: Header, data: &[u8]) {
        assert_eq!(h.src_cid, HOST_CID);
        assert_eq!(h.dst_cid, CID);
        assert_eq!(h.len as usize, data.len());
        let key = (h.dst_port, h.src_port);
        if h.op == op::REQUEST {
            if self.listening.contains(&h.dst_port) {
                self.conns.insert(
                    key,
                    GConn {
                        established: true,
                        buf_alloc: self.guest_buf_alloc,
                        consume: true,
                        peer_buf_alloc: h.buf_alloc,
                        peer_fwd_cnt: h.fwd_cnt,
                        ..GConn::default()
                    },
                );
                self.send(key, op::RESPONSE, &[]);
            } else {
                self.refused.push(h.dst_port);
                self.send(key, op::RST, &[]);
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            assert_eq!(h.op, op::RST, "a packet for no connection: {h:?}");
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        let mut reply = None;
        match h.op {
            op::RESPONSE => c.established = true,
            op::RST => c.reset = true,
            op::SHUTDOWN => c.host_shutdown |= h.flags,
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => reply = Some(op::CREDIT_UPDATE),
            op::RW => {
                let unread = c.received.len() as u32 - c.fwd_cnt;
                assert!(
                    unread + data.len() as u32 <= c.buf_alloc,
                    "the device overran the guest's credit: {unread} + {} > {}",
                    data.len(),
                    c.buf_alloc
                );
                c.received.extend_from_slice(data);
                if c.consume {
                    c.fwd_cnt = c.received.len() as u32;
                    // As Linux: tell the peer once free space as it last heard is low.
                    let free = c.buf_alloc - (c.fwd_cnt - c.last_credit_sent).min(c.buf_alloc);
                    if free < 64 * 1024 {
                        reply = Some(op::CREDIT_UPDATE);
                    }
                }
            }
            other => panic!("unexpected op {other}"),
        }
        if let Some(op) = reply {
            self.send(key, op, &[]);
        }
    }

    /// Writes `data` to the host, within the device's credit.
    fn write(&mut self, key: (u32, u32), data: &[u8]) {
        let mut sent = 0;
        while sent < data.len() {
            let c = &self.conns[&key];
            assert!(!c.reset, "the connection was reset");
            let credit = c.peer_buf_alloc - (c.tx_cnt - c.peer_fwd_cnt);
            let n = (credit as usize).min(MAX_PAYLOAD).min(data.len() - sent);
            if n == 0 {
                let before = (c.peer_fwd_cnt, c.reset);
                self.pump_until(|g| (g.conns[&key].peer_fwd_cnt, g.conns[&key].reset) != before);
                continue;
            }
            self.send(key, op::RW, &data[sent..sent + n]);
            self.conns.get_mut(&key).unwrap().tx_cnt += n as u32;
            sent += n;
            self.pump();
        }
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
}

/// Reads a host stream to its end in a thread.
fn read_to_end(mut s: UnixStream) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        out
    })
}

const SIZES: [usize; 8] = [
    0,
    1,
    4095,
    4096,
    32 * 1024,
    64 * 1024,
    1024 * 1024,
    64 * 1024 * 1024,
];

#[test]
fn guest_to_host_streams_arrive_whole_at_every_size() {
    let dir = Dir::new();
    let listener = dir.host_listener(1025);
    let mut g = Guest::new(&dir);
    for size in SIZES {
        let key = g.connect(1025);
        assert!(g.conns[&key].established, "{size}: refused");
        let (host, _) = listener.accept().unwrap();
        let reader = read_to_end(host);
        let data = pattern(size);
        g.write(key, &data);
        g.send_flags(key, op::SHUTDOWN, SHUTDOWN_BOTH);
        g.pump_until(|g| g.conns[&key].reset);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), size);
        assert!(got == data, "{size}: the bytes differ");
        assert_eq!(
            g.m.connections(),
            0,
            "{size}: the connection outlived its reset"
        );
    }
}

#[test]
fn host_to_guest_streams_arrive_whole_at_every_size_within_the_guests_credit() {
    let dir = Dir::new();
    let mut g = Guest::new(&dir);
    // A small guest buffer, so the device must wait for credit many times.
    g.guest_buf_alloc = 64 * 1024;
    g.listening.push(1024);
    for size in SIZES {
        let mut host = UnixStream::connect(dir.uds()).unwrap();
        host.write_all(b"CONNECT 1024\n").unwrap();
        g.pump_until(|g| g.conns.values().any(|c| c.established));
        let key = *g.conns.keys().next().unwrap();
        let mut ok = String::new();
        let mut byte = [0u8];
        while !ok.ends_with('\n') {
            host.read_exact(&mut byte).unwrap();
            ok.push(byte[0] as char);
        }
        assert_eq!(ok, format!("OK {}\n", key.1));
        let data = pattern(size);
        let writer = {
            let data = data.clone();
            let mut host = host.try_clone().unwrap();
            std::thread::spawn(move || {
                host.write_all(&data).unwrap();
                host.shutdown(std::net::Shutdown::Write).unwrap();
            })
        };
        g.pump_until(|g| g.conns[&key].host_shutdown & SHUTDOWN_SEND != 0);
        writer.join().unwrap();
        assert_eq!(g.conns[&key].received.len(), size);
        assert!(g.conns[&key].received == data, "{size}: the bytes differ");
        g.send_flags(key, op::SHUTDOWN, SHUTDOWN_BOTH);
        g.pump_until(|g| g.conns[&key].reset);
        g.conns.remove(&key);
    }
    assert_eq!(g.m.connections(), 0);
}

#[test]
fn a_host_that_stops_reading_holds_the_guest_to_the_credit_and_loses_nothing() {
    let dir = Dir::new();
    let listener = dir.host_listener(1025);
    let mut g = Guest::new(&dir);
    let key = g.connect(1025);
    let (host, _) = listener.accept().unwrap();
    // The host socket's own buffer plus the device's credit is all the guest may get ahead.
    let data = pattern(8 * 1024 * 1024);
    let mut sent = 0;
    loop {
        let c = &g.conns[&key];
        let credit = c.peer_buf_alloc - (c.tx_cnt - c.peer_fwd_cnt);
        if credit == 0 {
            // Whatever the device could forward, it has: nothing more is coming.
            if !g.pump() {
                break;
            }
            continue;
        }
        let n = (credit as usize).min(MAX_PAYLOAD).min(data.len() - sent);
        g.send(key, op::RW, &data[sent..sent + n]);
        g.conns.get_mut(&key).unwrap().tx_cnt += n as u32;
        sent += n;
        g.pump();
        let unforwarded = g.m.conns[&Key {
            local_port: 1025,
            peer_port: key.0,
        }]
            .unforwarded();
        assert!(
            unforwarded <= BUF_ALLOC as usize,
            "{unforwarded} bytes held"
        );
    }
    assert!(sent < data.len(), "the guest was never held back");
    // A second connection is not held back by the first.
    let other = g.connect(1025);
    let (other_host, _) = listener.accept().unwrap();
    let other_reader = read_to_end(other_host);
    g.write(other, b"still flowing");
    g.send_flags(other, op::SHUTDOWN, SHUTDOWN_BOTH);
    g.pump_until(|g| g.conns[&other].reset);
    assert_eq!(other_reader.join().unwrap(), b"still flowing");
    // The host reads again: the rest flows and arrives whole.
    host.set_nonblocking(false).unwrap();
    let reader = read_to_end(host);
    g.write(key, &data[sent..]);
    g.send_flags(key, op::SHUTDOWN, SHUTDOWN_BOTH);
    g.pump_until(|g| g.conns[&key].reset);
    assert!(reader.join().unwrap() == data);
}

#[test]
fn a_guest_that_ignores_the_credit_is_reset() {
    let dir = Dir::new();
    let listener = dir.host_listener(1025);
    let mut g = Guest::new(&dir);
    let key = g.connect(1025);
    let (host, _) = listener.accept().unwrap();
    // The host reads nothing; the guest sends past the credit anyway.
    let chunk = pattern(MAX_PAYLOAD);
    let mut sent = 0usize;
    while !g.conns[&key].reset {
        g.send(key, op::RW, &chunk);
        sent += chunk.len();
        g.pump();
        assert!(sent <= 64 * 1024 * 1024, "never reset");
    }
    assert_eq!(g.m.connections(), 0);
    // The host sees the stream end, after at most what the credit and its socket allow.
    let got = read_to_end(host).join().unwrap();
    assert!(got.len() < sent);
}

#[test]
fn refusals_for_unknown_ports_and_connections_and_foreign_packets() {
    let dir = Dir::new();
    let mut g = Guest::new(&dir);
    // No listener on host port 7.
    let key = g.connect(7);
    assert!(g.conns[&key].reset && !g.conns[&key].established);
    // Data on a connection that does not exist: reset.
    let ghost = (40000, 1025);
    g.conns.insert(ghost, GConn::default());
    g.send(ghost, op::RW, b"x");
    g.pump();
    assert!(g.conns[&ghost].reset);
    // A packet from another cid, or to another cid than the host: dropped without a word.
    let mut h = g.header((40001, 1025), op::REQUEST, 0);
    h.src_cid = 4;
    g.m.guest_sent(&h, &[]);
    h.src_cid = CID;
    h.dst_cid = 5;
    g.m.guest_sent(&h, &[]);
    assert!(!g.pump());
    // A seqpacket request: refused.
    let mut h = g.header((40002, 1025), op::REQUEST, 0);
    h.kind = 2;
    g.conns.insert((40002, 1025), GConn::default());
    g.m.guest_sent(&h, &[]);
    g.pump();
    assert!(g.conns[&(40002, 1025)].reset);
    assert_eq!(g.m.connections(), 0);
}

#[test]
fn half_close_in_each_direction() {
    let dir = Dir::new();
    let listener = dir.host_listener(1025);
    let mut g = Guest::new(&dir);
    let key = g.connect(1025);
    let (mut host, _) = listener.accept().unwrap();
    // The guest is done sending: the host reads EOF, and can still answer.
    g.write(key, b"request");
    g.send_flags(key, op::SHUTDOWN, SHUTDOWN_SEND);
    g.pump();
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"request");
    host.write_all(b"response").unwrap();
    g.pump_until(|g| g.conns[&key].received == b"response");
    assert!(!g.conns[&key].reset);
    // The host is done too: the guest hears it, and the connection is over.
    drop(host);
    g.pump_until(|g| g.conns[&key].reset);
    assert_eq!(g.m.connections(), 0);

    // The other way: the host closes first; the guest can still send until it closes.
    let key = g.connect(1025);
    let (host, _) = listener.accept().unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    g.pump_until(|g| g.conns[&key].host_shutdown == SHUTDOWN_SEND);
    let reader = read_to_end(host);
    g.write(key, b"late");
    g.send_flags(key, op::SHUTDOWN, SHUTDOWN_SEND);
    g.pump_until(|g| g.conns[&key].reset);
    assert_eq!(reader.join().unwrap(), b"late");
}

#[test]
fn a_guest_that_stops_receiving_gets_no_more_data() {
    let dir = Dir::new();
    let listener = dir.host_listener(1025);
    let mut g = Guest::new(&dir);
    let key = g.connect(1025);
    let (mut host, _) = listener.accept().unwrap();
    g.send_flags(key, op::SHUTDOWN, SHUTDOWN_RCV);
    host.write_all(b"unwanted").unwrap();
    g.pump();
    assert!(g.conns[&key].received.is_empty());
    g.send(key, op::RST, &[]);
    g.pump();
    assert_eq!(g.m.connections(), 0);
}

#[test]
fn host_clients_must_greet_properly() {
    let dir = Dir::new();
    let mut g = Guest::new(&dir);
    g.listening.push(1024);
    for bad in [
        &b"HELLO 1024\n"[..],
        b"CONNECT x\n",
        b"CONNECT 99999999999\n",
        &[b'A'; 40],
    ] {
        let mut host = UnixStream::connect(dir.uds()).unwrap();
        host.write_all(bad).unwrap();
        g.pump();
        // Hung up on, unanswered (reset when the bad line was left unread).
        let mut rest = Vec::new();
        match host.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "{bad:?}: answered {rest:?}"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{bad:?}"),
        }
    }
    // A greeting in pieces, then the guest refuses the port.
    let mut host = UnixStream::connect(dir.uds()).unwrap();
    host.write_all(b"conn").unwrap();
    g.pump();
    host.write_all(b"ect 2000\n").unwrap();
    let mut rest = Vec::new();
    g.pump_until(|g| g.refused.contains(&2000));
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "answered {rest:?}");
    assert_eq!(g.m.connections(), 0);
}

#[test]
fn connections_are_bounded() {
    let dir = Dir::new();
    let listener = dir.host_listener(1025);
    listener.set_nonblocking(true).unwrap();
    let mut g = Guest::new(&dir);
    let mut held = Vec::new();
    for _ in 0..MAX_CONNS {
        let key = g.connect(1025);
        assert!(g.conns[&key].established);
        held.push(listener.accept().unwrap());
    }
    let refused = g.connect(1025);
    assert!(g.conns[&refused].reset);
    assert_eq!(g.m.connections(), MAX_CONNS);
    g.m.reset();
    assert_eq!(g.m.connections(), 0);
}
