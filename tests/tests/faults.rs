//! End-to-end: faults a sandbox must survive. Each ends with the leak check (no VM, daemon,
//! mount or directory left), against containerd 1.7 and 2.x.
//!
//! Boots VMs: `#[ignore]`d in a plain `cargo test`; `scripts/test.sh` runs them.

#![allow(clippy::unwrap_used)] // Test code: a failed step should fail the test loudly.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use hako_tests::*;

/// Kills the task's VM (or a helper) with `signal` while `sleep` runs in it, and checks what
/// containerd's clients see: a non-zero exit published within 10 s, and a plain Delete.
fn survive(c: &Containerd, id: &str, extra: &[&str], fault: impl FnOnce(&Containerd)) {
    let events = c.events();
    let r = c.run_detached(id, extra, &["sleep", "600"]);
    assert_eq!(r.code, 0, "{r:?}");
    c.wait_status(id, "RUNNING");
    let started = Instant::now();
    fault(c);
    let exit = events.wait_for(&["/tasks/exit", &format!("\"container_id\":\"{id}\"")]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the exit took {:?}",
        started.elapsed()
    );
    // proto3 JSON leaves a zero status out: its presence means non-zero.
    assert!(exit.contains("\"exit_status\":"), "exit status 0: {exit}");
    c.wait_status(id, "STOPPED");
    let r = c.ctr(&["task", "delete", id]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = c.ctr(&["container", "rm", id]);
    assert_eq!(r.code, 0, "{r:?}");
}

fn signal_comm(comm: &str, signal: Signal) {
    let pids: Vec<u32> = hako_processes()
        .into_iter()
        .filter(|(_, name)| name.starts_with(comm))
        .map(|(pid, _)| pid)
        .collect();
    // virtiofsd is two processes (it forks into its sandbox): all of them.
    assert!(!pids.is_empty(), "no {comm}");
    for pid in pids {
        let _ = kill(Pid::from_raw(pid as i32), signal);
    }
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn the_vmm_killed_or_terminated_ends_the_task_with_a_failure() {
    for_each_containerd(|c| {
        survive(c, "vmkill", &[], |c| {
            let pid = c.task_pid("vmkill");
            kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
        });
        survive(c, "vmterm", &[], |c| {
            let pid = c.task_pid("vmterm");
            kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
        });
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn a_guest_that_powers_off_or_panics_ends_the_task_with_a_failure() {
    for_each_containerd(|c| {
        for (id, key) in [("poweroff", "o"), ("panic", "c")] {
            survive(c, id, &["--privileged"], |c| {
                let r = c.exec(
                    id,
                    "sysrq",
                    &[],
                    &["sh", "-c", &format!("echo {key} > /proc/sysrq-trigger")],
                );
                // The exec dies with the guest; its status is not the point.
                let _ = r;
            });
        }
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn virtiofsd_killed_fails_the_sandbox() {
    for_each_containerd(|c| {
        survive(c, "fskill", &[], |_| {
            signal_comm("virtiofsd", Signal::SIGKILL)
        });
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn an_agent_that_does_not_answer_fails_calls_in_time_and_sigkill_still_works() {
    let config = HakoConfig::new("[agent]\ncall_timeout_ms = 2000\n");
    for_each_containerd_with_env(&config.env(), |c| {
        survive(c, "frozen", &[], |c| {
            // A stopped VM: the agent's socket accepts nothing and answers nothing.
            let pid = c.task_pid("frozen");
            kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();
            // (Pids asks the guest nothing: it answers the VMM's pid, frozen or not; and
            // containerd's Metrics leaves out a task whose Stats fails, without its error.)
            for args in [
                &["task", "pause", "frozen"][..],
                &["task", "kill", "-s", "SIGTERM", "frozen"][..],
            ] {
                let started = Instant::now();
                let r = c.ctr(args);
                assert_ne!(r.code, 0, "{args:?}: {r:?}");
                assert!(r.stderr.contains("timed out"), "{args:?}: {r:?}");
                assert!(started.elapsed() < Duration::from_secs(10), "{args:?}");
            }
            let r = c.ctr(&["task", "kill", "-s", "SIGKILL", "frozen"]);
            assert_eq!(r.code, 0, "{r:?}");
        });
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn containerd_restarts_leave_pods_running_or_gone() {
    for_each_containerd(|c| {
        // A running pod survives a restart and stays manageable.
        let r = c.run_detached("steady", &[], &["sleep", "600"]);
        assert_eq!(r.code, 0, "{r:?}");
        c.wait_status("steady", "RUNNING");
        c.restart();
        c.wait_status("steady", "RUNNING");
        let r = c.exec("steady", "after", &[], &["echo", "still here"]);
        assert_eq!((r.code, r.stdout.as_str()), (0, "still here\n"), "{r:?}");
        c.remove_task("steady");

        // A restart while a pod is being created: its VM is booting when containerd goes.
        let mut run = c
            .ctr_command(&[
                "run",
                "-d",
                "--runtime",
                RUNTIME,
                IMAGE,
                "midway",
                "sleep",
                "600",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while !hako_processes()
            .iter()
            .any(|(_, comm)| comm.starts_with("qemu-system"))
        {
            assert!(started.elapsed() < Duration::from_secs(30), "no VM started");
            std::thread::sleep(Duration::from_millis(20));
        }
        c.stop();
        let _ = run.wait();
        c.restart();
        // Afterwards the task is either there and manageable, or gone with everything it had.
        let midway = c.task_status("midway");
        eprintln!("after the restart, midway is {midway:?}");
        match midway.as_deref() {
            Some(status) => {
                assert!(
                    ["CREATED", "RUNNING", "STOPPED"].contains(&status),
                    "midway is {status}"
                );
                c.remove_task("midway");
            }
            None => {
                let _ = c.ctr(&["container", "rm", "midway"]);
            }
        }
    });
}

/// VMs, vsock backends, shims and sandbox dirs now, and virtiofsd instances (two processes
/// each: it forks into its sandbox).
fn sandbox_counts() -> [usize; 5] {
    let procs = hako_processes();
    let count = |prefix: &str| procs.iter().filter(|(_, c)| c.starts_with(prefix)).count();
    [
        count("qemu-system"),
        count("hako-vsock"),
        count("containerd-shim"),
        sandbox_dirs().len(),
        count("virtiofsd") / 2,
    ]
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn ten_pods_at_once_for_five_rounds() {
    const PODS: usize = 10;
    for_each_containerd(|c| {
        // Round 0 starts where a fresh host does: no parent cgroup (ctr's `/default`) in any
        // hierarchy, so ten shims race to make and fill the same parents (issue 27: one joined
        // a v1 cpuset another had made and not filled yet, and failed with ENOSPC).
        let parents: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")
            .unwrap()
            .flatten()
            .map(|h| h.path().join("default"))
            .filter(|p| p.exists())
            .collect();
        assert!(
            parents.is_empty(),
            "parent cgroups left from before: {parents:?}"
        );
        for round in 0..5 {
            let ids: Vec<String> = (0..PODS).map(|i| format!("load{round}-{i}")).collect();
            std::thread::scope(|s| {
                for id in &ids {
                    s.spawn(move || {
                        let r = c.run_detached(id, &[], &["sleep", "600"]);
                        assert_eq!(r.code, 0, "{id}: {r:?}");
                    });
                }
            });
            assert_eq!(sandbox_counts(), [PODS; 5], "round {round}, all started");
            std::thread::scope(|s| {
                for id in &ids {
                    s.spawn(move || {
                        let r = c.exec(id, "hello", &[], &["echo", id]);
                        assert_eq!(r.stdout.trim(), id.as_str(), "{r:?}");
                    });
                }
            });
            assert_eq!(sandbox_counts(), [PODS; 5], "round {round}, after exec");
            std::thread::scope(|s| {
                for id in &ids {
                    s.spawn(move || c.remove_task(id));
                }
            });
            // containerd stops each shim after its Delete, on its own schedule.
            let started = Instant::now();
            while sandbox_counts() != [0; 5] {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "round {round}, after delete: {:?}",
                    sandbox_counts()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });
}

/// The ways a VM dies under a running pod: the guest powers off or panics (root in a privileged
/// container), the VMM is killed.
const DEATHS: [(&str, &str); 3] = [("poweroff", "o"), ("panic", "c"), ("vmm-killed", "")];

fn kill_the_vm(c: &Containerd, id: &str, key: &str) {
    if key.is_empty() {
        let pid = c.task_pid(id);
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    } else {
        // The exec dies with the guest; its status is not the point.
        let _ = c.exec(
            id,
            "sysrq",
            &[],
            &["sh", "-c", &format!("echo {key} > /proc/sysrq-trigger")],
        );
    }
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn a_pod_whose_vm_died_is_deleted_at_once_by_a_forced_delete() {
    for_each_containerd(|c| {
        for (id, key) in DEATHS {
            let r = c.run_detached(id, &["--privileged"], &["sleep", "600"]);
            assert_eq!(r.code, 0, "{r:?}");
            c.wait_status(id, "RUNNING");
            kill_the_vm(c, id, key);
            // What CRI and `ctr task rm -f` do: Kill (every process), then Delete. The kill
            // answers as for a finished process, at once, whether or not the exit watcher
            // has reported the exit yet.
            let started = Instant::now();
            let r = c.ctr(&["task", "kill", "--all", "-s", "SIGKILL", id]);
            assert!(
                r.code == 0 || r.stderr.contains("process already finished"),
                "{id}: {r:?}"
            );
            let r = c.ctr(&["task", "rm", "-f", id]);
            assert_eq!(r.code, 0, "{id}: {r:?}");
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{id}: {:?}",
                started.elapsed()
            );
            let r = c.ctr(&["container", "rm", id]);
            assert_eq!(r.code, 0, "{id}: {r:?}");
            // Nothing of the sandbox stays: VMM, vsock device, virtiofsd, mounts, taps, the
            // VMM's uid claim, cgroups (the leak check after the test says the rest).
            assert_eq!(sandbox_counts(), [0, 0, 0, 0, 0], "{id}");
        }
    });
}

/// The shim's descriptors, threads and memory after `rounds` execs of every kind: what one
/// exec holds must go with it.
#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn execs_of_every_kind_leave_nothing_in_the_shim() {
    for_each_containerd(|c| {
        let r = c.run_detached("execs", &[], &["sleep", "600"]);
        assert_eq!(r.code, 0, "{r:?}");
        let shim = hako_processes()
            .into_iter()
            .find(|(_, comm)| comm.starts_with("containerd-shim"))
            .map(|(pid, _)| pid)
            .unwrap();
        let fds = || {
            std::fs::read_dir(format!("/proc/{shim}/fd"))
                .unwrap()
                .count()
        };
        let status_kib = |field: &str| -> u64 {
            std::fs::read_to_string(format!("/proc/{shim}/status"))
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{field}:")))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
                .unwrap()
        };
        let kinds: [(&str, &[&str]); 4] = [
            ("at-once", &["true"]),
            ("killed", &["sh", "-c", "kill -9 $$"]),
            ("large", &["sh", "-c", "head -c 262144 /dev/zero"]),
            ("stdin", &["cat"]),
        ];
        // One round of each first: the shim's pools and caches settle.
        let round = |n: usize| {
            for (kind, cmd) in kinds {
                let exec_id = format!("{kind}-{n}");
                // ctr attaches its stdin to every exec: `true` exits with it still open (the
                // finding's case), `cat` reads a line and then its end.
                let r = c.ctr_stdin(
                    &["task", "exec", "--exec-id", &exec_id, "execs"]
                        .iter()
                        .copied()
                        .chain(cmd.iter().copied())
                        .collect::<Vec<_>>(),
                    b"a line\n",
                );
                let want = if kind == "killed" { 137 } else { 0 };
                assert_eq!(r.code, want, "{exec_id}: {r:?}");
                match kind {
                    "large" => assert_eq!(r.stdout.len(), 262144, "{exec_id}"),
                    "stdin" => assert_eq!(r.stdout, "a line\n", "{exec_id}"),
                    _ => {}
                }
            }
        };
        round(0);
        let (fds_before, threads_before, rss_before) =
            (fds(), status_kib("Threads"), status_kib("VmRSS"));
        for n in 1..=100 {
            round(n);
        }
        let (fds_after, threads_after, rss_after) =
            (fds(), status_kib("Threads"), status_kib("VmRSS"));
        assert_eq!(fds_after, fds_before, "descriptors after 400 execs");
        assert!(
            threads_after <= threads_before + 2,
            "threads {threads_before} -> {threads_after}"
        );
        assert!(
            rss_after < rss_before + 8 * 1024,
            "resident memory {rss_before} KiB -> {rss_after} KiB after 400 execs"
        );
        c.remove_task("execs");
    });
}
