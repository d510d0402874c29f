//! containerd's CRI plugin, driven the way kubelet drives it: a private containerd with CRI on
//! and a `hako` runtime handler, and a CRI client (gRPC over containerd's unix socket).
//!
//! Pods get their network from the CNI plugins of Debian's `containernetworking-plugins`
//! (/usr/lib/cni): a bridge with host-local addresses on a private subnet. containerd runs in a
//! network namespace the harness makes, which plays the node: the bridge and the node ends of
//! the pods' veths live there and go with it. There is no registry: the images, the pod's
//! sandbox ("pause") image among them, are imported with `ctr -n k8s.io image import`.

#![allow(clippy::unwrap_used)] // Test harness: a failed step should fail the test loudly.

use std::collections::HashMap;
use std::fs;
use std::future::Future;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Status;

use crate::{
    assert_host_unchanged, assert_no_leaks, busybox_archive, containerd_versions, reap_leftovers,
    remove_daemon_leftovers, repo_root, run_with_timeout, stop_child, HostState, Run,
};

/// The runtime handler (kubelet's RuntimeClass handler) the CRI config maps to hako.
pub const HANDLER: &str = "hako";
/// The handler for hako through containerd 2.x's Sandbox API (`sandboxer = "shim"`): the pod
/// is the VM itself, with no pause container.
pub const SANDBOX_HANDLER: &str = "hako-sandbox";
/// The sandbox image: busybox sleeping until the pod is stopped.
pub const PAUSE_IMAGE: &str = "hako.local/pause:1";
/// The containerd namespace CRI keeps its images, containers and pods in.
pub const K8S_NAMESPACE: &str = "k8s.io";
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
pub const POD_SUBNET: &str = "10.89.0.0/24";
/// The bridge's address (the plugin's `isGateway`): the pods' default gateway, on the node.
pub const POD_GATEWAY: &str = "10.89.0.1";
/// Where libcni caches each attachment's result; CNI DEL removes the entry.
pub const CNI_RESULTS_DIR: &str = "/var/lib/cni/results";
/// Kubelet's namespace for the test pods' metadata.
pub const POD_NAMESPACE: &str = "default";
/// A bound on every CRI call: RunPodSandbox boots a VM, under TCG too.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// What ExecSync gives the command, in seconds (CRI's own timeout).
const EXEC_TIMEOUT_SECS: i64 = 60;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The pause image's OCI archive, built once per test binary.
pub fn pause_archive() -> &'static Path {
    static ARCHIVE: OnceLock<PathBuf> = OnceLock::new();
    ARCHIVE.get_or_init(|| {
        let out = repo_root().join("target/e2e-pause.tar");
        let status = Command::new(repo_root().join("tests/images/busybox-image.sh"))
            .arg(&out)
            .arg(PAUSE_IMAGE)
            // The sandbox container only holds the pod's namespaces; CRI kills it at
            // StopPodSandbox.
            .env("IMAGE_CMD", r#"["sleep","inf"]"#)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "building the pause image failed");
        out
    })
}

/// A CRI client on one socket. Each call blocks (the tests are synchronous) and is bounded by
/// CALL_TIMEOUT, so a hang fails the test instead of stalling the suite.
pub struct CriClient {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

impl CriClient {
    /// A client for the CRI socket at `socket`; it connects on the first call.
    pub fn new(socket: &Path) -> CriClient {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let socket = socket.to_path_buf();
        let channel = {
            // The channel's worker task is spawned on this runtime.
            let _entered = rt.enter();
            // gRPC needs an http URI; the connector ignores it and dials the socket.
            Endpoint::from_static("http://localhost").connect_with_connector_lazy(
                tower::service_fn(move |_: Uri| {
                    let socket = socket.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(socket).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                }),
            )
        };
        CriClient {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        }
    }

