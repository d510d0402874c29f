//! The one rtnetlink request busybox `ip` cannot make: a permanent neighbour entry
//! (RTM_NEWNEIGH). Built by hand on a NETLINK_ROUTE socket; the kernel's ack says whether it took.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const RTM_NEWNEIGH: u16 = 28;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NUD_PERMANENT: u16 = 0x80;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_HDRLEN: usize = 16;

/// The request: nlmsghdr, ndmsg, then the NDA_DST and NDA_LLADDR attributes, each padded to
/// four bytes. Native byte order, as netlink wants.
pub fn new_neighbour_message(ifindex: i32, ip: IpAddr, mac: [u8; 6], seq: u32) -> Vec<u8> {
    let (family, address) = match ip {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    };
    let mut body = Vec::new();
    // struct ndmsg: family, pad1, pad2, ifindex, state, flags, type.
    body.push(family);
    body.extend_from_slice(&[0, 0, 0]);
    body.extend_from_slice(&ifindex.to_ne_bytes());
    body.extend_from_slice(&NUD_PERMANENT.to_ne_bytes());
    body.extend_from_slice(&[0, 0]);
    for (kind, data) in [(NDA_DST, address.as_slice()), (NDA_LLADDR, mac.as_slice())] {
        let len = 4 + data.len();
        body.extend_from_slice(&(len as u16).to_ne_bytes());
        body.extend_from_slice(&kind.to_ne_bytes());
        body.extend_from_slice(data);
        body.resize(body.len() + (4 - len % 4) % 4, 0);
    }
    let mut message = Vec::with_capacity(NLMSG_HDRLEN + body.len());
    message.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
    message.extend_from_slice(&RTM_NEWNEIGH.to_ne_bytes());
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    message.extend_from_slice(&flags.to_ne_bytes());
    message.extend_from_slice(&seq.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(&body);
    message
}

/// Adds (or replaces) a permanent neighbour entry on the interface `ifindex`.
pub fn add_permanent_neighbour(ifindex: i32, ip: IpAddr, mac: [u8; 6]) -> io::Result<()> {
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
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let message = new_neighbour_message(ifindex, ip, mac, 1);
    // The kernel is the default destination of an unbound netlink socket.
    // SAFETY: sends `message.len()` bytes from a live buffer.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            message.as_ptr().cast(),
            message.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = [0u8; 1024];
    // SAFETY: receives into a live buffer of the given length.
    let got = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            reply.as_mut_ptr().cast(),
            reply.len(),
            0,
        )
    };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    ack_status(&reply[..got as usize])
}

/// Reads the NLMSG_ERROR ack: error 0 is success, else a negative errno.
fn ack_status(reply: &[u8]) -> io::Result<()> {
    let field = |at: usize, n: usize| reply.get(at..at + n);
    let kind = field(4, 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let error = field(NLMSG_HDRLEN, 4).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    match (kind, error) {
        (Some(NLMSG_ERROR), Some(0)) => Ok(()),
        (Some(NLMSG_ERROR), Some(e)) => Err(io::Error::from_raw_os_error(-e)),
        _ => Err(io::Error::other("unexpected netlink reply")),
    }
}

/// "aa:bb:cc:dd:ee:ff" as bytes.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_has_the_rtnetlink_layout() {
        let msg = new_neighbour_message(7, "10.0.0.1".parse().expect("ip"), [2, 0, 0, 0, 0, 9], 5);
        // 16 header + 12 ndmsg + 8 (dst: 4 + 4) + 12 (lladdr: 4 + 6, padded to 8).
        assert_eq!(msg.len(), 16 + 12 + 8 + 12);
        assert_eq!(u32::from_ne_bytes(msg[0..4].try_into().expect("4")), 48);
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), RTM_NEWNEIGH);
        assert_eq!(msg[16], libc::AF_INET as u8);
        assert_eq!(i32::from_ne_bytes(msg[20..24].try_into().expect("4")), 7);
        assert_eq!(u16::from_ne_bytes([msg[24], msg[25]]), NUD_PERMANENT);
        assert_eq!(&msg[32..36], &[10, 0, 0, 1]);
        assert_eq!(&msg[40..46], &[2, 0, 0, 0, 0, 9]);
        let v6 = new_neighbour_message(1, "fd00::1".parse().expect("ip"), [0; 6], 1);
        assert_eq!(v6.len(), 16 + 12 + 20 + 12);
    }

    #[test]
    fn acks_and_errors_are_read() {
        let ack = |errno: i32| {
            let mut m = vec![0u8; 36];
            m[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
            m[16..20].copy_from_slice(&errno.to_ne_bytes());
            m
        };
        assert!(ack_status(&ack(0)).is_ok());
        let err = ack_status(&ack(-libc::ENODEV)).expect_err("error");
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
        assert!(ack_status(&[1, 2]).is_err());
    }

    #[test]
    fn macs_are_parsed_strictly() {
        assert_eq!(
            parse_mac("02:42:ac:11:00:02"),
            Some([2, 0x42, 0xac, 0x11, 0, 2])
        );
        for bad in ["", "02:42", "02:42:ac:11:00:02:03", "zz:42:ac:11:00:02"] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}
