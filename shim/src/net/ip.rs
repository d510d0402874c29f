//! What the pod's network namespace holds, read over rtnetlink inside it: its ethernet links
//! with their addresses and permanent neighbours, and the routes through a gateway on them. The
//! results are what `ip -j` showed when the shim read them with it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use hako_protocol as pb;
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::AddressFamily;
use rtnetlink::Handle;

use super::rtnl::{self, dump};
use super::{plain_name, NetError, TAP_SUFFIX};

/// `ip route show` lists the main table only; the local table's routes are the kernel's own.
const RT_TABLE_MAIN: u32 = 254;
const NUD_PERMANENT: u16 = 0x80;

/// The name link `index` has now in `netns`: a link keeps its index when it is renamed, as
/// Docker renames a veth once it has moved it into the namespace.
pub fn name_of(netns: &Path, index: u32) -> Option<String> {
    rtnl::run_in(netns, "finding a link", move |handle| async move {
        rtnl::name_of(&handle, index).await
    })
    .ok()
    .flatten()
}

/// An ethernet link of the pod, as the namespace shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundLink {
    /// The kernel's index: with the MAC, what tells one link from another over time.
    pub index: u32,
    pub name: String,
    pub mac: String,
    pub mtu: u32,
    pub addresses: Vec<String>,
    /// Permanent neighbour entries: (address, MAC).
    pub neighbours: Vec<(String, String)>,
}

/// The pod's links and routes at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scan {
    pub links: Vec<FoundLink>,
    pub routes: Vec<pb::Route>,
}

/// Reads the namespace: links, their neighbours, the routes on them.
pub fn scan(netns: &Path) -> Result<Scan, NetError> {
    rtnl::run_in(netns, "reading the pod's network", |handle| async move {
        read(&handle).await
    })
}

async fn read(handle: &Handle) -> Result<Scan, NetError> {
    let mut links = Vec::new();
    for message in dump(handle.link().get().execute(), "listing links").await? {
        links.extend(found_link(&message)?);
    }
    if links.is_empty() {
        // Nothing for the VM to take over (a fresh namespace, `--network none`): addresses,
        // neighbours and routes only ever belong to a link.
        return Ok(Scan::default());
    }
    let addresses = dump(handle.address().get().execute(), "listing addresses").await?;
    for (index, address) in addresses.iter().filter_map(global_address) {
        if let Some(link) = links.iter_mut().find(|l| l.index == index) {
            link.addresses.push(address);
        }
    }
    let neighbours = dump(handle.neighbours().get().execute(), "listing neighbours").await?;
    for (index, entry) in neighbours.iter().filter_map(permanent_neighbour) {
        if let Some(link) = links.iter_mut().find(|l| l.index == index) {
            link.neighbours.push(entry);
        }
    }
    let indices: Vec<u32> = links.iter().map(|l| l.index).collect();
    let mut routes = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut request = RouteMessage::default();
        request.header.address_family = family;
        let listed = dump(handle.route().get(request).execute(), "listing routes").await?;
        routes.extend(listed.iter().filter_map(|r| gateway_route(r, &indices)));
    }
    Ok(Scan { links, routes })
}

/// The link, if it is one the VM takes over: ethernet, and not loopback nor one of hako's taps.
fn found_link(message: &LinkMessage) -> Result<Option<FoundLink>, NetError> {
    if message.header.link_layer_type != LinkLayerType::Ether {
        return Ok(None);
    }
    let mut name = None;
    let mut mac = String::new();
    let mut mtu = 0;
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Address(bytes) => mac = hex_mac(bytes),
            LinkAttribute::Mtu(m) => mtu = *m,
            _ => {}
        }
    }
    let Some(name) = name.filter(|n| !n.ends_with(TAP_SUFFIX)) else {
        return Ok(None);
    };
    plain_name(&name)?;
    Ok(Some(FoundLink {
        index: message.header.index,
        name,
        mac,
        mtu,
        addresses: Vec::new(),
        neighbours: Vec::new(),
    }))
}

/// A global (not link- or host-scoped) address as "addr/prefix", with its link's index. The
/// local address where there is one: on a point-to-point link IFA_ADDRESS is the peer's.
fn global_address(message: &AddressMessage) -> Option<(u32, String)> {
    if message.header.scope != AddressScope::Universe {
        return None;
    }
    let mut address = None;
    for attribute in &message.attributes {
        match attribute {
            AddressAttribute::Local(ip) => address = Some(*ip),
            AddressAttribute::Address(ip) if address.is_none() => address = Some(*ip),
            _ => {}
        }
    }
    let address = address?;
    Some((
        message.header.index,
        format!("{address}/{}", message.header.prefix_len),
    ))
}

/// A permanent neighbour entry (what a plugin set on purpose; learnt entries the guest learns
/// again itself) as (address, MAC), with its link's index.
fn permanent_neighbour(message: &NeighbourMessage) -> Option<(u32, (String, String))> {
    if u16::from(message.header.state) & NUD_PERMANENT == 0 {
        return None;
    }
    let mut address = None;
    let mut mac = None;
    for attribute in &message.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                address = Some(ip.to_string())
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                address = Some(ip.to_string())
            }
            NeighbourAttribute::LinkLayerAddress(bytes) if !bytes.is_empty() => {
                mac = Some(hex_mac(bytes))
            }
            _ => {}
        }
    }
    Some((message.header.ifindex, (address?, mac?)))
}

/// A route of the main table through a gateway on one of `links` (by index). A multipath route
/// has its gateways in nexthops, not in one RTA_GATEWAY, and is left out, as it always was.
fn gateway_route(message: &RouteMessage, links: &[u32]) -> Option<pb::Route> {
    let header = &message.header;
    let ipv6 = match header.address_family {
        AddressFamily::Inet => false,
        AddressFamily::Inet6 => true,
        _ => return None,
    };
    let mut table = u32::from(header.table);
    let (mut destination, mut gateway, mut oif) = (None, None, None);
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(address) => destination = ip_of(address),
            RouteAttribute::Gateway(address) => gateway = ip_of(address),
            RouteAttribute::Oif(index) => oif = Some(*index),
            _ => {}
        }
    }
    if table != RT_TABLE_MAIN || !oif.is_some_and(|i| links.contains(&i)) {
        return None;
    }
    let length = header.destination_prefix_length;
    let destination = if length == 0 {
        // As `ip` prints 0.0.0.0/0 and ::/0, and as the agent reads them.
        "default".to_string()
    } else {
        let unspecified = if ipv6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        format!("{}/{length}", destination.unwrap_or(unspecified))
    };
    Some(pb::Route {
        destination,
        gateway: gateway?.to_string(),
        ipv6,
        ..Default::default()
    })
}

fn ip_of(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

/// "02:42:0a:58:00:02", as `ip` prints a hardware address.
fn hex_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests;
