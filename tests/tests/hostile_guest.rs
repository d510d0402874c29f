//! End-to-end: the guest is hostile. Root in a privileged container (root in the guest, for
//! all that matters here) goes after the share, plants symlinks where the host mounts next, and
//! looks for block devices; the host helpers it could reach run confined. Each test ends with
//! the leak check, and checks that the host's mount table and marker files are as before.
//!
//! Boots VMs: `#[ignore]`d in a plain `cargo test`; `scripts/test.sh` runs them.

#![allow(clippy::unwrap_used)] // Test code: a failed step should fail the test loudly.

use std::fs;
use std::path::Path;

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

        // The vsock backend: no new privileges, no capabilities.
        let vsock = pids_named("vhost-device-vs");
        assert_eq!(vsock.len(), 1, "{vsock:?}");
        assert_eq!(status_field(vsock[0], "NoNewPrivs"), "1", "vsock");
        assert_eq!(status_field(vsock[0], "CapEff"), none, "vsock");

        // virtiofsd serves from a mount namespace of its own (it sees only the share), under
        // its seccomp filter.
        let serving: Vec<u32> = pids_named("virtiofsd")
            .into_iter()
            .filter(|p| fs::read_link(format!("/proc/{p}/ns/mnt")).ok().as_ref() != Some(&host_mnt))
            .collect();
        assert!(
            !serving.is_empty(),
            "no virtiofsd in its own mount namespace"
        );
        for pid in serving {
            assert_eq!(status_field(pid, "Seccomp"), "2", "virtiofsd {pid}");
        }
        c.remove_task("confined");
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
        // Root in the guest mounts the virtio-fs share itself and tries to write where the
        // host will mount next: the top of the share, the next container's place, its own
        // mounts dir. Its own rootfs is writable, so symlinks planted there are the ones the
        // host meets at delete.
        let script = "mkdir -p /share && mount -t virtiofs hakoShared /share || exit 10; \
            touch /share/planted 2>/dev/null && echo top-writable || echo top-read-only; \
            ln -s / /share/second 2>/dev/null && echo next-planted || echo next-refused; \
            mkdir /share/hostile/mounts 2>/dev/null && echo mounts-made || echo mounts-refused; \
            ln -s / /share/hostile/rootfs/escape && ln -s ../../.. /share/hostile/rootfs/up \
              && echo rootfs-links-planted; \
            mknod /dev/hkdisk b 8 0 && { dd if=/dev/hkdisk of=/dev/null count=1 2>/dev/null \
              && echo block-readable || echo block-useless; }; \
            echo disks=$(grep -cE ' (sd|vd|nvme|xvd|hd)[a-z]' /proc/partitions)";
        let r = c.exec("hostile", "attack", &[], &["sh", "-c", script]);
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(
            r.stdout.lines().collect::<Vec<_>>(),
            [
                "top-read-only",
                "next-refused",
                "mounts-refused",
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
    assert!(Path::new("/").join("bin").is_dir());
}
