//! The guest's network: each pod interface the host found becomes the guest NIC with the same
//! MAC, MTU and addresses, plus the pod's routes. Configured with the busybox `ip` the guest
//! image carries.

use std::fs;
use std::path::Path;
use std::process::Command;

use hako_protocol as pb;

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

fn ip(args: &[&str]) -> Result<(), NetError> {
    let out = Command::new(IP)
        .arg("ip")
        .args(args)
        .output()
        .map_err(|e| NetError::Ip {
            args: args.join(" "),
            message: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Ip {
            args: args.join(" "),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
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

pub fn configure(interfaces: &[pb::Interface], routes: &[pb::Route]) -> Result<(), NetError> {
    if Path::new("/sys/class/net/lo").exists() {
        ip(&["link", "set", "dev", "lo", "up"])?;
    }
    for iface in interfaces {
        let dev = link_with_mac(checked(&iface.mac)?)?;
        let mtu = iface.mtu.to_string();
        if iface.mtu > 0 {
            ip(&["link", "set", "dev", &dev, "mtu", &mtu])?;
        }
        // No duplicate address detection: the addresses are the pod's, already in use on the
        // host side, and DAD would hold IPv6 back for a second or more.
        let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/accept_dad"), "0");
        for address in &iface.addresses {
            let address = checked(address)?;
            let family = if address.contains(':') { "-6" } else { "-4" };
            ip(&[family, "addr", "add", address, "dev", &dev])?;
        }
        ip(&["link", "set", "dev", &dev, "up"])?;
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
        ip(&[family, "route", "add", destination, "via", gateway])?;
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
