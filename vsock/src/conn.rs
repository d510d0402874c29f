//! One stream between a guest socket and a host unix socket: its state, the credit each side
//! gives the other, and the bytes in flight.
//!
//! Credit is what keeps both directions bounded without ever dropping a byte. Towards the host,
//! the device advertises `BUF_ALLOC` bytes and reports in `fwd_cnt` how many it has written to
//! the host socket; a guest may have at most `BUF_ALLOC` bytes unforwarded, so the buffer below
//! never grows past it (a guest that sends more is cut off). Towards the guest, the device reads
//! from the host socket only as much as the guest's advertised buffer has room for.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use crate::header::{op, Header, MAX_PAYLOAD, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// The receive buffer the device advertises to the guest for each connection.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Forwarded bytes the guest has not heard of yet that warrant a credit update of their own (the
/// count also rides on every other packet). Below `BUF_ALLOC`, so a guest that has used all its
/// credit always hears once the host has read enough.
const CREDIT_UPDATE_AFTER: u32 = BUF_ALLOC / 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// The host's end: the port a host client was given, or the host port the guest dialled.
    pub local_port: u32,
    /// The guest's end.
    pub peer_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A host client asked for the guest's port: the guest has not answered yet.
    Connecting,
    Established,
    /// Reset, by either side: the connection is to be removed.
    Closed,
}

pub struct Conn {
    pub key: Key,
    stream: UnixStream,
    state: State,
    // Towards the guest.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    credit_requested: bool,
    host_readable: bool,
    host_eof: bool,
    // Towards the host.
    greeting: Vec<u8>,
    to_host: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    fwd_reported: Wrapping<u32>,
    host_writable: bool,
    host_write_closed: bool,
    guest_shutdown: u32,
    // Control packets owed to the guest.
    owe_request: bool,
    owe_response: bool,
    owe_credit_update: bool,
    owe_eof: bool,
    owe_rst: bool,
}

/// A packet the connection wants sent to the guest; `len` payload bytes are in the caller's
/// buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outgoing {
    pub op: u16,
    pub flags: u32,
    pub len: usize,
}

impl Conn {
    fn new(key: Key, stream: UnixStream, state: State) -> Conn {
        Conn {
            key,
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            credit_requested: false,
            host_readable: true,
            host_eof: false,
            greeting: Vec::new(),
            to_host: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            fwd_reported: Wrapping(0),
            host_writable: true,
            host_write_closed: false,
            guest_shutdown: 0,
            owe_request: false,
            owe_response: false,
            owe_credit_update: false,
            owe_eof: false,
            owe_rst: false,
        }
    }

    /// A host client's connection to a guest port: the guest is asked first.
    pub fn from_host(key: Key, stream: UnixStream) -> Conn {
        let mut c = Conn::new(key, stream, State::Connecting);
        c.owe_request = true;
        c
    }

