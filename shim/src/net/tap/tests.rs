use std::io::{Read, Write};
use std::time::{Duration, Instant};

use std::os::fd::AsFd;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::*;
use crate::net::namespace::{command_in, link_index, TestBindPoint};
use crate::net::NetnsHolder;

fn must_be_root() {
    // Never a silent pass: hako's tests run as root (scripts/test.sh).
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: run the unit tests as root, as scripts/test.sh does"
    );
}

/// Docker renames its veth once it is in the namespace; an attach that raced the rename
/// fails, and must leave the veth (by its new name) without a redirect, or the next attach
/// finds the ingress taken.
#[test]
fn a_failed_attach_cleans_a_veth_renamed_meanwhile() {
    must_be_root();
    let bind_point = TestBindPoint::new("tap");
    let bind_at = bind_point.0.clone();
    let holder = NetnsHolder::create(&bind_at).expect("namespace");
    let ip = |args: &[&str]| command_in(&bind_at, "ip", args).expect("ip");
    ip(&[
        "link", "add", "vtmp", "type", "veth", "peer", "name", "vpeer",
    ]);
    let index = link_index(&bind_at, "vtmp");
    // What an attach that raced the rename had made on the veth, then the rename.
    command_in(&bind_at, "tc", &["qdisc", "add", "dev", "vtmp", "ingress"]).expect("qdisc");
    ip(&["link", "set", "vtmp", "name", "eth0"]);

    let stale = attach(&bind_at, "vtmp", index, "tap0_hk", 1500, 1);
    let error = stale.expect_err("the old name is gone");
    assert!(
        error.to_string().contains("vtmp"),
        "names the link: {error}"
    );
    let qdiscs = command_in(&bind_at, "tc", &["qdisc", "show", "dev", "eth0"]).expect("tc");
    assert!(!qdiscs.contains("ingress"), "left on the veth: {qdiscs}");
    assert!(!ip(&["-o", "link", "show"]).contains("tap0_hk"), "tap left");

    let fds = attach(&bind_at, "eth0", index, "tap1_hk", 1500, 1).expect("attach again");
    assert_eq!(fds.len(), 1);
    drop(fds);
    detach(&bind_at, "eth0", "tap1_hk");
    drop(holder);
    bind_point.release().expect("unmount and remove");
}

/// The packets on the veth's peer's side, as the namespace's /proc/net/dev counts them.
fn received(netns: &Path, dev: &str) -> u64 {
    let table = command_in(netns, "cat", &["/proc/net/dev"]).expect("/proc/net/dev");
    table
        .lines()
        .find_map(|line| line.trim().strip_prefix(&format!("{dev}:")))
        .and_then(|counts| counts.split_whitespace().nth(1)?.parse().ok())
        .expect("the device's receive count")
}

/// Reads frames from the tap's queues, as they become readable, until one comes from `source`
/// with `ethertype` or five seconds pass.
fn wait_for_frame(queues: &[OwnedFd], source: [u8; 6], ethertype: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut files: Vec<fs::File> = queues
        .iter()
        .map(|q| fs::File::from(q.try_clone().expect("dup")))
        .collect();
    for file in &files {
        fcntl(file, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).expect("non-blocking");
    }
    let mut frame = [0u8; 2048];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let mut fds: Vec<PollFd> = files
            .iter()
            .map(|f| PollFd::new(f.as_fd(), PollFlags::POLLIN))
            .collect();
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        if poll(&mut fds, timeout).expect("poll") == 0 {
            break;
        }
        for file in &mut files {
            let Ok(n) = file.read(&mut frame) else {
                continue;
            };
            let ethernet = &frame[VNET_HDR.min(n)..n];
            if ethernet.len() >= 14
                && ethernet[6..12] == source
                && u16::from_be_bytes([ethernet[12], ethernet[13]]) == ethertype
            {
                return true;
            }
        }
    }
    false
}

/// What comes before each frame on a tap queue opened with IFF_VNET_HDR: a virtio_net_hdr.
const VNET_HDR: usize = 10;

