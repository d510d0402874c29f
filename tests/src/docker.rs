//! A private Docker Engine for the end-to-end tests: Debian 13's dockerd (unpacked under
//! /opt/hako/docker by `scripts/setup.sh`) on a test's containerd, inside a network namespace
//! the harness makes. Its bridge, port proxies and container traffic stay in that namespace,
//! which plays "the host" for the tests and goes away with the daemon.

#![allow(clippy::unwrap_used)] // Test harness: a failed step should fail the test loudly.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::{
    busybox_archive, remove_daemon_leftovers, run_with_timeout, stop_child, Containerd, Run,
};

pub const DOCKER_ROOT: &str = "/opt/hako/docker";
/// The runtime registered under a short name, so `docker run --runtime hako` works.
pub const DAEMON_JSON: &str = r#"{"runtimes": {"hako": {"runtimeType": "io.containerd.hako.v2"}}}"#;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The Docker Engine build under /opt/hako/docker.
pub fn docker_install() -> PathBuf {
    let mut found: Vec<PathBuf> = fs::read_dir(DOCKER_ROOT)
        .unwrap_or_else(|e| panic!("{DOCKER_ROOT}: {e}; run scripts/setup.sh"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("usr/sbin/dockerd").is_file())
        .collect();
    found.sort();
    found
        .pop()
        .unwrap_or_else(|| panic!("no dockerd under {DOCKER_ROOT}; run scripts/setup.sh"))
}

pub struct Docker {
    pub version: String,
    /// The network namespace dockerd and its bridge live in.
    pub netns: String,
    bin: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
}

impl Docker {
    /// Starts dockerd on `containerd` and loads the busybox image.
    pub fn start(containerd: &Containerd) -> Docker {
        let install = docker_install();
        let version = install.file_name().unwrap().to_string_lossy().into_owned();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let netns = format!("hkt-dock-{}-{n}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("hako-docker-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        must(&format!(
            "ip netns add {netns} && ip -n {netns} link set lo up"
        ));
        let bin = install.join("usr");
        let log = fs::File::create(dir.join("dockerd.log")).unwrap();
        // The runtime by name, as an operator registers it (what `hako` prints for daemon.json).
        fs::write(dir.join("daemon.json"), DAEMON_JSON).unwrap();
        // nsenter, not `ip netns exec`: that would also give dockerd a mount namespace of its
        // own, and containerd and the shim must see the rootfs mounts dockerd makes.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
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
            // The bridge and NAT rules would be in the test's namespace, but port mapping here
            // goes through docker-proxy, which needs no iptables.
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
            netns,
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

    /// `docker <args>` against this daemon.
    pub fn docker(&self, args: &[&str]) -> Run {
        let mut cmd = Command::new(self.bin.join("bin/docker"));
        cmd.arg("--host")
            .arg(format!("unix://{}", self.dir.join("docker.sock").display()))
            .args(args);
        run_with_timeout(cmd, None, Duration::from_secs(120))
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
        remove_daemon_leftovers(&self.dir, Some(&self.netns));
    }
}

fn must(script: &str) {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script]);
    let r = run_with_timeout(cmd, None, Duration::from_secs(30));
    assert_eq!(r.code, 0, "{script}: {r:?}");
}
