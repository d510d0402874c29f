//! End-to-end: pod networking. Test hosts live in network namespaces the test makes (a pod
//! namespace and a server namespace joined by a veth pair, as a CNI plugin would leave them);
//! all traffic stays inside them. Against containerd 1.7 and 2.x.
//!
//! Boots VMs: `#[ignore]`d in a plain `cargo test`; `scripts/test.sh` runs them.

#![allow(clippy::unwrap_used)] // Test code: a failed step should fail the test loudly.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hako_tests::*;

fn sh(cmd: &str) -> Run {
    let mut c = Command::new("sh");
    c.args(["-c", cmd]);
    run_with_timeout(c, None, Duration::from_secs(30))
}

fn must(cmd: &str) -> String {
    let r = sh(cmd);
    assert_eq!(r.code, 0, "{cmd}: {r:?}");
    r.stdout
}

/// Two namespaces joined by a veth pair; the server side runs busybox httpd on port 8080.
struct TestNet {
    pod: String,
    srv: String,
    veth: String,
    www: PathBuf,
    httpd: Child,
}

impl TestNet {
    fn new() -> Self {
        let tag = std::process::id() % 100_000;
        let (pod, srv) = (format!("hkt-pod-{tag}"), format!("hkt-srv-{tag}"));
        let (veth, peer) = (format!("hkp{tag}"), format!("hks{tag}"));
        must(&format!("ip netns add {pod} && ip netns add {srv}"));
        must(&format!(
            "ip link add {veth} type veth peer name {peer} && \
             ip link set {veth} netns {pod} && ip link set {peer} netns {srv} && \
             ip -n {pod} link set lo up && ip -n {srv} link set lo up && \
             ip -n {pod} addr add 10.99.0.2/24 dev {veth} && ip -n {srv} addr add 10.99.0.1/24 dev {peer} && \
             ip -n {pod} -6 addr add fd99::2/64 dev {veth} nodad && \
             ip -n {srv} -6 addr add fd99::1/64 dev {peer} nodad && \
             ip -n {pod} link set {veth} up && ip -n {srv} link set {peer} up && \
             ip -n {pod} route add default via 10.99.0.1 && \
             ip -n {pod} neigh add 10.99.0.77 lladdr 02:00:00:00:00:77 dev {veth} nud permanent && \
             ip -n {pod} neigh add fd99::77 lladdr 02:00:00:00:00:78 dev {veth} nud permanent"
        ));
        let www = std::env::temp_dir().join(format!("hako-www-{tag}"));
        fs::create_dir_all(&www).unwrap();
        fs::write(www.join("index.html"), "hello from the server\n").unwrap();
        let httpd = Command::new("ip")
            .args([
                "netns", "exec", &srv, "busybox", "httpd", "-f", "-p", "8080", "-h",
            ])
            .arg(&www)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        TestNet {
            pod,
            srv,
            veth,
            www,
            httpd,
        }
    }

    fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.pod)
    }

    /// The pod namespace holds only what the plugin made: lo and the veth, no tap, no qdisc.
    fn assert_pristine(&self) {
        let links = must(&format!("ip -n {} -o link show", self.pod));
        assert_eq!(links.lines().count(), 2, "only lo and the veth: {links}");
        assert!(!links.contains("_hk"), "a tap was left: {links}");
        let qdiscs = must(&format!(
            "ip netns exec {} tc qdisc show dev {} ingress",
            self.pod, self.veth
        ));
        assert!(
            qdiscs.trim().is_empty(),
            "an ingress qdisc was left: {qdiscs}"
        );
        let addrs = must(&format!(
            "ip -n {} -o addr show dev {}",
            self.pod, self.veth
        ));
        assert!(
            addrs.contains("10.99.0.2/24"),
            "the veth keeps its address: {addrs}"
        );
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = self.httpd.kill();
        let _ = self.httpd.wait();
        let _ = sh(&format!(
            "ip netns del {}; ip netns del {}",
            self.pod, self.srv
        ));
        let _ = fs::remove_dir_all(&self.www);
    }
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn the_vm_takes_over_the_pods_network() {
    let net = TestNet::new();
    let with_ns = format!("--with-ns=network:{}", net.netns_path());
    for_each_containerd(|c| {
        // Out: the container fetches a page from the server namespace, over IPv4.
        // The guest NIC has the pod interface's name, as a runc container would see it.
        let fetch = format!("ip -o addr show dev {}; ", net.veth)
            + "ip route; ip neigh show; ip -6 neigh show; \
                     printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 10.99.0.1 8080; \
                     (nc -l -p 7777 -e echo loopback-answers &); \
                     for i in $(seq 50); do nc 127.0.0.1 7777 </dev/null 2>/dev/null && break; sleep 0.1; done";
        let r = c.run_rm_with("net1", &[&with_ns], &["sh", "-c", &fetch]);
        assert_eq!(r.code, 0, "{r:?}");
        assert!(r.stdout.contains("inet 10.99.0.2/24"), "{r:?}");
        assert!(r.stdout.contains("inet6 fd99::2/64"), "{r:?}");
        assert!(r.stdout.contains("default via 10.99.0.1"), "{r:?}");
        assert!(r.stdout.contains("hello from the server"), "{r:?}");
        // The plugin's permanent neighbours, IPv4 and IPv6, are the guest's too.
        for (ip, mac) in [
            ("10.99.0.77", "02:00:00:00:00:77"),
            ("fd99::77", "02:00:00:00:00:78"),
        ] {
            assert!(
                r.stdout.lines().any(|l| l.starts_with(&format!("{ip} "))
                    && l.contains(mac)
                    && l.contains("PERMANENT")),
                "{ip}: {r:?}"
            );
        }
        // Loopback works in the guest.
        assert!(r.stdout.contains("loopback-answers"), "{r:?}");
        net.assert_pristine();

        // In: a server in the container answers the server namespace, over IPv4 and IPv6.
        let serve = "while true; do echo hello-from-the-vm | nc -l -p 9090; done";
        let r = c.run_detached("net2", &[&with_ns], &["sh", "-c", serve]);
        assert_eq!(r.code, 0, "{r:?}");
        for address in ["10.99.0.2", "fd99::2"] {
            let started = Instant::now();
            loop {
                let r = sh(&format!(
                    "ip netns exec {} busybox nc -w 2 {address} 9090 </dev/null",
                    net.srv
                ));
                if r.stdout.contains("hello-from-the-vm") {
                    break;
                }
                // The listener comes up a moment after the task starts.
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "{address}: no answer: {r:?}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        c.remove_task("net2");
        net.assert_pristine();
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn an_empty_namespace_gives_no_nic_and_the_hosts_namespace_is_refused() {
    for_each_containerd(|c| {
        // A new namespace of the shim's own, with nothing in it: loopback only, and the VMM
        // (the task's pid) is in that namespace, not the host's.
        let r = c.run_detached("nonet", &[], &["sleep", "600"]);
        assert_eq!(r.code, 0, "{r:?}");
        let r = c.exec("nonet", "links", &[], &["ls", "/sys/class/net"]);
        assert_eq!(
            r.stdout.split_whitespace().collect::<Vec<_>>(),
            ["lo"],
            "{r:?}"
        );
        let ns = |pid: u32| fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
        let vmm = c.task_pid("nonet");
        assert_ne!(
            ns(vmm),
            ns(std::process::id()),
            "the VMM runs in the host's namespace"
        );
        assert_ne!(
            ns(vmm),
            ns(c.pid()),
            "the VMM runs in containerd's namespace"
        );
        c.remove_task("nonet");

        let r = c.run_rm_with("hostnet", &["--net-host"], &["true"]);
        assert_ne!(r.code, 0, "{r:?}");
        assert!(
            r.stderr.contains("host networking is not possible"),
            "{r:?}"
        );
        // A namespace path that names the host's own namespace, by whatever name: refused
        // before anything is made. (init's may be unreadable even to root, as on these build
        // machines: refused either way.)
        let containerd_ns = format!("--with-ns=network:/proc/{}/ns/net", c.pid());
        let r = c.run_rm_with("hostns", &[&containerd_ns], &["true"]);
        assert_ne!(r.code, 0, "{r:?}");
        assert!(r.stderr.contains("is the host's own"), "{r:?}");
        let r = c.run_rm_with("initns", &["--with-ns=network:/proc/1/ns/net"], &["true"]);
        assert_ne!(r.code, 0, "{r:?}");
        assert!(r.stderr.contains("/proc/1/ns/net"), "{r:?}");
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn a_vm_with_two_vcpus_gets_a_queue_pair_per_vcpu() {
    let net = TestNet::new();
    let with_ns = format!("--with-ns=network:{}", net.netns_path());
    let config = HakoConfig::new("[hypervisor]\nvcpus = 2\n");
    for_each_containerd_with_env(&config.env(), |c| {
        let script = format!("nproc; ls /sys/class/net/{}/queues; ", net.veth)
            + "\
                      printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 10.99.0.1 8080";
        let r = c.run_rm_with("mq", &[&with_ns], &["sh", "-c", &script]);
        assert_eq!(r.code, 0, "{r:?}");
        let words: Vec<&str> = r.stdout.split_whitespace().collect();
        assert_eq!(words[0], "2", "{r:?}");
        for queue in ["rx-0", "rx-1", "tx-0", "tx-1"] {
            assert!(words.contains(&queue), "{queue}: {r:?}");
        }
        assert!(r.stdout.contains("hello from the server"), "{r:?}");
        // The tap and both its queues are gone: the namespace is as the plugin left it.
        net.assert_pristine();
    });
}
