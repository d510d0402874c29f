//! Pod networking on the host. The VM runs inside the pod's network namespace and takes its
//! interfaces over: for each veth there, a tap device beside it, joined by tc redirects
//! (`tap`), and a guest NIC with the veth's MAC, MTU, addresses and permanent neighbours, so to
//! the network plugin the VM is the veth. What the namespace holds is read over rtnetlink
//! (`ip`); it can change while the pod runs (Docker 28 configures it after Create; `docker
//! network connect`), which `watch` notices, and `PodNetwork::plan` says what the VM must gain
//! or lose. All of it is done in-process, over netlink sockets made inside the namespace
//! (`rtnl`, `nftables`): a pod start spawns no helper process for its network.

pub mod forward;
pub mod ip;
pub mod namespace;
pub mod nftables;
pub mod rtnl;
pub mod tap;
pub mod watch;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use hako_protocol as pb;
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use serde::{Deserialize, Serialize};

pub use ip::{FoundLink, Scan};
pub use namespace::NetnsHolder;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The spec asks for the host's network stack, which a VM cannot share.
    #[error("host networking is not possible with hako: a VM cannot share the host's network stack; give the container a network namespace (the default for ctr, docker, CRI)")]
    HostNetwork,
    /// The spec's network namespace path names the host's (or the shim's) own namespace.
    #[error("network namespace {path} is the host's own: hako would hand the host's interfaces to the VM; give the container a network namespace of its own")]
    HostNamespace { path: PathBuf },
    /// The network namespace could not be used.
    #[error("network namespace {path}: {reason}")]
    Namespace { path: PathBuf, reason: String },
    /// A netlink request (rtnetlink or nf_tables) in the pod's namespace failed.
    #[error("{operation}: {reason}")]
    Netlink { operation: String, reason: String },
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
    /// A network namespace with no path: a new one, which the shim makes.
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

/// hako's taps end with this; everything else in the namespace is the pod's.
pub const TAP_SUFFIX: &str = "_hk";
/// Most queue pairs a NIC gets, whatever the vCPU count.
pub const MAX_QUEUES: u32 = 8;

/// Interface names reach the guest's picture and `net.json`: the kernel's own rules, but refuse
/// anything odd.
pub fn plain_name(name: &str) -> Result<&str, NetError> {
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

/// One pod interface the VM has: the veth as last seen, its tap, and the VMM's NIC for it.
#[derive(Debug)]
pub struct TapLink {
    pub veth: FoundLink,
    pub tap: String,
    /// The VMM's id of the guest NIC (QEMU device and netdev id, Cloud Hypervisor device id).
    pub nic: String,
    /// The tap's queues: the VMM reads and writes the guest's packets through them.
    pub fds: Vec<OwnedFd>,
}

/// What teardown needs, also written to the sandbox dir for the `delete` path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetRecord {
    pub netns: PathBuf,
    /// (veth, tap) pairs.
    pub links: Vec<(String, String)>,
}

/// What must change for the VM to match a scan of the namespace.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Links the VM does not have yet.
    pub added: Vec<FoundLink>,
    /// NICs whose veth is gone (or is another link now, by index or MAC).
    pub removed: Vec<String>,
    /// Whether the guest's picture (names, addresses, MTUs, neighbours, routes) changes.
    pub changed: bool,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && !self.changed
    }
}

/// The pod's network as the VM has it.
#[derive(Debug)]
pub struct PodNetwork {
    pub netns: PathBuf,
    pub links: Vec<TapLink>,
    pub routes: Vec<pb::Route>,
    /// Queue pairs per NIC.
    queues: u32,
    /// Taps and NICs get fresh numbers: a name is never reused while the VM runs.
    next: u32,
}

/// The same link: the kernel's index and the MAC both unchanged.
fn same_link(a: &FoundLink, b: &FoundLink) -> bool {
    a.index == b.index && a.mac == b.mac
}

impl PodNetwork {
    pub fn new(netns: &Path, queues: u32) -> Self {
        Self {
            netns: netns.to_path_buf(),
            links: Vec::new(),
            routes: Vec::new(),
            queues: queues.clamp(1, MAX_QUEUES),
            next: 0,
        }
    }

