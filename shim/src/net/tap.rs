//! A tap device beside a pod veth, in the pod's network namespace, joined to the veth by tc
//! ingress redirects both ways: what the veth receives goes to the VM, what the VM sends leaves
//! through the veth. The VMM reads and writes the guest's packets through the tap's queues. All
//! of it over rtnetlink and /dev/net/tun, from one thread inside the namespace.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use netlink_packet_route::tc::{TcAttribute, TcHandle};
use rtnetlink::{Handle, LinkUnspec};

use super::namespace::on_thread_in;
use super::rtnl::{self, failed};
use super::NetError;

/// `protocol all` in tc's terms: ETH_P_ALL, which a filter carries in network byte order.
const ETH_P_ALL: u16 = 0x0003;
/// The ingress qdisc's handle (`ffff:`), the parent its filters hang from.
const INGRESS_HANDLE: u32 = 0xffff_0000;
/// The least MTU an IPv4 link may have.
const MIN_MTU: u32 = 68;

/// Opens a tap device named `name` in this thread's namespace, with `queues` queues (a
/// multiqueue tap when more than one). The taps carry virtio-net headers, so checksum and
/// segmentation offloads reach the guest instead of every packet being cut to the MTU on the
/// host.
fn open_tap(name: &str, queues: u32) -> Result<Vec<OwnedFd>, NetError> {
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if queues > 1 {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    (0..queues.max(1))
        .map(|_| open_queue(name, flags as libc::c_short))
        .collect::<std::io::Result<_>>()
        .map_err(|source| NetError::Tap {
            name: name.to_string(),
            source,
        })
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
    let (veth, tap) = (veth.to_string(), tap.to_string());
    on_thread_in(netns, "attaching a tap", move || {
        let fds = open_tap(&tap, queues)?;
        rtnl::run_here(|handle| async move { join(&handle, &veth, &tap, mtu).await })?;
        Ok(fds)
    })
}

/// Sets the tap up with the veth's MTU and redirects each one's ingress to the other's egress
/// (`tc filter ... u32 match u8 0 0 action mirred egress redirect`): the two become one wire.
async fn join(handle: &Handle, veth: &str, tap: &str, mtu: u32) -> Result<(), NetError> {
    let veth_index = rtnl::index_of(handle, veth).await?;
    let tap_index = rtnl::index_of(handle, tap).await?;
    let mtu = mtu.max(MIN_MTU);
    handle
        .link()
        .set(LinkUnspec::new_with_index(tap_index).mtu(mtu).up().build())
        .execute()
        .await
        .map_err(|e| failed(format!("setting {tap} up with MTU {mtu}"), e))?;
    for (dev, index) in [(veth, veth_index), (tap, tap_index)] {
        handle
            .qdisc()
            .add(index as i32)
            .ingress()
            .execute()
            .await
            .map_err(|e| failed(format!("adding an ingress qdisc to {dev}"), e))?;
    }
    for ((from, from_index), (to, to_index)) in [
        ((veth, veth_index), (tap, tap_index)),
        ((tap, tap_index), (veth, veth_index)),
    ] {
        let operation = || format!("redirecting {from}'s ingress to {to}");
        handle
            .traffic_filter(from_index as i32)
            .add()
            .parent(INGRESS_HANDLE)
            .protocol(ETH_P_ALL.to_be())
            .redirect(to_index)
            .map_err(|e| failed(operation(), e))?
            .execute()
            .await
            .map_err(|e| failed(operation(), e))?;
    }
    Ok(())
}

/// Removes the veth's ingress qdisc (and with it the filter) and the tap; the veth stays as the
/// network plugin made it. Missing pieces are fine.
pub fn detach(netns: &Path, veth: &str, tap: &str) {
    let (veth, tap) = (veth.to_string(), tap.to_string());
    let _ = rtnl::run_in(netns, "detaching a tap", |handle| async move {
        if let Ok(index) = rtnl::index_of(&handle, &veth).await {
            let mut request = handle.qdisc().del(index as i32);
            let message = request.message_mut();
            message.header.parent = TcHandle::INGRESS;
            message.header.handle = TcHandle::from(INGRESS_HANDLE);
            message
                .attributes
                .push(TcAttribute::Kind("ingress".to_string()));
            let _ = request.execute().await;
        }
        if let Ok(index) = rtnl::index_of(&handle, &tap).await {
            let _ = handle.link().del(index).execute().await;
        }
        Ok(())
    });
}

#[cfg(test)]
mod tests;
