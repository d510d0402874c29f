//! End-to-end: Docker Engine with `--runtime io.containerd.hako.v2`, on containerd 1.7 and 2.x.
//! dockerd runs in a network namespace the harness makes (see `hako_tests::docker`), which is
//! "the host" here: its bridge, its port proxy and `curl` all live there.
//!
//! Boots VMs: `#[ignore]`d in a plain `cargo test`; `scripts/test.sh` runs them.

#![allow(clippy::unwrap_used)] // Test code: a failed step should fail the test loudly.

use std::fs;
use std::time::{Duration, Instant};

use hako_tests::docker::for_each_docker;
use hako_tests::*;

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn a_published_port_serves_a_page_from_the_vm() {
    let www = std::env::temp_dir().join(format!("hako-docker-www-{}", std::process::id()));
    fs::create_dir_all(&www).unwrap();
    fs::write(www.join("index.html"), "hello from a hako VM\n").unwrap();
    let volume = format!("{}:/www:ro", www.display());
    for_each_docker(|d| {
        let links_before = d.host_links();
        let r = d.docker(&[
            "run",
            "-d",
            "--name",
            "web",
            "--runtime",
            RUNTIME,
            "-p",
            "8080:80",
            "-v",
            &volume,
            IMAGE,
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            "/www",
        ]);
        assert_eq!(r.code, 0, "{r:?}\n{}", d.log());

        // In: `curl` on the host reaches the container through the published port.
        eventually(
            "the page through -p 8080:80",
            Duration::from_secs(30),
            || {
                let r = d.on_host("curl -sS -m 5 http://127.0.0.1:8080/");
                if r.stdout == "hello from a hako VM\n" {
                    Ok(())
                } else {
                    Err(format!("{r:?}"))
                }
            },
        );
        let ports = d.docker(&["port", "web", "80"]);
        assert!(ports.stdout.contains("0.0.0.0:8080"), "{ports:?}");

        // Out: the container reaches a server on the host's side of the bridge.
        let gateway = d
            .docker(&["inspect", "-f", "{{.NetworkSettings.Gateway}}", "web"])
            .stdout
            .trim()
            .to_string();
        assert!(!gateway.is_empty(), "no gateway");
        let mut server = std::process::Command::new("ip")
            .args([
                "netns", "exec", &d.netns, "busybox", "nc", "-l", "-p", "9099",
            ])
            .args(["-e", "echo", "hello-from-the-host"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        eventually("the host's listener", Duration::from_secs(10), || {
            let r = d.on_host("ss -Hltn 'sport = :9099'");
            if r.stdout.contains("9099") {
                Ok(())
            } else {
                Err(format!("{r:?}"))
            }
        });
        let fetched = d.docker(&["exec", "web", "nc", "-w", "5", &gateway, "9099"]);
        let _ = server.kill();
        let _ = server.wait();
        assert!(
            fetched.stdout.contains("hello-from-the-host"),
            "{fetched:?}"
        );

        let r = d.docker(&["rm", "-f", "web"]);
        assert_eq!(r.code, 0, "{r:?}");
        // The container's veth went with it; no tap or other device is left on the host.
        assert_eq!(d.host_links(), links_before);
    });
    let _ = fs::remove_dir_all(&www);
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn resolv_conf_hosts_and_hostname_are_what_docker_wrote() {
    for_each_docker(|d| {
        let r = d.docker(&[
            "run",
            "-d",
            "--name",
            "names",
            "--runtime",
            RUNTIME,
            "--hostname",
            "hako-box",
            "--add-host",
            "extra.test:10.1.2.3",
            "--dns",
            "192.0.2.53",
            "--dns-search",
            "example.test",
            IMAGE,
            "sleep",
            "600",
        ]);
        assert_eq!(r.code, 0, "{r:?}\n{}", d.log());
        // While it runs (Docker rewrites hosts when the container stops).
        let run = d.docker(&[
            "exec",
            "names",
            "sh",
            "-c",
            "cat /etc/hostname; echo @@; cat /etc/hosts; echo @@; cat /etc/resolv.conf; echo @@; hostname",
        ]);
        assert_eq!(run.code, 0, "{run:?}");
        let parts: Vec<&str> = run.stdout.split("@@\n").collect();
        assert_eq!(parts.len(), 4, "{run:?}");

        // Byte for byte the files Docker generated for the container.
        for (part, field) in [
            (parts[0], "{{.HostnamePath}}"),
            (parts[1], "{{.HostsPath}}"),
            (parts[2], "{{.ResolvConfPath}}"),
        ] {
            let path = d.docker(&["inspect", "-f", field, "names"]).stdout;
            let written = fs::read_to_string(path.trim()).unwrap();
            assert_eq!(part, written, "{field}");
        }
        assert_eq!(parts[3].trim(), "hako-box");
        assert!(parts[1].contains("10.1.2.3\textra.test"), "{}", parts[1]);
        assert!(parts[2].contains("nameserver 192.0.2.53"), "{}", parts[2]);
        assert!(parts[2].contains("search example.test"), "{}", parts[2]);

        let r = d.docker(&["rm", "-f", "names"]);
        assert_eq!(r.code, 0, "{r:?}");
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn docker_run_options_reach_the_container() {
    let vol = std::env::temp_dir().join(format!("hako-docker-vol-{}", std::process::id()));
    fs::create_dir_all(&vol).unwrap();
    fs::write(vol.join("from-host"), "host data\n").unwrap();
    // The container runs as nobody and writes into the volume.
    fs::set_permissions(&vol, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let volume = format!("{}:/data", vol.display());
    for_each_docker(|d| {
        let script = "echo \"$GREETING\"; pwd; id -u; id -g; cat /data/from-host; \
                      echo guest data > /data/from-guest; \
                      cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max; \
                      touch /rootfs-write 2>/dev/null && echo rootfs-writable || echo rootfs-read-only";
        let r = d.docker(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "-e",
            "GREETING=hello docker",
            "-w",
            "/tmp",
            "-u",
            "65534:65534",
            "-v",
            &volume,
            "--memory",
            "64m",
            "--cpus",
            "0.5",
            "--read-only",
            IMAGE,
            "sh",
            "-c",
            script,
        ]);
        assert_eq!(r.code, 0, "{r:?}");
        let lines: Vec<&str> = r.stdout.lines().collect();
        assert_eq!(
            lines,
            [
                "hello docker",
                "/tmp",
                "65534",
                "65534",
                "host data",
                "67108864",
                "50000 100000",
                "rootfs-read-only"
            ],
            "{r:?}"
        );
        // The guest's write went through the volume to the host.
        assert_eq!(
            fs::read_to_string(vol.join("from-guest")).unwrap_or_default(),
            "guest data\n"
        );
        let _ = fs::remove_file(vol.join("from-guest"));

        // Exit codes and stderr; the runtime by the name daemon.json gives it.
        let r = d.docker(&[
            "run",
            "--rm",
            "--runtime",
            "hako",
            IMAGE,
            "sh",
            "-c",
            "echo oops >&2; exit 7",
        ]);
        assert_eq!(r.code, 7, "{r:?}");
        assert_eq!(r.stderr, "oops\n", "{r:?}");
    });
    let _ = fs::remove_dir_all(&vol);
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn docker_exec_logs_stop_kill_and_rm() {
    for_each_docker(|d| {
        // A container that logs, and leaves on SIGTERM with a status of its own.
        let script = "trap 'echo got-term; exit 42' TERM; echo started; \
                      while true; do sleep 0.2; done";
        let r = d.docker(&[
            "run",
            "-d",
            "--name",
            "life",
            "--runtime",
            RUNTIME,
            IMAGE,
            "sh",
            "-c",
            script,
        ]);
        assert_eq!(r.code, 0, "{r:?}");
        eventually(
            "the container's first log line",
            Duration::from_secs(30),
            || {
                let logs = d.docker(&["logs", "life"]);
                if logs.stdout.contains("started") {
                    Ok(())
                } else {
                    Err(format!("{logs:?}"))
                }
            },
        );

        let r = d.docker(&["exec", "life", "sh", "-c", "echo in-exec; exit 3"]);
        assert_eq!((r.code, r.stdout.as_str()), (3, "in-exec\n"), "{r:?}");
        let r = d.docker(&[
            "exec",
            "-e",
            "X=1",
            "-w",
            "/tmp",
            "life",
            "sh",
            "-c",
            "echo $X; pwd",
        ]);
        assert_eq!(r.stdout, "1\n/tmp\n", "{r:?}");

        // Graceful stop: SIGTERM is delivered and the container's own status is kept.
        let r = d.docker(&["stop", "-t", "20", "life"]);
        assert_eq!(r.code, 0, "{r:?}");
        let status = d.docker(&["inspect", "-f", "{{.State.ExitCode}}", "life"]);
        assert_eq!(status.stdout.trim(), "42", "{status:?}");
        assert!(d.docker(&["logs", "life"]).stdout.contains("got-term"));
        assert_eq!(d.docker(&["rm", "life"]).code, 0);

        // A container that ignores SIGTERM is killed when the timeout runs out.
        let r = d.docker(&[
            "run",
            "-d",
            "--name",
            "stubborn",
            "--runtime",
            RUNTIME,
            IMAGE,
            "sh",
            "-c",
            "trap '' TERM; echo ready; while true; do sleep 0.2; done",
        ]);
        assert_eq!(r.code, 0, "{r:?}");
        eventually(
            "the container's first log line",
            Duration::from_secs(30),
            || {
                let logs = d.docker(&["logs", "stubborn"]);
                if logs.stdout.contains("ready") {
                    Ok(())
                } else {
                    Err(format!("{logs:?}"))
                }
            },
        );
        let r = d.docker(&["stop", "-t", "1", "stubborn"]);
        assert_eq!(r.code, 0, "{r:?}");
        let status = d.docker(&["inspect", "-f", "{{.State.ExitCode}}", "stubborn"]);
        assert_eq!(status.stdout.trim(), "137", "{status:?}");
        assert_eq!(d.docker(&["rm", "stubborn"]).code, 0);

        // docker kill with a signal, then rm -f of a running container.
        let r = d.docker(&[
            "run",
            "-d",
            "--name",
            "victim",
            "--runtime",
            RUNTIME,
            IMAGE,
            "sleep",
            "600",
        ]);
        assert_eq!(r.code, 0, "{r:?}");
        let r = d.docker(&["kill", "-s", "KILL", "victim"]);
        assert_eq!(r.code, 0, "{r:?}");
        let r = d.docker(&["wait", "victim"]);
        assert_eq!(r.stdout.trim(), "137", "{r:?}");
        assert_eq!(d.docker(&["start", "victim"]).code, 0);
        let r = d.docker(&["rm", "-f", "victim"]);
        assert_eq!(r.code, 0, "{r:?}");
        let r = d.docker(&["ps", "-aq"]);
        assert_eq!(r.stdout.trim(), "", "{r:?}");
    });
}

/// `docker exec <id> ip -4 -o addr show` (the guest's IPv4 addresses, one line each).
fn guest_ipv4(d: &hako_tests::docker::Docker, id: &str) -> String {
    d.docker(&["exec", id, "ip", "-4", "-o", "addr", "show"])
        .stdout
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn docker_networks_reach_the_vm_and_follow_live_changes() {
    for_each_docker(|d| {
        // The default bridge and a port published on loopback. Docker 26 networks the pod in a
        // prestart hook; 28 and later after Create, and the NIC is hot-plugged at Start.
        let r = d.docker(&[
            "run",
            "-d",
            "--name",
            "n1",
            "--runtime",
            RUNTIME,
            "-p",
            "127.0.0.1:8080:80",
            IMAGE,
            "sh",
            "-c",
            "echo page-from-n1 > /tmp/index.html; exec httpd -f -p 80 -h /tmp",
        ]);
        assert_eq!(r.code, 0, "{r:?}\n{}", d.log());
        let inspect = |field: &str| {
            d.docker(&["inspect", "-f", field, "n1"])
                .stdout
                .trim()
                .to_string()
        };
        let ip = inspect("{{.NetworkSettings.IPAddress}}");
        let gateway = inspect("{{.NetworkSettings.Gateway}}");
        assert!(!ip.is_empty() && !gateway.is_empty(), "{ip:?} {gateway:?}");
        let addresses = guest_ipv4(d, "n1");
        assert!(
            addresses.contains(&format!("eth0    inet {ip}/")),
            "{addresses}"
        );
        let routes = d.docker(&["exec", "n1", "ip", "route"]).stdout;
        assert!(
            routes.contains(&format!("default via {gateway} dev eth0")),
            "{routes}"
        );
        let page = || {
            let r = d.on_host("curl -sS -m 5 http://127.0.0.1:8080/index.html");
            if r.stdout == "page-from-n1\n" {
                Ok(())
            } else {
                Err(format!("{r:?}"))
            }
        };
        eventually("the page through -p", Duration::from_secs(30), page);

        // --network container:n1 shares n1's network stack, which only n1's VM has: the
        // container joins that VM.
        let r = d.docker(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--network",
            "container:n1",
            IMAGE,
            "sh",
            "-c",
            "ip -4 -o addr show eth0; printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc 127.0.0.1 80",
        ]);
        assert_eq!(r.code, 0, "{r:?}");
        assert!(r.stdout.contains(&format!("inet {ip}/")), "{r:?}");
        assert!(r.stdout.contains("page-from-n1"), "{r:?}");

        // --network none: loopback only.
        let r = d.docker(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--network",
            "none",
            IMAGE,
            "ls",
            "/sys/class/net",
        ]);
        assert_eq!((r.code, r.stdout.as_str()), (0, "lo\n"), "{r:?}");

        // A user-defined network with a subnet of its own.
        let r = d.docker(&["network", "create", "--subnet", "10.123.0.0/24", "hnet"]);
        assert_eq!(r.code, 0, "{r:?}");
        let r = d.docker(&[
            "run",
            "-d",
            "--name",
            "n2",
            "--runtime",
            RUNTIME,
            "--network",
            "hnet",
            IMAGE,
            "sleep",
            "600",
        ]);
        assert_eq!(r.code, 0, "{r:?}");
        let addresses = guest_ipv4(d, "n2");
        assert!(addresses.contains("eth0    inet 10.123.0."), "{addresses}");
        let r = d.docker(&["exec", "n2", "ping", "-c", "1", "-W", "5", "10.123.0.1"]);
        assert_eq!(r.code, 0, "the network's gateway on the host: {r:?}");

        // Docker's DNS server (127.0.0.11 in the pod's namespace on the host) answers in the
        // guest: from the first instruction of a new container, over UDP and over TCP.
        let n2_ip = d
            .docker(&[
                "inspect",
                "-f",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                "n2",
            ])
            .stdout
            .trim()
            .to_string();
        assert!(n2_ip.starts_with("10.123.0."), "{n2_ip:?}");
        let r = d.docker(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--network",
            "hnet",
            IMAGE,
            "nslookup",
            "n2",
        ]);
        assert!(
            r.code == 0 && r.stdout.contains(&format!("Address: {n2_ip}")),
            "n2 by name over UDP: {r:?}"
        );
        // A query for n2's A record by hand, over TCP (2-byte length first), and the last four
        // bytes of the answer: its address.
        let r = d.docker(&[
            "exec",
            "n2",
            "sh",
            "-c",
            "printf '\\000\\024\\022\\064\\001\\000\\000\\001\\000\\000\\000\\000\\000\\000\\002n2\\000\\000\\001\\000\\001' | nc -w 5 127.0.0.11 53 | od -An -tu1",
        ]);
        let bytes: Vec<&str> = r.stdout.split_whitespace().collect();
        assert!(
            bytes.len() > 4 && bytes[bytes.len() - 4..].join(".") == n2_ip,
            "n2 by name over TCP: {r:?}"
        );

        // Live changes: connect gives the running VM a NIC, disconnect takes it away.
        let r = d.docker(&["network", "connect", "hnet", "n1"]);
        assert_eq!(r.code, 0, "{r:?}");
        let connected = Instant::now();
        eventually(
            "the connected network in n1",
            Duration::from_secs(10),
            || {
                let a = guest_ipv4(d, "n1");
                if a.contains("eth1    inet 10.123.0.") {
                    Ok(())
                } else {
                    Err(a)
                }
            },
        );
        eprintln!(
            "docker network connect: in the guest after {:?}",
            connected.elapsed()
        );
        let r = d.docker(&["exec", "n1", "ping", "-c", "1", "-W", "5", "10.123.0.1"]);
        assert_eq!(r.code, 0, "over the hot-plugged NIC: {r:?}");
        let r = d.docker(&["network", "disconnect", "hnet", "n1"]);
        assert_eq!(r.code, 0, "{r:?}");
        let disconnected = Instant::now();
        eventually("n1 without eth1", Duration::from_secs(10), || {
            let links = d.docker(&["exec", "n1", "ls", "/sys/class/net"]).stdout;
            if links == "eth0\nlo\n" {
                Ok(())
            } else {
                Err(links)
            }
        });
        eprintln!(
            "docker network disconnect: NIC gone from the guest after {:?}",
            disconnected.elapsed()
        );
        assert!(!guest_ipv4(d, "n1").contains("10.123.0."));

        // docker restart: a new VM, networked again.
        let r = d.docker(&["restart", "-t", "1", "n1"]);
        assert_eq!(r.code, 0, "{r:?}");
        eventually("the page after a restart", Duration::from_secs(30), page);

        for id in ["n1", "n2"] {
            let r = d.docker(&["rm", "-f", id]);
            assert_eq!(r.code, 0, "{r:?}");
        }
        let r = d.docker(&["network", "rm", "hnet"]);
        assert_eq!(r.code, 0, "{r:?}");
    });
}

/// Issue 24, items 5 and 8, beside runc in the same run: `$HOME` as runc sets it (from the
/// container's /etc/passwd, `/` for a uid it does not list) in `run` and `exec`; and the host's
/// PID and UTS namespaces, which runc gives and a VM cannot, refused with the reason instead of
/// quietly given the VM's.
#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn home_is_set_as_under_runc_and_host_pid_and_uts_are_refused() {
    for_each_docker(|d| {
        let homes = |runtime: &str| -> Vec<String> {
            let mut seen = Vec::new();
            for user in ["0", "65534", "1000"] {
                let r = docker_run(
                    d,
                    runtime,
                    &["--rm", "-u", user, IMAGE, "sh", "-c", "echo $HOME"],
                );
                assert_eq!(r.code, 0, "{runtime} -u {user}: {r:?}");
                seen.push(r.stdout);
            }
            with_running(d, runtime, "home", |name| {
                for user in ["0", "1000"] {
                    let r = d.docker(&["exec", "-u", user, name, "sh", "-c", "echo $HOME"]);
                    assert_eq!(r.code, 0, "{runtime} exec -u {user}: {r:?}");
                    seen.push(r.stdout);
                }
            });
            seen
        };
        let under_runc = homes("runc");
        assert_eq!(under_runc[0], "/root\n", "runc: {under_runc:?}");
        assert_eq!(homes("hako"), under_runc, "hako as runc");

        for flag in ["--pid", "--uts"] {
            let r = docker_run(d, "runc", &["--rm", flag, "host", IMAGE, "true"]);
            assert_eq!(r.code, 0, "runc gives the host's: {r:?}");
            let r = docker_run(d, "hako", &["--rm", flag, "host", IMAGE, "true"]);
            assert_ne!(r.code, 0, "{flag} host: {r:?}");
            assert!(r.stderr.contains(&format!("{flag} host")), "{r:?}");
        }
        hako_tests::runc::remove_parent();
    });
}

/// Issue 24, item 7, beside runc in the same run: a command that is missing, not executable or
/// not in `$PATH` gives the exit codes runc's gives, in `run` and in `exec`. Docker chooses 127
/// and 126 from the runtime's wording of the error, so hako words them as runc does.
#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn commands_that_cannot_run_exit_as_under_runc() {
    let commands = ["/no/such/program", "/etc/passwd", "no-such-command"];
    for_each_docker(|d| {
        let codes = |runtime: &str| -> Vec<(String, i32)> {
            let mut seen = Vec::new();
            for command in commands {
                let r = docker_run(d, runtime, &["--rm", IMAGE, command]);
                seen.push((format!("run {command}"), r.code));
            }
            with_running(d, runtime, "codes", |name| {
                for command in commands {
                    let r = d.docker(&["exec", name, command]);
                    seen.push((format!("exec {command}"), r.code));
                }
            });
            seen
        };
        let under_runc = codes("runc");
        // `docker run` tells a missing command (127) from one it cannot run (126); `docker
        // exec` answers 126 for both, under runc.
        assert_eq!(
            under_runc.iter().map(|(_, code)| *code).collect::<Vec<_>>()[..3],
            [127, 126, 127],
            "runc: {under_runc:?}"
        );
        assert_eq!(codes("hako"), under_runc, "hako as runc");
        hako_tests::runc::remove_parent();
    });
}

/// Issue 24, item 4, beside runc in the same run: the devices every kernel numbers alike are
/// made in the container as runc makes them, under any name; a host device, which the guest
/// would resolve to its own or to nothing, is refused naming it; and a privileged container
/// gets the guest's devices.
#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn devices_are_made_as_under_runc_and_a_host_device_is_refused() {
    let host_block = fs::read_dir("/dev")
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            use std::os::unix::fs::FileTypeExt;
            fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
        })
        .expect("this host has a block device node in /dev");
    let host_block = host_block.display().to_string();
    let script = "stat -c '%n %F %t:%T %a' /dev/h4null /dev/fuse && echo x > /dev/h4null && \
                  test ! -s /dev/h4null && echo written";
    for_each_docker(|d| {
        let made = |runtime: &str| {
            let r = docker_run(
                d,
                runtime,
                &[
                    "--rm",
                    "--device",
                    "/dev/null:/dev/h4null",
                    "--device",
                    "/dev/fuse",
                    IMAGE,
                    "sh",
                    "-c",
                    script,
                ],
            );
            assert_eq!(r.code, 0, "{runtime}: {r:?}");
            r.stdout
        };
        let under_runc = made("runc");
        assert!(
            under_runc.contains("/dev/h4null character special file 1:3"),
            "runc: {under_runc}"
        );
        assert_eq!(made("hako"), under_runc, "hako as runc");

        let device = format!("{host_block}:/dev/hostdisk");
        let args = ["--rm", "--device", device.as_str(), IMAGE, "true"];
        let r = docker_run(d, "runc", &args);
        assert_eq!(r.code, 0, "runc gives the host's disk: {r:?}");
        let r = docker_run(d, "hako", &args);
        assert_ne!(r.code, 0, "{r:?}");
        assert!(
            r.stderr.contains("device /dev/hostdisk (block")
                && r.stderr.contains("cannot be given to a container in a VM"),
            "{r:?}"
        );

        // The guest's own devices, where runc gives the host's: fuse and tun among them, and
        // more than a container that is not privileged has.
        let count = |privileged: &[&str]| -> usize {
            let script = "test -c /dev/fuse && test -c /dev/net/tun && test -c /dev/full; \
                          echo $?; ls /dev | wc -l";
            let mut args = vec!["--rm"];
            args.extend(privileged);
            args.extend([IMAGE, "sh", "-c", script]);
            let r = docker_run(d, "hako", &args);
            assert_eq!(r.code, 0, "{r:?}");
            let lines: Vec<&str> = r.stdout.lines().collect();
            assert_eq!(lines.len(), 2, "{r:?}");
            assert_eq!(
                lines[0] == "0",
                !privileged.is_empty(),
                "fuse and tun: {r:?}"
            );
            lines[1].parse().unwrap()
        };
        let (plain, privileged) = (count(&[]), count(&["--privileged"]));
        assert!(
            privileged > plain,
            "/dev: {privileged} entries, {plain} without --privileged"
        );
        hako_tests::runc::remove_parent();
    });
}

