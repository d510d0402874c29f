//! Addresses on a link: list, add, delete.

use std::io;
use std::net::IpAddr;

use super::{attributes, Request, Socket, NLM_F_CREATE, NLM_F_REPLACE};

const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
/// `struct ifaddrmsg`: family, prefix length, flags, scope, index.
const IFADDRMSG_LEN: usize = 8;
/// No duplicate address detection: the pod's addresses are already its own, and DAD would hold
/// IPv6 back for a second or more.
const IFA_F_NODAD: u8 = 0x02;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;

/// An address with its prefix length, such as 10.88.0.2/16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub ip: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `addr/prefix`, checking the prefix against the family.
    pub fn parse(text: &str) -> Option<Cidr> {
        let (ip, prefix) = text.split_once('/')?;
        let ip: IpAddr = ip.parse().ok()?;
        let prefix: u8 = prefix.parse().ok()?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { ip, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

/// One address the kernel lists, with the link it is on and whether it is link-local.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub index: i32,
    pub cidr: Cidr,
    pub link_scope: bool,
}

pub fn octets(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

pub fn family(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        libc::AF_INET as u8
    } else {
        libc::AF_INET6 as u8
    }
}

/// Reads an IPv4 or IPv6 address from attribute data.
pub fn ip_from(data: &[u8]) -> Option<IpAddr> {
    match data.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(data).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(data).ok()?)),
        _ => None,
    }
}

fn ifaddrmsg(cidr: &Cidr, flags: u8, index: i32) -> [u8; IFADDRMSG_LEN] {
    let mut header = [0u8; IFADDRMSG_LEN];
    header[0] = family(&cidr.ip);
    header[1] = cidr.prefix;
    header[2] = flags;
    header[3] = RT_SCOPE_UNIVERSE;
    header[4..8].copy_from_slice(&index.to_ne_bytes());
    header
}

fn parse_address(payload: &[u8]) -> Option<Address> {
    let header = payload.get(..IFADDRMSG_LEN)?;
    let index = i32::from_ne_bytes([header[4], header[5], header[6], header[7]]);
    let attrs = attributes(payload, IFADDRMSG_LEN);
    // IPv4 point-to-point links put the peer in IFA_ADDRESS; IFA_LOCAL is the link's own.
    let ip = attrs
        .iter()
        .find(|(k, _)| *k == IFA_LOCAL)
        .or_else(|| attrs.iter().find(|(k, _)| *k == IFA_ADDRESS))
        .and_then(|(_, data)| ip_from(data))?;
    Some(Address {
        index,
        cidr: Cidr {
            ip,
            prefix: header[1],
        },
        link_scope: header[3] == RT_SCOPE_LINK,
    })
}

pub fn list(socket: &mut Socket) -> io::Result<Vec<Address>> {
    let request = Request::new(RTM_GETADDR, 0, &[0u8; IFADDRMSG_LEN]);
    Ok(socket
        .dump(&request)?
        .iter()
        .filter(|m| m.kind == RTM_NEWADDR)
        .filter_map(|m| parse_address(&m.payload))
        .collect())
}

fn request(kind: u16, flags: u16, index: i32, cidr: &Cidr) -> Request {
    let ip = octets(&cidr.ip);
    let request = Request::new(kind, flags, &ifaddrmsg(cidr, IFA_F_NODAD, index));
    if cidr.ip.is_ipv4() {
        request.attr(IFA_LOCAL, &ip).attr(IFA_ADDRESS, &ip)
    } else {
        request.attr(IFA_ADDRESS, &ip)
    }
}

pub fn add(socket: &mut Socket, index: i32, cidr: &Cidr) -> io::Result<()> {
    socket.request(&request(
        RTM_NEWADDR,
        NLM_F_CREATE | NLM_F_REPLACE,
        index,
        cidr,
    ))
}

pub fn delete(socket: &mut Socket, index: i32, cidr: &Cidr) -> io::Result<()> {
    socket.request(&request(RTM_DELADDR, 0, index, cidr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_are_checked_against_their_family() {
        assert_eq!(
            Cidr::parse("10.88.0.2/16").map(|c| c.to_string()),
            Some("10.88.0.2/16".to_string())
        );
        assert!(Cidr::parse("fd00::2/64").is_some());
        for bad in [
            "10.0.0.1/33",
            "fd00::1/129",
            "10.0.0.1",
            "x/8",
            "10.0.0.1/-1",
            "",
        ] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_ipv4_request_names_the_local_address_and_skips_dad() {
        let cidr = Cidr::parse("10.1.2.3/24").expect("cidr");
        let r = request(RTM_NEWADDR, NLM_F_CREATE, 4, &cidr);
        assert_eq!(r.body[0], libc::AF_INET as u8);
        assert_eq!(r.body[1], 24);
        assert_eq!(r.body[2], IFA_F_NODAD);
        let parsed = parse_address(&r.body).expect("parses back");
        assert_eq!(parsed.index, 4);
        assert_eq!(parsed.cidr, cidr);
    }
}
