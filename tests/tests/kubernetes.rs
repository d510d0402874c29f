//! End-to-end: what Kubernetes' CRI validation suite (critest) asks of a runtime, through
//! containerd's CRI plugin as kubelet calls it, on containerd 1.7 and 2.x: port forwarding and
//! host ports reaching the server in the VM, pod sysctls, what privileged and NET_ADMIN
//! containers can do in the guest, `ro` against `rro`, and clear refusals of what a VM cannot
//! share with the host.
//!
//! Needs root and the installed runtime: `#[ignore]`d in a plain `cargo test`;
//! `scripts/test.sh` runs them.

#![allow(clippy::unwrap_used)] // Test code: a failed step should fail the test loudly.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hako_tests::cri::*;
use hako_tests::portforward;
use hako_tests::*;
use k8s_cri::v1 as k8s;

/// The pod's HTTP server and what it serves.
const WEB_PORT: u16 = 8080;
const HOST_PORT: i32 = 18080;
const PAGE: &str = "served-from-the-vm";

fn image_id(c: &CriContainerd) -> String {
    c.client
        .image_status(IMAGE)
        .unwrap()
        .expect("busybox is imported")
        .id
}

/// Runs `config`'s container in `pod` and waits until it runs.
fn start(
    c: &CriContainerd,
    pod: &str,
    config: &k8s::ContainerConfig,
    pod_config: &k8s::PodSandboxConfig,
) -> String {
    let id = c.client.create_container(pod, config, pod_config).unwrap();
    c.client.start_container(&id).unwrap();
    id
}

fn exec(c: &CriContainerd, id: &str, script: &str) -> Run {
    c.client.exec_sync(id, &["sh", "-c", script]).unwrap()
}