/// Issue 24, items 2 and 3: a limit above the VM's size, as Docker users set them. With the
/// default configuration (the VM may not grow) `--memory`, `--cpus` and `--cpuset-cpus` past
/// the VM are refused naming the setting, as is `docker update` past it, and `docker stats`
/// shows the VM's memory as the limit, not the host's.
#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn limits_past_the_vm_are_refused_naming_the_setting() {
    for_each_docker(|d| {
        for (flag, value, setting) in [
            ("--memory", "1g", "max_memory_mib"),
            ("--cpus", "2", "max_vcpus"),
            ("--cpuset-cpus", "1", "max_vcpus"),
        ] {
            let args = ["--rm", flag, value, IMAGE, "true"];
            let r = docker_run(d, "runc", &args);
            assert_eq!(r.code, 0, "runc {flag} {value}: {r:?}");
            let r = docker_run(d, "hako", &args);
            assert_eq!(r.code, 125, "hako {flag} {value}: {r:?}");
            assert!(r.stderr.contains(setting), "{flag} {value}: {r:?}");
        }
        with_running(d, "hako", "limits", |name| {
            let r = d.docker(&["stats", "--no-stream", "--format", "{{.MemUsage}}", name]);
            assert_eq!(r.code, 0, "{r:?}");
            // "1.2MiB / 480MiB": the VM's 512 MiB less what its kernel keeps.
            let limit = r.stdout.trim().rsplit(" / ").next().unwrap_or_default();
            let mib: f64 = limit
                .strip_suffix("MiB")
                .unwrap_or("0")
                .parse()
                .unwrap_or(0.0);
            assert!(mib > 256.0 && mib <= 512.0, "stats: {r:?}");
            let r = d.docker(&["update", "--memory", "900m", "--memory-swap", "900m", name]);
            assert_ne!(r.code, 0, "{r:?}");
            assert!(r.stderr.contains("io.hako.memory_mib"), "{r:?}");
        });
        hako_tests::runc::remove_parent();
    });
}