    /// Compares what the VM has with `scan`.
    pub fn plan(&self, scan: &Scan) -> Plan {
        let added: Vec<FoundLink> = scan
            .links
            .iter()
            .filter(|found| !self.links.iter().any(|l| same_link(&l.veth, found)))
            .cloned()
            .collect();
        let removed: Vec<String> = self
            .links
            .iter()
            .filter(|l| !scan.links.iter().any(|found| same_link(&l.veth, found)))
            .map(|l| l.nic.clone())
            .collect();
        let kept_differ = self.links.iter().any(|l| {
            scan.links
                .iter()
                .find(|found| same_link(&l.veth, found))
                .is_some_and(|found| *found != l.veth)
        });
        Plan {
            changed: !added.is_empty()
                || !removed.is_empty()
                || kept_differ
                || self.routes != scan.routes,
            added,
            removed,
        }
    }

    /// Makes the tap for a new link; the caller hands its queues to the VMM.
    pub fn attach(&mut self, veth: FoundLink) -> Result<&TapLink, NetError> {
        let n = self.next;
        self.next += 1;
        let tap = format!("tap{n}{TAP_SUFFIX}");
        let fds = tap::attach(
            &self.netns,
            &veth.name,
            veth.index,
            &tap,
            veth.mtu,
            self.queues,
        )?;
        self.links.push(TapLink {
            veth,
            tap,
            nic: format!("nic{n}"),
            fds,
        });
        Ok(&self.links[self.links.len() - 1])
    }

    /// Takes a NIC out of the picture (the guest's next update no longer has it); `release`
    /// removes its tap once the VMM has let go of it.
    pub fn take(&mut self, nic: &str) -> Option<TapLink> {
        let at = self.links.iter().position(|l| l.nic == nic)?;
        Some(self.links.remove(at))
    }

    pub fn release(&self, link: TapLink) {
        tap::detach(&self.netns, &link.veth.name, &link.tap);
    }

    /// Takes the current names, addresses, MTUs, neighbours and routes from `scan`.
    pub fn refresh(&mut self, scan: &Scan) {
        for link in &mut self.links {
            if let Some(found) = scan.links.iter().find(|f| same_link(&link.veth, f)) {
                link.veth = found.clone();
            }
        }
        self.routes = scan.routes.clone();
    }

    pub fn record(&self) -> NetRecord {
        NetRecord {
            netns: self.netns.clone(),
            links: self
                .links
                .iter()
                .map(|l| (l.veth.name.clone(), l.tap.clone()))
                .collect(),
        }
    }

    pub fn teardown(&self) {
        teardown_record(&self.record());
    }

