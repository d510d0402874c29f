//! Credit accounting of one connection, with a socket pair for the host side.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};

use super::*;
use crate::header::{HOST_CID, TYPE_STREAM};

fn guest_header(op: u16, buf_alloc: u32, fwd_cnt: u32, len: usize) -> Header {
    Header {
        src_cid: 3,
        dst_cid: HOST_CID,
        src_port: 5000,
        dst_port: 1025,
        len: len as u32,
        kind: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

fn established(buf_alloc: u32) -> (Conn, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let key = Key {
        local_port: 1025,
        peer_port: 5000,
    };
    let mut c = Conn::from_guest(key, ours, &guest_header(op::REQUEST, buf_alloc, 0, 0));
    let mut buf = [0u8; 16];
    assert_eq!(c.next_packet(&mut buf).map(|o| o.op), Some(op::RESPONSE));
    (c, theirs)
}

#[test]
fn the_device_sends_no_more_than_the_guest_has_room_for_and_asks_once_for_more() {
    let (mut c, mut host) = established(10);
    host.write_all(b"0123456789abcdef").unwrap();
    let mut buf = [0u8; 64];
    let out = c.next_packet(&mut buf).unwrap();
    assert_eq!((out.op, out.len), (op::RW, 10));
    assert_eq!(&buf[..10], b"0123456789");
    // No credit left: one request, then silence until the guest answers.
    assert_eq!(
        c.next_packet(&mut buf).map(|o| o.op),
        Some(op::CREDIT_REQUEST)
    );
    assert!(!c.has_work());
    assert_eq!(c.next_packet(&mut buf), None);
    c.on_guest_packet(&guest_header(op::CREDIT_UPDATE, 10, 4, 0), &[]);
    assert!(c.has_work());
    let out = c.next_packet(&mut buf).unwrap();
    assert_eq!((out.op, out.len), (op::RW, 4));
    assert_eq!(&buf[..4], b"abcd");
}

#[test]
fn forwarded_bytes_are_reported_before_the_guest_runs_dry() {
    let (mut c, mut host) = established(BUF_ALLOC);
    let chunk = vec![7u8; MAX_PAYLOAD];
    let mut forwarded = 0;
    let mut sink = vec![0u8; MAX_PAYLOAD];
    while !c.owe_credit_update {
        c.on_guest_packet(&guest_header(op::RW, BUF_ALLOC, 0, chunk.len()), &chunk);
        forwarded += chunk.len();
        let mut read = 0;
        while read < chunk.len() {
            read += host.read(&mut sink[read..]).unwrap();
        }
        assert!(
            forwarded < BUF_ALLOC as usize,
            "no credit update by {forwarded} bytes"
        );
    }
    let mut buf = [0u8; 16];
    let out = c.next_packet(&mut buf).unwrap();
    assert_eq!(out.op, op::CREDIT_UPDATE);
    let h = c.header(3, &out);
    assert_eq!(h.fwd_cnt as usize, forwarded);
    assert_eq!(h.buf_alloc, BUF_ALLOC);
    assert!(!c.has_work());
}

#[test]
fn a_host_connection_waits_for_the_guest_and_greets_the_client_first() {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let key = Key {
        local_port: 1 << 30,
        peer_port: 1024,
    };
    let mut c = Conn::from_host(key, ours);
    let mut buf = [0u8; 16];
    assert_eq!(c.next_packet(&mut buf).map(|o| o.op), Some(op::REQUEST));
    // Data from the client waits until the guest accepted.
    theirs.write_all(b"early").unwrap();
    assert_eq!(c.next_packet(&mut buf), None);
    let mut response = guest_header(op::RESPONSE, 4096, 0, 0);
    response.src_port = 1024;
    c.on_guest_packet(&response, &[]);
    let mut ok = [0u8; 14];
    theirs.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, format!("OK {}\n", 1u32 << 30).as_bytes());
    let out = c.next_packet(&mut buf).unwrap();
    assert_eq!((out.op, &buf[..out.len]), (op::RW, &b"early"[..]));
}

#[test]
fn a_packet_out_of_turn_resets_the_connection() {
    let (mut c, _host) = established(4096);
    c.on_guest_packet(&guest_header(op::REQUEST, 4096, 0, 0), &[]);
    let mut buf = [0u8; 16];
    assert_eq!(c.next_packet(&mut buf).map(|o| o.op), Some(op::RST));
    assert!(c.is_closed());
}

#[test]
fn a_receive_buffer_with_no_room_is_not_mistaken_for_the_hosts_end() {
    let (mut c, mut host) = established(4096);
    host.write_all(b"data").unwrap();
    assert_eq!(c.next_packet(&mut []), None);
    let mut buf = [0u8; 16];
    let out = c.next_packet(&mut buf).unwrap();
    assert_eq!((out.op, &buf[..out.len]), (op::RW, &b"data"[..]));
}
