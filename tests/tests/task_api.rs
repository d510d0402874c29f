//! End-to-end: the rest of the containerd Task API (exec, terminals, pause, pids, stats,
//! update, OOM, checkpoint) and the OCI process settings, against containerd 1.7 and 2.x.
//!
//! Boots VMs: `#[ignore]`d in a plain `cargo test`; `scripts/test.sh` runs them.

#![allow(clippy::unwrap_used)] // Test code: a failed step should fail the test loudly.

use hako_tests::*;

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn exec_runs_in_the_container_with_its_exit_code_and_events() {
    for_each_containerd(|c| {
        let events = c.events();
        let r = c.run_detached("ex1", &[], &["sleep", "1000"]);
        assert_eq!(r.code, 0, "{r:?}");

        let r = c.exec(
            "ex1",
            "x1",
            &[],
            &[
                "sh",
                "-c",
                "echo in-exec; echo err >&2; ps -o pid,args; exit 5",
            ],
        );
        assert_eq!(r.code, 5, "{r:?}");
        assert!(r.stdout.starts_with("in-exec\n"), "{r:?}");
        assert!(r.stderr.contains("err"), "{r:?}");
        // The exec shares the container's pid namespace: the container's init is PID 1.
        assert!(
            r.stdout.lines().any(|l| l.trim() == "1 sleep 1000"),
            "{r:?}"
        );
        events.wait_for(&["/tasks/exec-added", "ex1", "x1"]);
        events.wait_for(&["/tasks/exec-started", "ex1", "x1"]);
        events.wait_for(&["/tasks/exit", r#""id":"x1""#, r#""exit_status":5"#]);

        // stdin into an exec.
        let args = ["task", "exec", "--exec-id", "x2", "ex1", "cat"];
        let r = c.ctr_stdin(&args, b"through exec stdin\n");
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(r.stdout, "through exec stdin\n");

        // A missing binary is a clear error and leaves the container running.
        let r = c.exec("ex1", "x3", &[], &["/no/such/thing"]);
        assert_ne!(r.code, 0, "{r:?}");
        assert!(r.stderr.contains("/no/such/thing"), "{r:?}");
        assert_eq!(c.task_status("ex1").as_deref(), Some("RUNNING"));

        // kill --all reaches every process of the container, execs included.
        let r = c.exec("ex1", "bg", &["-d"], &["sleep", "1000"]);
        assert_eq!(r.code, 0, "{r:?}");
        let r = c.ctr(&["task", "kill", "--all", "-s", "SIGKILL", "ex1"]);
        assert_eq!(r.code, 0, "{r:?}");
        c.wait_status("ex1", "STOPPED");
        c.remove_task("ex1");
        events.wait_for(&["/tasks/delete", "ex1"]);
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn terminals_are_real_and_sized() {
    for_each_containerd(|c| {
        // As under runc, the terminal is one of the container's own devpts and its console.
        let script = "[ -t 0 ] && [ -t 1 ] && echo isatty; stty size; tty; test -e /dev/console && echo console";
        let r = c.ctr_on_tty(
            &[
                "run",
                "-t",
                "--rm",
                "--runtime",
                RUNTIME,
                IMAGE,
                "tty1",
                "sh",
                "-c",
                script,
            ],
            100,
            30,
        );
        assert_eq!(r.code, 0, "{r:?}");
        assert!(r.stdout.contains("isatty"), "{r:?}");
        assert!(r.stdout.contains("30 100"), "{r:?}");
        let lines = r.stdout.replace('\r', "");
        assert!(lines.contains("\n/dev/pts/0\nconsole\n"), "{r:?}");

        let r = c.run_detached("tty2", &[], &["sleep", "1000"]);
        assert_eq!(r.code, 0, "{r:?}");
        let r = c.ctr_on_tty(
            &[
                "task",
                "exec",
                "-t",
                "--exec-id",
                "t1",
                "tty2",
                "sh",
                "-c",
                "[ -t 1 ] && echo exec-tty; stty size; tty; exit 3",
            ],
            90,
            20,
        );
        assert_eq!(r.code, 3, "{r:?}");
        assert!(r.stdout.contains("exec-tty"), "{r:?}");
        assert!(r.stdout.contains("20 90"), "{r:?}");
        // The container has no terminal of its own: the exec's is the first of its devpts.
        assert!(
            r.stdout.replace('\r', "").contains("\n/dev/pts/0\n"),
            "{r:?}"
        );
        c.remove_task("tty2");
    });
}

/// A value from `ctr task metrics`' METRIC/VALUE table.
fn metric(r: &Run, name: &str) -> u64 {
    r.stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {r:?}"))
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn pause_resume_pids_stats_and_update() {
    for_each_containerd(|c| {
        let events = c.events();
        // The container's own cgroup (its cgroup namespace's root) mounted where it can read it.
        let cgroup_mount = "--mount=type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=ro";
        let r = c.run_detached(
            "res1",
            &["--memory-limit", "100000000", cgroup_mount],
            &["sleep", "1000"],
        );
        assert_eq!(r.code, 0, "{r:?}");
        let r = c.ctr(&["task", "metrics", "res1"]);
        assert_eq!(
            metric(&r, "memory.usage_limit"),
            99999744,
            "set at create, page-aligned: {r:?}"
        );

        let r = c.ctr(&["task", "pause", "res1"]);
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(c.task_status("res1").as_deref(), Some("PAUSED"));
        events.wait_for(&["/tasks/paused", "res1"]);
        let r = c.ctr(&["task", "resume", "res1"]);
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(c.task_status("res1").as_deref(), Some("RUNNING"));
        events.wait_for(&["/tasks/resumed", "res1"]);

        // One process, the VM's on the host (the task's pid): a guest pid would name some
        // other host process (issue 24).
        let r = c.ctr(&["task", "ps", "res1"]);
        assert_eq!(r.code, 0, "{r:?}");
        let pids: Vec<&str> = r
            .stdout
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(pids, [c.task_pid("res1").to_string()], "{r:?}");
        let r = c.ctr(&["task", "metrics", "res1"]);
        assert_eq!(r.code, 0, "{r:?}");
        assert!(metric(&r, "memory.usage") > 0, "{r:?}");
        assert_eq!(metric(&r, "pids.current"), 1, "{r:?}");

        let cpu = ["cat", "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/cpu.max"];
        let r = c.exec("res1", "c1", &[], &cpu);
        assert_eq!(r.stdout, "99999744\nmax 100000\n", "{r:?}");
        c.shim_update(
            "res1",
            r#"{"memory": {"limit": 67108864}, "cpu": {"quota": 50000, "period": 100000}}"#,
        )
        .unwrap();
        let r = c.exec("res1", "c2", &[], &cpu);
        assert_eq!(r.stdout, "67108864\n50000 100000\n", "{r:?}");
        let r = c.ctr(&["task", "metrics", "res1"]);
        assert_eq!(metric(&r, "memory.usage_limit"), 67108864, "{r:?}");

        let r = c.ctr(&["task", "checkpoint", "res1"]);
        assert_ne!(r.code, 0, "{r:?}");
        assert!(r.stderr.contains("not implemented"), "{r:?}");
        c.remove_task("res1");
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn oom_kills_are_reported() {
    for_each_containerd(|c| {
        let events = c.events();
        let r = c.run_rm_with(
            "oom1",
            &["--memory-limit", "33554432"],
            &["dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"],
        );
        assert_eq!(r.code, 137, "{r:?}");
        events.wait_for(&["/tasks/oom", "oom1"]);
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn the_oci_process_is_applied() {
    for_each_containerd(|c| {
        let r = c.run_rm_with(
            "proc1",
            &["--env", "GREETING=hello world", "--cwd", "/tmp", "--user", "65534:65534"],
            &["sh", "-c", "echo \"$GREETING\"; pwd; id -u; id -g; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status"],
        );
        assert_eq!(r.code, 0, "{r:?}");
        let lines: Vec<&str> = r.stdout.lines().collect();
        assert_eq!(
            &lines[..4],
            ["hello world", "/tmp", "65534", "65534"],
            "{r:?}"
        );
        // A non-root user keeps no capabilities across exec (no ambient set), as with runc; the
        // spec's no_new_privileges (ctr sets it) is applied.
        assert!(r.stdout.contains("CapEff:\t0000000000000000"), "{r:?}");
        assert!(r.stdout.contains("NoNewPrivs:\t1"), "{r:?}");

        // Root in the default spec gets containerd's default capability set, not all of them.
        let r = c.run_rm("proc2", &["grep", "CapBnd", "/proc/self/status"]);
        assert_eq!(r.code, 0, "{r:?}");
        assert!(r.stdout.contains("CapBnd:\t00000000a80425fb"), "{r:?}");

        // Masked paths are empty, /dev/shm has the spec's size, /proc/sys is read-only.
        let r = c.run_rm(
            "proc3",
            &["sh", "-c", "wc -c < /proc/kcore; df -k /dev/shm | tail -n1; echo 1 > /proc/sys/vm/overcommit_memory; echo rc=$?"],
        );
        let lines: Vec<&str> = r.stdout.lines().collect();
        assert_eq!(lines.first().map(|l| l.trim()), Some("0"), "{r:?}");
        assert!(
            lines
                .get(1)
                .is_some_and(|l| l.split_whitespace().nth(1) == Some("65536")),
            "{r:?}"
        );
        assert!(r.stdout.contains("rc=1"), "{r:?}");

        // The container's seccomp profile is applied in the guest: containerd's default profile
        // refuses unshare without CAP_SYS_ADMIN, which the same command passes without it.
        let probe = [
            "sh",
            "-c",
            "grep Seccomp: /proc/self/status; unshare -U true; echo rc=$?",
        ];
        let r = c.run_rm("sec1", &probe);
        assert!(
            r.stdout.contains("Seccomp:\t0") && r.stdout.contains("rc=0"),
            "{r:?}"
        );
        let r = c.run_rm_with("sec2", &["--seccomp"], &probe);
        assert!(
            r.stdout.contains("Seccomp:\t2") && r.stdout.contains("rc=1"),
            "{r:?}"
        );

        // rlimits from the spec (containerd's default: 1024 open files, hard and soft), and a
        // capability added with --cap-add.
        let r = c.run_rm_with(
            "lim1",
            &["--cap-add", "CAP_SYS_ADMIN"],
            &["sh", "-c", "ulimit -Hn; grep CapEff /proc/self/status"],
        );
        assert!(r.stdout.starts_with("1024\n"), "{r:?}");
        assert!(r.stdout.contains("CapEff:\t00000000a82425fb"), "{r:?}");

        // The read-only rootfs cannot be written.
        let r = c.run_rm_with(
            "proc4",
            &["--read-only"],
            &["sh", "-c", "touch /x; echo rc=$?"],
        );
        assert!(r.stdout.contains("rc=1"), "{r:?}");
        assert!(r.stderr.contains("Read-only file system"), "{r:?}");
    });
}