/// The tap and the veth are one wire: the veth's traffic reaches the tap's queues, what the
/// VM writes leaves through the veth, and tc shows the same qdiscs and filters as the `tc`
/// commands once made. Detaching takes the veth's redirect and the tap away.
#[test]
fn an_attached_tap_and_veth_are_one_wire() {
    must_be_root();
    let bind_point = TestBindPoint::new("tap-wire");
    let netns = bind_point.0.clone();
    let holder = NetnsHolder::create(&netns).expect("namespace");
    let run = |program: &str, args: &[&str]| command_in(&netns, program, args).expect(program);
    // No IPv6 chatter (router solicitations, MLD) on the links: every frame is the test's.
    run("sysctl", &["-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
    run("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    run(
        "ip",
        &[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "vpeer",
            "address",
            "02:00:00:00:00:aa",
        ],
    );
    run("ip", &["addr", "add", "10.200.0.2/24", "dev", "vpeer"]);
    run("ip", &["link", "set", "vpeer", "up"]);
    run("ip", &["link", "set", "eth0", "up"]);
    let index = link_index(&netns, "eth0");

    let fds = attach(&netns, "eth0", index, "tap0_hk", 1400, 2).expect("attach");
    assert_eq!(fds.len(), 2, "a queue pair per queue asked for");
    let tap = run("ip", &["-o", "link", "show", "tap0_hk"]);
    assert!(tap.contains("mtu 1400") && tap.contains(",UP"), "{tap}");
    for (from, to) in [("eth0", "tap0_hk"), ("tap0_hk", "eth0")] {
        let qdiscs = run("tc", &["qdisc", "show", "dev", from]);
        assert!(qdiscs.contains("qdisc ingress ffff:"), "{from}: {qdiscs}");
        let filters = run("tc", &["filter", "show", "dev", from, "ingress"]);
        for shown in [
            "protocol all",
            "u32",
            "match 00000000/00000000 at 0",
            &format!("mirred (Egress Redirect to device {to}) stolen"),
        ] {
            assert!(filters.contains(shown), "{from}: {shown:?} in {filters}");
        }
    }

    // The peer's ARP request for a neighbour arrives at the veth, so at the tap's queues.
    let path = netns.clone();
    crate::net::namespace::on_thread_in(&netns, "sending", move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp");
        socket
            .send_to(b"x", "10.200.0.9:9")
            .map_err(|e| NetError::Namespace {
                path,
                reason: e.to_string(),
            })
    })
    .expect("sent");
    let arp = wait_for_frame(&fds, [2, 0, 0, 0, 0, 0xaa], 0x0806);
    assert!(arp, "the peer's ARP request reached the tap");

    // A frame the VM writes leaves through the veth: the peer receives it.
    let before = received(&netns, "vpeer");
    let mut frame = vec![0u8; VNET_HDR];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&[2, 0, 0, 0, 0, 0xbb]);
    frame.extend_from_slice(&0x88b5u16.to_be_bytes());
    frame.extend_from_slice(&[0u8; 46]);
    let mut queue = fs::File::from(fds[0].try_clone().expect("dup"));
    for _ in 0..3 {
        queue.write_all(&frame).expect("written to the tap");
    }
    assert_eq!(received(&netns, "vpeer"), before + 3, "through the veth");

    // While the queues are open, as when the VMM has just let go: the tap goes all the same.
    detach(&netns, "eth0", "tap0_hk");
    let qdiscs = run("tc", &["qdisc", "show", "dev", "eth0"]);
    assert!(!qdiscs.contains("ingress"), "left on the veth: {qdiscs}");
    assert!(
        !run("ip", &["-o", "link", "show"]).contains("tap0_hk"),
        "tap left"
    );
    // Detaching again finds nothing, and says nothing.
    detach(&netns, "eth0", "tap0_hk");
    drop((fds, queue, holder));
    bind_point.release().expect("unmount and remove");
}
