use std::io::{Read, Write};
use std::net::TcpStream;

use super::*;
use crate::net::namespace::{command_in, on_thread_in, TestBindPoint};
use crate::net::NetnsHolder;

/// A TCP connection to 127.0.0.1:`port`, made inside `netns` as containerd's PortForward makes
/// it.
fn connect_in(netns: &Path, port: u16) -> Result<TcpStream, NetError> {
    let path = netns.to_path_buf();
    on_thread_in(netns, "connecting", move || {
        TcpStream::connect((Ipv4Addr::LOCALHOST, port)).map_err(|e| NetError::Namespace {
            path,
            reason: e.to_string(),
        })
    })
}

/// The rule `nft` shows is the one the shim once wrote with `nft -f`; a connection to any
/// port of the pod's loopback reaches the listener, which reads the port asked for; removing
/// the redirect leaves nothing of hako's in the ruleset.
#[test]
fn the_loopback_redirect_reaches_the_listener_until_removed() {
    // Never a silent pass: hako's tests run as root (scripts/test.sh).
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: run the unit tests as root, as scripts/test.sh does"
    );
    let bind_point = TestBindPoint::new("forward");
    let netns = bind_point.0.clone();
    let holder = NetnsHolder::create(&netns).expect("namespace");
    command_in(&netns, "ip", &["link", "set", "lo", "up"]).expect("lo up");
    let listener = listen_in(&netns).expect("listener");
    listener.set_nonblocking(false).expect("blocking");

    redirect_loopback(&netns).expect("redirect");
    // Again, as for a namespace that outlived a sandbox: still one rule.
    redirect_loopback(&netns).expect("redirect again");
    let ruleset = command_in(&netns, "nft", &["list", "ruleset"]).expect("nft");
    for shown in [
        "table ip hako_portforward {",
        "chain output {",
        "type nat hook output priority",
        "policy accept;",
        "ip daddr 127.0.0.1 tcp dport != 1 redirect to :1",
    ] {
        assert!(ruleset.contains(shown), "{shown:?} in {ruleset}");
    }
    assert_eq!(ruleset.matches("redirect").count(), 1, "{ruleset}");

    let mut client = connect_in(&netns, 8080).expect("connected through the redirect");
    let (mut served, _) = listener.accept().expect("accepted");
    assert_eq!(original_port(&served), 8080);
    client.write_all(b"ping").expect("written");
    let mut got = [0u8; 4];
    served.read_exact(&mut got).expect("read");
    assert_eq!(&got, b"ping");
    // The listener's own port is not redirected, and keeps its number.
    let _direct = connect_in(&netns, LISTEN_PORT).expect("connected to the listener");
    let (direct, _) = listener.accept().expect("accepted");
    assert_eq!(original_port(&direct), LISTEN_PORT);

    remove_redirect(&netns).expect("removed");
    let ruleset = command_in(&netns, "nft", &["list", "ruleset"]).expect("nft");
    assert!(!ruleset.contains("hako_portforward"), "{ruleset}");
    assert!(connect_in(&netns, 8080).is_err(), "nothing listens on 8080");
    let again = remove_redirect(&netns).expect_err("no table left to delete");
    let text = again.to_string();
    assert!(
        text.contains("deleting table ip hako_portforward") && text.contains("No such file"),
        "{text}"
    );

    drop((listener, holder));
    bind_point.release().expect("unmount and remove");
}

#[test]
fn the_kernel_speaks_nf_tables_here() {
    nftables::available().expect("nf_tables answers");
}