/// Issue 24, item 6, beside runc in the same run: `docker run -t` and `docker exec -t` get a
/// terminal of the container's own devpts, named as runc names it (`/dev/pts/0` for the
/// container's, the next for an exec), the container's terminal is its `/dev/console` too, and
/// the size of the user's terminal is the container's.
#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn terminals_are_the_containers_own_as_under_runc() {
    let script = "tty; ls /dev/pts; test -e /dev/console && echo console; true";
    for_each_docker(|d| {
        let seen = |runtime: &str| -> Vec<String> {
            let mut seen = Vec::new();
            let mut note = |what: &str, r: Run| {
                // A terminal ends its lines with CR LF.
                let out = r.stdout.replace("\r\n", "\n");
                seen.push(format!("{what}: exit {}: {out}", r.code));
            };
            note(
                "run -t",
                docker_run(d, runtime, &["--rm", "-t", IMAGE, "sh", "-c", script]),
            );
            let mut on_tty = run_args(runtime);
            on_tty.extend(["--rm", "-t", IMAGE, "stty", "size"].map(String::from));
            let on_tty: Vec<&str> = on_tty.iter().map(String::as_str).collect();
            note("run -t on 100x30", d.docker_on_tty(&on_tty, 100, 30));

            let name = format!("tty-{runtime}");
            let r = docker_run(
                d,
                runtime,
                &["-d", "-t", "--name", &name, IMAGE, "sleep", "600"],
            );
            assert_eq!(r.code, 0, "{runtime}: {r:?}");
            note(
                "exec -t",
                d.docker(&["exec", "-t", &name, "sh", "-c", script]),
            );
            note(
                "exec -t on 90x20",
                d.docker_on_tty(&["exec", "-t", &name, "stty", "size"], 90, 20),
            );
            let r = d.docker(&["rm", "-f", &name]);
            assert_eq!(r.code, 0, "{r:?}");
            seen
        };
        let under_runc = seen("runc");
        eprintln!("runc: {under_runc:#?}");
        let all = under_runc.join("\n");
        for expected in [
            "/dev/pts/0\n",
            "/dev/pts/1\n",
            "console\n",
            "30 100",
            "20 90",
        ] {
            assert!(
                all.contains(expected),
                "runc: {expected:?}: {under_runc:#?}"
            );
        }
        assert_eq!(seen("hako"), under_runc, "hako as runc");
        hako_tests::runc::remove_parent();
    });
}

