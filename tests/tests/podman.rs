//! End-to-end: podman 4.3 and conmon 2.1 (Debian 12) with `--runtime /usr/local/bin/hako-runtime`,
//! each test beside the same podman commands under runc, podman's default runtime, compared
//! (see `hako_tests::podman`). HAKO_PODMAN_RUNTIMES=runc runs the runc halves alone.
//!
//! Boots VMs: `#[ignore]`d in a plain `cargo test`; `scripts/test.sh` runs them.

#![allow(clippy::unwrap_used)] // Test code: a failed step should fail the test loudly.

use std::fs;
use std::time::{Duration, Instant};

use hako_tests::podman::{
    compare, remove_pod_cgroups, under_hako_only, without_pts_number, Runtime, ScratchDir,
    HAKO_RUNTIME, RUNTIME_ROOT,
};
use hako_tests::{eventually, run_with_timeout, Run, IMAGE};

/// The host's boot id: a container under hako reads its guest's instead.
fn host_boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .to_string()
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn run_rm_gives_the_output_streams_and_exit_code_of_the_container() {
    compare("run_rm_gives_the_output_streams_and_exit_code", |p| {
        let r = p.podman(&[
            "run",
            "--rm",
            IMAGE,
            "sh",
            "-c",
            "echo out; echo err >&2; uname -r; exit 7",
        ]);
        assert_eq!(r.code, 7, "{r:?}");
        // The last line says where it ran: the host's kernel under runc, the guest's under hako.
        let (out, release) = r.stdout.trim_end().rsplit_once('\n').unwrap();
        assert_eq!(release, p.runtime.kernel_release(), "{r:?}");
        assert_eq!(out, "out", "{r:?}");
        assert_eq!(r.stderr, "err\n", "{r:?}");
        (r.code, out.to_string(), r.stderr)
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn run_it_gives_the_container_a_terminal_of_the_users_size() {
    compare(
        "run_it_gives_the_container_a_terminal_of_the_users_size",
        |p| {
            let r = p.on_tty(
                &[
                    "run",
                    "--rm",
                    "-it",
                    IMAGE,
                    "sh",
                    "-c",
                    "tty; stty size; exit 3",
                ],
                91,
                27,
            );
            assert_eq!(r.code, 3, "{r:?}");
            // Exactly this: no `\r\r\n` from a second output processing on the way.
            let shown = without_pts_number(&r.stdout);
            assert_eq!(shown, "/dev/pts/N\r\n27 91\r\n", "{r:?}");
            (r.code, shown)
        },
    );
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn a_container_goes_from_created_to_running_to_exited_with_logs_execs_and_stop() {
    compare("a_container_goes_from_created_to_running_to_exited", |p| {
        // Handles TERM as a service would: `podman stop` ends it with its own exit code.
        let script = "echo one; echo two >&2; echo three; \
                      trap 'echo got TERM; exit 3' TERM; echo ready; \
                      while true; do sleep 0.1; done";
        p.must(&["create", "--name", "life", IMAGE, "sh", "-c", script]);
        let created = p.state("life");
        assert_eq!(created, "created false 0");
        p.must(&["start", "life"]);
        let running = p.state("life");
        assert_eq!(running, "running true 0");

        eventually("ready in the logs", Duration::from_secs(30), || {
            let logs = p.must(&["logs", "life"]);
            logs.stdout
                .contains("ready")
                .then_some(())
                .ok_or(format!("{logs:?}"))
        });
        // Each stream in order, on the stream it was written to.
        let logs = p.must(&["logs", "life"]);
        assert_eq!(logs.stdout, "one\nthree\nready\n", "{logs:?}");
        assert_eq!(logs.stderr, "two\n", "{logs:?}");

        let exec = p.podman(&[
            "exec",
            "life",
            "sh",
            "-c",
            "echo in exec; echo exec err >&2; exit 5",
        ]);
        assert_eq!(
            (exec.code, exec.stdout.as_str(), exec.stderr.as_str()),
            (5, "in exec\n", "exec err\n")
        );
        let exec_tty = p.podman(&["exec", "-t", "life", "sh", "-c", "tty; exit 4"]);
        let exec_tty = (exec_tty.code, without_pts_number(&exec_tty.stdout));
        assert_eq!(exec_tty, (4, "/dev/pts/N\r\n".to_string()));
        // podman maps the runtime's errors to the shell's codes: not found, not executable.
        let missing = p.podman(&["exec", "life", "no-such-command"]);
        assert_eq!(missing.code, 127, "{missing:?}");
        assert!(missing.stderr.contains("no-such-command"), "{missing:?}");
        let denied = p.podman(&["exec", "life", "/etc/passwd"]);
        assert_eq!(denied.code, 126, "{denied:?}");
        let release = p.must(&["exec", "life", "uname", "-r"]);
        assert_eq!(release.stdout.trim(), p.runtime.kernel_release());

        let stop = p.must(&["stop", "-t", "2", "life"]);
        let exited = p.state("life");
        assert_eq!(exited, "exited false 3");
        let logs = p.must(&["logs", "life"]);
        assert_eq!(logs.stdout, "one\nthree\nready\ngot TERM\n", "{logs:?}");
        p.must(&["rm", "life"]);
        (
            [created, running, exited],
            (exec.code, exec.stdout, exec.stderr),
            exec_tty,
            (missing.code, denied.code),
            (stop.stdout, logs.stdout, logs.stderr),
        )
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn kill_pause_unpause_and_a_stop_timeout_reach_the_container() {
    compare("kill_pause_unpause_and_a_stop_timeout", |p| {
        let data = ScratchDir::new("counter");
        // Counts in a file the host reads, to see whether the process makes progress; ignores
        // TERM, so that `podman stop` has to kill it.
        let script = "trap 'echo got USR1' USR1; trap '' TERM; i=0; \
                      while true; do i=$((i+1)); echo $i > /data/count; sleep 0.1; done";
        let volume = data.volume("/data", "");
        p.must(&[
            "run", "-d", "--name", "sig", "-v", &volume, IMAGE, "sh", "-c", script,
        ]);
        let count = || -> Option<u64> {
            let text = fs::read_to_string(data.path.join("count")).ok()?;
            text.trim().parse().ok()
        };
        let advances = |what: &str| {
            let mut first = None;
            eventually(what, Duration::from_secs(30), || match (first, count()) {
                (Some(a), Some(b)) if b > a => Ok(()),
                (None, Some(a)) => {
                    first = Some(a);
                    Err(format!("at {a}"))
                }
                (_, now) => Err(format!("from {first:?} to {now:?}")),
            });
        };
        advances("the counter running");

        let kill = p.must(&["kill", "-s", "USR1", "sig"]);
        eventually("the USR1 trap", Duration::from_secs(30), || {
            let logs = p.must(&["logs", "sig"]);
            (logs.stdout == "got USR1\n")
                .then_some(())
                .ok_or(format!("{logs:?}"))
        });

        p.must(&["pause", "sig"]);
        let paused = p.inspect("sig", "{{.State.Status}} {{.State.Paused}}");
        assert_eq!(paused, "paused true");
        // A write issued just before the freeze may still land: wait until the count holds
        // for half a second (five of its steps), then it must hold for three more seconds.
        let mut settled = (count(), Instant::now());
        eventually("the count to settle", Duration::from_secs(10), || {
            let now = count();
            if now != settled.0 {
                settled = (now, Instant::now());
            }
            (settled.1.elapsed() >= Duration::from_millis(500))
                .then_some(())
                .ok_or(format!("still moving at {now:?}"))
        });
        let held = Instant::now();
        while held.elapsed() < Duration::from_secs(3) {
            assert_eq!(count(), settled.0, "the paused container made progress");
            std::thread::sleep(Duration::from_millis(100));
        }

        p.must(&["unpause", "sig"]);
        let resumed = p.inspect("sig", "{{.State.Status}} {{.State.Paused}}");
        assert_eq!(resumed, "running false");
        advances("the counter after unpause");

        // TERM is ignored: podman waits the 2 s, then kills (137).
        let started = Instant::now();
        let stop = p.must(&["stop", "-t", "2", "sig"]);
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(2), "stopped after {took:?}");
        let warning = "StopSignal SIGTERM failed to stop container sig in 2 seconds, \
                       resorting to SIGKILL";
        assert!(stop.stderr.contains(warning), "{stop:?}");
        let stopped = p.state("sig");
        assert_eq!(stopped, "exited false 137");
        p.must(&["rm", "sig"]);
        (kill.stdout, paused, resumed, stop.stdout, stopped)
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn a_published_port_serves_a_read_only_volume_and_rm_f_removes_the_running_container() {
    compare("a_published_port_serves_a_read_only_volume", |p| {
        let www = ScratchDir::new("www");
        fs::write(www.path.join("index.html"), "hello through podman\n").unwrap();
        let rw = ScratchDir::new("rw");
        // The port is free: this half's network namespace is new.
        p.must(&[
            "run",
            "-d",
            "--name",
            "web",
            "-p",
            "127.0.0.1:8080:80",
            "-v",
            &www.volume("/www", "ro"),
            "-v",
            &rw.volume("/rw", ""),
            IMAGE,
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            "/www",
        ]);
        eventually(
            "the page on 127.0.0.1:8080",
            Duration::from_secs(30),
            || {
                let r = p.on_host("curl -sS -m 5 http://127.0.0.1:8080/");
                (r.stdout == "hello through podman\n")
                    .then_some(())
                    .ok_or(format!("{r:?}"))
            },
        );
        let port = p.must(&["port", "web"]).stdout;
        assert_eq!(port, "80/tcp -> 127.0.0.1:8080\n");

        let write = p.podman(&[
            "exec",
            "web",
            "sh",
            "-c",
            "echo written in the container > /rw/out",
        ]);
        assert_eq!(write.code, 0, "{write:?}");
        let written = fs::read_to_string(rw.path.join("out")).unwrap();
        assert_eq!(written, "written in the container\n");
        let denied = p.podman(&["exec", "web", "sh", "-c", "echo x > /www/denied"]);
        assert_eq!(denied.code, 1, "{denied:?}");
        assert!(
            denied.stderr.contains("Read-only file system"),
            "{denied:?}"
        );
        assert!(!www.path.join("denied").exists());

        // The running container goes at once (-t 0: httpd as PID 1 ignores TERM, and the
        // 10 s wait would prove nothing here), and with it everything the runtime kept.
        let id = p.inspect("web", "{{.Id}}");
        let rm = p.must(&["rm", "-f", "-t", "0", "web"]);
        assert_eq!(rm.stdout, "web\n");
        let ps = p.must(&["ps", "-a", "-q"]);
        assert_eq!(ps.stdout, "");
        let state = std::path::Path::new(hako_tests::podman::RUNTIME_ROOT).join(&id);
        assert!(!state.exists(), "{} is left", state.display());
        (port, written, denied.code, denied.stderr, rm.stdout)
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn network_none_leaves_only_loopback() {
    compare("network_none_leaves_only_loopback", |p| {
        let r = p.podman(&[
            "run",
            "--rm",
            "--network",
            "none",
            IMAGE,
            "sh",
            "-c",
            "tail -n +3 /proc/net/dev | cut -d: -f1; echo @@; ls /sys/class/net",
        ]);
        assert_eq!(r.code, 0, "{r:?}");
        let (dev, sys) = r.stdout.split_once("@@\n").unwrap();
        let names = |text: &str| -> Vec<String> {
            let mut v: Vec<String> = text.split_whitespace().map(str::to_string).collect();
            v.sort();
            v
        };
        let (dev, sys) = (names(dev), names(sys));
        assert_eq!(dev, ["lo"], "{r:?}");
        assert_eq!(sys, ["lo"], "{r:?}");
        (dev, sys)
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn a_container_past_its_memory_limit_is_killed() {
    compare("a_container_past_its_memory_limit_is_killed", |p| {
        // dd's 200 MiB buffer, filled from /dev/zero, is three times the limit; without the
        // limit it would finish and exit 0.
        let r = p.podman(&[
            "run",
            "--rm",
            "--memory",
            "64m",
            IMAGE,
            "dd",
            "if=/dev/zero",
            "of=/dev/null",
            "bs=200M",
            "count=1",
        ]);
        assert_eq!(r.code, 137, "{r:?}");
        r.code
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn containers_in_a_pod_share_its_network_and_under_hako_its_vm() {
    compare("containers_in_a_pod_share_its_network", |p| {
        let pod = p.must(&["pod", "create", "--name", "pod"]).stdout;
        p.must(&[
            "run",
            "-d",
            "--pod",
            "pod",
            "--name",
            "server",
            IMAGE,
            "sh",
            "-c",
            "mkdir /tmp/www && echo served in the pod > /tmp/www/index.html && \
             exec httpd -f -p 8080 -h /tmp/www",
        ]);
        // The client retries inside itself: the server listens a moment after it starts.
        let client = p.podman(&[
            "run",
            "--rm",
            "--pod",
            "pod",
            IMAGE,
            "sh",
            "-c",
            "cat /proc/sys/kernel/random/boot_id; i=0; \
             until wget -qO- http://127.0.0.1:8080/; do \
             i=$((i+1)); [ $i -lt 150 ] || exit 1; sleep 0.2; done",
        ]);
        assert_eq!(client.code, 0, "{client:?}");
        let (client_boot, page) = client.stdout.split_once('\n').unwrap();
        assert_eq!(page, "served in the pod\n");
        let server_boot = p.must(&["exec", "server", "cat", "/proc/sys/kernel/random/boot_id"]);
        assert_eq!(
            server_boot.stdout.trim(),
            client_boot,
            "one kernel for the pod"
        );
        let host = host_boot_id();
        match p.runtime {
            Runtime::Runc => assert_eq!(client_boot, host),
            // One VM for the pod, not the host's kernel.
            Runtime::Hako => assert_ne!(client_boot, host),
        }
        let rm = p.must(&["pod", "rm", "-f", "-t", "0", "pod"]);
        remove_pod_cgroups(pod.trim());
        let left = (
            p.must(&["pod", "ps", "-q"]).stdout,
            p.must(&["ps", "-a", "-q"]).stdout,
        );
        assert_eq!(left, (String::new(), String::new()));
        (client.code, page.to_string(), rm.code)
    });
}

/// The runtime's command line with `args`, as `runtime` (runc or hako-runtime), directly.
fn runtime_cli(runtime: &str, args: &[&str]) -> Run {
    let mut cmd = std::process::Command::new(runtime);
    cmd.args(args);
    run_with_timeout(cmd, None, Duration::from_secs(30))
}

#[test]
#[ignore = "needs the installed runtime: run through scripts/test.sh"]
fn the_command_line_answers_unknown_ids_and_flags_as_runc_does() {
    // What podman relies on: exit statuses, and runc's words in the messages.
    for (args, code, words) in [
        (
            &["state", "hako-e2e-nosuch"][..],
            1,
            "container does not exist",
        ),
        (
            &["kill", "hako-e2e-nosuch", "9"][..],
            1,
            "container does not exist",
        ),
        (&["delete", "--force", "hako-e2e-nosuch"][..], 0, ""),
        (
            &["--bogus", "state", "x"][..],
            1,
            "flag provided but not defined: -bogus",
        ),
        (
            &["nosuchcommand"][..],
            3,
            "No help topic for 'nosuchcommand'",
        ),
    ] {
        let runc = runtime_cli("runc", args);
        let hako = runtime_cli(HAKO_RUNTIME, args);
        for (who, r) in [("runc", &runc), ("hako-runtime", &hako)] {
            assert_eq!(r.code, code, "{who} {args:?}: {r:?}");
            assert!(r.stderr.contains(words), "{who} {args:?}: {r:?}");
        }
        // runc adds its whole help to a usage error; where it prints nothing, so does hako.
        if runc.stdout.is_empty() {
            assert_eq!(hako.stdout, "", "{args:?}");
        }
    }
    // podman's probe for checkpoint support must fail: hako cannot checkpoint a VM's process.
    assert_ne!(runtime_cli(HAKO_RUNTIME, &["checkpoint", "--help"]).code, 0);
    let version = runtime_cli(HAKO_RUNTIME, &["--version"]);
    assert!(
        version.stdout.starts_with("hako-runtime version "),
        "{version:?}"
    );
    let features = runtime_cli(HAKO_RUNTIME, &["features"]);
    let features: serde_json::Value = serde_json::from_str(&features.stdout).unwrap();
    assert_eq!(features["linux"]["cgroup"]["v1"], false, "{features}");
}

#[test]
#[ignore = "needs the installed runtime: run through scripts/test.sh"]
fn a_tenants_ids_and_an_unprivileged_caller_are_refused() {
    let sandboxes = std::path::Path::new(RUNTIME_ROOT).join(".sandboxes");
    let had_sandboxes = sandboxes.is_dir();
    // Ids become paths under the root: none may leave it or name the root's own entries.
    for id in ["../../etc", ".sandboxes", ".create.lock", "a/b", ""] {
        for args in [&["delete", "--force", id][..], &["state", id][..]] {
            let r = runtime_cli(HAKO_RUNTIME, args);
            assert_eq!(r.code, 1, "{args:?}: {r:?}");
            assert!(r.stderr.contains("invalid container id"), "{args:?}: {r:?}");
        }
    }
    assert_eq!(
        sandboxes.is_dir(),
        had_sandboxes,
        "the servers' directory was touched"
    );
    // Rootless use, refused in one sentence before anything is made.
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        HAKO_RUNTIME,
    ])
    .args(["create", "--bundle", "/nonexistent", "hako-e2e-rootless"]);
    let r = run_with_timeout(cmd, None, Duration::from_secs(30));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains("needs root: rootless podman is not supported"),
        "{r:?}"
    );
    assert!(!std::path::Path::new(RUNTIME_ROOT)
        .join("hako-e2e-rootless")
        .exists());
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn the_hosts_network_is_refused_and_leaves_nothing_behind() {
    under_hako_only("the_hosts_network_is_refused", |p| {
        let r = p.podman(&["run", "--rm", "--network", "host", IMAGE, "true"]);
        assert_ne!(r.code, 0, "{r:?}");
        assert!(
            r.stderr
                .contains("host networking is not possible with hako"),
            "{r:?}"
        );
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn update_reaches_the_guests_cgroup_and_past_the_vm_is_refused() {
    // runc's host here has cgroup v1, the guest v2: the files differ, so hako alone.
    under_hako_only("update_reaches_the_guests_cgroup", |p| {
        p.must(&["run", "-d", "--name", "upd", IMAGE, "sleep", "1000"]);
        p.must(&["update", "--memory", "256m", "upd"]);
        let max = p.must(&["exec", "upd", "cat", "/sys/fs/cgroup/memory.max"]);
        assert_eq!(max.stdout.trim(), (256u64 << 20).to_string(), "{max:?}");
        let r = p.podman(&["update", "--memory", "4g", "upd"]);
        assert_ne!(r.code, 0, "{r:?}");
        assert!(r.stderr.contains("does not fit in its VM"), "{r:?}");
        // The refused update changed nothing.
        let max = p.must(&["exec", "upd", "cat", "/sys/fs/cgroup/memory.max"]);
        assert_eq!(max.stdout.trim(), (256u64 << 20).to_string(), "{max:?}");
        p.must(&["rm", "-f", "-t", "0", "upd"]);
    });
}

/// The sizes a stream is tested at: each crosses a buffer on the way (a pipe's 4 KiB page and
/// 64 KiB ring, the FIFOs', conmon's, the agent channel's).
const STREAM_SIZES: [usize; 6] = [0, 1, 4096, 65536, 1 << 20, 64 << 20];

/// `md5sum`'s answer for `bytes`, from the host's own md5sum (busybox has no cksum).
fn host_md5(bytes: &[u8]) -> String {
    let r = run_with_timeout(
        std::process::Command::new("md5sum"),
        Some(bytes),
        Duration::from_secs(60),
    );
    assert_eq!(r.code, 0, "{r:?}");
    r.stdout.trim().to_string()
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn stdout_and_stdin_of_run_and_exec_carry_every_size_whole() {
    // A repeating line the host can rebuild: what arrives is compared byte for byte.
    let pattern = |n: usize| -> Vec<u8> {
        b"0123456789abcde\n"
            .iter()
            .copied()
            .cycle()
            .take(n)
            .collect()
    };
    compare("stdout_and_stdin_carry_every_size_whole", |p| {
        let mut seen = Vec::new();
        for size in STREAM_SIZES {
            let script = format!("yes 0123456789abcde | head -c {size}");
            let out = run_with_timeout(
                p.command(&["run", "--rm", IMAGE, "sh", "-c", &script]),
                None,
                Duration::from_secs(300),
            );
            assert_eq!(out.code, 0, "{size}: {}", out.stderr);
            assert_eq!(out.stdout.len(), size, "stdout of {size} bytes");
            assert!(
                out.stdout.as_bytes() == pattern(size).as_slice(),
                "stdout of {size} bytes differs"
            );
            let input = pattern(size);
            let back = run_with_timeout(
                p.command(&["run", "--rm", "-i", IMAGE, "md5sum"]),
                Some(&input),
                Duration::from_secs(300),
            );
            assert_eq!(back.code, 0, "{size}: {back:?}");
            let md5 = back.stdout.trim().to_string();
            assert_eq!(md5, host_md5(&input), "stdin of {size} bytes");
            seen.push((size, md5));
        }
        // The same through an exec's keeper.
        p.must(&["run", "-d", "--name", "streams", IMAGE, "sleep", "1000"]);
        for size in STREAM_SIZES {
            let script = format!("yes 0123456789abcde | head -c {size}");
            let out = p.podman(&["exec", "streams", "sh", "-c", &script]);
            assert_eq!(out.code, 0, "exec {size}: {}", out.stderr);
            assert!(
                out.stdout.as_bytes() == pattern(size).as_slice(),
                "exec stdout of {size} bytes differs"
            );
            let input = pattern(size);
            let back = run_with_timeout(
                p.command(&["exec", "-i", "streams", "md5sum"]),
                Some(&input),
                Duration::from_secs(300),
            );
            assert_eq!(
                back.stdout.trim(),
                host_md5(&input),
                "exec stdin of {size} bytes: {back:?}"
            );
        }
        p.must(&["rm", "-f", "-t", "0", "streams"]);
        seen
    });
}

/// The host pids of hako-runtime's keepers whose command line holds every one of `words`.
fn keepers_with(words: &[&str]) -> Vec<u32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains("__keep") && words.iter().all(|w| cmdline.contains(w))
        })
        .collect()
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn a_keeper_killed_takes_its_guest_process_with_it() {
    // podman 5 ends an exec by SIGKILLing the pid it was given, and conmon's --timeout kills
    // the container's: under hako those are keepers, and the guest process must not outlive
    // them.
    under_hako_only("a_keeper_killed_takes_its_guest_process_with_it", |p| {
        let id = p.must(&["run", "-d", "--name", "kept", IMAGE, "sleep", "1000"]);
        let id = id.stdout.trim().to_string();
        p.must(&["exec", "-d", "kept", "sleep", "2000"]);
        let in_guest = |what: &str| {
            p.must(&["exec", "kept", "ps", "-o", "args"])
                .stdout
                .lines()
                .any(|l| l.trim() == what)
        };
        assert!(in_guest("sleep 2000"));
        let exec_keepers = keepers_with(&[&id, "--exec"]);
        assert_eq!(exec_keepers.len(), 1, "{exec_keepers:?}");
        let kill = |pid: u32| {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap()
        };
        kill(exec_keepers[0]);
        eventually(
            "the exec's guest process gone",
            Duration::from_secs(30),
            || {
                if in_guest("sleep 2000") {
                    Err("sleep 2000 still runs".into())
                } else {
                    Ok(())
                }
            },
        );
        // The container's own keeper: podman sees the container exit, killed.
        let init_keeper: Vec<u32> = keepers_with(&[&id])
            .into_iter()
            .filter(|pid| !exec_keepers.contains(pid))
            .collect();
        assert_eq!(init_keeper.len(), 1, "{init_keeper:?}");
        kill(init_keeper[0]);
        eventually("the container exited", Duration::from_secs(30), || match p
            .state("kept")
            .as_str()
        {
            "exited false 137" => Ok(()),
            other => Err(other.to_string()),
        });
        p.must(&["rm", "kept"]);
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn restart_runs_the_container_again_under_the_same_id() {
    // podman restart deletes the container from the runtime and creates it again at once with
    // the same id: nothing of the first run may be in the way.
    compare("restart_runs_the_container_again_under_the_same_id", |p| {
        let id = p.must(&[
            "run",
            "-d",
            "--name",
            "again",
            IMAGE,
            "sh",
            "-c",
            "echo run; sleep 1000",
        ]);
        p.must(&["restart", "-t", "0", "again"]);
        assert_eq!(p.inspect("again", "{{.ID}}"), id.stdout.trim());
        let state = p.state("again");
        eventually("both runs logged", Duration::from_secs(30), || {
            let logs = p.must(&["logs", "again"]).stdout;
            if logs == "run\nrun\n" {
                Ok(())
            } else {
                Err(logs)
            }
        });
        p.must(&["rm", "-f", "-t", "0", "again"]);
        state
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn network_container_joins_the_containers_network_and_under_hako_its_vm() {
    compare("network_container_joins_the_containers_network", |p| {
        p.must(&[
            "run",
            "-d",
            "--name",
            "server",
            IMAGE,
            "sh",
            "-c",
            "mkdir /tmp/www && echo served next door > /tmp/www/index.html && \
             exec httpd -f -p 8080 -h /tmp/www",
        ]);
        let server_boot = p.must(&["exec", "server", "cat", "/proc/sys/kernel/random/boot_id"]);
        let joined = p.podman(&[
            "run",
            "--rm",
            "--network",
            "container:server",
            IMAGE,
            "sh",
            "-c",
            "cat /proc/sys/kernel/random/boot_id; i=0; \
             until wget -qO- http://127.0.0.1:8080/; do \
             i=$((i+1)); [ $i -lt 150 ] || exit 1; sleep 0.2; done",
        ]);
        assert_eq!(joined.code, 0, "{joined:?}");
        // One kernel: the host's under runc, the server's VM under hako.
        assert_eq!(
            joined.stdout,
            format!("{}served next door\n", server_boot.stdout),
            "{joined:?}"
        );
        let on_host = server_boot.stdout.trim() == host_boot_id();
        assert_eq!(on_host, p.runtime == Runtime::Runc, "{server_boot:?}");
        p.must(&["rm", "-f", "-t", "0", "server"]);
        joined.code
    });
}
