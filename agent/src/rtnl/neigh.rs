//! Permanent neighbour (ARP/NDP) entries, as a network plugin sets them on the pod's interface.

use std::io;
use std::net::IpAddr;

use super::addr::{family, octets};
use super::{Request, Socket, NLM_F_CREATE, NLM_F_REPLACE};

const RTM_NEWNEIGH: u16 = 28;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NUD_PERMANENT: u16 = 0x80;
/// `struct ndmsg`: family, 3 pad bytes, ifindex, state, flags, type.
const NDMSG_LEN: usize = 12;

pub fn request(index: i32, ip: IpAddr, mac: [u8; 6]) -> Request {
    let mut header = [0u8; NDMSG_LEN];
    header[0] = family(&ip);
    header[4..8].copy_from_slice(&index.to_ne_bytes());
    header[8..10].copy_from_slice(&NUD_PERMANENT.to_ne_bytes());
    Request::new(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, &header)
        .attr(NDA_DST, &octets(&ip))
        .attr(NDA_LLADDR, &mac)
}

/// Adds (or replaces) a permanent neighbour entry on the link `index`.
pub fn add_permanent(socket: &mut Socket, index: i32, ip: IpAddr, mac: [u8; 6]) -> io::Result<()> {
    socket.request(&request(index, ip, mac))
}

/// "aa:bb:cc:dd:ee:ff" as bytes.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_has_the_rtnetlink_layout() {
        let msg = request(7, "10.0.0.1".parse().expect("ip"), [2, 0, 0, 0, 0, 9]).encode(0, 5);
        // 16 header + 12 ndmsg + 8 (dst: 4 + 4) + 12 (lladdr: 4 + 6, padded to 8).
        assert_eq!(msg.len(), 16 + 12 + 8 + 12);
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), RTM_NEWNEIGH);
        assert_eq!(msg[16], libc::AF_INET as u8);
        assert_eq!(i32::from_ne_bytes([msg[20], msg[21], msg[22], msg[23]]), 7);
        assert_eq!(u16::from_ne_bytes([msg[24], msg[25]]), NUD_PERMANENT);
        assert_eq!(&msg[32..36], &[10, 0, 0, 1]);
        assert_eq!(&msg[40..46], &[2, 0, 0, 0, 0, 9]);
        let v6 = request(1, "fd00::1".parse().expect("ip"), [0; 6]).encode(0, 1);
        assert_eq!(v6.len(), 16 + 12 + 20 + 12);
    }

    #[test]
    fn macs_are_parsed_strictly() {
        assert_eq!(
            parse_mac("02:42:ac:11:00:02"),
            Some([2, 0x42, 0xac, 0x11, 0, 2])
        );
        for bad in [
            "",
            "02:42",
            "02:42:ac:11:00:02:03",
            "zz:42:ac:11:00:02",
            "2:42:ac:11:00:2",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}