    /// The guest's picture of the network.
    pub fn interfaces(&self) -> Vec<pb::Interface> {
        self.links
            .iter()
            .map(|l| pb::Interface {
                name: l.veth.name.clone(),
                mac: l.veth.mac.clone(),
                mtu: l.veth.mtu,
                addresses: l.veth.addresses.clone(),
                neighbors: l
                    .veth
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
            tap::detach(&record.netns, veth, tap);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

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

    fn found(index: u32, name: &str, mac: &str, addresses: &[&str]) -> FoundLink {
        FoundLink {
            index,
            name: name.into(),
            mac: mac.into(),
            mtu: 1500,
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            neighbours: Vec::new(),
        }
    }

    /// A network whose links exist only on paper (no taps), for planning.
    fn network(links: &[FoundLink]) -> PodNetwork {
        let mut n = PodNetwork::new(Path::new("/nonexistent"), 1);
        for (i, veth) in links.iter().enumerate() {
            n.links.push(TapLink {
                veth: veth.clone(),
                tap: format!("tap{i}{TAP_SUFFIX}"),
                nic: format!("nic{i}"),
                fds: Vec::new(),
            });
        }
        n
    }

    #[test]
    fn plans_follow_links_by_index_and_mac() {
        let eth0 = found(7, "eth0", "02:42:ac:11:00:02", &["172.17.0.2/16"]);
        let eth1 = found(9, "eth1", "02:42:0a:7b:00:02", &["10.123.0.2/24"]);
        let net = network(std::slice::from_ref(&eth0));
        let same = Scan {
            links: vec![eth0.clone()],
            routes: Vec::new(),
        };
        assert!(net.plan(&same).is_empty());

        // docker network connect: a new veth.
        let connected = Scan {
            links: vec![eth0.clone(), eth1.clone()],
            routes: Vec::new(),
        };
        let plan = net.plan(&connected);
        assert_eq!(plan.added, vec![eth1.clone()]);
        assert!(plan.removed.is_empty() && plan.changed);

        // docker network disconnect: the veth is gone.
        let plan = network(&[eth0.clone(), eth1.clone()]).plan(&same);
        assert_eq!(plan.removed, vec!["nic1".to_string()]);
        assert!(plan.added.is_empty());

        // An address change keeps the NIC and changes the picture.
        let readdressed = Scan {
            links: vec![found(7, "eth0", "02:42:ac:11:00:02", &["172.17.0.9/16"])],
            routes: Vec::new(),
        };
        let plan = net.plan(&readdressed);
        assert!(plan.added.is_empty() && plan.removed.is_empty() && plan.changed);

        // A new MAC on the same index is another device for the guest: replaced.
        let new_mac = Scan {
            links: vec![found(7, "eth0", "02:42:ac:11:00:99", &["172.17.0.2/16"])],
            routes: Vec::new(),
        };
        let plan = net.plan(&new_mac);
        assert_eq!(plan.removed, vec!["nic0".to_string()]);
        assert_eq!(plan.added.len(), 1);

        // A route change alone changes the picture.
        let routed = Scan {
            links: vec![eth0],
            routes: vec![pb::Route {
                destination: "default".into(),
                gateway: "172.17.0.1".into(),
                ..Default::default()
            }],
        };
        assert!(net.plan(&routed).changed);
    }

    #[test]
    fn taking_a_nic_removes_it_from_the_guests_picture() {
        let mut net = network(&[
            found(7, "eth0", "02:42:ac:11:00:02", &[]),
            found(9, "eth1", "02:42:0a:7b:00:02", &[]),
        ]);
        let taken = net.take("nic0").expect("present");
        assert_eq!(taken.veth.name, "eth0");
        assert_eq!(net.interfaces().len(), 1);
        assert_eq!(net.interfaces()[0].name, "eth1");
        assert!(net.take("nic0").is_none());
    }

    #[test]
    fn a_holder_thread_names_a_new_namespace_by_its_pid() {
        // Never a silent pass: hako's tests run as root (scripts/test.sh).
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: run the unit tests as root, as scripts/test.sh does"
        );
        let bind_point = namespace::TestBindPoint::new("netns");
        let bind_at = bind_point.0.clone();
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
        // A namespace of its own is not the host's; the shim's own is refused by any name.
        assert!(namespace::refuse_host(&bind_at).is_ok());
        for own in ["/proc/self/ns/net", "/proc/thread-self/ns/net"] {
            let refused = namespace::refuse_host(Path::new(own)).expect_err(own);
            assert!(
                matches!(refused, NetError::HostNamespace { .. }),
                "{refused}"
            );
        }
        // init's: refused as the host's, or (where init is beyond even root's ptrace reach, as
        // on these build machines) as unusable.
        assert!(namespace::refuse_host(Path::new("/proc/1/ns/net")).is_err());
        drop((again, bound));
        bind_point.release().expect("unmount and remove");
        assert!(NetnsHolder::enter(&bind_at).is_err());
        assert!(matches!(
            namespace::refuse_host(&bind_at),
            Err(NetError::Namespace { .. })
        ));
    }

    #[test]
    fn odd_names_are_refused() {
        assert!(plain_name("eth0").is_ok());
        for bad in ["", "-x", "a b", "x;y", &"e".repeat(16)] {
            assert!(plain_name(bad).is_err(), "{bad:?}");
        }
    }
}