    /// A guest's connection to a host listener, already connected on the host.
    pub fn from_guest(key: Key, stream: UnixStream, request: &Header) -> Conn {
        let mut c = Conn::new(key, stream, State::Established);
        c.take_credit(request);
        c.owe_response = true;
        c
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// The fields of a header this connection sends; also tells the guest `fwd_cnt`.
    pub fn header(&mut self, guest_cid: u64, out: &Outgoing) -> Header {
        self.fwd_reported = self.fwd_cnt;
        self.owe_credit_update = false;
        Header {
            src_cid: crate::header::HOST_CID,
            dst_cid: guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: out.len as u32,
            kind: crate::header::TYPE_STREAM,
            op: out.op,
            flags: out.flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    fn take_credit(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// Bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// A packet the guest sent on this connection. A reset, or a packet that breaks the
    /// protocol, closes it (`is_closed`, after any reset owed to the guest is sent).
    pub fn on_guest_packet(&mut self, h: &Header, data: &[u8]) {
        if self.state == State::Closed {
            return;
        }
        self.take_credit(h);
        match h.op {
            op::RST => self.state = State::Closed,
            op::RESPONSE if self.state == State::Connecting => {
                self.state = State::Established;
                self.greeting = format!("OK {}\n", self.key.local_port).into_bytes();
                self.flush_to_host();
            }
            op::RW if self.state == State::Established => {
                let unforwarded = self.to_host.len() + data.len();
                if self.guest_shutdown & SHUTDOWN_SEND != 0 || unforwarded > BUF_ALLOC as usize {
                    log::warn!(
                        "guest port {} broke the vsock protocol ({} bytes unforwarded, credit {BUF_ALLOC}, shutdown {:#x}): reset",
                        self.key.peer_port,
                        unforwarded,
                        self.guest_shutdown
                    );
                    self.reset();
                    return;
                }
                self.to_host.extend(data);
                self.flush_to_host();
            }
            op::SHUTDOWN if self.state == State::Established => {
                self.guest_shutdown |= h.flags & SHUTDOWN_BOTH;
                self.flush_to_host();
            }
            op::CREDIT_REQUEST => self.owe_credit_update = true,
            // The credit was taken above; nothing else to do.
            op::CREDIT_UPDATE => {}
            // A request on a live connection, a response or data out of turn, an unknown op.
            _ => {
                log::warn!(
                    "guest port {}: unexpected vsock op {} in state {:?}: reset",
                    self.key.peer_port,
                    h.op,
                    self.state
                );
                self.reset();
            }
        }
    }

    /// Ends the connection with a reset to the guest.
    fn reset(&mut self) {
        self.owe_rst = true;
        self.state = State::Closed;
    }

    /// The host socket became readable (or hung up).
    pub fn host_readable(&mut self) {
        self.host_readable = true;
    }

    /// The host socket became writable (or hung up).
    pub fn host_writable(&mut self) {
        self.host_writable = true;
        self.flush_to_host();
    }

    /// Writes what is buffered for the host until the socket would block.
    fn flush_to_host(&mut self) {
        if self.state == State::Closed {
            return;
        }
        while self.host_writable && !self.greeting.is_empty() {
            match self.stream.write(&self.greeting) {
                Ok(n) => {
                    self.greeting.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.host_writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.reset();
                    return;
                }
            }
        }
        while self.host_writable && self.greeting.is_empty() && !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.host_writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The host client is gone: the guest's data cannot be delivered.
                Err(_) => {
                    self.reset();
                    return;
                }
            }
        }
        if (self.fwd_cnt - self.fwd_reported).0 >= CREDIT_UPDATE_AFTER {
            self.owe_credit_update = true;
        }
        if self.to_host.is_empty() && self.greeting.is_empty() {
            if self.guest_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_closed {
                self.host_write_closed = true;
                let _ = self.stream.shutdown(Shutdown::Write);
            }
            // The guest closed its socket, or both directions have ended: the connection is
            // over once everything reached the host.
            let both_ended = self.guest_shutdown & SHUTDOWN_SEND != 0 && self.host_eof;
            if self.guest_shutdown == SHUTDOWN_BOTH || both_ended {
                self.reset();
            }
        }
    }

    /// Whether `next_packet` has something to send (given room for a payload).
    pub fn has_work(&self) -> bool {
        if self.owe_rst {
            return true;
        }
        if self.state == State::Closed {
            return false;
        }
        self.owe_request
            || self.owe_response
            || self.owe_eof
            || self.owe_credit_update
            || (self.wants_to_read() && (self.peer_credit() > 0 || !self.credit_requested))
    }

    fn wants_to_read(&self) -> bool {
        self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && self.guest_shutdown & SHUTDOWN_RCV == 0
    }

    /// Whether the connection is over and can be removed (nothing more owed to the guest).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed && !self.owe_rst
    }

    /// The next packet for the guest. Data is read from the host into `buf` (at most its length).
    pub fn next_packet(&mut self, buf: &mut [u8]) -> Option<Outgoing> {
        let control = |op, flags| Some(Outgoing { op, flags, len: 0 });
        if self.owe_rst {
            self.owe_rst = false;
            self.state = State::Closed;
            return control(op::RST, 0);
        }
        if self.state == State::Closed {
            return None;
        }
        if self.owe_request {
            self.owe_request = false;
            return control(op::REQUEST, 0);
        }
        if self.owe_response {
            self.owe_response = false;
            return control(op::RESPONSE, 0);
        }
        if self.wants_to_read() {
            let credit = self.peer_credit() as usize;
            if credit == 0 {
                if !self.credit_requested {
                    self.credit_requested = true;
                    return control(op::CREDIT_REQUEST, 0);
                }
            } else if !buf.is_empty() {
                // (A receive buffer with no room for data: a read of nothing would look like
                // the host's end of stream.)
                let want = credit.min(buf.len()).min(MAX_PAYLOAD);
                loop {
                    match self.stream.read(&mut buf[..want]) {
                        Ok(0) => {
                            self.host_eof = true;
                            self.owe_eof = true;
                            break;
                        }
                        Ok(n) => {
                            self.rx_cnt += Wrapping(n as u32);
                            return Some(Outgoing {
                                op: op::RW,
                                flags: 0,
                                len: n,
                            });
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.host_readable = false;
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => {
                            self.state = State::Closed;
                            return control(op::RST, 0);
                        }
                    }
                }
            }
        }
        if self.owe_eof {
            self.owe_eof = false;
            // The guest may already have stopped sending: then the connection is over.
            self.flush_to_host();
            if self.owe_rst {
                self.owe_rst = false;
                self.state = State::Closed;
                return control(op::RST, 0);
            }
            return control(op::SHUTDOWN, SHUTDOWN_SEND);
        }
        if self.owe_credit_update {
            return control(op::CREDIT_UPDATE, 0);
        }
        None
    }

    /// Bytes from the guest waiting for the host to read them.
    #[cfg(test)]
    pub fn unforwarded(&self) -> usize {
        self.to_host.len()
    }
}

#[cfg(test)]
mod tests;