/// Issue 24, item 1, beside runc in the same run: `docker top` lists the container's
/// processes under runc; under hako it lists no host process but the VM's (the task's pid,
/// `.State.Pid`), where it once looked guest pids up among the host's and showed strangers;
/// and `hako ps` lists the processes as the guest sees them, exec'd ones too.
#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn docker_top_shows_only_the_vm_and_hako_ps_the_guests_processes() {
    for_each_docker(|d| {
        with_running(d, "runc", "top", |name| {
            let r = d.docker(&["top", name]);
            assert_eq!(r.code, 0, "{r:?}");
            assert!(r.stdout.contains("sleep 600"), "runc: {r:?}");
        });
        with_running(d, "hako", "top", |name| {
            let inspect = |field: &str| {
                d.docker(&["inspect", "-f", field, name])
                    .stdout
                    .trim()
                    .to_string()
            };
            let vmm = inspect("{{.State.Pid}}");
            let id = inspect("{{.Id}}");
            assert!(vmm.parse::<u32>().is_ok_and(|p| p > 0), "{vmm:?}");
            let r = d.docker(&["exec", "-d", name, "sleep", "700"]);
            assert_eq!(r.code, 0, "{r:?}");

            let top = d.docker(&["top", name]);
            assert_eq!(top.code, 0, "{top:?}");
            let mut lines = top.stdout.lines();
            let header: Vec<&str> = lines
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .collect();
            let pid_column = header.iter().position(|h| *h == "PID");
            let pid_column = pid_column.unwrap_or_else(|| panic!("no PID column: {top:?}"));
            let pids: Vec<&str> = lines
                .filter_map(|l| l.split_whitespace().nth(pid_column))
                .collect();
            assert_eq!(pids, [vmm.as_str()], "only the VMM: {top:?}");

            // A prefix of the id names the container, as with Docker; every namespace is
            // searched.
            let ps = hako_cli(&["ps", &id[..12]], &[]);
            assert_eq!(ps.code, 0, "{ps:?}");
            eprintln!("hako ps {}:\n{}", &id[..12], ps.stdout);
            let row = |command: &str| -> Vec<String> {
                let line = ps.stdout.lines().find(|l| l.ends_with(command));
                let line = line.unwrap_or_else(|| panic!("no {command:?}: {ps:?}"));
                line.split_whitespace().map(str::to_string).collect()
            };
            // PID PPID GUEST-PID UID STAT TIME CMD: the init is the container's pid 1, its
            // parent outside the container; the exec'd process too.
            let init = row("sleep 600");
            assert_eq!((init[0].as_str(), init[1].as_str()), ("1", "0"), "{ps:?}");
            assert_ne!(init[2], "1", "the guest's own pid beside: {ps:?}");
            let exec = row("sleep 700");
            assert_ne!(exec[0], "1", "{ps:?}");
            assert_eq!(ps.stdout.lines().count(), 3, "a header and two: {ps:?}");

            // By the container's Docker name, which only Docker knows: asked of the daemon
            // `DOCKER_HOST` names, as the docker CLI would.
            let docker_host = d.host();
            let docker_env = [("DOCKER_HOST", docker_host.as_str())];
            let by_name = hako_cli(&["ps", name], &docker_env);
            assert_eq!(by_name.code, 0, "{by_name:?}");
            assert!(by_name.stdout.contains("sleep 600"), "{by_name:?}");
            let logs = hako_cli(&["logs", name], &docker_env);
            assert_eq!(logs.code, 0, "{logs:?}");
            assert!(logs.stdout.contains("console.log"), "{logs:?}");
            let unknown = hako_cli(&["ps", "no-such-name"], &docker_env);
            assert_ne!(unknown.code, 0, "{unknown:?}");
            assert!(unknown.stderr.contains("no-such-name"), "{unknown:?}");
        });
        hako_tests::runc::remove_parent();
    });
}

