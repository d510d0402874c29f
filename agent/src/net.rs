//! The guest's network, declared by the host: each pod interface becomes the guest NIC with the
//! same MAC, and gets the pod interface's name, MTU, addresses and permanent neighbours; the
//! routes are exactly the pod's. The host sends the whole picture each time (at boot, when a NIC
//! was hot-plugged or removed, when addresses change), and `apply` makes the guest match it:
//! what is missing is added, what is no longer there is removed. Everything goes through
//! rtnetlink (`crate::rtnl`).

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use hako_protocol as pb;

use crate::rtnl::addr::{self, Cidr};
use crate::rtnl::link::{self, Link};
use crate::rtnl::route::{self, Route};
use crate::rtnl::{neigh, wait_for_link, Socket};

/// How long a hot-plugged NIC may take to appear in the guest.
const NIC_WAIT: Duration = Duration::from_secs(10);
/// Bounds on what one request may ask for: far above any pod, far below what would matter.
const MAX_INTERFACES: usize = 32;
const MAX_ADDRESSES: usize = 64;
const MAX_NEIGHBOURS: usize = 256;
const MAX_ROUTES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A value from the host is not a plain address, prefix, MAC or name.
    #[error("invalid network value {0:?}")]
    Invalid(String),
    /// The request is larger than any pod's network.
    #[error("too many {what} ({count}, at most {max})")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    /// A NIC the host plugged did not appear.
    #[error("no guest network interface with MAC {mac} appeared within {waited:?}")]
    NoSuchMac { mac: String, waited: Duration },
    /// The kernel refused a change.
    #[error("{what}: {source}")]
    Kernel { what: String, source: io::Error },
}

fn kernel(what: impl Into<String>) -> impl FnOnce(io::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Kernel { what, source }
}

/// One interface as the host wants it, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    name: String,
    mac: String,
    mtu: u32,
    addresses: BTreeSet<Cidr>,
    neighbours: Vec<(IpAddr, [u8; 6])>,
}

fn bounded(what: &'static str, count: usize, max: usize) -> Result<(), NetError> {
    if count > max {
        return Err(NetError::TooMany { what, count, max });
    }
    Ok(())
}

/// Interface names: what the kernel takes, and nothing odd.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && !name.starts_with(['-', '.'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn check(
    interfaces: &[pb::Interface],
    routes: &[pb::Route],
) -> Result<(Vec<Wanted>, BTreeSet<Route>), NetError> {
    bounded("interfaces", interfaces.len(), MAX_INTERFACES)?;
    bounded("routes", routes.len(), MAX_ROUTES)?;
    let invalid = |v: &str| NetError::Invalid(v.to_string());
    let mut wanted = Vec::new();
    for iface in interfaces {
        bounded("addresses", iface.addresses.len(), MAX_ADDRESSES)?;
        bounded("neighbours", iface.neighbors.len(), MAX_NEIGHBOURS)?;
        let mac = neigh::parse_mac(&iface.mac).ok_or_else(|| invalid(&iface.mac))?;
        if !plain_name(&iface.name) {
            return Err(invalid(&iface.name));
        }
        if iface.mtu != 0 && !(68..=65535).contains(&iface.mtu) {
            return Err(invalid(&iface.mtu.to_string()));
        }
        let addresses = iface
            .addresses
            .iter()
            .map(|a| Cidr::parse(a).ok_or_else(|| invalid(a)))
            .collect::<Result<_, _>>()?;
        let neighbours = iface
            .neighbors
            .iter()
            .map(|n| {
                let ip = n.ip.parse().map_err(|_| invalid(&n.ip))?;
                let mac = neigh::parse_mac(&n.mac).ok_or_else(|| invalid(&n.mac))?;
                Ok((ip, mac))
            })
            .collect::<Result<_, NetError>>()?;
        wanted.push(Wanted {
            name: iface.name.clone(),
            mac: link::format_mac(&mac),
            mtu: iface.mtu,
            addresses,
            neighbours,
        });
    }
    let routes = routes
        .iter()
        .map(|r| {
            Route::parse(&r.destination, &r.gateway, r.ipv6)
                .ok_or_else(|| invalid(&format!("{} via {}", r.destination, r.gateway)))
        })
        .collect::<Result<_, _>>()?;
    Ok((wanted, routes))
}

