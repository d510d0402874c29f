//! End-to-end: containerd runs containers in hako VMs. Each test runs against every containerd
//! version the set-up installed (1.7 and 2.x) and ends with the leak check.
//!
//! These boot real VMs, so they are `#[ignore]`d in a plain `cargo test`; `scripts/test.sh`
//! runs them with `--ignored` after installing everything they need.

#![allow(clippy::unwrap_used)] // Test code: a failed step should fail the test loudly.

use std::process::Command;
use std::time::Duration;

use hako_tests::prometheus::{get_on_unix_socket, sample, sandbox_snapshot, snapshot_number};
use hako_tests::*;

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn command_runs_in_the_guest_kernel_on_virtiofs() {
    let host_release = nix::sys::utsname::uname()
        .unwrap()
        .release()
        .to_string_lossy()
        .into_owned();
    let guest_release = guest_kernel_release();
    assert_ne!(
        host_release, guest_release,
        "the test needs a guest kernel that differs from the host's"
    );
    assert!(
        guest_release.ends_with("-hako"),
        "the installed guest boots hako's own kernel (guest-image/build-kernel.sh): {guest_release}"
    );
    for_each_containerd(|c| {
        // Everything the guest needs is built in: the kernel has no module support at all.
        let r = c.run_rm("nomods1", &["sh", "-c", "test -e /proc/modules; echo $?"]);
        assert_eq!((r.code, r.stdout.as_str()), (0, "1\n"), "{r:?}");
        let r = c.run_rm("uname1", &["uname", "-r"]);
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(r.stdout.trim(), guest_release, "{r:?}");
        // Delete answers once the sandbox's helpers are gone and reaped: none is left, not even
        // as a zombie, when `ctr run --rm` returns (the shim itself exits after Shutdown).
        let helpers: Vec<_> = hako_processes()
            .into_iter()
            .filter(|(_, comm)| comm != "containerd-shim")
            .collect();
        assert!(helpers.is_empty(), "helpers left after --rm: {helpers:?}");
        // containerd 2.x talks task API v3 to the shim; 1.x talks v2.
        if c.version.starts_with('2') {
            let log = c.log();
            let line = log
                .lines()
                .find(|l| l.contains("connecting to shim uname1"))
                .unwrap_or_else(|| panic!("no shim connection in the containerd log"));
            assert!(line.contains("version=3"), "{line}");
        }

        let r = c.run_rm("mounts1", &["cat", "/proc/mounts"]);
        assert_eq!(r.code, 0, "{r:?}");
        let root = r.stdout.lines().find(|l| l.split(' ').nth(1) == Some("/"));
        let root = root.unwrap_or_else(|| panic!("no / in /proc/mounts: {}", r.stdout));
        assert_eq!(
            root.split(' ').nth(2),
            Some("virtiofs"),
            "root line: {root}"
        );
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn exit_codes_and_both_output_streams_pass_through() {
    for_each_containerd(|c| {
        let r = c.run_rm(
            "exit7",
            &["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7"],
        );
        assert_eq!(r.code, 7, "{r:?}");
        assert_eq!(r.stdout.trim(), "to-stdout", "{r:?}");
        assert!(r.stderr.contains("to-stderr"), "{r:?}");

        let r = c.run_rm("exit0", &["true"]);
        assert_eq!(r.code, 0, "{r:?}");

        // A command that does not exist fails the start with a clear message.
        let r = c.run_rm("noexec", &["/no/such/binary"]);
        assert_ne!(r.code, 0, "{r:?}");
        assert!(r.stderr.contains("/no/such/binary"), "{r:?}");
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn stdin_reaches_the_container_and_eof_ends_it() {
    for_each_containerd(|c| {
        let args = ["run", "--rm", "--runtime", RUNTIME, IMAGE, "stdin1", "cat"];
        let r = c.ctr_stdin(&args, b"hi\n");
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(r.stdout, "hi\n", "{r:?}");

        // More than one pipe buffer, through stdin and back out.
        let big: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let args = [
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            "stdin2",
            "wc",
            "-c",
        ];
        let r = c.ctr_stdin(&args, &big);
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(r.stdout.trim(), "200000", "{r:?}");
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn kill_ends_a_long_running_task_and_delete_removes_it() {
    for_each_containerd(|c| {
        let r = c.ctr(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            IMAGE,
            "long1",
            "sleep",
            "1000",
        ]);
        assert_eq!(r.code, 0, "{r:?}");
        let ls = c.ctr(&["task", "ls"]);
        assert!(
            ls.stdout
                .lines()
                .any(|l| l.starts_with("long1") && l.contains("RUNNING")),
            "{ls:?}"
        );
        assert!(
            !sandbox_dirs().is_empty(),
            "a running task has its sandbox dir"
        );

        // `sleep` is PID 1 of its namespace and has no SIGTERM handler, so, as with runc,
        // only SIGKILL ends it.
        let r = c.ctr(&["task", "kill", "-s", "SIGKILL", "long1"]);
        assert_eq!(r.code, 0, "{r:?}");
        // The exit event arrives on its own; poll State (bounded) until it shows.
        let stopped = (0..200).any(|_| {
            let ls = c.ctr(&["task", "ls"]);
            let done = ls
                .stdout
                .lines()
                .any(|l| l.starts_with("long1") && l.contains("STOPPED"));
            if !done {
                std::thread::sleep(Duration::from_millis(100));
            }
            done
        });
        assert!(stopped, "task did not stop after SIGKILL");
        let r = c.ctr(&["task", "delete", "long1"]);
        assert_eq!(r.code, 0, "{r:?}");
        let r = c.ctr(&["container", "rm", "long1"]);
        assert_eq!(r.code, 0, "{r:?}");
        let ls = c.ctr(&["task", "ls"]);
        assert!(!ls.stdout.contains("long1"), "{ls:?}");

        // A process that handles SIGTERM ends on a plain `ctr task kill`.
        let script =
            "trap 'echo got-term; exit 143' TERM; echo ready; while true; do sleep 0.1; done";
        let mut run = c.ctr_command(&[
            "run",
            "--runtime",
            RUNTIME,
            IMAGE,
            "term1",
            "sh",
            "-c",
            script,
        ]);
        run.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .stdin(std::process::Stdio::null());
        let mut child = run.spawn().unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert_eq!(
            line, "ready\n",
            "the trap is set once the script prints ready"
        );
        let r = c.ctr(&["task", "kill", "term1"]);
        assert_eq!(r.code, 0, "{r:?}");
        line.clear();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert_eq!(line, "got-term\n");
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(143));
        // `ctr run` deletes the task itself once it has exited; the container is ours.
        let r = c.ctr(&["container", "rm", "term1"]);
        assert_eq!(r.code, 0, "{r:?}");
    });
}

fn shim(args: &[&str]) -> Run {
    let mut cmd = Command::new("/usr/local/bin/containerd-shim-hako-v2");
    cmd.args(args)
        .env("TTRPC_ADDRESS", "/nonexistent/containerd.sock.ttrpc")
        .current_dir(std::env::temp_dir());
    run_with_timeout(cmd, None, Duration::from_secs(30))
}

/// A protobuf length-delimited field: `number`, then `bytes`.
fn pb_field(number: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![(number << 3) | 2];
    let mut len = bytes.len();
    while len >= 0x80 {
        out.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    out.push(len as u8);
    out.extend_from_slice(bytes);
    out
}

#[test]
#[ignore = "needs the installed shim: run through scripts/test.sh"]
fn start_takes_what_any_containerd_writes_on_its_stdin() {
    // containerd up to 2.2 writes the runtime's options (a protobuf Any) to `start`'s stdin, or
    // nothing; 2.3 and later write their bootstrap parameters, the options among their
    // extensions. Each way the shim starts, and, never used, exits on its own.
    let options = [
        pb_field(1, b"type.googleapis.com/runtimeoptions.v1.Options"),
        pb_field(
            2,
            &pb_field(2, b"/usr/share/defaults/hako/configuration.toml"),
        ),
    ]
    .concat();
    for_each_containerd(|c| {
        let ttrpc = c.socket().with_extension("sock.ttrpc");
        let containerd = c.binary("containerd");
        for (n, what) in ["nothing", "options", "bootstrap"].iter().enumerate() {
            let id = format!("stdin{n}");
            let stdin = match *what {
                "nothing" => Vec::new(),
                "options" => options.clone(),
                _ => [
                    pb_field(1, id.as_bytes()),
                    pb_field(2, b"default"),
                    pb_field(4, b"2.3.4"),
                    pb_field(5, ttrpc.as_os_str().as_encoded_bytes()),
                    pb_field(6, c.socket().as_os_str().as_encoded_bytes()),
                    pb_field(7, containerd.as_os_str().as_encoded_bytes()),
                    pb_field(8, &pb_field(1, &options)),
                ]
                .concat(),
            };
            let bundle = std::env::temp_dir().join(format!("hako-e2e-bundle-{id}"));
            std::fs::create_dir_all(&bundle).unwrap();
            let mut cmd = Command::new("/usr/local/bin/containerd-shim-hako-v2");
            cmd.args(["-namespace", "default", "-id", &id])
                .arg("-address")
                .arg(c.socket())
                .arg("-publish-binary")
                .arg(&containerd)
                .arg("start")
                .env("TTRPC_ADDRESS", &ttrpc)
                .current_dir(&bundle);
            let r = run_with_timeout(cmd, Some(&stdin), Duration::from_secs(30));
            std::fs::remove_dir_all(&bundle).unwrap();
            assert_eq!(r.code, 0, "{what} on stdin: {r:?}");
            assert!(r.stdout.contains("unix://"), "{what} on stdin: {r:?}");
        }
    });
}

#[test]
#[ignore = "needs the installed shim: run through scripts/test.sh"]
fn bad_ids_and_namespaces_are_refused_before_anything_is_created() {
    assert_no_leaks("before");
    let cases: [(&str, &str, &str); 6] = [
        ("default", "../x", "invalid container id"),
        ("default", "a/b", "invalid container id"),
        ("default", "..", "invalid container id"),
        ("../etc", "x", "invalid namespace"),
        ("a/b", "x", "invalid namespace"),
        ("default", &"x".repeat(300), "invalid container id"),
    ];
    for (ns, id, expected) in cases {
        for action in ["start", "delete"] {
            let r = shim(&[
                "-namespace",
                ns,
                "-id",
                id,
                "-address",
                "/nonexistent.sock",
                action,
            ]);
            assert_ne!(r.code, 0, "{action} {ns:?}/{id:?} must fail: {r:?}");
            assert!(r.stderr.contains(expected), "{action} {ns:?}/{id:?}: {r:?}");
        }
    }
    assert_no_leaks("after the refused ids");

    // Through containerd, the same ids never reach a VM either.
    for_each_containerd(|c| {
        for id in ["../x", "a/b"] {
            let r = c.run_rm(id, &["true"]);
            assert_ne!(r.code, 0, "{id}: {r:?}");
            assert!(r.stderr.to_lowercase().contains("invalid"), "{id}: {r:?}");
        }
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn pod_annotations_size_the_vm_within_the_operators_bounds() {
    // Without bounds in the configuration, a pod may ask for no more than the default size.
    for_each_containerd(|c| {
        for (annotation, said) in [
            ("io.hako.vcpus=64", "more than the 1"),
            ("io.hako.memory_mib=65536", "more than the 512"),
            ("io.hako.vcpus=2", "hypervisor.max_vcpus"),
        ] {
            let r = c.run_rm_with("greedy", &["--annotation", annotation], &["true"]);
            assert_ne!(r.code, 0, "{annotation}: {r:?}");
            assert!(r.stderr.contains(said), "{annotation}: {r:?}");
        }
        // The kernel command line (like host helper paths) is not a pod's to change.
        let r = c.run_rm_with(
            "refused",
            &["--annotation", "io.hako.kernel_params=init=/bin/sh"],
            &["true"],
        );
        assert_ne!(r.code, 0, "{r:?}");
        assert!(
            r.stderr.contains("io.hako.kernel_params") && r.stderr.contains("unknown"),
            "{r:?}"
        );
    });
    // Within the bounds an operator sets, a pod chooses.
    let config = HakoConfig::new("[hypervisor]\nmax_vcpus = 2\nmax_memory_mib = 1024\n");
    for_each_containerd_with_env(&config.env(), |c| {
        let r = c.run_rm_with(
            "sized",
            &[
                "--annotation",
                "io.hako.vcpus=2",
                "--annotation",
                "io.hako.memory_mib=256",
            ],
            &[
                "sh",
                "-c",
                "nproc; awk '/^MemTotal/ {print $2}' /proc/meminfo",
            ],
        );
        assert_eq!(r.code, 0, "{r:?}");
        let lines: Vec<&str> = r.stdout.lines().collect();
        assert_eq!(lines.first(), Some(&"2"), "{r:?}");
        let mem_kib: u64 = lines.get(1).and_then(|l| l.parse().ok()).unwrap_or(0);
        // 256 MiB less what the guest kernel keeps for itself.
        assert!((180_000..=262_144).contains(&mem_kib), "{r:?}");
        let r = c.run_rm_with("greedy", &["--annotation", "io.hako.vcpus=3"], &["true"]);
        assert!(r.stderr.contains("more than the 2"), "{r:?}");
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn hako_logs_shows_the_guest_console_of_a_running_sandbox() {
    for_each_containerd(|c| {
        let r = c.run_detached("logged", &[], &["sleep", "600"]);
        assert_eq!(r.code, 0, "{r:?}");
        // A unique prefix of the id is enough, and every namespace is searched.
        let logs = hako_cli(&["logs", "logge"], &[]);
        assert_eq!(logs.code, 0, "{logs:?}");
        // The agent's own lines on the guest console, and the VMM's log.
        assert!(
            logs.stdout
                .contains("/run/hako/default/logged/console.log <=="),
            "{logs:?}"
        );
        assert!(logs.stdout.contains("container logged created"), "{logs:?}");
        assert!(logs.stdout.contains("vmm.log <=="), "{logs:?}");
        c.remove_task("logged");
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn bad_specs_are_refused_clearly_and_leave_nothing() {
    for_each_containerd(|c| {
        // Each refused before or while its VM comes up; the leak check after each run (and the
        // one for_each_containerd does) shows nothing stayed.
        let cases: [(&[&str], &str); 4] = [
            (&["--env", "=value"], "invalid environment entry \"=value\""),
            (
                &[
                    "--mount",
                    "type=bind,src=/tmp,dst=relative/dir,options=rbind",
                ],
                "mount destination \"relative/dir\" must be an absolute path",
            ),
            (
                &[
                    "--mount",
                    "type=bind,src=/tmp,dst=/a/../../etc,options=rbind",
                ],
                "must be an absolute path without '..'",
            ),
            (
                &["--mount", "type=no-such-fs,src=none,dst=/x"],
                "no-such-fs",
            ),
        ];
        for (extra, message) in cases {
            let r = c.run_rm_with("bad", extra, &["true"]);
            assert_ne!(r.code, 0, "{extra:?}: {r:?}");
            assert!(r.stderr.contains(message), "{extra:?}: {r:?}");
            let _ = c.ctr(&["container", "rm", "bad"]);
            assert_no_leaks(&format!("{extra:?}"));
        }

        // 10,000 annotations are only data: the container runs.
        let annotations: Vec<String> = (0..10_000)
            .map(|i| format!("--annotation=example.com/key-{i}=value-{i}"))
            .collect();
        let mut args: Vec<&str> = annotations.iter().map(String::as_str).collect();
        args.push("--annotation=io.kubernetes.cri.container-type=container");
        let r = c.run_rm_with("annotated", &args, &["echo", "fine"]);
        assert_eq!((r.code, r.stdout.as_str()), (0, "fine\n"), "{:?}", r.stderr);
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn task_api_inputs_containerd_never_sends_are_refused_and_leave_nothing() {
    let dir = std::env::temp_dir().join(format!("hako-bad-bundles-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pod = r#""annotations": {"io.kubernetes.cri.sandbox-id": "anchor"}, "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}]}"#;
    let process = r#""process": {"args": ["/bin/sh", "-c", "true"], "cwd": "/", "user": {"uid": 0, "gid": 0}"#;
    // 5 MiB in strings exec takes one by one, under a stack limit that lets exec take them all
    // (6 MiB): the guest must get them, and the agent channel cannot carry them. (What exec
    // would refuse anyway reaches the guest in a stand-in: see `docker.rs`.)
    let big_env = (0..50)
        .map(|i| format!("\"BIG{i}={}\"", "x".repeat(100 << 10)))
        .collect::<Vec<_>>()
        .join(", ");
    let big_stack = r#""rlimits": [{"type": "RLIMIT_STACK", "soft": 67108864, "hard": 67108864}]"#;
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "truncated",
            r#"{"ociVersion": "1.0.2", "process": {"#.to_string(),
            "cannot read the OCI spec",
        ),
        (
            "no-process",
            format!(r#"{{"ociVersion": "1.0.2", "root": {{"path": "rootfs"}}, {pod}}}"#),
            "the OCI spec has no process",
        ),
        (
            "empty-image",
            format!(
                r#"{{"ociVersion": "1.0.2", {process}}}, "root": {{"path": "rootfs"}}, {pod}}}"#
            ),
            "/bin/sh",
        ),
        (
            "huge-env",
            format!(
                r#"{{"ociVersion": "1.0.2", {process}, "env": [{big_env}], {big_stack}}}, "root": {{"path": "rootfs"}}, {pod}}}"#
            ),
            "hako passes at most",
        ),
    ];
    for_each_containerd(|c| {
        let r = c.run_detached(
            "anchor",
            &[
                "--annotation=io.kubernetes.cri.container-type=sandbox",
                "--annotation=io.kubernetes.cri.sandbox-id=anchor",
            ],
            &["sleep", "600"],
        );
        assert_eq!(r.code, 0, "{r:?}");
        for (id, config, expected) in &cases {
            let bundle = dir.join(id);
            std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
            std::fs::write(bundle.join("config.json"), config).unwrap();
            let err = c.shim_create("anchor", id, &bundle).expect_err(id);
            assert!(err.contains(expected), "{id}: {err}");
            // The pod's first container is untouched, and nothing of the refused one is left.
            let r = c.exec("anchor", &format!("after-{id}"), &[], &["echo", "alive"]);
            assert_eq!(r.stdout, "alive\n", "{id}: {r:?}");
            let leftovers: Vec<_> = sandbox_dirs()
                .iter()
                .map(|d| d.join("rw").join(id))
                .filter(|p| p.exists())
                .collect();
            assert!(leftovers.is_empty(), "{id}: {leftovers:?}");
        }
        // Ids containerd would never send.
        for id in ["", ".", "a\0b", "../anchor"] {
            let bundle = dir.join("valid");
            std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
            let err = c.shim_create("anchor", id, &bundle).expect_err(id);
            assert!(err.contains("invalid container id"), "{id:?}: {err}");
        }
        c.remove_task("anchor");
    });
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn a_running_sandbox_serves_its_metrics_and_takes_the_socket_with_it() {
    for_each_containerd(|c| {
        let r = c.run_detached("measured", &[], &["sleep", "600"]);
        assert_eq!(r.code, 0, "{r:?}");
        let socket = std::path::Path::new(SANDBOX_ROOT).join("default/measured/metrics.sock");
        let (status, text) = get_on_unix_socket(&socket, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK", "{text}");
        // The start that made this sandbox, once, and its VM's memory on the host.
        assert_eq!(
            sample(&text, r#"hako_start_phase_seconds_count{phase="total"}"#),
            Some(1.0),
            "{text}"
        );
        // What the VM is, and its size (the configuration's default: 1 vCPU, 512 MiB).
        let info = text
            .lines()
            .find(|l| l.starts_with("hako_sandbox_info{"))
            .unwrap_or_default();
        assert!(
            info.contains(r#"hypervisor="qemu""#)
                && (info.contains(r#"accel="tcg""#) || info.contains(r#"accel="kvm""#))
                && info.rsplit(' ').next().and_then(|v| v.parse().ok()) == Some(1.0),
            "{text}"
        );
        assert_eq!(sample(&text, "hako_vm_vcpus"), Some(1.0), "{text}");
        assert_eq!(
            sample(&text, "hako_vm_memory_bytes"),
            Some(512.0 * 1024.0 * 1024.0),
            "{text}"
        );
        let vmm_rss = sample(&text, r#"hako_host_process_rss_bytes{process="vmm"}"#);
        assert!(
            vmm_rss.is_some_and(|b| b > 16.0 * 1024.0 * 1024.0),
            "{text}"
        );
        let created = sample(
            &text,
            r#"hako_agent_rpc_duration_seconds_count{method="CreateContainer"}"#,
        );
        assert_eq!(created, Some(1.0), "{text}");
        // HELP and TYPE once per family, as Prometheus requires.
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let mut unique = types.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(types.len(), unique.len(), "{text}");
        let (status, json) = get_on_unix_socket(&socket, "/v1/snapshot");
        assert_eq!(status, "HTTP/1.1 200 OK", "{json}");
        assert!(
            serde_json::from_str::<serde_json::Value>(&json).is_ok(),
            "{json}"
        );
        c.remove_task("measured");
        assert!(!socket.exists(), "the socket outlived its sandbox");
    });
}

/// The value of the sample of `family` with `labels` in a snapshot from the socket.
fn snapshot_value(socket: &std::path::Path, family: &str, labels: &[&str]) -> Option<f64> {
    snapshot_number(&sandbox_snapshot(socket), family, labels)
}

/// The guest's figures reach the sandbox's snapshot: its memory, and a container's CPU time
/// that grows while the container burns CPU.
#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn a_running_containers_snapshot_has_the_guests_figures_and_its_cpu_time() {
    for_each_containerd(|c| {
        let r = c.run_detached("burner", &[], &["sh", "-c", "while :; do :; done"]);
        assert_eq!(r.code, 0, "{r:?}");
        let socket = std::path::Path::new(SANDBOX_ROOT).join("default/burner/metrics.sock");
        let available = snapshot_value(&socket, "hako_guest_memory_available_bytes", &[]);
        assert!(available.is_some_and(|b| b > 0.0), "{available:?}");
        // ctr gives no CRI name: the container's series are labelled with its id twice.
        let labels = ["burner", "burner"];
        let cpu = || snapshot_value(&socket, "hako_container_cpu_usage_seconds_total", &labels);
        let mut first = None;
        eventually(
            "the container's CPU time grows",
            Duration::from_secs(60),
            || {
                let now = cpu().ok_or("no CPU series for the container")?;
                match first {
                    None => {
                        first = Some(now);
                        Err(format!("first value {now}"))
                    }
                    Some(before) if now >= before + 0.5 => Ok(()),
                    Some(before) => Err(format!("{before} s, then {now} s")),
                }
            },
        );
        c.remove_task("burner");
    });
}
