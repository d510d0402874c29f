//! The pod's loopback on the host, for port forwarding (ADR 11). containerd's CRI PortForward
//! dials `localhost:<port>` inside the pod's network namespace on the host, where nothing
//! listens: the pod's processes run in the VM. One nftables rule in that namespace redirects
//! every TCP connection to 127.0.0.1 onto a listener the shim holds there
//! (`LISTEN_PORT`), which reads the port asked for from the connection's original destination.
//! The rule is made over nf_tables netlink (`nftables`), in-process.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use nix::sys::socket::{
    bind, getsockopt, listen, setsockopt, sockopt, Backlog, SockType, SockaddrIn,
};

use super::namespace::socket_in;
use super::nftables::expr::{self, Base, Cmp};
use super::nftables::{self, Batch, Kind, NFPROTO_IPV4, NLM_F_APPEND, NLM_F_CREATE};
use super::NetError;

/// The shim's listener in the pod's namespace. Nothing of the pod listens on the host side, so
/// any port is free there; a connection to this one itself is served as one to it.
pub const LISTEN_PORT: u16 = 1;
/// hako's nftables table in the pod's namespace.
const TABLE: &str = "hako_portforward";
const CHAIN: &str = "output";
/// The output hook (NF_INET_LOCAL_OUT): containerd's connections start in the namespace.
const NF_INET_LOCAL_OUT: u32 = 3;
/// Where `nft`'s `priority -100` (dstnat) puts a nat chain.
const NAT_PRIORITY: i32 = -100;
/// IPv4's offset of the destination address, TCP's of the destination port.
const IP_DADDR: u32 = 16;
const TCP_DPORT: u32 = 2;

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

/// Redirects TCP to 127.0.0.1, on any port, onto the listener, in `netns`: what this `nft`
/// script did, once for all however often it runs (the table is made if missing, then made
/// anew in the same atomic batch, so a namespace that outlived an earlier sandbox keeps one
/// rule):
///
/// ```text
/// table ip hako_portforward {
///     chain output {
///         type nat hook output priority -100; policy accept;
///         ip daddr 127.0.0.1 tcp dport != 1 redirect to :1
///     }
/// }
/// ```
pub fn redirect_loopback(netns: &Path) -> Result<(), NetError> {
    let port = LISTEN_PORT.to_be_bytes();
    // The rule as `nft` compiles it (`nft --debug=netlink`).
    let rule = vec![
        expr::payload(Base::Network, IP_DADDR, 4),
        expr::cmp(Cmp::Eq, &Ipv4Addr::LOCALHOST.octets()),
        expr::l4proto(),
        expr::cmp(Cmp::Eq, &[libc::IPPROTO_TCP as u8]),
        expr::payload(Base::Transport, TCP_DPORT, 2),
        expr::cmp(Cmp::Neq, &port),
        expr::immediate(&port),
        expr::redirect_to_port(),
    ];
    let mut batch = Batch::new(NFPROTO_IPV4);
    let table = || nftables::table(TABLE);
    batch.push(
        Kind::NewTable,
        NLM_F_CREATE,
        table(),
        format!("adding table ip {TABLE}"),
    );
    batch.push(
        Kind::DelTable,
        0,
        table(),
        format!("emptying table ip {TABLE}"),
    );
    batch.push(
        Kind::NewTable,
        NLM_F_CREATE,
        table(),
        format!("adding table ip {TABLE}"),
    );
    let chain = nftables::base_chain(TABLE, CHAIN, "nat", NF_INET_LOCAL_OUT, NAT_PRIORITY);
    batch.push(
        Kind::NewChain,
        NLM_F_CREATE,
        chain,
        format!("adding nat chain {CHAIN} to table ip {TABLE}"),
    );
    batch.push(
        Kind::NewRule,
        NLM_F_CREATE | NLM_F_APPEND,
        nftables::rule(TABLE, CHAIN, rule),
        format!("adding the loopback redirect to port {LISTEN_PORT} in table ip {TABLE}"),
    );
    nftables::apply_in(netns, batch).map_err(|e| in_namespace(netns, e))
}

/// Removes the redirect, when the namespace outlives the sandbox.
pub fn remove_redirect(netns: &Path) -> Result<(), NetError> {
    let mut batch = Batch::new(NFPROTO_IPV4);
    batch.push(
        Kind::DelTable,
        0,
        nftables::table(TABLE),
        format!("deleting table ip {TABLE}"),
    );
    nftables::apply_in(netns, batch).map_err(|e| in_namespace(netns, e))
}

/// Says which namespace a netlink error happened in; the caller only logs it.
fn in_namespace(netns: &Path, error: NetError) -> NetError {
    match error {
        NetError::Netlink { operation, reason } => NetError::Netlink {
            operation: format!("{operation} (in {})", netns.display()),
            reason,
        },
        other => other,
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

#[cfg(test)]
mod tests;
