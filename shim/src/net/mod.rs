//! Pod networking on the host: for each veth in the pod's network namespace, a tap device in
//! the same namespace, joined to the veth by tc ingress redirects both ways, and handed to the
//! VMM as a file descriptor. The guest NIC takes the veth's MAC, MTU and addresses, so to the
//! network plugin the VM is the veth.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use hako_protocol as pb;
use nix::sched::{setns, CloneFlags};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The spec asks for the host's network stack, which a VM cannot share.
    #[error("host networking is not possible with hako: a VM cannot share the host's network stack; give the container a network namespace (the default for ctr, docker, CRI)")]
    HostNetwork,
    /// The network namespace could not be used.
    #[error("network namespace {path}: {reason}")]
    Namespace { path: PathBuf, reason: String },
    /// An `ip` or `tc` command failed.
    #[error("{command}: {message}")]
    Command { command: String, message: String },
    /// The tap device could not be created.
    #[error("creating tap {name}: {source}")]
    Tap {
        name: String,
        source: std::io::Error,
    },
    /// An interface name from the namespace is not a plain name.
    #[error("unexpected interface name {0:?} in the pod's network namespace")]
    BadName(String),
}

/// What the spec says about the pod's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkMode {
    /// A network namespace with no path: a new, empty one. The VM gets no NIC.
    Isolated,
    /// The pod's network namespace, made by containerd, Docker or a CNI plugin.
    Namespace(PathBuf),
    /// No network namespace at all: the host's stack.
    Host,
}

pub fn mode(spec: &Spec) -> NetworkMode {
    let ns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|n| {
            n.iter()
                .find(|n| n.typ() == LinuxNamespaceType::Network)
                .cloned()
        });
    match ns {
        None => NetworkMode::Host,
        Some(ns) => match ns.path() {
            Some(path) => NetworkMode::Namespace(path.clone()),
            None => NetworkMode::Isolated,
        },
    }
}

/// One veth and its tap.
#[derive(Debug)]
pub struct TapLink {
    pub veth: String,
    pub tap: String,
    pub mac: String,
    pub mtu: u32,
    pub addresses: Vec<String>,
    /// Permanent neighbour entries on the veth: (address, MAC).
    pub neighbours: Vec<(String, String)>,
    /// The tap's queues: the VMM reads and writes the guest's packets through them.
    pub fds: Vec<OwnedFd>,
}

/// What teardown needs, also written to the sandbox dir for the `delete` path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetRecord {
    pub netns: PathBuf,
    pub links: Vec<(String, String)>,
}

#[derive(Debug)]
pub struct PodNetwork {
    pub netns: PathBuf,
    pub links: Vec<TapLink>,
    pub routes: Vec<pb::Route>,
}

/// Interface names reach `ip`/`tc` argv: the kernel's own rules, but refuse anything odd.
fn plain_name(name: &str) -> Result<&str, NetError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '@'));
    if ok {
        Ok(name)
    } else {
        Err(NetError::BadName(name.to_string()))
    }
}

