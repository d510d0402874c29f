//! End-to-end: the guest is hostile. Root in a privileged container (root in the guest, for
//! all that matters here) goes after the share, plants symlinks where the host mounts next, and
//! looks for block devices; the host helpers it could reach run confined. Each test ends with
//! the leak check, and checks that the host's mount table and marker files are as before.
//!
//! Boots VMs: `#[ignore]`d in a plain `cargo test`; `scripts/test.sh` runs them.

#![allow(clippy::unwrap_used)] // Test code: a failed step should fail the test loudly.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use hako_tests::prometheus::{sample, sandbox_metrics, sandbox_snapshot, snapshot_number};
use hako_tests::*;

const POD: &str = "--annotation=io.kubernetes.cri.sandbox-id=hostile";

fn status_field(pid: u32, field: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

fn pids_named(prefix: &str) -> Vec<u32> {
    hako_processes()
        .into_iter()
        .filter(|(_, comm)| comm.starts_with(prefix))
        .map(|(pid, _)| pid)
        .collect()
}

/// The host's mount table, without the per-test containerd's own mounts.
fn host_mounts() -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| !m.starts_with("/tmp/hako-e2e-"))
        .collect()
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn host_helpers_run_confined() {
    let host_mnt = fs::read_link("/proc/self/ns/mnt").unwrap();
    for_each_containerd(|c| {
        let r = c.run_detached("confined", &[], &["sleep", "600"]);
        assert_eq!(r.code, 0, "{r:?}");
        let none = "0000000000000000";

        // QEMU: its seccomp filter (-sandbox on), no new privileges, no capabilities.
        let qemu = c.task_pid("confined");
        assert_eq!(status_field(qemu, "Seccomp"), "2", "qemu");
        assert_eq!(status_field(qemu, "NoNewPrivs"), "1", "qemu");
        assert_eq!(status_field(qemu, "CapEff"), none, "qemu");
        assert_eq!(status_field(qemu, "CapBnd"), none, "qemu");

        // The vsock device (it parses what the guest writes): no new privileges, no
        // capabilities, its seccomp filter on every thread, and a network namespace of its own
        // with nothing in it, so it reaches neither the host's nor the pod's network.
        let vsock = pids_named("hako-vsock");
        assert_eq!(vsock.len(), 1, "{vsock:?}");
        assert_eq!(status_field(vsock[0], "NoNewPrivs"), "1", "vsock");
        assert_eq!(status_field(vsock[0], "CapEff"), none, "vsock");
        assert_eq!(status_field(vsock[0], "CapBnd"), none, "vsock");
        for task in fs::read_dir(format!("/proc/{}/task", vsock[0]))
            .unwrap()
            .flatten()
        {
            let status = fs::read_to_string(task.path().join("status")).unwrap_or_default();
            assert!(
                status.contains("Seccomp:\t2"),
                "vsock thread {:?}",
                task.path()
            );
        }
        let vsock_net = fs::read_link(format!("/proc/{}/ns/net", vsock[0])).unwrap();
        assert_ne!(
            vsock_net,
            fs::read_link("/proc/self/ns/net").unwrap(),
            "host netns"
        );
        assert_ne!(
            vsock_net,
            fs::read_link(format!("/proc/{qemu}/ns/net")).unwrap(),
            "pod netns"
        );
        let links = fs::read_to_string(format!("/proc/{}/net/dev", vsock[0])).unwrap();
        let links: Vec<&str> = links
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(str::trim)
            .collect();
        assert_eq!(
            links,
            ["lo"],
            "the vsock device's namespace has only a loopback (down)"
        );
        // The review's attack: from where the device runs, a service on the host's loopback.
        let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = service.local_addr().unwrap().port().to_string();
        let probe = |target: Option<u32>| {
            let mut cmd = std::process::Command::new("nsenter");
            if let Some(pid) = target {
                cmd.arg(format!("--net=/proc/{pid}/ns/net"));
            }
            cmd.args(["timeout", "5", "bash", "-c"])
                .arg(format!("exec 3<>/dev/tcp/127.0.0.1/{port}"));
            cmd.status().unwrap().success()
        };
        assert!(
            probe(None),
            "the host reaches its own service (the probe works)"
        );
        assert!(
            !probe(Some(vsock[0])),
            "the vsock device's namespace reaches the host's loopback"
        );

        // virtiofsd runs in a mount namespace of its own (it sees only the share); the process
        // that serves the guest's requests does so under its seccomp filter, on every thread.
        // (Its parent only waits for it and has no filter.)
        let virtiofsd = pids_named("virtiofsd");
        assert_eq!(virtiofsd.len(), 2, "supervisor and server: {virtiofsd:?}");
        for pid in &virtiofsd {
            let mnt = fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
            assert_ne!(
                mnt, host_mnt,
                "virtiofsd {pid} in the host's mount namespace"
            );
        }
        // The VMM and the vsock backend run as a uid (and gid) of the pod's own, nobody on the
        // host; virtiofsd keeps root, which serving files as their owners needs.
        let uid = |pid: u32| status_field(pid, "Uid");
        let vmm_uid = uid(qemu);
        assert!(!vmm_uid.starts_with("0\t"), "qemu runs as root: {vmm_uid}");
        assert_eq!(uid(vsock[0]), vmm_uid, "vsock backend");
        assert_eq!(status_field(qemu, "Gid"), vmm_uid, "qemu's gid is its uid");
        // Every helper is in the pod's cgroup (ctr's /default/<id>), charged to the pod.
        for pid in [qemu, vsock[0]].iter().chain(&virtiofsd) {
            let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
            for line in cgroups.lines().filter(|l| !l.ends_with("/init.scope")) {
                assert!(line.ends_with(":/default/confined"), "{pid}: {cgroups}");
            }
        }
        // A second pod's VMM has another uid: it cannot signal or trace the first.
        let r = c.run_detached("neighbour", &[], &["sleep", "600"]);
        assert_eq!(r.code, 0, "{r:?}");
        assert_ne!(uid(c.task_pid("neighbour")), vmm_uid);
        c.remove_task("neighbour");
        let serving: Vec<&u32> = virtiofsd
            .iter()
            .filter(|p| status_field(**p, "Seccomp") == "2")
            .collect();
        assert_eq!(
            serving.len(),
            1,
            "one virtiofsd under seccomp: {virtiofsd:?}"
        );
        for task in fs::read_dir(format!("/proc/{}/task", serving[0]))
            .unwrap()
            .flatten()
        {
            let status = fs::read_to_string(task.path().join("status")).unwrap_or_default();
            assert!(status.contains("Seccomp:\t2"), "thread {:?}", task.path());
        }
        c.remove_task("confined");
        // The pod's cgroup goes with it (the leak check compares the host's cgroups too).
        assert!(fs::read_dir("/sys/fs/cgroup")
            .unwrap()
            .flatten()
            .all(|h| !h.path().join("default/confined").exists()));
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn a_root_guest_cannot_reach_past_the_share() {
    let marker = std::env::temp_dir().join(format!("hako-marker-{}", std::process::id()));
    fs::write(&marker, "host data\n").unwrap();
    let guest_image: Vec<(String, Vec<u8>)> = fs::read_dir("/usr/share/hako/guest")
        .unwrap()
        .flatten()
        .map(|e| (e.path().display().to_string(), fs::read(e.path()).unwrap()))
        .collect();
    for_each_containerd(|c| {
        let mounts_before = host_mounts();
        let sandbox = [
            "--privileged",
            "--annotation=io.kubernetes.cri.container-type=sandbox",
            POD,
        ];
        let r = c.run_detached("hostile", &sandbox, &["sleep", "600"]);
        assert_eq!(r.code, 0, "{r:?}");
        // Root in the guest mounts the virtio-fs tag itself, looking for the share's top (where
        // the host mounts the next container) and other containers' dirs: it gets its own
        // root filesystem again, nothing more. Its rootfs is writable, so it plants symlinks
        // there, the ones the host meets at the next create and at delete.
        let script = "mkdir -p /share && mount -t virtiofs hakoShared /share || exit 10; \
            [ \"$(stat -c %d:%i /share)\" = \"$(stat -c %d:%i /)\" ] && echo own-root-only; \
            ls /share/hostile /share/second 2>/dev/null && echo sees-container-dirs; \
            ln -s / /escape && ln -s ../../.. /up && ln -s / /share/second \
              && echo rootfs-links-planted; \
            mknod /dev/hkdisk b 8 0 && { dd if=/dev/hkdisk of=/dev/null count=1 2>/dev/null \
              && echo block-readable || echo block-useless; }; \
            echo disks=$(grep -cE ' (sd|vd|nvme|xvd|hd)[a-z]' /proc/partitions)";
        let r = c.exec("hostile", "attack", &[], &["sh", "-c", script]);
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(
            r.stdout.lines().collect::<Vec<_>>(),
            [
                "own-root-only",
                "rootfs-links-planted",
                "block-useless",
                "disks=0"
            ],
            "{r:?}"
        );

        // The next container of the pod: its host-side mounts land in the sandbox dir as
        // always, whatever the guest planted.
        let second = c.run_rm_with("second", &[POD], &["sh", "-c", "echo from-second; ls /"]);
        assert_eq!(second.code, 0, "{second:?}");
        assert!(second.stdout.starts_with("from-second\n"), "{second:?}");

        c.remove_task("hostile");
        assert_eq!(
            host_mounts(),
            mounts_before,
            "the host's mount table changed"
        );
        assert_eq!(fs::read_to_string(&marker).unwrap(), "host data\n");
    });
    for (path, bytes) in guest_image {
        assert_eq!(fs::read(&path).unwrap(), bytes, "{path} changed");
    }
    fs::remove_file(&marker).unwrap();
}

/// A privileged container (root in the guest) mknods the guest's serial console and floods it;
/// a plain container cannot even open it. The console log on the host stays within its cap,
/// and `hako logs` shows the guest's escape sequences escaped.
#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn the_guest_console_cannot_fill_the_hosts_disk() {
    let config = HakoConfig::new("[runtime]\nlog_max_bytes = 65536\n");
    for_each_containerd_with_env(&config.env(), |c| {
        // Default capabilities include mknod, but the device rules (deny all but the usual
        // devices, as runc) keep the console closed.
        let r = c.run_rm(
            "plain",
            &[
                "sh",
                "-c",
                "mknod /dev/console-s c 4 64 && echo spam > /dev/console-s",
            ],
        );
        assert_ne!(r.code, 0, "{r:?}");
        assert!(r.stderr.contains("Operation not permitted"), "{r:?}");

        let r = c.run_detached("flood", &["--privileged"], &["sleep", "600"]);
        assert_eq!(r.code, 0, "{r:?}");
        let flood = "mknod /dev/console-s c 4 64; \
                     printf '\\033]0;pwned\\007\\033[2Jmarker-from-the-guest\\n' > /dev/console-s; \
                     head -c 8388608 /dev/zero | tr '\\0' x > /dev/console-s; echo flooded";
        let r = c.exec("flood", "spam", &[], &["sh", "-c", flood]);
        assert_eq!(r.stdout, "flooded\n", "{r:?}");
        let dir = std::path::Path::new(SANDBOX_ROOT).join("default/flood");
        // Everything the guest wrote went through the shim's copy: wait (bounded) until the
        // rotation shows, then both files are within the cap.
        let rotated = dir.join("console.log.1");
        let started = std::time::Instant::now();
        while !rotated.exists() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "no rotation"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        for log in [dir.join("console.log"), rotated.clone()] {
            let size = fs::metadata(&log).unwrap().len();
            assert!(size <= 65536, "{}: {size} bytes", log.display());
        }
        // The pod's metrics account for every byte: what the two files hold, and the rest
        // dropped by rotation.
        eventually(
            "the console's bytes counted",
            std::time::Duration::from_secs(60),
            || {
                let text = sandbox_metrics("default", "flood");
                let kept = sample(&text, r#"hako_console_log_bytes_total{outcome="kept"}"#);
                let dropped = sample(&text, r#"hako_console_log_bytes_total{outcome="dropped"}"#);
                let on_disk = [dir.join("console.log"), rotated.clone()]
                    .iter()
                    .map(|f| fs::metadata(f).map(|m| m.len()).unwrap_or(0) as f64)
                    .sum::<f64>();
                match (kept, dropped) {
                    (Some(k), Some(d)) if k >= 8388608.0 && k == d + on_disk => Ok(()),
                    other => Err(format!("{other:?}, {on_disk} on disk")),
                }
            },
        );
        c.remove_task("flood");
    });
    // `hako logs` never hands the guest's control characters to the operator's terminal.
    for_each_containerd(|c| {
        let r = c.run_detached("loud", &["--privileged"], &["sleep", "600"]);
        assert_eq!(r.code, 0, "{r:?}");
        let script = "mknod /dev/console-s c 4 64; \
                      printf '\\033]0;pwned\\007\\033[2J\\377marker-from-the-guest\\n' > /dev/console-s";
        let r = c.exec("loud", "ansi", &[], &["sh", "-c", script]);
        assert_eq!(r.code, 0, "{r:?}");
        let started = std::time::Instant::now();
        let logs = loop {
            let logs = hako_cli(&["logs", "loud"], &[]);
            if logs.stdout.contains("marker-from-the-guest") {
                break logs;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "{logs:?}"
            );
        };
        assert!(
            logs.stdout
                .contains("\\x1b]0;pwned\\x07\\x1b[2J\\xffmarker-from-the-guest"),
            "{logs:?}"
        );
        assert!(
            !logs.stdout.contains('\u{1b}'),
            "a raw escape reached the terminal"
        );
        c.remove_task("loud");
    });
}

/// Nested volumes: the guest swaps the inner volume's directory (inside the outer, writable
/// one) for a symlink to a host secret. The host does not follow it when the pod's next
/// container binds the inner volume again.
#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn a_symlink_the_guest_planted_in_a_volume_is_not_followed() {
    let base = std::env::temp_dir().join(format!("hako-nested-{}", std::process::id()));
    let app = base.join("app");
    let secret = base.join("secret");
    fs::create_dir_all(app.join("config")).unwrap();
    fs::create_dir_all(&secret).unwrap();
    fs::write(secret.join("key"), "host secret\n").unwrap();
    let volumes = [
        format!(
            "--mount=type=bind,src={},dst=/app,options=rbind:rw",
            app.display()
        ),
        format!(
            "--mount=type=bind,src={},dst=/app/config,options=rbind:ro",
            app.join("config").display()
        ),
    ];
    for_each_containerd(|c| {
        let _ = fs::remove_file(app.join("config"));
        let _ = fs::remove_dir_all(app.join("config"));
        fs::create_dir_all(app.join("config")).unwrap();
        let mut first: Vec<&str> = volumes.iter().map(String::as_str).collect();
        first.extend([
            "--privileged",
            "--annotation=io.kubernetes.cri.container-type=sandbox",
            POD,
        ]);
        let r = c.run_detached("hostile", &first, &["sleep", "600"]);
        assert_eq!(r.code, 0, "{r:?}");
        let plant = format!(
            "umount /app/config && rmdir /app/config && ln -s {} /app/config && echo planted",
            secret.display()
        );
        let r = c.exec("hostile", "plant", &[], &["sh", "-c", &plant]);
        assert_eq!(r.stdout, "planted\n", "{r:?}");
        assert!(fs::symlink_metadata(app.join("config"))
            .unwrap()
            .is_symlink());

        let mut second: Vec<&str> = volumes.iter().map(String::as_str).collect();
        second.push(POD);
        let r = c.run_rm_with("second", &second, &["cat", "/app/config/key"]);
        assert_ne!(r.code, 0, "{r:?}");
        assert!(!r.stdout.contains("host secret"), "{r:?}");
        assert!(
            r.stderr
                .contains("symlink in a directory the guest can write"),
            "{r:?}"
        );
        c.remove_task("hostile");
    });
    fs::remove_dir_all(&base).unwrap();
}

/// Guest root makes a device node and a setuid-root program in a read-write volume. Device
/// nodes cannot be made (virtiofsd has no CAP_MKNOD), and what lands on the host is bound
/// nosuid and nodev: run through hako's binds by an unprivileged user, the program gains nothing.
#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn devices_and_setuid_programs_the_guest_plants_do_nothing_on_the_host() {
    let vol = std::env::temp_dir().join(format!("hako-plant-{}", std::process::id()));
    fs::create_dir_all(&vol).unwrap();
    let mount = format!(
        "--mount=type=bind,src={},dst=/vol,options=rbind:rw",
        vol.display()
    );
    // A root-owned program that reports its effective uid and never drops it (busybox drops a
    // setuid bit itself); the guest makes it setuid.
    let program = vol.join("id");
    for_each_containerd(|c| {
        fs::copy("/usr/bin/id", &program).unwrap();
        let r = c.run_detached("planter", &["--privileged", &mount], &["sleep", "600"]);
        assert_eq!(r.code, 0, "{r:?}");
        let script = "mknod /vol/null c 1 3 2>&1; chmod 4755 /vol/id && echo planted";
        let r = c.exec("planter", "plant", &[], &["sh", "-c", script]);
        assert!(r.stdout.contains("Operation not permitted"), "{r:?}");
        assert!(r.stdout.contains("planted"), "{r:?}");
        assert!(!vol.join("null").exists());
        // The share's binds of the volume carry nosuid and nodev: seen in its namespace.
        let share = std::path::Path::new(SANDBOX_ROOT).join("default/planter");
        let ns = share_namespace("default", "planter");
        let info = in_namespace(&ns, &["cat", "/proc/self/mountinfo"]).stdout;
        let binds: Vec<&str> = info
            .lines()
            .filter(|l| l.contains(&format!("{}/", share.display())) && l.contains("/mounts/"))
            .collect();
        assert!(!binds.is_empty(), "{info}");
        for line in &binds {
            let options = line.split(' ').nth(5).unwrap();
            assert!(
                options.contains("nosuid") && options.contains("nodev"),
                "{line}"
            );
        }
        let as_nobody = |path: &std::path::Path| {
            let path = path.display().to_string();
            let nobody = [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
            ];
            in_namespace(&ns, &[&nobody[..], &[path.as_str()]].concat()).stdout
        };
        // The planted program is setuid-root (run from the directory the operator lent, it
        // is root)...
        assert!(
            as_nobody(&program).contains("euid=0"),
            "the plant did not work"
        );
        // ...but not through hako's binds.
        let mounts = share.join("rw/planter/mounts");
        let listed = in_namespace(&ns, &["ls", &mounts.display().to_string()]).stdout;
        let bound = mounts.join(listed.lines().next().unwrap()).join("id");
        let out = as_nobody(&bound);
        assert!(
            out.starts_with("uid=65534") && !out.contains("euid=0"),
            "{out}"
        );
        c.remove_task("planter");
        fs::remove_file(&program).unwrap();
    });
    fs::remove_dir_all(&vol).unwrap();
}

/// A configuration that boots the hostile guest (`build/guest-hostile`, an agent built with
/// `--features hostile`, which scripts/test.sh makes) in attack `mode` (`hako.hostile=`).
fn hostile_guest_config(mode: &str) -> HakoConfig {
    let image = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/guest-hostile");
    assert!(
        image.join("initramfs.cpio").is_file(),
        "no hostile guest image in {}: scripts/test.sh builds it",
        image.display()
    );
    HakoConfig::new(&format!(
        "[hypervisor]\nkernel = \"{0}/vmlinux\"\nvmlinux = \"{0}/vmlinux\"\ninitrd = \"{0}/initramfs.cpio\"\nkernel_params = \"hako.hostile={mode}\"\n",
        image.display()
    ))
}

/// A guest whose agent forges OOM kills (built with `--features hostile`; scripts/test.sh
/// makes its image): other pods' containers are never reported OOM-killed, the forged ids are
/// quoted in the shim's log, and the flood is rate-limited.
#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn forged_oom_events_reach_no_one() {
    let config = hostile_guest_config("oom");
    for_each_containerd(|c| {
        let events = c.events();
        let r = c.run_detached("victim", &[], &["sleep", "600"]);
        assert_eq!(r.code, 0, "{r:?}");
        // Only the attacker's pod runs the hostile guest.
        let hostile = format!("--runtime-config-path={}", config.path);
        let r = c.run_detached("attacker", &[&hostile], &["sleep", "600"]);
        assert_eq!(r.code, 0, "{r:?}");
        // The shim says it refused them (the first, then at powers of two).
        let started = std::time::Instant::now();
        while !c
            .log()
            .contains("is not a container of this sandbox: ignored (4 so far)")
        {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "{}",
                c.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let log = c.log();
        // The id with a newline in it stays inside the shim's one quoted line.
        for line in log.lines().filter(|l| l.contains("forged by the guest")) {
            assert!(
                line.contains("OOM kill of"),
                "a forged line got through: {line}"
            );
        }
        assert!(!log.lines().any(|l| l.starts_with("level=error")), "{log}");
        // Ten a second at most, logged at powers of two: a few lines, not thousands.
        let lines = log.matches("is not a container of this sandbox").count();
        assert!(lines < 10, "{lines} lines");
        // And counts them, where an operator's dashboard sees them; the victim's pod has none.
        let forged = r#"hako_guest_events_refused_total{event="oom",reason="foreign"}"#;
        let counted = sample(&sandbox_metrics("default", "attacker"), forged);
        assert!(counted.is_some_and(|n| n >= 4.0), "{counted:?}");
        assert_eq!(sample(&sandbox_metrics("default", "victim"), forged), None);
        c.remove_task("attacker");
        c.remove_task("victim");
        let seen = events.lines();
        assert!(
            !seen.iter().any(|l| l.contains("/tasks/oom")),
            "an OOM event was published: {seen:#?}"
        );
    });
}

/// A network namespace with its loopback up, removed when dropped (on a failed assertion too,
/// so the leak check of the next test does not find it).
struct TestNetns(String);

impl TestNetns {
    fn new(name: &str) -> Self {
        let made = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ip netns add {name} && ip -n {name} link set lo up"
            ))
            .status()
            .unwrap();
        assert!(made.success(), "making the namespace {name}");
        Self(name.to_string())
    }

    fn path(&self) -> std::path::PathBuf {
        std::path::PathBuf::from("/run/netns").join(&self.0)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// Stand-in for Docker's DNS server: a UDP socket on 127.0.0.11:53 in `netns` that records
/// when each query arrives, until `stop`.
fn record_queries(
    netns: &std::path::Path,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<std::time::Instant>> {
    use std::os::fd::AsRawFd;
    let fd =
        hako_shim::net::namespace::socket_in(netns, nix::sys::socket::SockType::Datagram).unwrap();
    nix::sys::socket::bind(
        fd.as_raw_fd(),
        &nix::sys::socket::SockaddrIn::new(127, 0, 0, 11, 53),
    )
    .unwrap();
    let socket = std::net::UdpSocket::from(fd);
    socket.set_nonblocking(false).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    std::thread::spawn(move || {
        let mut arrivals = Vec::new();
        let mut buf = [0u8; 512];
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            if socket.recv_from(&mut buf).is_ok() {
                arrivals.push(std::time::Instant::now());
            }
        }
        arrivals
    })
}

/// A guest whose DNS relay floods the host (`hako.hostile=dns`: 2,000 queries at once, then a
/// frame that is not one) once a container that uses Docker's DNS server starts. The shim asks
/// the server in the pod's namespace at most 200 times a second (so the 2,000 take nine
/// seconds at least, where an unbounded relay takes well under one), the bad frame ends the
/// relay with a warning, and the pod runs on.
#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn a_guest_flooding_the_dns_relay_is_held_to_its_rate() {
    let config = hostile_guest_config("dns");
    let hostile = format!("--runtime-config-path={}", config.path);
    let resolv = std::env::temp_dir().join(format!("hako-resolv-{}", std::process::id()));
    fs::write(&resolv, "nameserver 127.0.0.11\noptions ndots:0\n").unwrap();
    let mount = format!(
        "type=bind,src={},dst=/etc/resolv.conf,options=rbind:ro",
        resolv.display()
    );
    for_each_containerd(|c| {
        let pod_netns = TestNetns::new(&format!("hkt-dns-{}", std::process::id() % 100_000));
        let netns = pod_netns.path();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let server = record_queries(&netns, stop.clone());

        let with_ns = format!("network:{}", netns.display());
        let r = c.run_detached(
            "flooder",
            &[&hostile, "--with-ns", &with_ns, "--mount", &mount],
            &["sleep", "600"],
        );
        assert_eq!(r.code, 0, "{r:?}\n{}", c.log());
        let started = std::time::Instant::now();
        while !c.log().contains("the guest sent a bad frame") {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "the relay never ended:\n{}",
                c.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let arrivals = server.join().unwrap();
        // Every well-formed query was asked (none lost to the limit), no faster than 200 a
        // second after the first 200.
        assert_eq!(arrivals.len(), 2000, "queries that reached the server");
        let span = *arrivals.last().unwrap() - arrivals[0];
        assert!(
            span >= std::time::Duration::from_secs(8),
            "2,000 queries reached the server in {span:?}"
        );
        assert_eq!(
            c.task_status("flooder").as_deref(),
            Some("RUNNING"),
            "the pod runs on"
        );
        // The flood in the pod's metrics: every query relayed, most of them held back by the
        // rate, and the bad frame.
        let text = sandbox_metrics("default", "flooder");
        let queries = |result: &str| {
            sample(
                &text,
                &format!(r#"hako_dns_relay_queries_total{{result="{result}"}}"#),
            )
        };
        assert_eq!(queries("relayed"), Some(2000.0), "{text}");
        assert_eq!(queries("malformed"), Some(1.0), "{text}");
        let throttled = sample(&text, "hako_dns_relay_throttled_total");
        assert!(throttled.is_some_and(|n| n >= 1000.0), "{text}");
        c.remove_task("flooder");
    });
    fs::remove_file(&resolv).unwrap();
}

/// Another user on the host (uid 65534, no capabilities) watches the sandbox dir while a pod
/// starts, again and again, with a volume whose host directory only root may enter: it must
/// never list where binds are staged nor read the volume through it.
#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn another_host_user_cannot_reach_a_volume_while_it_is_staged() {
    let private = std::env::temp_dir().join(format!("hako-private-{}", std::process::id()));
    fs::create_dir_all(&private).unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(private.join("secret"), "root's only\n").unwrap();
    fs::set_permissions(private.join("secret"), fs::Permissions::from_mode(0o644)).unwrap();
    let volume = format!(
        "type=bind,src={},dst=/secret,options=rbind:ro",
        private.display()
    );
    for_each_containerd(|c| {
        let staging = format!("{SANDBOX_ROOT}/default/staged/staging");
        let watch = format!(
            "while :; do \
               cat {staging}/*/secret 2>/dev/null && echo LEAKED; \
               if ls {staging}/ >/dev/null 2>&1; then echo LISTED; \
               elif [ -d {SANDBOX_ROOT}/default/staged/rw ]; then echo MET; fi; \
             done"
        );
        let mut racer = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .args(["sh", "-c", &watch])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        for _ in 0..4 {
            let r = c.run_rm_with("staged", &["--mount", &volume], &["cat", "/secret/secret"]);
            assert_eq!((r.code, r.stdout.as_str()), (0, "root's only\n"), "{r:?}");
        }
        racer.kill().unwrap();
        let out = racer.wait_with_output().unwrap();
        let seen = String::from_utf8_lossy(&out.stdout);
        assert!(
            !seen.contains("LEAKED"),
            "the volume was read through staging/"
        );
        assert!(
            !seen.contains("LISTED"),
            "staging/ was listed by another user"
        );
        assert!(
            seen.contains("MET"),
            "the racer never met a running sandbox: {seen:?}"
        );
    });
    fs::remove_dir_all(&private).unwrap();
}

/// `GET /v1/snapshot` on a sandbox's metrics socket: how long it took, and its samples.
fn snapshot(
    socket: &std::path::Path,
) -> (
    std::time::Duration,
    Vec<hako_shim::metrics::snapshot::Sample>,
) {
    let started = std::time::Instant::now();
    let samples = sandbox_snapshot(socket);
    (started.elapsed(), samples)
}

/// A guest whose metrics answer is hostile (`mode`): a snapshot of its sandbox still answers
/// within its bound with the host's part, counts the refusal under `reason`, has none of the
/// guest's families; the shim does not grow, and the pod's agent API goes on serving (an exec
/// works) while the snapshots are taken.
fn a_hostile_metrics_answer_is_refused(mode: &str, reason: &str) {
    let config = hostile_guest_config(mode);
    let hostile = format!("--runtime-config-path={}", config.path);
    for_each_containerd(|c| {
        let r = c.run_detached("attacker", &[&hostile], &["sleep", "600"]);
        assert_eq!(r.code, 0, "{r:?}\n{}", c.log());
        let socket = std::path::Path::new(SANDBOX_ROOT).join("default/attacker/metrics.sock");
        let check = || {
            let (took, samples) = snapshot(&socket);
            // 500 ms for the guest, the host's part beside it; slack for TCG.
            assert!(took < std::time::Duration::from_secs(3), "took {took:?}");
            let rss = snapshot_number(&samples, "hako_host_process_rss_bytes", &["vmm"]);
            assert!(rss.is_some_and(|b| b > 0.0), "no host part: {samples:?}");
            let refused = snapshot_number(&samples, "hako_guest_metrics_rejected_total", &[reason]);
            assert!(refused.is_some_and(|n| n >= 1.0), "{samples:?}");
            assert!(
                !samples
                    .iter()
                    .any(|s| s.family.starts_with("hako_guest_memory")
                        || s.family.starts_with("hako_container_")),
                "a refused answer left figures: {samples:?}"
            );
            refused.unwrap_or(0.0)
        };
        check();
        let shims = pids_named("containerd-shim");
        let rss_kb = || -> u64 {
            shims
                .iter()
                .map(|pid| {
                    status_field(*pid, "VmRSS")
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .unwrap_or(0)
                })
                .sum()
        };
        let before = rss_kb();
        // Snapshots go on until the exec is done: the metrics connection is its own, and the
        // agent API's calls do not wait behind it.
        let (exec, refusals) = std::thread::scope(|scope| {
            let exec = scope.spawn(|| c.exec("attacker", "during", &[], &["echo", "alive"]));
            let mut refusals = check();
            while !exec.is_finished() {
                refusals = check();
            }
            (exec.join().unwrap(), refusals)
        });
        assert_eq!(exec.code, 0, "{exec:?}");
        assert_eq!(exec.stdout.trim(), "alive", "{exec:?}");
        // The node's endpoint answers too, with the attacker up and its refusals counted.
        let monitor = hako_tests::prometheus::HakoMonitor::start("1s");
        let (text, took) = monitor.scrape();
        assert!(took < std::time::Duration::from_secs(3), "took {took:?}");
        let labels = r#"sandbox_id="attacker",containerd_namespace="default""#;
        assert_eq!(
            sample(&text, &format!("hako_sandbox_up{{{labels}}}")),
            Some(1.0),
            "{text}"
        );
        let rejected =
            format!(r#"hako_guest_metrics_rejected_total{{{labels},reason="{reason}"}}"#);
        assert!(sample(&text, &rejected).is_some_and(|n| n >= 1.0), "{text}");
        drop(monitor);
        let grown = rss_kb().saturating_sub(before);
        assert!(
            grown < 8 * 1024,
            "the shims grew by {grown} kB over {refusals} refused answers"
        );
        c.remove_task("attacker");
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn a_guest_flooding_its_metrics_answer_is_cut_at_the_header() {
    a_hostile_metrics_answer_is_refused("metrics-flood", "oversize");
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn a_guest_answering_metrics_with_garbage_is_refused() {
    a_hostile_metrics_answer_is_refused("metrics-garbage", "malformed");
}
