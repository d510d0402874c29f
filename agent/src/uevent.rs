//! The host's devices as the guest learns of them: a VM restored from a template gets its share
//! and its vsock device hot-plugged after the restore, and the agent waits for their drivers to
//! bind. It learns of each from the kernel's uevents, never by looking again on a timer.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The virtio drivers of the devices the agent needs before it can serve: the vsock transport
/// and the share's (virtio-fs, or 9p's transport).
pub fn needed_drivers(share_9p: bool) -> [&'static str; 2] {
    [
        "vmw_vsock_virtio_transport",
        if share_9p { "9pnet_virtio" } else { "virtiofs" },
    ]
}

/// Whether a virtio device is bound to `driver` now.
pub fn bound(driver: &str) -> bool {
    std::fs::read_dir(format!("/sys/bus/virtio/drivers/{driver}"))
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("virtio"))
        })
        .unwrap_or(false)
}

/// A socket on the kernel's uevent broadcast.
pub struct Uevents {
    fd: OwnedFd,
}

impl Uevents {
    /// Opens and binds the socket: every uevent from now on is queued on it, so a device that
    /// binds between a look at sysfs and the wait is not missed.
    pub fn open() -> io::Result<Uevents> {
        // SAFETY: a plain socket(2) call; the descriptor is owned below.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_KOBJECT_UEVENT,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh socket nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; zeroed is valid.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // The kernel's broadcast group of uevents.
        addr.nl_groups = 1;
        // SAFETY: addr is a valid sockaddr_nl of the length given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Uevents { fd })
    }

    /// Blocks until every driver in `drivers` has a device bound.
    pub fn wait_bound(&self, drivers: &[&str]) -> io::Result<()> {
        let mut buf = vec![0u8; 8192];
        while !drivers.iter().all(|d| bound(d)) {
            // SAFETY: recv into a buffer we own, of the length given.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Events were lost in a burst: sysfs, looked at again, is the truth.
                    Some(libc::ENOBUFS) => continue,
                    _ => return Err(e),
                }
            }
            if let Some(driver) = bound_driver(&buf[..n as usize]) {
                log::debug!("uevent: a device bound to {driver}");
            }
        }
        Ok(())
    }
}

/// The driver a `bind` uevent names (`bind@<devpath>\0...\0DRIVER=<name>\0...`), if it is one.
fn bound_driver(message: &[u8]) -> Option<String> {
    let mut fields = message.split(|b| *b == 0);
    let header = fields.next()?;
    if !header.starts_with(b"bind@") {
        return None;
    }
    fields
        .find_map(|f| f.strip_prefix(b"DRIVER="))
        .map(|d| String::from_utf8_lossy(d).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bind_uevent_names_its_driver() {
        let message = b"bind@/devices/pci0000:00/0000:00:02.0/virtio3\0ACTION=bind\0DEVPATH=/devices/pci0000:00/0000:00:02.0/virtio3\0SUBSYSTEM=virtio\0DRIVER=virtiofs\0SEQNUM=812\0";
        assert_eq!(bound_driver(message).as_deref(), Some("virtiofs"));
        let add = b"add@/devices/virtio3\0ACTION=add\0SUBSYSTEM=virtio\0";
        assert_eq!(bound_driver(add), None);
        assert_eq!(bound_driver(b""), None);
        assert_eq!(bound_driver(b"bind@/x\0ACTION=bind\0"), None);
    }

    #[test]
    fn the_share_decides_the_second_driver() {
        assert_eq!(needed_drivers(false)[1], "virtiofs");
        assert_eq!(needed_drivers(true)[1], "9pnet_virtio");
    }
}
