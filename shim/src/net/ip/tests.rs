use super::*;
use crate::net::namespace::{command_in, link_index, TestBindPoint};
use crate::net::NetnsHolder;

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

/// A real namespace, as a plugin leaves it: a veth with addresses, permanent and learnt
/// neighbours, gateway routes of both families and some that are not the pod's; beside it
/// loopback and a tap of hako's own. The scan sees exactly the pod's part.
#[test]
fn a_scan_sees_the_pods_veth_addresses_neighbours_and_gateway_routes() {
    // Never a silent pass: hako's tests run as root (scripts/test.sh).
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: run the unit tests as root, as scripts/test.sh does"
    );
    // The points outlive the holders (dropped in reverse order), also when an assert panics.
    let pod_point = TestBindPoint::new("scan-pod");
    let peer_point = TestBindPoint::new("scan-peer");
    let pod = NetnsHolder::create(&pod_point.0).expect("pod namespace");
    // The veth's far end lives elsewhere, as a plugin's does (on the host).
    let peer = NetnsHolder::create(&peer_point.0).expect("peer namespace");
    let netns = pod_point.0.clone();
    let ip = |args: &[&str]| command_in(&netns, "ip", args).expect("ip");

    assert_eq!(scan(&netns).expect("empty scan"), Scan::default());

    let peer_pid = peer.pid().to_string();
    ip(&[
        "link",
        "add",
        "eth0",
        "address",
        "02:42:0A:58:00:02",
        "mtu",
        "1450",
        "type",
        "veth",
        "peer",
        "name",
        "vpeer",
        "netns",
        &peer_pid,
    ]);
    command_in(&peer_point.0, "ip", &["link", "set", "vpeer", "up"]).expect("peer up");
    ip(&["addr", "add", "10.88.0.2/16", "dev", "eth0"]);
    ip(&["addr", "add", "fd00::2/64", "dev", "eth0", "nodad"]);
    ip(&["link", "set", "eth0", "up"]);
    for (address, mac, state) in [
        ("10.88.0.1", "ee:ee:ee:ee:ee:ee", "permanent"),
        ("fd00::1", "ee:ee:ee:ee:ee:01", "permanent"),
        ("10.88.0.9", "02:00:00:00:00:09", "reachable"),
    ] {
        ip(&[
            "neigh", "add", address, "lladdr", mac, "nud", state, "dev", "eth0",
        ]);
    }
    ip(&["route", "add", "default", "via", "10.88.0.1", "dev", "eth0"]);
    ip(&["route", "add", "10.99.0.0/16", "via", "10.88.0.254"]);
    ip(&["route", "add", "10.77.0.5/32", "via", "10.88.0.1"]);
    ip(&[
        "-6", "route", "add", "default", "via", "fd00::1", "dev", "eth0",
    ]);
    // Another table's route is policy routing's, not the pod's gateway.
    ip(&[
        "route",
        "add",
        "default",
        "via",
        "10.88.0.3",
        "table",
        "100",
    ]);
    ip(&["tuntap", "add", "tap7_hk", "mode", "tap"]);
    let index = link_index(&netns, "eth0");

    let mut found = scan(&netns).expect("scan");
    let route = |destination: &str, gateway: &str, ipv6: bool| pb::Route {
        destination: destination.into(),
        gateway: gateway.into(),
        ipv6,
        ..Default::default()
    };
    let by_destination =
        |a: &pb::Route, b: &pb::Route| (a.ipv6, &a.destination).cmp(&(b.ipv6, &b.destination));
    found.routes.sort_by(by_destination);
    assert_eq!(
        found.routes,
        [
            route("10.77.0.5/32", "10.88.0.1", false),
            route("10.99.0.0/16", "10.88.0.254", false),
            route("default", "10.88.0.1", false),
            route("default", "fd00::1", true),
        ]
    );
    let [link] = &mut found.links[..] else {
        panic!("one link, not {:?}", found.links);
    };
    link.neighbours = sorted(std::mem::take(&mut link.neighbours));
    assert_eq!(
        *link,
        FoundLink {
            index,
            name: "eth0".into(),
            mac: "02:42:0a:58:00:02".into(),
            mtu: 1450,
            // Global ones only: the fe80:: address the kernel gave the link is not the pod's.
            addresses: vec!["10.88.0.2/16".into(), "fd00::2/64".into()],
            neighbours: vec![
                ("10.88.0.1".into(), "ee:ee:ee:ee:ee:ee".into()),
                ("fd00::1".into(), "ee:ee:ee:ee:ee:01".into()),
            ],
        }
    );

    // The same link under a new name, as Docker renames a veth it moved in.
    ip(&["link", "set", "eth0", "down"]);
    ip(&["link", "set", "eth0", "name", "pod0"]);
    assert_eq!(name_of(&netns, index).as_deref(), Some("pod0"));
    assert_eq!(name_of(&netns, 99_999), None);

    // A name the guest's picture must not carry is refused, not passed on.
    ip(&[
        "link", "add", "a,b", "type", "veth", "peer", "name", "vodd", "netns", &peer_pid,
    ]);
    assert!(
        matches!(scan(&netns), Err(NetError::BadName(name)) if name == "a,b"),
        "an odd name"
    );

    drop((pod, peer));
    pod_point.release().expect("unmount and remove");
    peer_point.release().expect("unmount and remove");
}

#[test]
fn a_missing_namespace_is_an_error_that_names_it() {
    let error = scan(Path::new("/nonexistent/netns")).expect_err("no namespace");
    assert!(error.to_string().contains("/nonexistent/netns"), "{error}");
}