/// Issue 24, items 2 and 3, beside runc in the same run: where the configuration lets a VM
/// grow, a container's limits size the VM it boots. Under `--memory 1g` a container fills
/// 700 MiB, past the VM's configured 512, and is not killed; `--cpus 2` gets two CPUs; a
/// cpuset is applied inside the guest.
#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn limits_past_the_configured_vm_grow_it_as_runc_gives_them() {
    let config = HakoConfig::new("[hypervisor]\nmax_vcpus = 2\nmax_memory_mib = 2048\n");
    hako_tests::docker::for_each_docker_with(&config.env(), |d| {
        let runs = |runtime: &str| -> Vec<String> {
            let fill = "dd if=/dev/zero of=/big/x bs=1M count=700 2>/dev/null; echo dd=$?; nproc";
            let pinned = "nproc; grep Cpus_allowed_list /proc/self/status";
            [
                vec![
                    "--memory",
                    "1g",
                    "--cpus",
                    "2",
                    "--tmpfs",
                    "/big:size=900m",
                    IMAGE,
                    "sh",
                    "-c",
                    fill,
                ],
                vec!["--cpuset-cpus", "1", IMAGE, "sh", "-c", pinned],
            ]
            .iter()
            .map(|args| {
                let mut all = vec!["--rm"];
                all.extend(args);
                let r = docker_run(d, runtime, &all);
                assert_eq!(r.code, 0, "{runtime} {args:?}: {r:?}");
                r.stdout
            })
            .collect()
        };
        let under_runc = runs("runc");
        assert_eq!(
            under_runc,
            ["dd=0\n2\n", "1\nCpus_allowed_list:\t1\n"],
            "runc"
        );
        assert_eq!(runs("hako"), under_runc, "hako as runc");
        hako_tests::runc::remove_parent();
    });
}

