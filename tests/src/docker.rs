//! A private Docker Engine for the end-to-end tests: each build `scripts/setup.sh` unpacks under
//! /opt/hako/docker (Debian 13's 26, which networks containers through a prestart hook, and
//! Debian unstable's 28 or later, which networks the task's namespace after Create), on a
//! test's containerd. containerd, its shims and dockerd all run inside a network namespace the
//! harness makes (`HostNetns`), which plays "the host": its uplink is `uplink0`, not `eth0`, so
//! a runtime that let Docker configure the host's own namespace would not fail loudly there but
//! change it, and every test compares it before and after.

#![allow(clippy::unwrap_used)] // Test harness: a failed step should fail the test loudly.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::{
    assert_host_unchanged, assert_no_leaks, busybox_archive, containerd_versions, reap_leftovers,
    remove_daemon_leftovers, run_with_timeout, stop_child, Containerd, HostState, Run,
};

pub const DOCKER_ROOT: &str = "/opt/hako/docker";
/// The runtime registered under a short name, so `docker run --runtime hako` works.
pub const DAEMON_JSON: &str = r#"{"runtimes": {"hako": {"runtimeType": "io.containerd.hako.v2"}}}"#;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The Docker Engine builds under /opt/hako/docker, oldest first.
pub fn docker_installs() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(DOCKER_ROOT)
        .unwrap_or_else(|e| panic!("{DOCKER_ROOT}: {e}; run scripts/setup.sh"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("usr/sbin/dockerd").is_file())
        .collect();
    found.sort();
    assert!(
        !found.is_empty(),
        "no dockerd under {DOCKER_ROOT}; run scripts/setup.sh"
    );
    found
}

/// Runs `test` on every Docker build against every containerd, each pair in a fresh "host"
/// namespace; after the test, that namespace's interfaces, addresses and routes must be what
/// they were once dockerd was up, and the real host must be unchanged and leak-free.
pub fn for_each_docker(test: impl Fn(&Docker)) {
    for_each_docker_with(&[], test)
}

