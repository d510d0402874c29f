//! The guest's network: each pod interface the host found becomes the guest NIC with the same
//! MAC, MTU, addresses and permanent neighbours, plus the pod's routes. Configured with the
//! busybox `ip` the guest image carries, and rtnetlink for the neighbours (`netlink`).

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use hako_protocol as pb;

use crate::reaper::Reaper;

const IP: &str = "/bin/busybox";

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// No guest NIC has the MAC the host asked for.
    #[error("no guest network interface has MAC {0}")]
    NoSuchMac(String),
    /// A value would not be a plain address, prefix or name.
    #[error("invalid network value {0:?}")]
    Invalid(String),
    /// An `ip` command failed.
    #[error("ip {args}: {message}")]
    Ip { args: String, message: String },
    /// The kernel refused a neighbour entry.
    #[error("neighbour {ip} ({mac}) on {dev}: {source}")]
    Neighbour {
        ip: String,
        mac: String,
        dev: String,
        source: std::io::Error,
    },
}

/// Values from the host land in `ip`'s argv: allow only what addresses, MACs and CIDRs use.
fn checked(value: &str) -> Result<&str, NetError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value.chars().all(|c| {
            c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '/') || c.is_ascii_alphanumeric()
        });
    if ok && !value.starts_with('-') {
        Ok(value)
    } else {
        Err(NetError::Invalid(value.to_string()))
    }
}

/// Runs busybox `ip`. PID 1's reaper collects every child, so the exit status comes from it,
/// not from waiting on the child (which would race the reaper and see ECHILD).
async fn ip(reaper: &Reaper, args: &[&str]) -> Result<(), NetError> {
    let failed = |message: String| NetError::Ip {
        args: args.join(" "),
        message,
    };
    let mut child = Command::new(IP)
        .arg("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    let exit = reaper.watch(child.id() as i32);
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        // `ip` is short-lived; the pipe ends when it exits.
        let _ = pipe.read_to_string(&mut stderr);
    }
    match exit.await {
        Ok(0) => Ok(()),
        Ok(status) => Err(failed(format!("exit status {status}: {}", stderr.trim()))),
        Err(_) => Err(failed("the reaper went away".to_string())),
    }
}

/// A permanent neighbour entry, through rtnetlink: busybox `ip` cannot add neighbours.
fn add_neighbour(dev: &str, neighbour: &pb::Neighbor) -> Result<(), NetError> {
    let invalid = || NetError::Invalid(format!("{} {}", neighbour.ip, neighbour.mac));
    let ip: std::net::IpAddr = neighbour.ip.parse().map_err(|_| invalid())?;
    let mac = crate::netlink::parse_mac(&neighbour.mac).ok_or_else(invalid)?;
    let failed = |source| NetError::Neighbour {
        ip: neighbour.ip.clone(),
        mac: neighbour.mac.clone(),
        dev: dev.to_string(),
        source,
    };
    let ifindex: i32 = fs::read_to_string(format!("/sys/class/net/{dev}/ifindex"))
        .map_err(failed)?
        .trim()
        .parse()
        .map_err(|_| failed(std::io::Error::other("unreadable ifindex")))?;
    crate::netlink::add_permanent_neighbour(ifindex, ip, mac).map_err(failed)
}

/// The guest interface whose MAC is `mac`.
fn link_with_mac(mac: &str) -> Result<String, NetError> {
    let entries =
        fs::read_dir("/sys/class/net").map_err(|_| NetError::NoSuchMac(mac.to_string()))?;
    for entry in entries.flatten() {
        let address = fs::read_to_string(entry.path().join("address")).unwrap_or_default();
        if address.trim().eq_ignore_ascii_case(mac) {
            return Ok(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Err(NetError::NoSuchMac(mac.to_string()))
}

pub async fn configure(
    reaper: &Reaper,
    interfaces: &[pb::Interface],
    routes: &[pb::Route],
) -> Result<(), NetError> {
    if Path::new("/sys/class/net/lo").exists() {
        ip(reaper, &["link", "set", "dev", "lo", "up"]).await?;
    }
    for iface in interfaces {
        let dev = link_with_mac(checked(&iface.mac)?)?;
        let mtu = iface.mtu.to_string();
        if iface.mtu > 0 {
            ip(reaper, &["link", "set", "dev", &dev, "mtu", &mtu]).await?;
        }
        // No duplicate address detection: the addresses are the pod's, already in use on the
        // host side, and DAD would hold IPv6 back for a second or more.
        let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/accept_dad"), "0");
        for address in &iface.addresses {
            let address = checked(address)?;
            let family = if address.contains(':') { "-6" } else { "-4" };
            ip(reaper, &[family, "addr", "add", address, "dev", &dev]).await?;
        }
        ip(reaper, &["link", "set", "dev", &dev, "up"]).await?;
        for neighbour in &iface.neighbors {
            add_neighbour(&dev, neighbour)?;
        }
        log::info!(
            "interface {dev} ({}) configured as {}",
            iface.mac,
            iface.addresses.join(", ")
        );
    }
    for route in routes {
        let family = if route.ipv6 { "-6" } else { "-4" };
        let destination = checked(&route.destination)?;
        let gateway = checked(&route.gateway)?;
        ip(
            reaper,
            &[family, "route", "add", destination, "via", gateway],
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_for_ip_are_checked() {
        for ok in ["10.0.0.2/24", "fd00::2/64", "default", "02:42:ac:11:00:02"] {
            assert_eq!(checked(ok).ok(), Some(ok));
        }
        for bad in ["", "-help", "1.2.3.4; reboot", "a b", &"1".repeat(65)] {
            assert!(checked(bad).is_err(), "{bad:?}");
        }
    }
}