/// Makes the guest's network what the host declares. Blocking: it may wait for hot-plugged
/// NICs to appear.
pub fn apply(interfaces: &[pb::Interface], routes: &[pb::Route]) -> Result<(), NetError> {
    let (wanted, routes) = check(interfaces, routes)?;
    let mut socket = Socket::open(0).map_err(kernel("opening rtnetlink"))?;

    let macs: BTreeSet<&str> = wanted.iter().map(|w| w.mac.as_str()).collect();
    let appeared = wait_for_link(NIC_WAIT, |s| {
        let links = link::list(s)?;
        let present: BTreeSet<&str> = links.iter().map(|l| l.mac.as_str()).collect();
        Ok(macs.is_subset(&present).then_some(links))
    })
    .map_err(kernel("listing links"))?;
    let Some(mut links) = appeared else {
        let links = link::list(&mut socket).map_err(kernel("listing links"))?;
        let mac = macs
            .iter()
            .find(|m| !links.iter().any(|l| l.mac == **m))
            .map(|m| m.to_string())
            .unwrap_or_default();
        return Err(NetError::NoSuchMac {
            mac,
            waited: NIC_WAIT,
        });
    };

    if let Some(lo) = links.iter().find(|l| l.loopback) {
        link::set_up(&mut socket, lo.index, true).map_err(kernel("bringing lo up"))?;
    }
    // Pod NICs the host no longer has: every guest NIC is one, since the guest has no other.
    for gone in links
        .iter()
        .filter(|l| l.ethernet && !macs.contains(l.mac.as_str()))
    {
        release(&mut socket, gone)?;
    }
    for want in &wanted {
        configure(&mut socket, &mut links, want)?;
    }
    set_routes(&mut socket, &routes)
}

