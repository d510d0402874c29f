//! End-to-end: a container's output of every size that crosses a buffer (0 B to 64 MiB),
//! stdout and stderr at once, with and without a terminal, arrives whole and in order, then the
//! exit status: through `ctr run` and `ctr task exec` (beside runc, in the same run, on the
//! same files), `docker run` and `docker logs -f`, and CRI's container log. A reader that stops
//! reading holds back only its own stream: the shim still answers on that sandbox.
//!
//! Needs root and the installed runtime: `#[ignore]`d in a plain `cargo test`;
//! `scripts/test.sh` runs them.

#![allow(clippy::unwrap_used)] // Test code: a failed step should fail the test loudly.

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use hako_tests::payload::{first_difference, from_a_terminal, payload, payload_dir, script, SIZES};
use hako_tests::runc::{cgroup as runc_cgroup, remove_parent as remove_runc_parent, RUNC};
use hako_tests::*;

fn bind(size: usize) -> String {
    format!(
        "type=bind,src={},dst=/data,options=rbind:ro",
        payload_dir(size).display()
    )
}

/// `ctr run --rm` of the payload script under `runtime`, on a terminal or not.
fn ctr_run(c: &Containerd, runtime: &str, id: &str, size: usize, terminal: bool) -> Run {
    let mount = bind(size);
    let cgroup = runc_cgroup(id);
    let mut args = vec!["run", "--rm", "--runtime", runtime, "--mount", &mount];
    if runtime == RUNC {
        args.extend(cgroup.iter().map(String::as_str));
    }
    if terminal {
        args.push("-t");
    }
    args.extend([IMAGE, id, "sh", "-c", script(terminal)]);
    if terminal {
        c.ctr_on_tty(&args, 80, 24)
    } else {
        c.ctr(&args)
    }
}

/// What a run of the payload script must have printed: each stream whole, and exit 3.
fn check(what: &str, r: &Run, size: usize, terminal: bool) {
    assert_eq!(
        r.code,
        3,
        "{what}: exit status; stderr {:?}",
        tail(&r.stderr)
    );
    let (out, err) = (payload("out", size), payload("err", size));
    if terminal {
        let got = from_a_terminal(r.stdout.as_bytes());
        assert!(
            got == out,
            "{what}: terminal output: {}",
            first_difference(&got, &out)
        );
    } else {
        assert!(
            r.stdout.as_bytes() == out,
            "{what}: stdout: {}",
            first_difference(r.stdout.as_bytes(), &out)
        );
        assert!(
            r.stderr.as_bytes() == err,
            "{what}: stderr: {}",
            first_difference(r.stderr.as_bytes(), &err)
        );
    }
}

