//! Routes through a gateway. The agent marks the routes it adds with a protocol number of its
//! own, so it can later tell them from the kernel's (connected routes) and remove exactly what
//! the pod no longer has.

use std::io;
use std::net::IpAddr;

use super::addr::{family, ip_from, octets, Cidr};
use super::{attributes, Request, Socket, NLM_F_CREATE, NLM_F_EXCL};

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const RTA_DST: u16 = 1;
const RTA_GATEWAY: u16 = 5;
const RTA_TABLE: u16 = 15;
/// `struct rtmsg`: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
const RTMSG_LEN: usize = 12;
const RT_TABLE_MAIN: u8 = 254;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;
/// The protocol the agent's routes carry (user-defined values are free above RTPROT_STATIC).
pub const RTPROT_HAKO: u8 = 99;

/// A route to `destination` through `gateway`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    pub destination: Cidr,
    pub gateway: IpAddr,
}

impl Route {
    /// `destination` is a CIDR or `default`; both addresses must be of one family.
    pub fn parse(destination: &str, gateway: &str, ipv6: bool) -> Option<Route> {
        let gateway: IpAddr = gateway.parse().ok()?;
        let destination = if destination == "default" {
            Cidr {
                ip: if ipv6 {
                    IpAddr::from([0u16; 8])
                } else {
                    IpAddr::from([0u8; 4])
                },
                prefix: 0,
            }
        } else {
            Cidr::parse(destination)?
        };
        (destination.ip.is_ipv6() == ipv6 && gateway.is_ipv6() == ipv6).then_some(Route {
            destination,
            gateway,
        })
    }
}

fn rtmsg(route: &Route) -> [u8; RTMSG_LEN] {
    let mut header = [0u8; RTMSG_LEN];
    header[0] = family(&route.gateway);
    header[1] = route.destination.prefix;
    header[4] = RT_TABLE_MAIN;
    header[5] = RTPROT_HAKO;
    header[6] = RT_SCOPE_UNIVERSE;
    header[7] = RTN_UNICAST;
    header
}

fn request(kind: u16, flags: u16, route: &Route) -> Request {
    let request = Request::new(kind, flags, &rtmsg(route));
    let request = if route.destination.prefix > 0 {
        request.attr(RTA_DST, &octets(&route.destination.ip))
    } else {
        request
    };
    request.attr(RTA_GATEWAY, &octets(&route.gateway))
}

fn parse_route(payload: &[u8]) -> Option<(u8, u8, Route)> {
    let header = payload.get(..RTMSG_LEN)?;
    let (family_byte, prefix, mut table, protocol) = (header[0], header[1], header[4], header[5]);
    let mut destination = None;
    let mut gateway = None;
    for (kind, data) in attributes(payload, RTMSG_LEN) {
        match kind {
            RTA_DST => destination = ip_from(data),
            RTA_GATEWAY => gateway = ip_from(data),
            RTA_TABLE if data.len() >= 4 => {
                table = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as u8
            }
            _ => {}
        }
    }
    let gateway = gateway?;
    let unspecified = if family_byte == libc::AF_INET6 as u8 {
        IpAddr::from([0u16; 8])
    } else {
        IpAddr::from([0u8; 4])
    };
    Some((
        table,
        protocol,
        Route {
            destination: Cidr {
                ip: destination.unwrap_or(unspecified),
                prefix,
            },
            gateway,
        },
    ))
}

/// The routes of the main table the agent added.
pub fn list_own(socket: &mut Socket) -> io::Result<Vec<Route>> {
    let mut all = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let mut header = [0u8; RTMSG_LEN];
        header[0] = family;
        all.extend(
            socket
                .dump(&Request::new(RTM_GETROUTE, 0, &header))?
                .iter()
                .filter(|m| m.kind == RTM_NEWROUTE)
                .filter_map(|m| parse_route(&m.payload))
                .filter(|(table, protocol, _)| *table == RT_TABLE_MAIN && *protocol == RTPROT_HAKO)
                .map(|(_, _, route)| route),
        );
    }
    Ok(all)
}

pub fn add(socket: &mut Socket, route: &Route) -> io::Result<()> {
    socket.request(&request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, route))
}

pub fn delete(socket: &mut Socket, route: &Route) -> io::Result<()> {
    socket.request(&request(RTM_DELROUTE, 0, route))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_and_round_trip() {
        let default = Route::parse("default", "10.88.0.1", false).expect("default");
        assert_eq!(default.destination.prefix, 0);
        let r = request(RTM_NEWROUTE, 0, &default);
        assert_eq!(
            parse_route(&r.body),
            Some((RT_TABLE_MAIN, RTPROT_HAKO, default))
        );

        let v6 = Route::parse("fd00:1::/64", "fd00::1", true).expect("v6");
        let r = request(RTM_NEWROUTE, 0, &v6);
        assert_eq!(r.body[0], libc::AF_INET6 as u8);
        assert_eq!(parse_route(&r.body).map(|(_, _, route)| route), Some(v6));

        // Families must agree; garbage is refused.
        assert_eq!(Route::parse("default", "fd00::1", false), None);
        assert_eq!(Route::parse("10.0.0.0/8", "fd00::1", true), None);
        assert_eq!(Route::parse("default", "gateway", false), None);
    }
}