/// Issue 24, item 10, beside runc in the same run: an environment too large for exec starts the
/// container and fails its process (E2BIG), its stderr saying so, as under runc. 2 MiB is past
/// what exec takes under the default 8 MiB stack limit; 5 MiB is past what the agent channel
/// carries too, so the guest gets a stand-in exec refuses as surely.
#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn an_environment_too_large_for_exec_fails_the_process_as_under_runc() {
    let dir = std::env::temp_dir().join(format!("hako-env-files-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let files: Vec<String> = [2usize << 20, 5 << 20]
        .iter()
        .map(|size| {
            // Lines of 1,000 bytes: the docker CLI reads an env file in lines of at most 64 KiB.
            let line = |i: usize| format!("E{i:05}={}\n", "v".repeat(992));
            let text: String = (0..size / 1000 + 1).map(line).collect();
            let file = dir.join(format!("env-{size}"));
            fs::write(&file, text).unwrap();
            file.display().to_string()
        })
        .collect();
    let too_long = |stderr: &str| -> Vec<String> {
        stderr
            .lines()
            .filter(|l| l.contains("argument list too long"))
            .map(String::from)
            .collect()
    };
    for_each_docker(|d| {
        for file in &files {
            let args = ["--rm", "--env-file", file.as_str(), IMAGE, "true"];
            let runc = docker_run(d, "runc", &args);
            assert_ne!(runc.code, 0, "{file}: runc: {runc:?}");
            assert!(!too_long(&runc.stderr).is_empty(), "{file}: runc: {runc:?}");
            eprintln!("{file}: runc: exit {}, stderr {:?}", runc.code, runc.stderr);
            let hako = docker_run(d, "hako", &args);
            assert_eq!(
                (hako.code, too_long(&hako.stderr)),
                (runc.code, too_long(&runc.stderr)),
                "{file}: hako as runc: {hako:?}"
            );
        }
        hako_tests::runc::remove_parent();
    });
    fs::remove_dir_all(&dir).unwrap();
}

/// `docker run --runtime <runtime>`; runc's containers go under the tests' own cgroup parent
/// (`runc::PARENT`, removed after), not Docker's `/docker`, which runc leaves behind.
fn run_args(runtime: &str) -> Vec<String> {
    let mut all = vec![
        "run".to_string(),
        "--runtime".to_string(),
        runtime.to_string(),
    ];
    if runtime == "runc" {
        all.push("--cgroup-parent".to_string());
        all.push(format!("/{}", hako_tests::runc::PARENT));
    }
    all
}

/// `docker run --runtime <runtime> <args>` (`run_args`).
fn docker_run(d: &hako_tests::docker::Docker, runtime: &str, args: &[&str]) -> Run {
    let mut all = run_args(runtime);
    all.extend(args.iter().map(|a| a.to_string()));
    d.docker(&all.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Runs `sleep` in a container named `<name>-<runtime>` under `runtime`, hands its name to
/// `f`, then removes it.
fn with_running(d: &hako_tests::docker::Docker, runtime: &str, name: &str, f: impl FnOnce(&str)) {
    let name = format!("{name}-{runtime}");
    let r = docker_run(d, runtime, &["-d", "--name", &name, IMAGE, "sleep", "600"]);
    assert_eq!(r.code, 0, "{runtime}: {r:?}");
    f(&name);
    let r = d.docker(&["rm", "-f", &name]);
    assert_eq!(r.code, 0, "{r:?}");
}
