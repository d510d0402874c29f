//! The pod's loopback on the host, for port forwarding (ADR 11). containerd's CRI PortForward
//! dials `localhost:<port>` inside the pod's network namespace on the host, where nothing
//! listens: the pod's processes run in the VM. One nftables rule in that namespace redirects
//! every TCP connection to 127.0.0.1 onto a listener the shim holds there
//! (`LISTEN_PORT`), which reads the port asked for from the connection's original destination.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::process::{Command, Stdio};

use nix::sys::socket::{
    bind, getsockopt, listen, setsockopt, sockopt, Backlog, SockType, SockaddrIn,
};

use super::namespace::socket_in;
use super::NetError;

/// The shim's listener in the pod's namespace. Nothing of the pod listens on the host side, so
/// any port is free there; a connection to this one itself is served as one to it.
pub const LISTEN_PORT: u16 = 1;
/// hako's nftables table in the pod's namespace.
const TABLE: &str = "hako_portforward";

/// A listening socket on 127.0.0.1:`LISTEN_PORT` that belongs to `netns` (a thread that
/// entered the namespace makes it; a socket stays in the namespace it was made in). It binds
/// even while the namespace's loopback is down (IP_FREEBIND).
pub fn listen_in(netns: &Path) -> Result<std::net::TcpListener, NetError> {
    let fd = socket_in(netns, SockType::Stream)?;
    let listen = || -> nix::Result<()> {
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        setsockopt(&fd, sockopt::IpFreebind, &true)?;
        let address = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, LISTEN_PORT));
        bind(fd.as_raw_fd(), &address)?;
        listen(&fd, Backlog::new(64)?)
    };
    listen().map_err(|e| NetError::Namespace {
        path: netns.to_path_buf(),
        reason: format!("port-forward listener: {e}"),
    })?;
    Ok(std::net::TcpListener::from(fd))
}

/// Redirects TCP to 127.0.0.1, on any port, onto the listener (`nft`, in `netns`).
pub fn redirect_loopback(netns: &Path) -> Result<(), NetError> {
    let rules = format!(
        "table ip {TABLE} {{\n\
         \tchain output {{\n\
         \t\ttype nat hook output priority -100; policy accept;\n\
         \t\tip daddr 127.0.0.1 tcp dport != {LISTEN_PORT} redirect to :{LISTEN_PORT}\n\
         \t}}\n\
         }}\n"
    );
    nft_in(netns, &rules)
}

/// Removes the redirect, when the namespace outlives the sandbox.
pub fn remove_redirect(netns: &Path) -> Result<(), NetError> {
    nft_in(netns, &format!("delete table ip {TABLE}\n"))
}

fn nft_in(netns: &Path, script: &str) -> Result<(), NetError> {
    let shown = || format!("nft -f - (in {})", netns.display());
    let failed = |message: String| NetError::Command {
        command: shown(),
        message,
    };
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("{e} (is nftables installed?)")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| failed(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(failed(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// The port a redirected connection was made to (its original destination); a connection made
/// to the listener's own port is not redirected and keeps it.
pub fn original_port(stream: &impl AsFd) -> u16 {
    match getsockopt(stream, sockopt::OriginalDst) {
        Ok(address) => u16::from_be(address.sin_port),
        Err(_) => LISTEN_PORT,
    }
}