fn run_in(netns: &Path, program: &str, args: &[&str]) -> Result<String, NetError> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display()))
        .arg(program)
        .args(args);
    let shown = format!("{program} {}", args.join(" "));
    let out = cmd.output().map_err(|e| NetError::Command {
        command: shown.clone(),
        message: e.to_string(),
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetError::Command {
            command: shown,
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[derive(Deserialize)]
struct IpLink {
    ifname: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    mtu: u32,
    #[serde(default)]
    link_type: String,
    #[serde(default)]
    addr_info: Vec<IpAddr>,
}

#[derive(Deserialize)]
struct IpAddr {
    family: String,
    local: String,
    prefixlen: u32,
    #[serde(default)]
    scope: String,
}

#[derive(Deserialize)]
struct IpNeigh {
    dst: String,
    #[serde(default)]
    dev: String,
    #[serde(default)]
    lladdr: String,
    #[serde(default)]
    state: Vec<String>,
}

/// Parses `ip -j neigh show`: the permanent entries on `dev` (what a plugin set on purpose;
/// learnt entries the guest learns again itself).
fn parse_neighbours(json: &str, dev: &str) -> Vec<(String, String)> {
    let entries: Vec<IpNeigh> = serde_json::from_str(json).unwrap_or_default();
    entries
        .into_iter()
        .filter(|n| n.dev == dev && !n.lladdr.is_empty())
        .filter(|n| n.state.iter().any(|s| s == "PERMANENT"))
        .map(|n| (n.dst, n.lladdr))
        .collect()
}

#[derive(Deserialize)]
struct IpRoute {
    dst: String,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    dev: String,
}

const TAP_SUFFIX: &str = "_hk";

/// An ethernet link of the pod as `ip` shows it.
#[derive(Debug, PartialEq, Eq)]
struct FoundLink {
    name: String,
    mac: String,
    mtu: u32,
    addresses: Vec<String>,
}

/// Parses `ip -j addr show`: the pod's ethernet links with global addresses (loopback and our
/// own taps skipped).
fn parse_links(json: &str) -> Result<Vec<FoundLink>, NetError> {
    let links: Vec<IpLink> = serde_json::from_str(json).map_err(|e| NetError::Command {
        command: "ip -j addr show".to_string(),
        message: e.to_string(),
    })?;
    let mut out = Vec::new();
    for link in links {
        if link.link_type != "ether" || link.ifname.ends_with(TAP_SUFFIX) {
            continue;
        }
        // "eth0@if12": the part before '@' is the name.
        let name = link
            .ifname
            .split('@')
            .next()
            .unwrap_or_default()
            .to_string();
        plain_name(&name)?;
        let addresses = link
            .addr_info
            .iter()
            .filter(|a| a.scope == "global" && (a.family == "inet" || a.family == "inet6"))
            .map(|a| format!("{}/{}", a.local, a.prefixlen))
            .collect();
        out.push(FoundLink {
            name,
            mac: link.address,
            mtu: link.mtu,
            addresses,
        });
    }
    Ok(out)
}

/// Parses `ip -j route show`: the routes through a gateway on one of `devs`.
fn parse_routes(json: &str, devs: &[String], ipv6: bool) -> Vec<pb::Route> {
    let routes: Vec<IpRoute> = serde_json::from_str(json).unwrap_or_default();
    routes
        .into_iter()
        .filter(|r| devs.contains(&r.dev))
        .filter_map(|r| {
            Some(pb::Route {
                destination: r.dst,
                gateway: r.gateway?,
                ipv6,
                ..Default::default()
            })
        })
        .collect()
}

/// Most queue pairs a NIC gets, whatever the vCPU count.
pub const MAX_QUEUES: u32 = 8;

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

/// Builds the taps (each with `queues` queues) and redirects. On error, what was made is
/// removed again.
pub fn setup(netns: &Path, queues: u32) -> Result<PodNetwork, NetError> {
    if !netns.exists() {
        return Err(NetError::Namespace {
            path: netns.to_path_buf(),
            reason: "does not exist".to_string(),
        });
    }
    let found = parse_links(&run_in(netns, "ip", &["-j", "addr", "show"])?)?;
    let neighbours = run_in(netns, "ip", &["-j", "neigh", "show"])?;
    let mut network = PodNetwork {
        netns: netns.to_path_buf(),
        links: Vec::new(),
        routes: Vec::new(),
    };
    for (index, link) in found.into_iter().enumerate() {
        let FoundLink {
            name: veth,
            mac,
            mtu,
            addresses,
        } = link;
        let tap = format!("tap{index}{TAP_SUFFIX}");
        match link_one(netns, &veth, &tap, mtu, queues) {
            Ok(fds) => network.links.push(TapLink {
                neighbours: parse_neighbours(&neighbours, &veth),
                veth,
                tap,
                mac,
                mtu,
                addresses,
                fds,
            }),
            Err(e) => {
                unlink(netns, &veth, &tap);
                network.teardown();
                return Err(e);
            }
        }
    }
    let devs: Vec<String> = network.links.iter().map(|l| l.veth.clone()).collect();
    network.routes = parse_routes(
        &run_in(netns, "ip", &["-j", "-4", "route", "show"])?,
        &devs,
        false,
    );
    network.routes.extend(parse_routes(
        &run_in(netns, "ip", &["-j", "-6", "route", "show"])?,
        &devs,
        true,
    ));
    Ok(network)
}

fn link_one(
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
fn unlink(netns: &Path, veth: &str, tap: &str) {
    let _ = run_in(netns, "tc", &["qdisc", "del", "dev", veth, "ingress"]);
    let _ = run_in(netns, "ip", &["link", "del", "dev", tap]);
}

impl PodNetwork {
    pub fn record(&self) -> NetRecord {
        NetRecord {
            netns: self.netns.clone(),
            links: self
                .links
                .iter()
                .map(|l| (l.veth.clone(), l.tap.clone()))
                .collect(),
        }
    }

    pub fn teardown(&self) {
        teardown_record(&self.record());
    }

    pub fn interfaces(&self) -> Vec<pb::Interface> {
        self.links
            .iter()
            .map(|l| pb::Interface {
                name: l.veth.clone(),
                mac: l.mac.clone(),
                mtu: l.mtu,
                addresses: l.addresses.clone(),
                neighbors: l
                    .neighbours
                    .iter()
                    .map(|(ip, mac)| pb::Neighbor {
                        ip: ip.clone(),
                        mac: mac.clone(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect()
    }
}

pub fn teardown_record(record: &NetRecord) {
    if !record.netns.exists() {
        return;
    }
    for (veth, tap) in &record.links {
        if plain_name(veth).is_ok() && plain_name(tap).is_ok() {
            unlink(&record.netns, veth, tap);
        }
    }
}

/// A thread of the shim parked in a network namespace. Hooks get its id as the container's
/// pid: Docker's `libnetwork-setkey` and CNI hooks find the namespace as `/proc/<pid>/ns/net`,
/// which names a thread's namespace as well as a process's. No extra process is needed, and the
/// thread never runs anything else.
pub struct NetnsHolder {
    tid: u32,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum HolderTarget {
    /// A new, empty namespace, kept alive by a bind mount on this file.
    New(PathBuf),
    Existing(PathBuf),
}

impl NetnsHolder {
    /// Makes a new network namespace and bind-mounts it at `bind_at` (a file that must not
    /// exist yet; unmounting it and removing it is the caller's cleanup).
    pub fn create(bind_at: &Path) -> Result<Self, NetError> {
        Self::spawn(HolderTarget::New(bind_at.to_path_buf()))
    }

    /// Parks a thread in the namespace at `path`.
    pub fn enter(path: &Path) -> Result<Self, NetError> {
        Self::spawn(HolderTarget::Existing(path.to_path_buf()))
    }

    pub fn pid(&self) -> u32 {
        self.tid
    }

    fn spawn(target: HolderTarget) -> Result<Self, NetError> {
        let path = match &target {
            HolderTarget::New(p) | HolderTarget::Existing(p) => p.clone(),
        };
        let ns_err = |reason: String| NetError::Namespace {
            path: path.clone(),
            reason,
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<u32, String>>();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("netns-holder".to_string())
            .spawn(move || {
                let entered = enter_on_this_thread(&target);
                let tid = nix::unistd::gettid().as_raw() as u32;
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered.map(|()| tid));
                if ok {
                    // Parked until the holder is dropped (the sender goes away).
                    let _ = stop_rx.recv();
                }
            })
            .map_err(|e| ns_err(format!("starting a thread: {e}")))?;
        let mut holder = Self {
            tid: 0,
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(tid)) => {
                holder.tid = tid;
                Ok(holder)
            }
            Ok(Err(reason)) => Err(ns_err(reason)),
            Err(_) => Err(ns_err("the namespace thread died".to_string())),
        }
    }
}

fn enter_on_this_thread(target: &HolderTarget) -> Result<(), String> {
    match target {
        HolderTarget::Existing(path) => {
            let ns = fs::File::open(path).map_err(|e| e.to_string())?;
            setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns: {e}"))
        }
        HolderTarget::New(bind_at) => {
            // Only this thread moves: network namespaces are per task.
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("unshare: {e}"))?;
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(bind_at)
                .map_err(|e| format!("creating the mount point: {e}"))?;
            let bound = nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                bind_at,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            );
            if let Err(e) = bound {
                let _ = fs::remove_file(bind_at);
                return Err(format!("bind-mounting the namespace: {e}"));
            }
            Ok(())
        }
    }
}

impl Drop for NetnsHolder {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_modes_follow_the_spec() {
        let spec = |ns: &str| -> Spec {
            serde_json::from_str(&format!(
                r#"{{"ociVersion":"1.0.2","linux":{{"namespaces":[{ns}]}}}}"#
            ))
            .expect("spec")
        };
        assert_eq!(mode(&spec(r#"{"type":"pid"}"#)), NetworkMode::Host);
        assert_eq!(mode(&spec(r#"{"type":"network"}"#)), NetworkMode::Isolated);
        assert_eq!(
            mode(&spec(r#"{"type":"network","path":"/run/netns/p"}"#)),
            NetworkMode::Namespace(PathBuf::from("/run/netns/p"))
        );
    }

    #[test]
    fn links_and_routes_are_read_from_ip_json() {
        let links = r#"[
          {"ifname":"lo","link_type":"loopback","address":"00:00:00:00:00:00","mtu":65536,"addr_info":[]},
          {"ifname":"eth0@if7","link_type":"ether","address":"02:42:0a:58:00:02","mtu":1450,
           "addr_info":[{"family":"inet","local":"10.88.0.2","prefixlen":16,"scope":"global"},
                        {"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"},
                        {"family":"inet6","local":"fd00::2","prefixlen":64,"scope":"global"}]},
          {"ifname":"tap0_hk","link_type":"ether","address":"aa:aa:aa:aa:aa:aa","mtu":1500,"addr_info":[]}]"#;
        let parsed = parse_links(links).expect("parsed");
        assert_eq!(parsed.len(), 1);
        assert_eq!(
            parsed[0],
            FoundLink {
                name: "eth0".into(),
                mac: "02:42:0a:58:00:02".into(),
                mtu: 1450,
                addresses: vec!["10.88.0.2/16".into(), "fd00::2/64".into()],
            }
        );

        let routes = r#"[{"dst":"default","gateway":"10.88.0.1","dev":"eth0"},
                         {"dst":"10.88.0.0/16","dev":"eth0","scope":"link"},
                         {"dst":"default","gateway":"192.168.1.1","dev":"other"}]"#;
        let neighbours = r#"[{"dst":"10.88.0.1","dev":"eth0","lladdr":"ee:ee:ee:ee:ee:ee","state":["PERMANENT"]},
                             {"dst":"10.88.0.9","dev":"eth0","lladdr":"02:00:00:00:00:09","state":["REACHABLE"]},
                             {"dst":"fd00::1","dev":"eth0","lladdr":"ee:ee:ee:ee:ee:01","state":["PERMANENT"]},
                             {"dst":"10.1.0.1","dev":"other","lladdr":"ee:ee:ee:ee:ee:02","state":["PERMANENT"]}]"#;
        assert_eq!(
            parse_neighbours(neighbours, "eth0"),
            [
                ("10.88.0.1".to_string(), "ee:ee:ee:ee:ee:ee".to_string()),
                ("fd00::1".to_string(), "ee:ee:ee:ee:ee:01".to_string())
            ]
        );

        let parsed = parse_routes(routes, &["eth0".to_string()], false);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].destination, "default");
        assert_eq!(parsed[0].gateway, "10.88.0.1");
    }

    #[test]
    fn a_holder_thread_names_a_new_namespace_by_its_pid() {
        // Never a silent pass: hako's tests run as root (scripts/test.sh).
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: run the unit tests as root, as scripts/test.sh does"
        );
        let bind_at = std::env::temp_dir().join(format!("hako-netns-{}", std::process::id()));
        let holder = NetnsHolder::create(&bind_at).expect("holder");
        let ns_of = |p: &str| fs::read_link(p).expect(p).display().to_string();
        let held = ns_of(&format!("/proc/{}/ns/net", holder.pid()));
        assert_ne!(
            held,
            ns_of("/proc/self/ns/net"),
            "the thread moved, the shim did not"
        );
        // The bind mount is the same namespace, and outlives the thread.
        drop(holder);
        let bound = fs::File::open(&bind_at).expect("bound");
        let again = NetnsHolder::enter(&bind_at).expect("enter");
        assert_eq!(ns_of(&format!("/proc/{}/ns/net", again.pid())), held);
        drop((again, bound));
        nix::mount::umount(&bind_at).expect("unmount");
        fs::remove_file(&bind_at).expect("remove");
        assert!(NetnsHolder::enter(&bind_at).is_err());
    }

    #[test]
    fn odd_names_are_refused() {
        assert!(plain_name("eth0").is_ok());
        for bad in ["", "-x", "a b", "x;y", &"e".repeat(16)] {
            assert!(plain_name(bad).is_err(), "{bad:?}");
        }
    }
}