    fn call<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, Status> {
        self.rt.block_on(async {
            match tokio::time::timeout(CALL_TIMEOUT, call).await {
                Ok(answer) => answer.map(tonic::Response::into_inner),
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "{what}: no answer within {CALL_TIMEOUT:?}"
                ))),
            }
        })
    }

    pub fn version(&self) -> Result<cri::VersionResponse, Status> {
        let mut c = self.runtime.clone();
        let req = cri::VersionRequest {
            version: "v1".to_string(),
        };
        self.call("Version", async move { c.version(req).await })
    }

    /// Status with `verbose`: containerd adds its CRI configuration under `info["config"]`.
    pub fn status(&self, verbose: bool) -> Result<cri::StatusResponse, Status> {
        let mut c = self.runtime.clone();
        let req = cri::StatusRequest { verbose };
        self.call("Status", async move { c.status(req).await })
    }

    /// The image `image` names (a reference or an id), if CRI has it.
    pub fn image_status(&self, image: &str) -> Result<Option<cri::Image>, Status> {
        let mut c = self.images.clone();
        let req = cri::ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: false,
        };
        self.call("ImageStatus", async move { c.image_status(req).await })
            .map(|r| r.image)
    }

    pub fn list_images(&self) -> Result<Vec<cri::Image>, Status> {
        let mut c = self.images.clone();
        let req = cri::ListImagesRequest { filter: None };
        self.call("ListImages", async move { c.list_images(req).await })
            .map(|r| r.images)
    }

    /// RunPodSandbox with runtime handler `handler`; returns the pod's id.
    pub fn run_pod_sandbox(
        &self,
        config: &cri::PodSandboxConfig,
        handler: &str,
    ) -> Result<String, Status> {
        let mut c = self.runtime.clone();
        let req = cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.to_string(),
        };
        self.call("RunPodSandbox", async move { c.run_pod_sandbox(req).await })
            .map(|r| r.pod_sandbox_id)
    }

    /// PodSandboxStatus, verbose: containerd's details are JSON under `info["info"]`.
    pub fn pod_sandbox_status(&self, id: &str) -> Result<cri::PodSandboxStatusResponse, Status> {
        let mut c = self.runtime.clone();
        let req = cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose: true,
        };
        self.call("PodSandboxStatus", async move {
            c.pod_sandbox_status(req).await
        })
    }

    pub fn list_pod_sandbox(&self) -> Result<Vec<cri::PodSandbox>, Status> {
        let mut c = self.runtime.clone();
        let req = cri::ListPodSandboxRequest { filter: None };
        self.call(
            "ListPodSandbox",
            async move { c.list_pod_sandbox(req).await },
        )
        .map(|r| r.items)
    }

    pub fn stop_pod_sandbox(&self, id: &str) -> Result<(), Status> {
        let mut c = self.runtime.clone();
        let req = cri::StopPodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        self.call(
            "StopPodSandbox",
            async move { c.stop_pod_sandbox(req).await },
        )
        .map(drop)
    }

    pub fn remove_pod_sandbox(&self, id: &str) -> Result<(), Status> {
        let mut c = self.runtime.clone();
        let req = cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        self.call("RemovePodSandbox", async move {
            c.remove_pod_sandbox(req).await
        })
        .map(drop)
    }

    /// CreateContainer in pod `pod`, which was run with `sandbox_config` (kubelet passes it
    /// again); returns the container's id.
    pub fn create_container(
        &self,
        pod: &str,
        config: &cri::ContainerConfig,
        sandbox_config: &cri::PodSandboxConfig,
    ) -> Result<String, Status> {
        let mut c = self.runtime.clone();
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: pod.to_string(),
            config: Some(config.clone()),
            sandbox_config: Some(sandbox_config.clone()),
        };
        self.call(
            "CreateContainer",
            async move { c.create_container(req).await },
        )
        .map(|r| r.container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<(), Status> {
        let mut c = self.runtime.clone();
        let req = cri::StartContainerRequest {
            container_id: id.to_string(),
        };
        self.call(
            "StartContainer",
            async move { c.start_container(req).await },
        )
        .map(drop)
    }

    pub fn remove_container(&self, id: &str) -> Result<(), Status> {
        let mut c = self.runtime.clone();
        let req = cri::RemoveContainerRequest {
            container_id: id.to_string(),
        };
        self.call(
            "RemoveContainer",
            async move { c.remove_container(req).await },
        )
        .map(drop)
    }

    pub fn container_status(&self, id: &str) -> Result<cri::ContainerStatus, Status> {
        let mut c = self.runtime.clone();
        let req = cri::ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: false,
        };
        self.call(
            "ContainerStatus",
            async move { c.container_status(req).await },
        )
        .and_then(|r| {
            r.status
                .ok_or_else(|| Status::not_found(format!("no status for container {id}")))
        })
    }

    pub fn list_containers(&self) -> Result<Vec<cri::Container>, Status> {
        let mut c = self.runtime.clone();
        let req = cri::ListContainersRequest { filter: None };
        self.call(
            "ListContainers",
            async move { c.list_containers(req).await },
        )
        .map(|r| r.containers)
    }

    /// ExecSync of `cmd` in container `id`: what it printed and its exit code.
    pub fn exec_sync(&self, id: &str, cmd: &[&str]) -> Result<Run, Status> {
        let mut c = self.runtime.clone();
        let req = cri::ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: EXEC_TIMEOUT_SECS,
        };
        self.call("ExecSync", async move { c.exec_sync(req).await })
            .map(|r| Run {
                code: r.exit_code,
                stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
            })
    }

    /// PortForward for `ports` of pod `pod`: the streaming URL to connect to.
    pub fn port_forward(&self, pod: &str, ports: &[i32]) -> Result<String, Status> {
        let mut c = self.runtime.clone();
        let req = cri::PortForwardRequest {
            pod_sandbox_id: pod.to_string(),
            port: ports.to_vec(),
        };
        self.call("PortForward", async move { c.port_forward(req).await })
            .map(|r| r.url)
    }

    pub fn container_stats(&self, id: &str) -> Result<cri::ContainerStats, Status> {
        let mut c = self.runtime.clone();
        let req = cri::ContainerStatsRequest {
            container_id: id.to_string(),
        };
        self.call(
            "ContainerStats",
            async move { c.container_stats(req).await },
        )
        .and_then(|r| {
            r.stats
                .ok_or_else(|| Status::not_found(format!("no stats for container {id}")))
        })
    }
}