/// Brings a NIC to what `want` says: name, MTU, addresses, up, neighbours.
fn configure(socket: &mut Socket, links: &mut [Link], want: &Wanted) -> Result<(), NetError> {
    let Some(at) = links.iter().position(|l| l.mac == want.mac) else {
        return Err(NetError::NoSuchMac {
            mac: want.mac.clone(),
            waited: NIC_WAIT,
        });
    };
    if links[at].name != want.name {
        rename(socket, links, at, &want.name)?;
    }
    let nic = links[at].clone();
    let dev = nic.name.clone();
    if want.mtu != 0 && want.mtu != nic.mtu {
        link::set_mtu(socket, nic.index, want.mtu).map_err(kernel(format!("MTU of {dev}")))?;
    }
    let present: BTreeSet<Cidr> = addr::list(socket)
        .map_err(kernel("listing addresses"))?
        .into_iter()
        .filter(|a| a.index == nic.index && !a.link_scope)
        .map(|a| a.cidr)
        .collect();
    for old in present.difference(&want.addresses) {
        addr::delete(socket, nic.index, old)
            .map_err(kernel(format!("removing {old} from {dev}")))?;
    }
    for new in want.addresses.difference(&present) {
        addr::add(socket, nic.index, new).map_err(kernel(format!("adding {new} to {dev}")))?;
    }
    link::set_up(socket, nic.index, true).map_err(kernel(format!("bringing {dev} up")))?;
    for (ip, mac) in &want.neighbours {
        neigh::add_permanent(socket, nic.index, *ip, *mac)
            .map_err(kernel(format!("neighbour {ip} on {dev}")))?;
    }
    log::info!(
        "interface {dev} ({}) has {}",
        want.mac,
        want.addresses
            .iter()
            .map(Cidr::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// Gives `links[at]` the name `name`; a guest link that has the name already steps aside.
fn rename(socket: &mut Socket, links: &mut [Link], at: usize, name: &str) -> Result<(), NetError> {
    if let Some(other) = links.iter().position(|l| l.name == name) {
        let spare = format!("hk{}", links[other].index);
        link::set_up(socket, links[other].index, false)
            .map_err(kernel(format!("taking {name} down")))?;
        link::rename(socket, links[other].index, &spare)
            .map_err(kernel(format!("renaming {name} to {spare}")))?;
        links[other].name = spare;
    }
    let index = links[at].index;
    link::set_up(socket, index, false)
        .map_err(kernel(format!("taking {} down", links[at].name)))?;
    link::rename(socket, index, name)
        .map_err(kernel(format!("renaming {} to {name}", links[at].name)))?;
    links[at].name = name.to_string();
    Ok(())
}

/// A NIC the pod no longer has: its addresses go, it goes down, and if it sits in a hot-plug
/// slot the slot is powered off, which completes the host's unplug at once (instead of after
/// the five seconds a PCIe attention button waits).
fn release(socket: &mut Socket, nic: &Link) -> Result<(), NetError> {
    let dev = &nic.name;
    for old in addr::list(socket)
        .map_err(kernel("listing addresses"))?
        .into_iter()
        .filter(|a| a.index == nic.index && !a.link_scope)
    {
        addr::delete(socket, nic.index, &old.cidr)
            .map_err(kernel(format!("removing {} from {dev}", old.cidr)))?;
    }
    link::set_up(socket, nic.index, false).map_err(kernel(format!("taking {dev} down")))?;
    match hotplug_slot(dev) {
        Some(slot) => {
            fs::write(slot.join("power"), "0")
                .map_err(kernel(format!("powering off the slot of {dev}")))?;
            log::info!("interface {dev} ({}) released; its slot is off", nic.mac);
        }
        None => log::info!(
            "interface {dev} ({}) is down; it was not hot-plugged",
            nic.mac
        ),
    }
    Ok(())
}

/// The PCI hot-plug slot a network device sits in: `/sys/bus/pci/slots/<n>` whose address is
/// the device's `domain:bus:device`.
fn hotplug_slot(dev: &str) -> Option<std::path::PathBuf> {
    // /sys/class/net/<dev>/device is the virtio device; its parent is the PCI function.
    let virtio = fs::canonicalize(Path::new("/sys/class/net").join(dev).join("device")).ok()?;
    let function = virtio.parent()?.file_name()?.to_str()?.to_string();
    let (address, _function) = function.rsplit_once('.')?;
    fs::read_dir("/sys/bus/pci/slots")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|slot| {
            fs::read_to_string(slot.join("address"))
                .map(|a| a.trim() == address)
                .unwrap_or(false)
        })
}

/// Makes the agent's routes exactly `wanted`.
fn set_routes(socket: &mut Socket, wanted: &BTreeSet<Route>) -> Result<(), NetError> {
    let present: BTreeSet<Route> = route::list_own(socket)
        .map_err(kernel("listing routes"))?
        .into_iter()
        .collect();
    for old in present.difference(wanted) {
        route::delete(socket, old).map_err(kernel(format!(
            "removing the route to {} via {}",
            old.destination, old.gateway
        )))?;
    }
    for new in wanted.difference(&present) {
        match route::add(socket, new) {
            // Another route to the same place (not the agent's) is the pod's to keep.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            other => other.map_err(kernel(format!(
                "adding the route to {} via {}",
                new.destination, new.gateway
            )))?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, mac: &str, addresses: &[&str]) -> pb::Interface {
        pb::Interface {
            name: name.into(),
            mac: mac.into(),
            mtu: 1500,
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn host_values_are_checked() {
        let good = iface(
            "eth0",
            "02:42:AC:11:00:02",
            &["172.17.0.2/16", "fd00::2/64"],
        );
        let route = pb::Route {
            destination: "default".into(),
            gateway: "172.17.0.1".into(),
            ..Default::default()
        };
        let (wanted, routes) =
            check(std::slice::from_ref(&good), std::slice::from_ref(&route)).expect("valid");
        assert_eq!(
            wanted[0].mac, "02:42:ac:11:00:02",
            "MACs are compared lower-case"
        );
        assert_eq!(wanted[0].addresses.len(), 2);
        assert_eq!(routes.len(), 1);

        for bad in [
            iface("eth0", "02:42", &[]),
            iface("-x", "02:42:ac:11:00:02", &[]),
            iface("a b", "02:42:ac:11:00:02", &[]),
            iface(&"e".repeat(16), "02:42:ac:11:00:02", &[]),
            iface("eth0", "02:42:ac:11:00:02", &["10.0.0.1/33"]),
            iface("eth0", "02:42:ac:11:00:02", &["10.0.0.1; reboot"]),
        ] {
            assert!(check(std::slice::from_ref(&bad), &[]).is_err(), "{bad:?}");
        }
        let mut tiny_mtu = good.clone();
        tiny_mtu.mtu = 10;
        assert!(check(&[tiny_mtu], &[]).is_err());
        let wrong_family = pb::Route {
            ipv6: true,
            ..route
        };
        assert!(check(&[], &[wrong_family]).is_err());
        let many = vec![good; MAX_INTERFACES + 1];
        assert!(matches!(check(&many, &[]), Err(NetError::TooMany { .. })));
    }
}