/// Polls (bounded) until `script` succeeds in the container: for a server that is starting.
fn wait_until(c: &CriContainerd, id: &str, script: &str) {
    let started = Instant::now();
    loop {
        let r = exec(c, id, script);
        if r.code == 0 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{script}: not within 30 s: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn stop_and_remove(c: &CriContainerd, pod: &str) {
    c.client.stop_pod_sandbox(pod).unwrap();
    c.client.remove_pod_sandbox(pod).unwrap();
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn port_forward_host_ports_and_sysctls_reach_the_pod_in_its_vm() {
    for_each_cri_containerd(|c| {
        for handler in c.handlers() {
            eprintln!("--- handler {handler}");
            let uid = "7c1d-hako-k8s-web";
            let log_dir = c.pod_log_directory("web", uid, &["server"]);
            let mut pod_config = pod_sandbox_config("web", uid, &log_dir);
            pod_config.port_mappings = vec![k8s::PortMapping {
                protocol: k8s::Protocol::Tcp as i32,
                container_port: i32::from(WEB_PORT),
                host_port: HOST_PORT,
                ..Default::default()
            }];
            // A safe sysctl (kubelet allows it by default) and an unsafe one (an operator must
            // allow it), both in the pod's IPC namespace, and one of its network namespace.
            let linux = pod_config.linux.as_mut().unwrap();
            linux.sysctls = HashMap::from([
                ("kernel.shm_rmid_forced".to_string(), "1".to_string()),
                ("fs.mqueue.msg_max".to_string(), "100".to_string()),
                (
                    "net.ipv4.ip_unprivileged_port_start".to_string(),
                    "0".to_string(),
                ),
            ]);
            let pod = c.client.run_pod_sandbox(&pod_config, handler).unwrap();
            let server = start(
            c,
            &pod,
            &container_config(
                &pod_config,
                "server",
                &image_id(c),
                &[
                    "sh",
                    "-c",
                    &format!("mkdir -p /www && echo {PAGE} > /www/index.html && exec httpd -f -p {WEB_PORT} -h /www"),
                ],
                0,
            ),
            &pod_config,
        );
            wait_until(
                c,
                &server,
                &format!("wget -q -O - http://127.0.0.1:{WEB_PORT}/"),
            );

            // Pod sysctls, read back in the container.
            for (file, want) in [
                ("kernel/shm_rmid_forced", "1"),
                ("fs/mqueue/msg_max", "100"),
                ("net/ipv4/ip_unprivileged_port_start", "0"),
            ] {
                let r = exec(c, &server, &format!("cat /proc/sys/{file}"));
                assert_eq!((r.code, r.stdout.trim()), (0, want), "{file}: {r:?}");
            }

            // kubectl port-forward: PortForward's URL, bytes up (the request) and down (the page).
            let url = c.client.port_forward(&pod, &[i32::from(WEB_PORT)]).unwrap();
            let got =
                portforward::exchange(&c.netns, &url, WEB_PORT, b"GET / HTTP/1.0\r\n\r\n", PAGE);
            let text = String::from_utf8_lossy(&got.data);
            assert!(
                text.starts_with("HTTP/1.") && text.contains(PAGE),
                "{got:?}"
            );
            assert!(got.error.is_empty(), "{got:?}");
            // A port nothing listens on: no bytes, and the connection ends. (A URL serves once.)
            let url = c.client.port_forward(&pod, &[8081]).unwrap();
            let got = portforward::exchange(&c.netns, &url, 8081, b"GET / HTTP/1.0\r\n\r\n", "");
            assert!(got.data.is_empty(), "{got:?}");
            // Both in the pod's metrics, each counted as its connection ends.
            eventually("the forwards are counted", Duration::from_secs(10), || {
                let text = prometheus::sandbox_metrics("k8s.io", &pod);
                let count = |result: &str| {
                    prometheus::sample(
                        &text,
                        &format!(r#"hako_port_forward_connections_total{{result="{result}"}}"#),
                    )
                };
                match (count("carried"), count("refused")) {
                    (Some(1.0), Some(1.0)) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            });

            // hostPort: the node's address, through the portmap plugin's DNAT, reaches the VM.
            let r = c.on_node(&format!(
                "busybox wget -q -O - http://{POD_GATEWAY}:{HOST_PORT}/"
            ));
            assert_eq!((r.code, r.stdout.trim()), (0, PAGE), "{r:?}");

            stop_and_remove(c, &pod);
            assert_no_leaks("after the web pod");
        }
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn privileged_and_net_admin_containers_make_bridges_in_the_guest_and_others_cannot() {
    for_each_cri_containerd(|c| {
        for handler in c.handlers() {
            eprintln!("--- handler {handler}");
            let uid = "8d2e-hako-k8s-priv";
            let log_dir = c.pod_log_directory("priv", uid, &["privileged", "netadmin", "plain"]);
            let mut pod_config = pod_sandbox_config("priv", uid, &log_dir);
            // A privileged container needs a privileged pod.
            let security = pod_config
                .linux
                .as_mut()
                .and_then(|l| l.security_context.as_mut())
                .unwrap();
            security.privileged = true;
            let pod = c.client.run_pod_sandbox(&pod_config, handler).unwrap();
            let image = image_id(c);
            let mut ids = Vec::new();
            for name in ["privileged", "netadmin", "plain"] {
                let mut config = container_config(&pod_config, name, &image, &["sleep", "inf"], 0);
                let security = config
                    .linux
                    .as_mut()
                    .and_then(|l| l.security_context.as_mut())
                    .unwrap();
                match name {
                    "privileged" => security.privileged = true,
                    "netadmin" => {
                        security.capabilities = Some(k8s::Capability {
                            add_capabilities: vec!["NET_ADMIN".to_string()],
                            ..Default::default()
                        })
                    }
                    _ => {}
                }
                ids.push(start(c, &pod, &config, &pod_config));
            }
            // critest's check: `brctl addbr`, which needs the guest kernel's bridge support.
            for (id, bridge) in [(&ids[0], "foobar"), (&ids[1], "foobaz")] {
                let r = exec(
                    c,
                    id,
                    &format!("brctl addbr {bridge} && ip -o link show {bridge}"),
                );
                assert_eq!(r.code, 0, "{bridge}: {r:?}");
                assert!(r.stdout.contains(bridge), "{r:?}");
            }
            // A veth pair on the bridge, as a CNI plugin in a privileged pod makes them.
            let r = exec(
                c,
                &ids[0],
                "ip link add hkv0 type veth && brctl addif foobar hkv0 && ip -o link show hkv0",
            );
            assert!(r.code == 0 && r.stdout.contains("master foobar"), "{r:?}");
            let r = exec(c, &ids[2], "brctl addbr foobax");
            assert_ne!(r.code, 0, "an unprivileged container may not: {r:?}");
            assert!(
                r.stderr.contains("not permitted"),
                "the guest refuses it for want of the capability: {r:?}"
            );
            stop_and_remove(c, &pod);
            assert_no_leaks("after the privileged pod");
        }
    });
}

/// A host directory with a tmpfs mounted below it (`sub`), and a shared bind of itself (so
/// containerd accepts a Bidirectional mount of it, which hako must refuse), for one test.
struct Volume(PathBuf);

impl Volume {
    fn new(name: &str) -> Volume {
        let dir = std::env::temp_dir().join(format!("hako-k8s-{name}-{}", std::process::id()));
        fs::create_dir_all(dir.join("sub")).unwrap();
        let run = |args: &[&str]| {
            let status = Command::new("mount").args(args).status().unwrap();
            assert!(status.success(), "mount {args:?}");
        };
        let d = dir.display().to_string();
        run(&["-t", "tmpfs", "tmpfs", &format!("{d}/sub")]);
        // Recursive: the bind carries the tmpfs below it.
        run(&["--rbind", &d, &d]);
        run(&["--make-rshared", &d]);
        Volume(dir)
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        for m in mounts_under(&self.0).into_iter().rev() {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// In container `id`, `/vol` (a `readOnly` volume) refuses a write and its submount `sub`, which
/// the host mounted below the source, takes one: `ro` is the mount itself, as under runc.
fn assert_read_only_above_a_writable_submount(c: &CriContainerd, id: &str, sub: &str) {
    let script = format!("touch /vol/top; echo top=$?; touch /vol/{sub}/x && echo sub=ok");
    let r = exec(c, id, &script);
    assert!(
        r.stdout.contains("top=1") && r.stdout.contains("sub=ok"),
        "{r:?}"
    );
}

fn mount(volume: &Path, at: &str, readonly: bool, recursive: bool) -> k8s::Mount {
    k8s::Mount {
        container_path: at.to_string(),
        host_path: volume.display().to_string(),
        readonly,
        recursive_read_only: recursive,
        ..Default::default()
    }
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn read_only_volumes_behave_as_with_runc_and_bidirectional_propagation_is_refused() {
    let volume = Volume::new("ro");
    for_each_cri_containerd(|c| {
        for handler in c.handlers() {
            eprintln!("--- handler {handler}");
            let uid = "9e3f-hako-k8s-ro";
            let log_dir = c.pod_log_directory("ro", uid, &["ro", "rro", "shared"]);
            let pod_config = pod_sandbox_config("ro", uid, &log_dir);
            let pod = c.client.run_pod_sandbox(&pod_config, handler).unwrap();
            let image = image_id(c);

            // `ro` is the mount itself: what the host mounted below it keeps its own flags.
            let mut config = container_config(&pod_config, "ro", &image, &["sleep", "inf"], 0);
            config.mounts = vec![mount(&volume.0, "/vol", true, false)];
            let ro = start(c, &pod, &config, &pod_config);
            assert_read_only_above_a_writable_submount(c, &ro, "sub");

            // `rro`: read-only on every level. hako tells containerd it can (the runtime features
            // containerd asks for), and kubelet sends `rro` only where CRI's Status says the handler
            // has it: containerd before 2.2.7 and 2.3.4 asks only runc-type runtimes for their
            // features, so there kubelet refuses such pods for the hako handler instead.
            if c.version.starts_with('2') {
                let r = c.ctr(&[
                    "plugins",
                    "inspect-runtime",
                    "--runtime",
                    "io.containerd.hako.v2",
                ]);
                assert_eq!(r.code, 0, "{r:?}");
                let info: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
                let options = &info["Features"]["mountOptions"];
                assert!(
                    options.as_array().unwrap().contains(&"rro".into()),
                    "{options}"
                );
            }
            if handler_offers_rro(c, handler) {
                let mut config = container_config(&pod_config, "rro", &image, &["sleep", "inf"], 0);
                config.mounts = vec![mount(&volume.0, "/vol", true, true)];
                let rro = start(c, &pod, &config, &pod_config);
                let r = exec(c, &rro, "touch /vol/sub/y; echo sub=$?");
                assert!(r.stdout.contains("sub=1"), "{r:?}");
                assert!(r.stderr.contains("Read-only file system"), "{r:?}");
            } else {
                report_skip(&format!(
                    "kubernetes: rro through CRI on containerd {}: its Status does not offer \
                     recursive read-only mounts for the {handler} handler (containerd before \
                     2.2.7/2.3.4 asks only runc-type runtimes; kubelet refuses such pods); \
                     pods_and_volumes tests rro through ctr",
                    c.version
                ));
            }

            // Bidirectional propagation would need mounts made in the VM to reach the host. CRI's
            // CreateContainer only records the container; the runtime sees it at StartContainer.
            let mut config = container_config(&pod_config, "shared", &image, &["sleep", "inf"], 0);
            let mut shared = mount(&volume.0, "/vol", false, false);
            shared.propagation = k8s::MountPropagation::PropagationBidirectional as i32;
            config.mounts = vec![shared];
            let id = c
                .client
                .create_container(&pod, &config, &pod_config)
                .unwrap();
            let err = c
                .client
                .start_container(&id)
                .expect_err("Bidirectional propagation is refused");
            assert!(err.message().contains("Bidirectional"), "{err:?}");
            // The pod is untouched: its other containers still run.
            let r = exec(c, &ro, "echo alive");
            assert_eq!(r.stdout, "alive\n", "{r:?}");

            stop_and_remove(c, &pod);
            assert_no_leaks("after the volumes pod");
        }
    });
}

/// What containerd's CRI tells kubelet about a hako handler: whether a pod may ask for `rro`.
fn handler_offers_rro(c: &CriContainerd, handler: &str) -> bool {
    c.client
        .status(false)
        .unwrap()
        .runtime_handlers
        .iter()
        .find(|h| h.name == handler)
        .and_then(|h| h.features.as_ref())
        .is_some_and(|f| f.recursive_read_only_mounts)
}

/// Whether this containerd survives a hostNetwork pod through a shim sandboxer: 2.3.0 and
/// later (containerd commit b32cecd: a nil spec in NewBundle).
fn shim_sandboxer_takes_host_network(c: &CriContainerd) -> bool {
    let mut parts = c.version.split(['.', '+', '~', '-']);
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (2, 3)
}

#[test]
#[ignore = "needs root and containerd under /opt/hako: run through scripts/test.sh"]
fn host_network_ipc_and_pid_are_refused_with_the_reason() {
    for_each_cri_containerd(|c| {
        for handler in c.handlers() {
            eprintln!("--- handler {handler}");
            for (name, namespaces, reason) in [
                (
                    "hostnet",
                    k8s::NamespaceOption {
                        network: k8s::NamespaceMode::Node as i32,
                        pid: k8s::NamespaceMode::Container as i32,
                        ipc: k8s::NamespaceMode::Pod as i32,
                        ..Default::default()
                    },
                    "host networking is not possible",
                ),
                (
                    "hostipc",
                    k8s::NamespaceOption {
                        network: k8s::NamespaceMode::Pod as i32,
                        pid: k8s::NamespaceMode::Container as i32,
                        ipc: k8s::NamespaceMode::Node as i32,
                        ..Default::default()
                    },
                    "hostIPC",
                ),
                (
                    "hostpid",
                    k8s::NamespaceOption {
                        network: k8s::NamespaceMode::Pod as i32,
                        pid: k8s::NamespaceMode::Node as i32,
                        ipc: k8s::NamespaceMode::Pod as i32,
                        ..Default::default()
                    },
                    "hostPID",
                ),
            ] {
                if name == "hostnet"
                    && *handler == SANDBOX_HANDLER
                    && !shim_sandboxer_takes_host_network(c)
                {
                    report_skip(&format!(
                        "kubernetes: hostNetwork through {handler} on containerd {}: containerd \
                         before 2.3.0 crashes on a hostNetwork pod with any shim sandboxer, \
                         before the shim is asked (containerd commit b32cecd); hako's refusal \
                         is tested in sandbox::standalone's unit tests",
                        c.version
                    ));
                    continue;
                }
                let uid = format!("0a4b-hako-k8s-{name}");
                let log_dir = c.pod_log_directory(name, &uid, &[]);
                let mut pod_config = pod_sandbox_config(name, &uid, &log_dir);
                pod_config
                    .linux
                    .as_mut()
                    .and_then(|l| l.security_context.as_mut())
                    .unwrap()
                    .namespace_options = Some(namespaces);
                let err = c
                    .client
                    .run_pod_sandbox(&pod_config, handler)
                    .expect_err(name);
                assert!(err.message().contains(reason), "{name}: {err:?}");
            }
            assert!(c.client.list_pod_sandbox().unwrap().is_empty());
            assert_no_leaks("after the refused pods");
        }
    });
}

/// A pod whose VM died (its guest powered off from a privileged container, or its VMM killed)
/// is stopped and removed as kubelet does it (StopPodSandbox: Kill, accepting only NotFound or
/// FailedPrecondition, then Delete; RemovePodSandbox), at once and leaving nothing.
#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn a_pod_whose_vm_died_is_removed_as_kubelet_removes_it() {
    for_each_cri_containerd(|c| {
        for handler in c.handlers() {
            eprintln!("--- handler {handler}");
            for death in ["poweroff", "vmm-killed"] {
                let uid = format!("5c1d-hako-k8s-{death}");
                let log_dir = c.pod_log_directory(death, &uid, &["app"]);
                let mut pod_config = pod_sandbox_config(death, &uid, &log_dir);
                pod_config
                    .linux
                    .as_mut()
                    .and_then(|l| l.security_context.as_mut())
                    .unwrap()
                    .privileged = true;
                let pod = c.client.run_pod_sandbox(&pod_config, handler).unwrap();
                let mut config =
                    container_config(&pod_config, "app", &image_id(c), &["sleep", "inf"], 0);
                config
                    .linux
                    .as_mut()
                    .and_then(|l| l.security_context.as_mut())
                    .unwrap()
                    .privileged = true;
                let app = start(c, &pod, &config, &pod_config);
                if death == "poweroff" {
                    // The exec dies with the guest; its answer is not the point.
                    let _ = c
                        .client
                        .exec_sync(&app, &["sh", "-c", "echo o > /proc/sysrq-trigger"]);
                } else {
                    let status = c.client.pod_sandbox_status(&pod).unwrap();
                    let info: serde_json::Value =
                        serde_json::from_str(&status.info["info"]).unwrap();
                    let pid = info["pid"].as_u64().unwrap() as i32;
                    nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    )
                    .unwrap();
                }
                remove_as_kubelet_does(c, &pod, death);
                assert_no_leaks(death);
            }
        }
    });
}

/// Stops and removes a pod whose VM or shim died, as kubelet does: each call retried until it
/// succeeds, all within 20 s. containerd 2.x handles the exits of every container of a dead VM
/// at once (hako reports them the moment the VM is gone): handling the pause container's, it
/// closes the pod's shim connection, which fails a Kill it has in flight ("ttrpc: closed") and
/// delays its own handling of the other containers' exits ("container is still running").
fn remove_as_kubelet_does(c: &CriContainerd, pod: &str, context: &str) {
    let started = Instant::now();
    let retried = |what: &str, call: &dyn Fn() -> Result<(), tonic::Status>| {
        let mut last = call();
        while let Err(e) = &last {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{context}: {what}: {e:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
            last = call();
        }
    };
    retried("StopPodSandbox", &|| c.client.stop_pod_sandbox(pod));
    retried("RemovePodSandbox", &|| c.client.remove_pod_sandbox(pod));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{context}: stop and remove took {:?}",
        started.elapsed()
    );
    assert!(c.client.list_pod_sandbox().unwrap().is_empty(), "{context}");
}

/// Issue 23: hako's share (the pod's root filesystems and volumes, bound for virtiofsd) lives
/// in a mount namespace of the sandbox's, as runc's copies live in the container's: the host's
/// own mount table has none of it while the pod runs, and the host can unmount and remove a
/// volume's source as critest's cleanup does (a plain `umount` of a tmpfs below it, then
/// `rm -r`), which failed with EBUSY while hako's copy of the tmpfs was a mount in the host's
/// namespace. A killed shim leaves no namespace holding any of it once the pod is removed.
#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn the_share_stays_off_the_hosts_mounts_and_a_volume_can_be_cleaned_up_under_it() {
    for_each_cri_containerd(|c| {
        for handler in c.handlers() {
            eprintln!("--- handler {handler}");
            let source =
                std::env::temp_dir().join(format!("hako-k8s-cleanup-{}", std::process::id()));
            fs::create_dir_all(source.join("tmpfs")).unwrap();
            // Whatever happens, nothing of it is left.
            let _cleanup = Volume(source.clone());
            let tmpfs = source.join("tmpfs");
            let status = Command::new("mount")
                .args(["-t", "tmpfs", "tmpfs"])
                .arg(&tmpfs)
                .status()
                .unwrap();
            assert!(status.success(), "mount tmpfs");

            let uid = "7a41-hako-k8s-cleanup";
            let log_dir = c.pod_log_directory("cleanup", uid, &["app"]);
            let pod_config = pod_sandbox_config("cleanup", uid, &log_dir);
            let pod = c.client.run_pod_sandbox(&pod_config, handler).unwrap();
            let mut config =
                container_config(&pod_config, "app", &image_id(c), &["sleep", "inf"], 0);
            // critest's "non-recursive readonly mounts": the mount itself read-only, the tmpfs
            // below it as the host mounted it. And a HostToContainer (rslave) volume.
            let slave = Volume::new("slave");
            fs::create_dir_all(slave.0.join("later")).unwrap();
            let mut follows = mount(&slave.0, "/slave", false, false);
            follows.propagation = k8s::MountPropagation::PropagationHostToContainer as i32;
            config.mounts = vec![mount(&source, "/vol", true, false), follows];
            let app = start(c, &pod, &config, &pod_config);
            assert_read_only_above_a_writable_submount(c, &app, "tmpfs");
            // A tmpfs the host mounts under the rslave volume once the container runs shows
            // in it, as under runc.
            let later = slave.0.join("later");
            let status = Command::new("mount")
                .args(["-t", "tmpfs", "tmpfs"])
                .arg(&later)
                .status()
                .unwrap();
            assert!(status.success(), "mount tmpfs later");
            fs::write(later.join("note"), "mounted-later").unwrap();
            let r = exec(c, &app, "cat /slave/later/note");
            assert_eq!((r.code, r.stdout.as_str()), (0, "mounted-later"), "{r:?}");
            assert_eq!(
                mounts_under(Path::new(SANDBOX_ROOT)),
                Vec::<PathBuf>::new(),
                "the host's mount namespace has none of the share"
            );
            let inside = in_namespace(
                &share_namespace(K8S_NAMESPACE, &pod),
                &["cat", "/proc/self/mountinfo"],
            );
            let share = format!("{SANDBOX_ROOT}/{K8S_NAMESPACE}/{pod}/rw/{app}/rootfs ");
            assert!(
                inside.stdout.contains(&share),
                "the share's own namespace has it: {inside:?}"
            );

            let umount = Command::new("umount").arg(&tmpfs).output().unwrap();
            assert!(
                umount.status.success(),
                "the host unmounts its tmpfs: {}",
                String::from_utf8_lossy(&umount.stderr)
            );
            fs::remove_dir_all(&source).expect("the host removes its own directory");
            assert_eq!(exec(c, &app, "echo alive").stdout, "alive\n");

            let shims: Vec<u32> = hako_processes()
                .into_iter()
                .filter(|(_, comm)| comm == "containerd-shim")
                .map(|(pid, _)| pid)
                .collect();
            assert_eq!(shims.len(), 1, "one shim serves the pod: {shims:?}");
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(shims[0] as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
            remove_as_kubelet_does(c, &pod, "a killed shim");
            // No hako process is left to hold the share's namespace (the shim held it, virtiofsd
            // a copy), and no process's namespace has anything under the sandbox root.
            assert_no_leaks("after the shim was killed");
        }
    });
}

/// A CRI pod's container series carry the container's CRI name; its sandbox (pause)
/// container has none.
#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn a_cri_containers_metrics_carry_its_name_and_the_pause_has_none() {
    for_each_cri_containerd(|c| {
        for handler in c.handlers() {
            eprintln!("--- handler {handler}");
            let uid = "7a41-hako-k8s-metrics";
            let log_dir = c.pod_log_directory("measured", uid, &["named"]);
            let pod_config = pod_sandbox_config("measured", uid, &log_dir);
            let pod = c.client.run_pod_sandbox(&pod_config, handler).unwrap();
            let config = container_config(&pod_config, "named", &image_id(c), &["sleep", "inf"], 0);
            let app = start(c, &pod, &config, &pod_config);
            let socket = Path::new(SANDBOX_ROOT)
                .join(K8S_NAMESPACE)
                .join(&pod)
                .join("metrics.sock");
            eventually(
                "the container's memory in the snapshot",
                Duration::from_secs(30),
                || {
                    let samples = prometheus::sandbox_snapshot(&socket);
                    let named = samples.iter().find(|s| {
                        s.family == "hako_container_memory_usage_bytes"
                            && s.labels == [app.as_str(), "named"]
                    });
                    let ours: Vec<&str> = samples
                        .iter()
                        .filter(|s| s.family.starts_with("hako_container_"))
                        .map(|s| s.labels[0].as_str())
                        .collect();
                    assert!(
                        ours.iter().all(|id| *id == app),
                        "series of another container than {app}: {ours:?}"
                    );
                    named.map(|_| ()).ok_or_else(|| format!("{samples:?}"))
                },
            );
            stop_and_remove(c, &pod);
        }
    });
}
