//! Links: list them, bring them up or down, set the MTU and the name.

use std::io;

use super::{attributes, Request, Socket};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
/// `struct ifinfomsg`: family, pad, type, index, flags, change.
const IFINFOMSG_LEN: usize = 16;
const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;
const IFF_UP: u32 = 0x1;

/// A link as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: i32,
    pub name: String,
    /// Lower-case `aa:bb:cc:dd:ee:ff`; empty for links without one.
    pub mac: String,
    pub mtu: u32,
    pub up: bool,
    pub ethernet: bool,
    pub loopback: bool,
}

fn ifinfomsg(index: i32, flags: u32, change: u32) -> [u8; IFINFOMSG_LEN] {
    let mut header = [0u8; IFINFOMSG_LEN];
    header[0] = libc::AF_UNSPEC as u8;
    header[4..8].copy_from_slice(&index.to_ne_bytes());
    header[8..12].copy_from_slice(&flags.to_ne_bytes());
    header[12..16].copy_from_slice(&change.to_ne_bytes());
    header
}

pub fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses one RTM_NEWLINK payload.
pub fn parse_link(payload: &[u8]) -> Option<Link> {
    let header = payload.get(..IFINFOMSG_LEN)?;
    let kind = u16::from_ne_bytes([header[2], header[3]]);
    let index = i32::from_ne_bytes([header[4], header[5], header[6], header[7]]);
    let flags = u32::from_ne_bytes([header[8], header[9], header[10], header[11]]);
    let mut link = Link {
        index,
        name: String::new(),
        mac: String::new(),
        mtu: 0,
        up: flags & IFF_UP != 0,
        ethernet: kind == ARPHRD_ETHER,
        loopback: kind == ARPHRD_LOOPBACK,
    };
    for (attr, data) in attributes(payload, IFINFOMSG_LEN) {
        match attr {
            IFLA_IFNAME => {
                let name = data.split(|b| *b == 0).next().unwrap_or_default();
                link.name = String::from_utf8_lossy(name).into_owned();
            }
            IFLA_ADDRESS => link.mac = format_mac(data),
            IFLA_MTU if data.len() >= 4 => {
                link.mtu = u32::from_ne_bytes([data[0], data[1], data[2], data[3]])
            }
            _ => {}
        }
    }
    Some(link)
}

pub fn list(socket: &mut Socket) -> io::Result<Vec<Link>> {
    let request = Request::new(RTM_GETLINK, 0, &ifinfomsg(0, 0, 0));
    Ok(socket
        .dump(&request)?
        .iter()
        .filter(|m| m.kind == RTM_NEWLINK)
        .filter_map(|m| parse_link(&m.payload))
        .collect())
}

pub fn set_up(socket: &mut Socket, index: i32, up: bool) -> io::Result<()> {
    let flags = if up { IFF_UP } else { 0 };
    socket.request(&Request::new(
        RTM_NEWLINK,
        0,
        &ifinfomsg(index, flags, IFF_UP),
    ))
}

pub fn set_mtu(socket: &mut Socket, index: i32, mtu: u32) -> io::Result<()> {
    socket.request(
        &Request::new(RTM_NEWLINK, 0, &ifinfomsg(index, 0, 0)).attr(IFLA_MTU, &mtu.to_ne_bytes()),
    )
}

/// Renames a link; the kernel refuses while it is up.
pub fn rename(socket: &mut Socket, index: i32, name: &str) -> io::Result<()> {
    let mut data = name.as_bytes().to_vec();
    data.push(0);
    socket.request(&Request::new(RTM_NEWLINK, 0, &ifinfomsg(index, 0, 0)).attr(IFLA_IFNAME, &data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_parse_from_the_kernels_layout() {
        let mut header = ifinfomsg(7, IFF_UP, 0);
        header[2..4].copy_from_slice(&ARPHRD_ETHER.to_ne_bytes());
        let message = Request::new(RTM_NEWLINK, 0, &header)
            .attr(IFLA_IFNAME, b"eth1\0")
            .attr(IFLA_ADDRESS, &[2, 0x42, 0xac, 0x11, 0, 2])
            .attr(IFLA_MTU, &1450u32.to_ne_bytes());
        let link = parse_link(&message.body).expect("parses");
        assert_eq!(
            link,
            Link {
                index: 7,
                name: "eth1".into(),
                mac: "02:42:ac:11:00:02".into(),
                mtu: 1450,
                up: true,
                ethernet: true,
                loopback: false,
            }
        );
        assert_eq!(parse_link(&[0; 8]), None);
    }
}
