//! A tap device beside a pod veth, in the pod's network namespace, joined to the veth by tc
//! ingress redirects both ways: what the veth receives goes to the VM, what the VM sends leaves
//! through the veth. The VMM reads and writes the guest's packets through the tap's queues.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use nix::sched::{setns, CloneFlags};

use super::ip::run_in;
use super::NetError;

/// Opens a tap device named `name` inside `netns`, with `queues` queues (a multiqueue tap when
/// more than one). The taps carry virtio-net headers, so checksum and segmentation offloads
/// reach the guest instead of every packet being cut to the MTU on the host. The namespace
/// switch happens on a thread of its own, so no other thread of the shim changes namespace.
fn open_tap(netns: &Path, name: &str, queues: u32) -> Result<Vec<OwnedFd>, NetError> {
    let netns = netns.to_path_buf();
    let name = name.to_string();
    let tap_err = |source| NetError::Tap {
        name: name.clone(),
        source,
    };
    let thread_name = name.clone();
    let result = std::thread::spawn(move || -> std::io::Result<Vec<OwnedFd>> {
        let ns = fs::File::open(&netns)?;
        setns(&ns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if queues > 1 {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        (0..queues.max(1))
            .map(|_| open_queue(&thread_name, flags as libc::c_short))
            .collect()
    })
    .join();
    match result {
        Ok(fds) => fds.map_err(tap_err),
        Err(_) => Err(tap_err(std::io::Error::other(
            "the namespace thread panicked",
        ))),
    }
}

/// One queue of the tap `name`: the first call creates the device, later ones attach to it.
fn open_queue(name: &str, flags: libc::c_short) -> std::io::Result<OwnedFd> {
    let tun = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is, on a tun fd we own.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(OwnedFd::from(tun))
}

/// Makes the tap `tap` for `veth` (whose index is `veth_index`) and the redirects between
/// them. On error, what was made is removed again, from the veth under the name it has by then:
/// one renamed meanwhile (Docker names its veth once it is in the namespace) fails the attach,
/// and must not keep a redirect to a tap that is gone when the next attach comes.
pub fn attach(
    netns: &Path,
    veth: &str,
    veth_index: u32,
    tap: &str,
    mtu: u32,
    queues: u32,
) -> Result<Vec<OwnedFd>, NetError> {
    let result = try_attach(netns, veth, tap, mtu, queues);
    if result.is_err() {
        let now = super::ip::name_of(netns, veth_index).unwrap_or_else(|| veth.to_string());
        detach(netns, &now, tap);
    }
    result
}

fn try_attach(
    netns: &Path,
    veth: &str,
    tap: &str,
    mtu: u32,
    queues: u32,
) -> Result<Vec<OwnedFd>, NetError> {
    let fds = open_tap(netns, tap, queues)?;
    let mtu = mtu.max(68).to_string();
    run_in(netns, "ip", &["link", "set", "dev", tap, "mtu", &mtu, "up"])?;
    for dev in [veth, tap] {
        run_in(netns, "tc", &["qdisc", "add", "dev", dev, "ingress"])?;
    }
    for (from, to) in [(veth, tap), (tap, veth)] {
        run_in(
            netns,
            "tc",
            &[
                "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match",
                "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
            ],
        )?;
    }
    Ok(fds)
}

/// Removes the veth's ingress qdisc (and with it the filter) and the tap; the veth stays as the
/// network plugin made it. Missing pieces are fine.
pub fn detach(netns: &Path, veth: &str, tap: &str) {
    let _ = run_in(netns, "tc", &["qdisc", "del", "dev", veth, "ingress"]);
    let _ = run_in(netns, "ip", &["link", "del", "dev", tap]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::NetnsHolder;

    /// Docker renames its veth once it is in the namespace; an attach that raced the rename
    /// fails, and must leave the veth (by its new name) without a redirect, or the next attach
    /// finds the ingress taken.
    #[test]
    fn a_failed_attach_cleans_a_veth_renamed_meanwhile() {
        // Never a silent pass: hako's tests run as root (scripts/test.sh).
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: run the unit tests as root, as scripts/test.sh does"
        );
        let bind_point = crate::net::namespace::TestBindPoint::new("tap");
        let bind_at = bind_point.0.clone();
        let holder = NetnsHolder::create(&bind_at).expect("namespace");
        let ip = |args: &[&str]| run_in(&bind_at, "ip", args).expect("ip");
        ip(&[
            "link", "add", "vtmp", "type", "veth", "peer", "name", "vpeer",
        ]);
        let index = ip(&["-o", "link", "show", "vtmp"])
            .split(':')
            .next()
            .and_then(|n| n.trim().parse::<u32>().ok())
            .expect("index");
        // What an attach that raced the rename had made on the veth, then the rename.
        run_in(&bind_at, "tc", &["qdisc", "add", "dev", "vtmp", "ingress"]).expect("qdisc");
        ip(&["link", "set", "vtmp", "name", "eth0"]);

        let stale = attach(&bind_at, "vtmp", index, "tap0_hk", 1500, 1);
        assert!(stale.is_err(), "the old name is gone");
        let qdiscs = run_in(&bind_at, "tc", &["qdisc", "show", "dev", "eth0"]).expect("tc");
        assert!(!qdiscs.contains("ingress"), "left on the veth: {qdiscs}");
        assert!(!ip(&["-o", "link", "show"]).contains("tap0_hk"), "tap left");

        let fds = attach(&bind_at, "eth0", index, "tap1_hk", 1500, 1).expect("attach again");
        assert_eq!(fds.len(), 1);
        drop(fds);
        detach(&bind_at, "eth0", "tap1_hk");
        drop(holder);
        bind_point.release().expect("unmount and remove");
    }
}