fn tail(s: &str) -> &str {
    &s[s.len().saturating_sub(300)..]
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn ctr_run_output_of_every_size_arrives_whole_as_under_runc() {
    for_each_containerd(|c| {
        for terminal in [false, true] {
            for size in SIZES {
                let what = format!("size {size}, terminal {terminal}");
                let runc = ctr_run(c, RUNC, &format!("runc-{size}-{terminal}"), size, terminal);
                check(&format!("runc, {what}"), &runc, size, terminal);
                let hako = ctr_run(
                    c,
                    RUNTIME,
                    &format!("hako-{size}-{terminal}"),
                    size,
                    terminal,
                );
                check(&format!("hako, {what}"), &hako, size, terminal);
            }
        }
        remove_runc_parent();
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn exec_output_of_every_size_arrives_whole_as_under_runc() {
    for_each_containerd(|c| {
        let all = format!(
            "type=bind,src={},dst=/payloads,options=rbind:ro",
            payload_dir(0).parent().unwrap().display()
        );
        for (runtime, id) in [(RUNC, "exec-runc"), (RUNTIME, "exec-hako")] {
            let cgroup = runc_cgroup(id);
            let mut args = vec!["run", "-d", "--runtime", runtime, "--mount", &all];
            if runtime == RUNC {
                args.extend(cgroup.iter().map(String::as_str));
            }
            args.extend([IMAGE, id, "sleep", "600"]);
            let r = c.ctr(&args);
            assert_eq!(r.code, 0, "{r:?}");
        }
        for terminal in [false, true] {
            for size in SIZES {
                for id in ["exec-runc", "exec-hako"] {
                    let exec_id = format!("e{size}{terminal}");
                    let line = script(terminal).replace("/data/", &format!("/payloads/{size}/"));
                    let r = if terminal {
                        c.ctr_on_tty(
                            &[
                                "task",
                                "exec",
                                "-t",
                                "--exec-id",
                                &exec_id,
                                id,
                                "sh",
                                "-c",
                                &line,
                            ],
                            80,
                            24,
                        )
                    } else {
                        c.exec(id, &exec_id, &[], &["sh", "-c", &line])
                    };
                    check(
                        &format!("{id}, size {size}, terminal {terminal}"),
                        &r,
                        size,
                        terminal,
                    );
                }
            }
        }
        c.remove_task("exec-runc");
        c.remove_task("exec-hako");
        remove_runc_parent();
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn a_reader_that_stops_reading_holds_back_only_its_own_output() {
    for_each_containerd(|c| {
        // ctr's stdout is a pipe nobody reads: it fills, then ctr stops reading the FIFO, and
        // the shim's copy, the agent's queue and the container's pipe fill behind it.
        let mut stalled =
            c.ctr_command(&["run", "--rm", "--runtime", RUNTIME, IMAGE, "stalled", "yes"]);
        stalled
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .stdin(Stdio::null());
        let mut child = stalled.spawn().unwrap();
        c.wait_status("stalled", "RUNNING");
        // The shim answers on that very sandbox, promptly, however long the stall lasts.
        for round in 0..3 {
            let started = Instant::now();
            let metrics = c.ctr(&["task", "metrics", "stalled"]);
            assert_eq!(metrics.code, 0, "round {round}: {metrics:?}");
            let exec = c.exec(
                "stalled",
                &format!("hi{round}"),
                &[],
                &["echo", "still here"],
            );
            assert_eq!(
                (exec.code, exec.stdout.as_str()),
                (0, "still here\n"),
                "{exec:?}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "round {round}: {:?}",
                started.elapsed()
            );
        }
        // A second container of the same VM is not held back by the first.
        let pod = ["--annotation=io.kubernetes.cri.sandbox-id=stalled"];
        let r = c.run_rm_with(
            "neighbour",
            &pod,
            &["sh", "-c", "head -c 1048576 /dev/zero | wc -c"],
        );
        assert_eq!((r.code, r.stdout.trim()), (0, "1048576"), "{r:?}");
        let r = c.ctr(&["task", "kill", "-s", "SIGKILL", "stalled"]);
        assert_eq!(r.code, 0, "{r:?}");
        // Reading again, ctr drains what was held and ends with the kill's status.
        let mut out = child.stdout.take().unwrap();
        let mut sink = [0u8; 65536];
        let mut total = 0usize;
        loop {
            match out.read(&mut sink) {
                Ok(0) => break,
                Ok(n) => total += n,
                Err(e) => panic!("reading ctr's output: {e}"),
            }
        }
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(137), "after {total} bytes");
        assert!(total >= 65536, "only {total} bytes were ever written");
    });
}

/// `docker run` and `docker logs -f` of the payload script under hako, every size, with and
/// without a terminal (runc's behaviour for the same files is the ctr test's).
#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn docker_run_and_docker_logs_carry_every_size_whole() {
    hako_tests::docker::for_each_docker(|d| {
        for terminal in [false, true] {
            for size in SIZES {
                let what = format!("docker {}, size {size}, terminal {terminal}", d.version);
                let volume = format!("{}:/data:ro", payload_dir(size).display());
                let mut args = vec!["run", "--runtime", RUNTIME, "-v", &volume];
                if terminal {
                    args.push("-t");
                }
                let name = format!("out-{size}-{terminal}");
                args.extend(["--name", &name, IMAGE, "sh", "-c", script(terminal)]);
                let attached = d.docker(&args);
                check(&format!("{what}, docker run"), &attached, size, terminal);
                // The log Docker kept is the same, streams apart (a terminal's is one).
                let logs = d.docker(&["logs", "-f", &name]);
                let logs = Run { code: 3, ..logs };
                check(&format!("{what}, docker logs -f"), &logs, size, terminal);
                let r = d.docker(&["rm", &name]);
                assert_eq!(r.code, 0, "{r:?}");
            }
        }
        // `docker logs -f` of a container still writing follows it to its end.
        let volume = format!("{}:/data:ro", payload_dir(1024 * 1024).display());
        let r = d.docker(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            "-v",
            &volume,
            "--name",
            "following",
            IMAGE,
            "sh",
            "-c",
            "sleep 2; cat /data/out & cat /data/err >&2; wait; exit 3",
        ]);
        assert_eq!(r.code, 0, "{r:?}");
        let logs = d.docker(&["logs", "-f", "following"]);
        let logs = Run { code: 3, ..logs };
        check("docker logs -f while running", &logs, 1024 * 1024, false);
        let r = d.docker(&["wait", "following"]);
        assert_eq!(r.stdout.trim(), "3", "{r:?}");
        let r = d.docker(&["rm", "following"]);
        assert_eq!(r.code, 0, "{r:?}");
    });
}

/// Joins a CRI container log (`<time> <stream> <P|F> <text>` lines) back into its streams.
fn cri_log_streams(log: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    for line in log.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let mut fields = line.splitn(4, |b| *b == b' ');
        let (_time, stream, tag) = (fields.next(), fields.next(), fields.next());
        let text = fields.next().unwrap_or_default();
        let into = match stream {
            Some(b"stdout") => &mut out,
            Some(b"stderr") => &mut err,
            other => panic!(
                "a log line of stream {other:?}: {:?}",
                String::from_utf8_lossy(line)
            ),
        };
        into.extend_from_slice(text);
        if tag == Some(b"F") {
            into.push(b'\n');
        }
    }
    (out, err)
}

/// CRI's container log (what `kubectl logs` and ContainerLogs read) of every size, with and
/// without a terminal, in one pod's VM; the exit status in the container's status.
#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn cri_container_logs_hold_every_size_whole() {
    use hako_tests::cri::*;
    for_each_cri_containerd(|c| {
        let cri = &c.client;
        let names: Vec<String> = [false, true]
            .iter()
            .flat_map(|t| SIZES.iter().map(move |s| format!("c{s}-{t}")))
            .collect();
        let names_ref: Vec<&str> = names.iter().map(String::as_str).collect();
        let log_dir = c.pod_log_directory("streams", "uid-streams", &names_ref);
        let pod_config = pod_sandbox_config("streams", "uid-streams", &log_dir);
        let pod = cri.run_pod_sandbox(&pod_config, HANDLER).unwrap();
        let image = cri.image_status(IMAGE).unwrap().unwrap().id;
        for terminal in [false, true] {
            for size in SIZES {
                let name = format!("c{size}-{terminal}");
                let what = format!("containerd {}, {name}", c.version);
                let mut config = container_config(
                    &pod_config,
                    &name,
                    &image,
                    &["sh", "-c", script(terminal)],
                    0,
                );
                config.tty = terminal;
                config.mounts = vec![k8s_cri::v1::Mount {
                    container_path: "/data".to_string(),
                    host_path: payload_dir(size).display().to_string(),
                    readonly: true,
                    ..Default::default()
                }];
                let id = cri.create_container(&pod, &config, &pod_config).unwrap();
                cri.start_container(&id).unwrap();
                let started = Instant::now();
                let status = loop {
                    let status = cri.container_status(&id).unwrap();
                    if status.state == k8s_cri::v1::ContainerState::ContainerExited as i32 {
                        break status;
                    }
                    assert!(
                        started.elapsed() < Duration::from_secs(120),
                        "{what}: never exited"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                };
                assert_eq!(status.exit_code, 3, "{what}: {status:?}");
                let log = std::fs::read(&status.log_path).unwrap();
                let (out, err) = cri_log_streams(&log);
                if terminal {
                    // CRI's log drops the terminal's carriage returns.
                    let (got, want) = (from_a_terminal(&out), payload("out", size));
                    assert!(got == want, "{what}: {}", first_difference(&got, &want));
                    assert!(err.is_empty(), "{what}: stderr beside a terminal");
                } else {
                    let (want_out, want_err) = (payload("out", size), payload("err", size));
                    assert!(
                        out == want_out,
                        "{what}: stdout {}",
                        first_difference(&out, &want_out)
                    );
                    assert!(
                        err == want_err,
                        "{what}: stderr {}",
                        first_difference(&err, &want_err)
                    );
                }
                cri.remove_container(&id).unwrap();
            }
        }
        cri.stop_pod_sandbox(&pod).unwrap();
        cri.remove_pod_sandbox(&pod).unwrap();
    });
}