fn image_spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    }
}

/// A pod's sandbox config as kubelet builds it for a plain pod: its own network and ipc
/// namespaces shared by its containers, a pid namespace per container, logs under
/// `log_directory`. No cgroup parent: the pod's limits live in the guest.
pub fn pod_sandbox_config(name: &str, uid: &str, log_directory: &Path) -> cri::PodSandboxConfig {
    let labels = HashMap::from([
        ("io.kubernetes.pod.name".to_string(), name.to_string()),
        (
            "io.kubernetes.pod.namespace".to_string(),
            POD_NAMESPACE.to_string(),
        ),
        ("io.kubernetes.pod.uid".to_string(), uid.to_string()),
    ]);
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.to_string(),
            uid: uid.to_string(),
            namespace: POD_NAMESPACE.to_string(),
            attempt: 0,
        }),
        hostname: name.to_string(),
        log_directory: log_directory.display().to_string(),
        labels,
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(pod_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn pod_namespaces() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Pod as i32,
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// A container's config as kubelet builds it: the image by id (kubelet resolves the reference
/// first), `args` over the image's command, the log at `<name>/0.log` under the pod's log
/// directory, and `memory_limit` (bytes, 0 for none) as its only resource.
pub fn container_config(
    pod: &cri::PodSandboxConfig,
    name: &str,
    image_id: &str,
    args: &[&str],
    memory_limit: i64,
) -> cri::ContainerConfig {
    let mut labels = pod.labels.clone();
    labels.insert("io.kubernetes.container.name".to_string(), name.to_string());
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(image_spec(image_id)),
        args: args.iter().map(|s| s.to_string()).collect(),
        labels,
        log_path: format!("{name}/0.log"),
        linux: Some(cri::LinuxContainerConfig {
            resources: (memory_limit > 0).then(|| cri::LinuxContainerResources {
                memory_limit_in_bytes: memory_limit,
                ..Default::default()
            }),
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(pod_namespaces()),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

/// What a caller adds to `CriContainerd`'s configuration (`start_with`).
#[derive(Debug, Default)]
pub struct ConfigExtra {
    /// Lines for the CRI runtime plugin's own table.
    pub keys: String,
    /// Whole tables, appended.
    pub tables: String,
    /// containerd's environment, and so its shims' (`HakoConfig::env`).
    pub env: Vec<(String, String)>,
}

/// A private containerd with CRI, in a network namespace of its own (the node), stopped on
/// drop after every pod it still has is stopped and removed.
pub struct CriContainerd {
    pub version: String,
    /// The network namespace containerd, the CNI bridge and the pods' node-side veths are in.
    pub netns: String,
    /// The CNI network's name and its bridge's.
    pub network: String,
    pub bridge: String,
    pub client: CriClient,
    bin: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
}

impl CriContainerd {
    /// Starts containerd `install` with CRI and imports the busybox and pause images into
    /// `k8s.io`; returns once CRI reports the runtime and the network ready.
    pub fn start(install: &Path) -> CriContainerd {
        Self::start_with(install, &ConfigExtra::default())
    }

    /// `start`, with `extra` in containerd's configuration: `keys` in the CRI runtime plugin's
    /// table, `tables` after it (the benchmarks add runc and gVisor handlers, and restrict
    /// oom_score_adj where the host does not let runc lower it).
    pub fn start_with(install: &Path, extra: &ConfigExtra) -> CriContainerd {
        let version = install.file_name().unwrap().to_string_lossy().into_owned();
        let major: u32 = version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("{}: no version in the name", install.display()));
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("hako-cri-{pid}-{n}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("cni")).unwrap();
        let network = format!("hako-cri-{pid}-{n}");
        // Interface names have at most 15 characters.
        let bridge = format!("hkcri{}-{n}", pid % 100_000);
        let netns = format!("hkt-cri-{}-{n}", pid % 100_000);
        fs::write(
            dir.join("cni/10-hako-test.conflist"),
            cni_conflist(&network, &bridge, &dir.join("cni-ipam")),
        )
        .unwrap();
        let config = containerd_config(major, &dir).replace(
            "  netns_mounts_under_state_dir = true\n",
            &format!("  netns_mounts_under_state_dir = true\n{}", extra.keys),
        ) + &extra.tables;
        fs::write(dir.join("config.toml"), config).unwrap();
        must(&format!(
            "ip netns add {netns} && ip -n {netns} link set lo up"
        ));
        let bin = install.join("usr/bin");
        let mut containerd = CriContainerd {
            version,
            netns,
            network,
            bridge,
            client: CriClient::new(&dir.join("containerd.sock")),
            bin,
            dir,
            child: None,
        };
        let log = fs::File::create(containerd.dir.join("containerd.log")).unwrap();
        // nsenter, not `ip netns exec`: that would also give containerd a mount namespace of
        // its own, and the shim and the CNI plugins must see the host's mounts.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", containerd.netns))
            .arg(containerd.bin.join("containerd"))
            .arg("--config")
            .arg(containerd.dir.join("config.toml"))
            .env(
                "PATH",
                format!(
                    "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin:{}",
                    containerd.bin.display()
                ),
            )
            .envs(extra.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        containerd.child = Some(child);
        containerd.wait_ready();
        for archive in [busybox_archive(), pause_archive()] {
            let archive = archive.display().to_string();
            let r = containerd.ctr(&["-n", K8S_NAMESPACE, "image", "import", &archive]);
            assert_eq!(r.code, 0, "image import {archive}: {r:?}");
        }
        containerd.wait_cri_ready();
        containerd
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// The handlers this containerd maps to hako: both ways of making a pod on 2.x (a pause
    /// container, the Sandbox API), the pause container on 1.7.
    pub fn handlers(&self) -> &'static [&'static str] {
        if self.version.starts_with("1.") {
            &[HANDLER]
        } else {
            &[HANDLER, SANDBOX_HANDLER]
        }
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            let up = fs::metadata(self.socket())
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false)
                && self.ctr(&["version"]).code == 0;
            if up {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "containerd {} exited with {status}: {}",
                    self.version,
                    self.log()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "containerd {} did not come up: {}",
                self.version,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (bounded) for CRI's RuntimeReady and NetworkReady: CRI loads the CNI config
    /// from its directory on its own schedule.
    fn wait_cri_ready(&self) {
        let started = Instant::now();
        loop {
            let status = self.client.status(false);
            let ready = |kind: &str| {
                status.as_ref().is_ok_and(|s| {
                    s.status
                        .as_ref()
                        .is_some_and(|s| s.conditions.iter().any(|c| c.r#type == kind && c.status))
                })
            };
            // containerd 2.x's CRI learns of imported images from events, a moment later.
            let images_seen = || {
                let tags: Vec<String> = self
                    .client
                    .list_images()
                    .unwrap_or_default()
                    .into_iter()
                    .flat_map(|i| i.repo_tags)
                    .collect();
                [crate::IMAGE, PAUSE_IMAGE]
                    .iter()
                    .all(|image| tags.iter().any(|t| t == image))
            };
            if ready("RuntimeReady") && ready("NetworkReady") && images_seen() {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "CRI of containerd {} not ready (or without the imported images): {status:?}\n{}",
                self.version,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr <args>` against this containerd.
    pub fn ctr(&self, args: &[&str]) -> Run {
        let mut cmd = Command::new(self.bin.join("ctr"));
        cmd.arg("--address").arg(self.socket()).args(args);
        run_with_timeout(cmd, None, Duration::from_secs(120))
    }

    /// A shell command in the node's network namespace.
    pub fn on_node(&self, script: &str) -> Run {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns))
            .args(["sh", "-c", script]);
        run_with_timeout(cmd, None, Duration::from_secs(60))
    }

    /// Names of the node's veths (the node ends of the pods' interfaces).
    pub fn node_veths(&self) -> Vec<String> {
        let r = self.on_node("ip -o link show type veth");
        assert_eq!(r.code, 0, "{r:?}");
        r.stdout
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|name| {
                name.trim()
                    .split('@')
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    }

    /// A fresh log directory for a pod, as kubelet makes one (`<namespace>_<name>_<uid>`),
    /// with a directory for each of `containers`.
    pub fn pod_log_directory(&self, name: &str, uid: &str, containers: &[&str]) -> PathBuf {
        let dir = self
            .dir
            .join("pods")
            .join(format!("{POD_NAMESPACE}_{name}_{uid}"));
        for c in containers {
            fs::create_dir_all(dir.join(c)).unwrap();
        }
        dir
    }

    /// host-local's record of the addresses it handed out on this network.
    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.join("cni-ipam").join(&self.network)
    }

    /// Best-effort cleanup: every pod goes, as kubelet would remove it, so no VM outlives
    /// the test.
    fn remove_all_pods(&self) {
        let Ok(pods) = self.client.list_pod_sandbox() else {
            return;
        };
        for pod in pods {
            let _ = self.client.stop_pod_sandbox(&pod.id);
            let _ = self.client.remove_pod_sandbox(&pod.id);
        }
    }
}

impl Drop for CriContainerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.remove_all_pods();
        }
        stop_child(self.child.take());
        // The bridge goes with the namespace.
        remove_daemon_leftovers(&self.dir, Some(&self.netns));
    }
}

/// Runs `test` against every containerd version, each on a fresh CRI containerd, with the leak
/// check before and after; afterwards the node's namespace (and with it the bridge) is gone.
pub fn for_each_cri_containerd(test: impl Fn(&CriContainerd)) {
    for_each_cri_containerd_with(&ConfigExtra::default(), test)
}

/// `for_each_cri_containerd`, each containerd started with `extra`.
pub fn for_each_cri_containerd_with(extra: &ConfigExtra, test: impl Fn(&CriContainerd)) {
    for install in containerd_versions() {
        assert_no_leaks("before the test");
        let host = HostState::now();
        let containerd = CriContainerd::start_with(&install, extra);
        eprintln!("--- containerd {} (CRI)", containerd.version);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| test(&containerd)));
        if outcome.is_err() {
            // The shim logs through containerd: its view of the failure is here.
            let log = containerd.log();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!(
                "containerd {} log, last lines:\n{}",
                containerd.version,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        let netns = containerd.netns.clone();
        drop(containerd);
        if let Err(panic) = outcome {
            reap_leftovers();
            std::panic::resume_unwind(panic);
        }
        assert_no_leaks(&format!("containerd {} (CRI)", install.display()));
        assert_host_unchanged(&host, &format!("containerd {} (CRI)", install.display()));
        assert!(
            !Path::new("/run/netns").join(&netns).exists(),
            "network namespace {netns} left behind"
        );
    }
}

/// containerd's configuration: root, state and sockets under `dir`; CRI with the `hako`
/// handler, the local pause image, and CNI from /usr/lib/cni with its config in `dir/cni`.
/// containerd 1.7 reads version 2; 2.x reads version 3, where CRI's settings are split between
/// its images and runtime plugins (it would migrate a version 2 file, but 2.x users write 3).
fn containerd_config(major: u32, dir: &Path) -> String {
    let common = format!(
        r#"root = "{d}/root"
state = "{d}/state"

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
"#,
        d = dir.display()
    );
    // The runtime entry is configs/containerd-config-v{2,3}.toml's without ConfigPath (the
    // installed defaults apply). In 1.7 the runtimes table replaces containerd's (runc goes),
    // so the default runtime is hako; the test still names its handler, as kubelet does for a
    // RuntimeClass.
    // NRI (on by default in 2.x) would listen on /var/run/nri/nri.sock, which every
    // containerd on the machine shares. AppArmor and SELinux would confine host processes
    // that do not exist: the containers run in the VM. Pod network namespaces go under the
    // state dir rather than /var/run/netns.
    if major < 2 {
        format!(
            r#"version = 2
{common}
[plugins."io.containerd.nri.v1.nri"]
  disable = true

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  disable_apparmor = true
  enable_selinux = false
  netns_mounts_under_state_dir = true

  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "{HANDLER}"

  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{HANDLER}]
    runtime_type = "{runtime}"
    pod_annotations = ["io.hako.*"]

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{d}/cni"
"#,
            runtime = crate::RUNTIME,
            d = dir.display()
        )
    } else {
        format!(
            r#"version = 3
{common}
[plugins."io.containerd.nri.v1.nri"]
  disable = true

[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "{PAUSE_IMAGE}"

[plugins."io.containerd.cri.v1.runtime"]
  disable_apparmor = true
  enable_selinux = false
  netns_mounts_under_state_dir = true

  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "{HANDLER}"

  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.{HANDLER}]
    runtime_type = "{runtime}"
    sandboxer = "podsandbox"
    pod_annotations = ["io.hako.*"]

  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.{SANDBOX_HANDLER}]
    runtime_type = "{runtime}"
    sandboxer = "shim"

  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{CNI_BIN_DIR}"]
    conf_dir = "{d}/cni"
"#,
            runtime = crate::RUNTIME,
            d = dir.display()
        )
    }
}

/// The pods' network: a bridge on the node with the gateway address, host-local addresses
/// from POD_SUBNET recorded under `ipam_dir` (not /var/lib/cni), no masquerading (nothing is
/// routed off the node), and `portmap` for the pods' hostPort mappings (iptables DNAT on the
/// node). containerd adds the `loopback` plugin for `lo` itself.
fn cni_conflist(network: &str, bridge: &str, ipam_dir: &Path) -> String {
    format!(
        r#"{{
  "cniVersion": "1.0.0",
  "name": "{network}",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "{bridge}",
      "isGateway": true,
      "ipMasq": false,
      "ipam": {{
        "type": "host-local",
        "ranges": [[{{"subnet": "{POD_SUBNET}", "gateway": "{POD_GATEWAY}"}}]],
        "routes": [{{"dst": "0.0.0.0/0"}}],
        "dataDir": "{ipam}"
      }}
    }},
    {{
      "type": "portmap",
      "capabilities": {{"portMappings": true}}
    }}
  ]
}}
"#,
        ipam = ipam_dir.display()
    )
}

fn must(script: &str) {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script]);
    let r = run_with_timeout(cmd, None, Duration::from_secs(30));
    assert_eq!(r.code, 0, "{script}: {r:?}");
}
