//! Packets in descriptor chains laid out as guests lay them out, on a mock queue.

#![allow(clippy::unwrap_used)]

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::header::{op, HOST_CID, TYPE_STREAM};

const DATA: u64 = 0x10_0000;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, 0))
}

fn header(len: usize) -> Header {
    Header {
        src_cid: 3,
        dst_cid: HOST_CID,
        src_port: 5000,
        dst_port: 1025,
        len: len as u32,
        kind: TYPE_STREAM,
        op: op::RW,
        flags: 0,
        buf_alloc: 65536,
        fwd_cnt: 0,
    }
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Lays the header and payload out in pieces of the given sizes, one descriptor each, and
/// reads the packet back through the device.
fn read_split(pieces: &[usize], payload_len: usize) -> Result<(Header, Vec<u8>), String> {
    let mem = memory();
    let queue = MockSplitQueue::new(&mem, 16);
    let mut bytes = header(payload_len).to_bytes().to_vec();
    bytes.extend(payload(payload_len));
    let mut descs = Vec::new();
    let (mut at, mut addr) = (0, DATA);
    for &size in pieces {
        let end = (at + size).min(bytes.len());
        mem.write_slice(&bytes[at..end], GuestAddress(addr))
            .unwrap();
        descs.push(desc(addr, size as u32, 0));
        at = end;
        addr += 0x1_0000;
    }
    let chain = queue.build_desc_chain(&descs).unwrap();
    let mut buf = vec![0u8; MAX_PAYLOAD];
    read_packet(&mem, chain, &mut buf).map(|(h, n)| (h, buf[..n].to_vec()))
}

#[test]
fn a_payload_is_read_from_every_descriptor_of_the_chain() {
    for (pieces, len) in [
        // Header and payload in one buffer (Linux 6.2 and later, small packets).
        (&[HEADER_LEN + 100][..], 100),
        // Header, then the payload in one buffer.
        (&[HEADER_LEN, 4096][..], 4096),
        // Linux 6.12: a payload above 32 KiB in page fragments.
        (&[HEADER_LEN, 32768, 16384, 16384][..], MAX_PAYLOAD),
        (
            &[
                HEADER_LEN, 4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096,
            ][..],
            46 * 1024,
        ),
        // Even the header split in two.
        (&[20, 24, 10][..], 10),
        // No payload.
        (&[HEADER_LEN][..], 0),
    ] {
        let (h, data) = read_split(pieces, len).unwrap_or_else(|e| panic!("{pieces:?}: {e}"));
        assert_eq!(h, header(len));
        assert!(data == payload(len), "{pieces:?}: payload differs");
    }
}

#[test]
fn a_chain_shorter_than_its_header_says_or_too_long_is_refused() {
    let err = read_split(&[HEADER_LEN, 100], 200).unwrap_err();
    assert!(err.contains("payload of 200 bytes"), "{err}");
    let err = read_split(&[HEADER_LEN - 4], 0).unwrap_err();
    assert!(err.contains("header"), "{err}");
    let err = read_split(&[HEADER_LEN, 65536, 8], MAX_PAYLOAD + 8).unwrap_err();
    assert!(err.contains("above"), "{err}");
}

#[test]
fn a_descriptor_outside_guest_memory_is_refused() {
    let mem = memory();
    let queue = MockSplitQueue::new(&mem, 16);
    mem.write_slice(&header(8).to_bytes(), GuestAddress(DATA))
        .unwrap();
    let chain = queue
        .build_desc_chain(&[desc(DATA, HEADER_LEN as u32, 0), desc(8 << 20, 8, 0)])
        .unwrap();
    let mut buf = vec![0u8; MAX_PAYLOAD];
    assert!(read_packet(&mem, chain, &mut buf).is_err());
}

#[test]
fn a_packet_is_written_across_the_receive_buffers() {
    let mem = memory();
    let queue = MockSplitQueue::new(&mem, 16);
    let chain = queue
        .build_desc_chain(&[
            desc(DATA, 30, VRING_DESC_F_WRITE),
            desc(DATA + 0x1_0000, 4096, VRING_DESC_F_WRITE),
        ])
        .unwrap();
    let mut writer = chain.writer(&mem).unwrap();
    assert_eq!(writer.available_bytes(), 4126);
    let data = payload(4000);
    write_packet(&mut writer, &header(4000), &data).unwrap();
    let mut raw = [0u8; HEADER_LEN];
    mem.read_slice(&mut raw[..30], GuestAddress(DATA)).unwrap();
    mem.read_slice(&mut raw[30..], GuestAddress(DATA + 0x1_0000))
        .unwrap();
    assert_eq!(Header::parse(&raw), header(4000));
    let mut back = vec![0u8; 4000];
    mem.read_slice(&mut back, GuestAddress(DATA + 0x1_0000 + 14))
        .unwrap();
    assert!(back == data);
}

#[test]
fn the_configuration_space_holds_the_guest_cid() {
    let dir = std::env::temp_dir().join(format!("hako-vsock-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let muxer = Muxer::new(7, &dir.join("hv.sock")).unwrap();
    let device = VsockDevice::new(7, muxer);
    assert_eq!(device.get_config(0, 8), 7u64.to_le_bytes());
    assert_eq!(device.get_config(4, 4), [0, 0, 0, 0]);
    assert!(device.get_config(6, 4).is_empty());
    assert!(device.get_config(u32::MAX, 2).is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}
