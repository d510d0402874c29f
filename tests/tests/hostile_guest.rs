//! End-to-end: the guest is hostile. Root in a privileged container (root in the guest, for
//! all that matters here) goes after the share, plants symlinks where the host mounts next, and
//! looks for block devices; the host helpers it could reach run confined. Each test ends with
//! the leak check, and checks that the host's mount table and marker files are as before.
//!
//! Boots VMs: `#[ignore]`d in a plain `cargo test`; `scripts/test.sh` runs them.

#![allow(clippy::unwrap_used)] // Test code: a failed step should fail the test loudly.

use std::fs;

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
