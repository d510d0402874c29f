//! The guest's end of the host's connections: a vsock listener on one port, for every service
//! the host dials (the agent API has its own in ttrpc).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

/// Any of the guest's addresses: the host reaches it as the VM's context id.
const VMADDR_CID_ANY: u32 = u32::MAX;

/// A blocking vsock stream socket listening on `port`.
pub fn listen_on(port: u32, backlog: i32) -> io::Result<OwnedFd> {
    let listener = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(listener.as_raw_fd(), &VsockAddr::new(VMADDR_CID_ANY, port))?;
    listen(&listener, Backlog::new(backlog).map_err(io::Error::from)?)?;
    Ok(listener)
}