/// `for_each_docker`, with containerd (and so the shims it starts) given `env`.
pub fn for_each_docker_with(env: &[(&str, &str)], test: impl Fn(&Docker)) {
    for containerd in containerd_versions() {
        for docker in docker_installs() {
            assert_no_leaks("before the test");
            let host_state = HostState::now();
            let host = HostNetns::create();
            let c = Containerd::start_in(&containerd, env, Some(&host.path()));
            let d = Docker::start(&c, &docker, &host);
            eprintln!("--- docker {} on containerd {}", d.version, c.version);
            let before = host.snapshot();
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| test(&d)));
            if let Err(panic) = outcome {
                eprintln!("dockerd log (last 30 lines):\n{}", tail_lines(&d.log(), 30));
                eprintln!(
                    "containerd log, with hako's (last 60 lines):\n{}",
                    tail_lines(&c.log(), 60)
                );
                drop(d);
                c.remove_all_tasks();
                drop(c);
                drop(host);
                reap_leftovers();
                // runc's containers' cgroups, which a passing test removes: left, they would
                // fail the next test's check of the host. Its own failure must not hide this one.
                let _ = std::panic::catch_unwind(crate::runc::remove_parent);
                std::panic::resume_unwind(panic);
            }
            host.assert_unchanged(&before, &format!("docker {}", d.version));
            drop(d);
            drop(c);
            drop(host);
            assert_no_leaks(&format!("docker {}", docker.display()));
            assert_host_unchanged(&host_state, &format!("docker {}", docker.display()));
        }
    }
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A network namespace standing in for the host: loopback, and an uplink named `uplink0` (a
/// veth whose peer `wan0` stays beside it: this host kernel has no dummy driver) with IPv4 and
/// IPv6 addresses and default routes. Removed on drop.
pub struct HostNetns {
    pub name: String,
}

/// What must not change in the host's namespace: its interfaces with their addresses, and its
/// routes (flags such as `linkdown`, link-local addresses and their routes left out: they come
/// and go with a bridge's carrier).
#[derive(Debug, PartialEq, Eq)]
pub struct NetSnapshot {
    pub addresses: Vec<String>,
    pub routes: Vec<String>,
}

impl HostNetns {
    pub fn create() -> HostNetns {
        let name = format!(
            "hkt-host-{}-{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        must(&format!(
            "ip netns add {name} && ip -n {name} link set lo up && \
             ip -n {name} link add uplink0 type veth peer name wan0 && \
             ip -n {name} addr add 192.0.2.10/24 dev uplink0 && \
             ip -n {name} -6 addr add 2001:db8::10/64 dev uplink0 nodad && \
             ip -n {name} link set wan0 up && ip -n {name} link set uplink0 up && \
             ip -n {name} route add default via 192.0.2.1 && \
             ip -n {name} -6 route add default via 2001:db8::1"
        ));
        HostNetns { name }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    pub fn snapshot(&self) -> NetSnapshot {
        let query = |args: &str| -> Vec<serde_json::Value> {
            let mut cmd = Command::new("sh");
            cmd.args(["-c", &format!("ip -n {} -j {args}", self.name)]);
            let r = run_with_timeout(cmd, None, Duration::from_secs(30));
            assert_eq!(r.code, 0, "ip {args}: {r:?}");
            serde_json::from_str(&r.stdout).unwrap_or_default()
        };
        let text = |v: &serde_json::Value, key: &str| {
            v.get(key)
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| x.to_string())
                })
                .unwrap_or_default()
        };
        let mut addresses = Vec::new();
        for link in query("addr show") {
            let name = text(&link, "ifname");
            let mut line = format!("{name} {}", text(&link, "address"));
            // Link-local addresses come and go with a bridge's first port.
            for a in link["addr_info"].as_array().into_iter().flatten() {
                if text(a, "scope") != "link" {
                    line.push_str(&format!(" {}/{}", text(a, "local"), text(a, "prefixlen")));
                }
            }
            addresses.push(line);
        }
        let mut routes = Vec::new();
        for family in ["-4", "-6"] {
            for r in query(&format!("{family} route show table all")) {
                let dst = text(&r, "dst");
                if dst.starts_with("fe80") || dst.starts_with("ff00") {
                    continue;
                }
                routes.push(format!(
                    "{} via {} dev {} table {}",
                    text(&r, "dst"),
                    text(&r, "gateway"),
                    text(&r, "dev"),
                    text(&r, "table")
                ));
            }
        }
        addresses.sort();
        routes.sort();
        NetSnapshot { addresses, routes }
    }

    /// Waits (bounded) until the namespace looks as `before`: veths go when their containers'
    /// tasks are deleted, a moment after `docker rm` returns.
    pub fn assert_unchanged(&self, before: &NetSnapshot, context: &str) {
        let started = Instant::now();
        loop {
            let now = self.snapshot();
            if &now == before {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{context}: the host's network namespace changed:\nbefore: {before:#?}\nafter: {now:#?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for HostNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub struct Docker {
    pub version: String,
    /// The network namespace dockerd (and containerd) live in: "the host".
    pub netns: String,
    bin: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
}

impl Docker {
    /// Starts the dockerd of `install` in the host namespace `host`, on `containerd`, and
    /// loads the busybox image.
    pub fn start(containerd: &Containerd, install: &Path, host: &HostNetns) -> Docker {
        let version = install.file_name().unwrap().to_string_lossy().into_owned();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("hako-docker-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let bin = install.join("usr");
        let log = fs::File::create(dir.join("dockerd.log")).unwrap();
        // The runtime by name, as an operator registers it (what `hako` prints for daemon.json).
        fs::write(dir.join("daemon.json"), DAEMON_JSON).unwrap();
        // nsenter, not `ip netns exec`: that would also give dockerd a mount namespace of its
        // own, and containerd and the shim must see the rootfs mounts dockerd makes.
        let child = Command::new("nsenter")
            .arg(format!("--net={}", host.path().display()))
            .arg(bin.join("sbin/dockerd"))
            .arg("--containerd")
            .arg(containerd.socket())
            .arg("--data-root")
            .arg(dir.join("root"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("--config-file")
            .arg(dir.join("daemon.json"))
            .arg("--host")
            .arg(format!("unix://{}", dir.join("docker.sock").display()))
            // Port mapping goes through docker-proxy, which needs no iptables.
            .args(["--iptables=false", "--ip6tables=false"])
            .env(
                "PATH",
                format!(
                    "{}:{}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                    bin.join("sbin").display(),
                    bin.join("bin").display()
                ),
            )
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut docker = Docker {
            version,
            netns: host.name.clone(),
            bin,
            dir,
            child: Some(child),
        };
        docker.wait_ready();
        let load = docker.docker(&["load", "-i", &busybox_archive().display().to_string()]);
        assert_eq!(load.code, 0, "docker load failed: {load:?}");
        docker
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            if self.dir.join("docker.sock").exists() && self.docker(&["version"]).code == 0 {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("dockerd exited with {status}: {}", self.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "dockerd did not come up: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    /// The major version, from the build's directory name (such as 28 for 28.5.2+dfsg4-5).
    pub fn major(&self) -> u32 {
        self.version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0)
    }

    /// The daemon's address, as `DOCKER_HOST` gives it.
    pub fn host(&self) -> String {
        format!("unix://{}", self.dir.join("docker.sock").display())
    }

    fn docker_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.bin.join("bin/docker"));
        cmd.arg("--host").arg(self.host()).args(args);
        cmd
    }

    /// `docker <args>` against this daemon.
    pub fn docker(&self, args: &[&str]) -> Run {
        run_with_timeout(self.docker_command(args), None, Duration::from_secs(120))
    }

    /// `docker <args>` on a terminal of `cols` x `rows`, as at a user's terminal.
    pub fn docker_on_tty(&self, args: &[&str], cols: u16, rows: u16) -> Run {
        crate::on_tty(self.docker_command(args), cols, rows)
    }

    /// A shell command in dockerd's network namespace: "the host" as Docker sees it.
    pub fn on_host(&self, script: &str) -> Run {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns, "sh", "-c", script]);
        run_with_timeout(cmd, None, Duration::from_secs(60))
    }

    /// The network interfaces of dockerd's namespace, by name.
    pub fn host_links(&self) -> Vec<String> {
        let r = self.on_host("ip -o link show | cut -d: -f2");
        r.stdout
            .lines()
            .map(|l| l.trim().split('@').next().unwrap_or_default().to_string())
            .collect()
    }

    pub fn data_dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        // Containers first, so no VM outlives the daemon.
        let ids = self.docker(&["ps", "-aq"]);
        for id in ids.stdout.split_whitespace() {
            let _ = self.docker(&["rm", "-f", id]);
        }
        // nsenter execs dockerd, so the child's pid is dockerd's.
        stop_child(self.child.take());
        remove_daemon_leftovers(&self.dir, None);
    }
}

fn must(script: &str) {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script]);
    let r = run_with_timeout(cmd, None, Duration::from_secs(30));
    assert_eq!(r.code, 0, "{script}: {r:?}");
}
