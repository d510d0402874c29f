//! A pod made through containerd's Sandbox API (`sandboxer = "shim"`): created and booted on
//! its own, before any container and without a pause container, and kept until containerd
//! stops it, however many containers come and go.
//!
//! In place of pause, the guest starts a pod init (agent `pod`) whose PID, IPC and UTS
//! namespaces the containers join, and keeps the pod's hostname, hosts, resolv.conf and
//! /dev/shm, which every container binds from the guest: CRI leaves them to the sandboxer.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use hako_protocol::{sysctl, PodInit, GUEST_POD_DIR, MAX_POD_FILE};
use oci_spec::runtime::{LinuxNamespaceType, Mount, MountBuilder, Spec};

use super::pod::{Pod, Running};
use super::sizing::{self, Needs};
use super::spec::SpecError;
use super::{Sandbox, SandboxError};
use crate::config::Config;
use crate::ids::validate;
use crate::net::{NetError, NetworkMode};

/// CRI's default /dev/shm for a pod.
const POD_SHM_SIZE: u64 = 64 * 1024 * 1024;
/// Where a pod without a DNS config gets its resolv.conf, and every pod its hosts: as CRI does.
const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";
const HOST_HOSTS: &str = "/etc/hosts";

/// What containerd's CreateSandbox says of the pod.
#[derive(Clone)]
pub struct StandalonePod<'a> {
    pub id: &'a str,
    /// The pod's network namespace; empty for a pod on the host's network.
    pub netns: &'a str,
    pub hostname: &'a str,
    /// The pod's resolv.conf from its DNS config; `None` takes the host's, as CRI does.
    pub resolv_conf: Option<String>,
    pub annotations: &'a std::collections::BTreeMap<String, String>,
    pub cgroup_parent: &'a str,
    pub sysctls: &'a std::collections::BTreeMap<String, String>,
    pub host_pid: bool,
    pub host_ipc: bool,
    /// What its containers need together (kubelet's sum of their limits).
    pub needs: Needs,
}

impl Pod {
    /// CreateSandbox: checks the pod, makes its sandbox (dir, share, cgroup) and chooses its
    /// network. Nothing runs until `start_standalone`. On error nothing is left.
    pub async fn create_standalone(&self, pod: &StandalonePod<'_>) -> Result<(), SandboxError> {
        validate("namespace", &self.namespace)?;
        validate("sandbox id", pod.id)?;
        if pod.netns.is_empty() {
            return Err(NetError::HostNetwork.into());
        }
        if pod.host_pid {
            return Err(SpecError::HostPid.into());
        }
        if pod.host_ipc {
            return Err(SpecError::HostIpc.into());
        }
        let all = sysctl::Namespaces {
            ipc: true,
            uts: true,
            net: true,
        };
        for (name, value) in pod.sysctls {
            sysctl::check(name, value, all).map_err(SpecError::from)?;
        }
        let init = PodInit {
            sysctls: pod.sysctls.clone().into_iter().collect(),
            hosts: read_capped(Path::new(HOST_HOSTS)),
            resolv_conf: match &pod.resolv_conf {
                Some(text) => text.clone().into_bytes(),
                None => read_capped(Path::new(HOST_RESOLV_CONF)),
            },
            shm_size: POD_SHM_SIZE,
            ..Default::default()
        };
        if init.resolv_conf.len() > MAX_POD_FILE {
            return Err(SpecError::PodFile("resolv.conf").into());
        }
        let mut slot = self.sandbox.lock().await;
        if slot.is_some() {
            return Err(SandboxError::Exists(pod.id.to_string()));
        }
        let loaded = Config::load(None)?;
        let mut config = loaded.config.with_pod_annotations(pod.annotations.iter())?;
        sizing::grow_towards(&mut config.hypervisor, &pod.needs);
        let cgroups_path = cgroups_path(pod.cgroup_parent, pod.id);
        let mut sandbox =
            Sandbox::prepare(&config, &self.namespace, pod.id, cgroups_path.as_deref()).await?;
        let netns = NetworkMode::Namespace(PathBuf::from(pod.netns));
        if let Err(e) = sandbox.choose_network(&netns, true) {
            if let Err(cleanup) = sandbox.shutdown().await {
                log::error!("cleaning up after a failed create: {cleanup}");
            }
            return Err(e);
        }
        sandbox.pod_init = Some(init);
        sandbox.pod_hostname = pod.hostname.to_string();
        *slot = Some(sandbox);
        self.standalone.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// StartSandbox: boots the VM, whose agent starts the pod init. On error the sandbox is
    /// torn down.
    pub async fn start_standalone(&self) -> Result<Running, SandboxError> {
        let started = Instant::now();
        let mut slot = self.sandbox.lock().await;
        let Some(sandbox) = slot.as_mut() else {
            return Err(SandboxError::NotBooted);
        };
        if let Some(running) = self.running() {
            return Ok(running);
        }
        let hostname = sandbox.pod_hostname.clone();
        let booted = match self.boot.boot(sandbox, &hostname).await {
            Ok(()) => self.follow_network(sandbox),
            Err(e) => Err(e),
        };
        let agent = booted.and_then(|()| sandbox.agent().ok_or(SandboxError::NotBooted));
        let agent = match agent {
            Ok(agent) => agent,
            Err(e) => {
                if let Some(mut sandbox) = slot.take() {
                    if let Err(cleanup) = sandbox.shutdown().await {
                        log::error!("cleaning up after a failed start: {cleanup}");
                    }
                }
                return Err(e);
            }
        };
        let running = Running {
            agent,
            metrics: sandbox.metrics.clone(),
            vm_exit: sandbox.vm_exit(),
            vmm_pid: sandbox.vmm_pid(),
        };
        self.init_pid.store(sandbox.pod_init_pid, Ordering::SeqCst);
        self.set_running(Some(running.clone()));
        sandbox.metrics.observe_start(&sandbox.timings);
        log::info!(
            "sandbox {} start phases: {} (started in {} ms)",
            sandbox.id,
            sandbox.timings.summary(),
            started.elapsed().as_millis()
        );
        Ok(running)
    }

    /// Whether the pod was made through the Sandbox API: then it outlives its containers.
    pub fn is_standalone(&self) -> bool {
        self.standalone.load(Ordering::SeqCst)
    }
}

/// The pod's cgroup, as CRI would name the pause container's: systemd's `slice:prefix:name`
/// under a `.slice` parent, else a directory below the parent.
fn cgroups_path(parent: &str, id: &str) -> Option<String> {
    if parent.is_empty() {
        None
    } else if parent.ends_with(".slice") {
        Some(format!("{parent}:cri-containerd:{id}"))
    } else {
        Some(format!("{}/{id}", parent.trim_end_matches('/')))
    }
}

/// A host file the pod gets a copy of, at most `MAX_POD_FILE` bytes; empty if unreadable.
fn read_capped(path: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    if let Ok(file) = std::fs::File::open(path) {
        let _ = file.take(MAX_POD_FILE as u64).read_to_end(&mut bytes);
    }
    bytes
}

/// Binds the pod's files into a container's guest spec, where the spec has nothing of its own
/// there: /etc/hostname, /etc/hosts and /etc/resolv.conf (read-only with a read-only root, as
/// CRI mounts them), and the pod's /dev/shm when the container shares the pod's IPC namespace.
/// Returns the destinations that are files (their mount points are files, not directories).
pub fn bind_pod_files(guest: &mut Spec, original: &Spec) -> Vec<PathBuf> {
    let readonly = original
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    let pod_ipc = original
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|n| {
            n.iter()
                .any(|n| n.typ() == LinuxNamespaceType::Ipc && n.path().is_some())
        });
    let mut mounts = guest.mounts().clone().unwrap_or_default();
    let has =
        |mounts: &[Mount], dest: &str| mounts.iter().any(|m| m.destination() == Path::new(dest));
    let mut files = Vec::new();
    for (name, dest) in [
        ("hostname", "/etc/hostname"),
        ("hosts", "/etc/hosts"),
        ("resolv.conf", "/etc/resolv.conf"),
    ] {
        if has(&mounts, dest) {
            continue;
        }
        let mut options = vec!["rbind".to_string()];
        options.push(if readonly { "ro" } else { "rw" }.to_string());
        mounts.push(guest_bind(name, dest, options));
        files.push(PathBuf::from(dest));
    }
    if pod_ipc {
        // The spec's own /dev/shm (a tmpfs of the container's) gives way to the pod's.
        mounts.retain(|m| m.destination() != Path::new("/dev/shm"));
        mounts.push(guest_bind(
            "shm",
            "/dev/shm",
            vec!["rbind".into(), "rw".into()],
        ));
    }
    guest.set_mounts(Some(mounts));
    files
}

fn guest_bind(name: &str, dest: &str, options: Vec<String>) -> Mount {
    let mut mount = Mount::default();
    if let Ok(built) = MountBuilder::default()
        .destination(dest)
        .typ("bind")
        .source(Path::new(GUEST_POD_DIR).join(name))
        .options(options)
        .build()
    {
        mount = built;
    }
    mount
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[tokio::test]
    async fn what_a_vm_cannot_share_is_refused_before_anything_is_made() {
        let pod = Pod::new("default");
        let none = BTreeMap::new();
        let bad_sysctl = BTreeMap::from([("kernel.panic".to_string(), "1".to_string())]);
        let base = StandalonePod {
            id: "p1",
            netns: "/run/netns/p1",
            hostname: "p1",
            resolv_conf: None,
            annotations: &none,
            cgroup_parent: "",
            sysctls: &none,
            host_pid: false,
            host_ipc: false,
            needs: Needs::default(),
        };
        let cases = [
            (
                StandalonePod {
                    netns: "",
                    ..base.clone()
                },
                "host networking is not possible",
            ),
            (
                StandalonePod {
                    host_pid: true,
                    ..base.clone()
                },
                "hostPID",
            ),
            (
                StandalonePod {
                    host_ipc: true,
                    ..base.clone()
                },
                "hostIPC",
            ),
            (
                StandalonePod {
                    sysctls: &bad_sysctl,
                    ..base.clone()
                },
                "kernel.panic",
            ),
            (
                StandalonePod {
                    id: "../p1",
                    ..base.clone()
                },
                "sandbox id",
            ),
        ];
        for (request, reason) in cases {
            let err = pod.create_standalone(&request).await.expect_err(reason);
            assert!(err.to_string().contains(reason), "{reason}: {err}");
        }
        assert!(pod.is_empty().await);
        assert!(!pod.is_standalone());
    }

    #[test]
    fn the_pod_cgroup_is_named_as_cri_names_the_pause_containers() {
        assert_eq!(cgroups_path("", "p"), None);
        assert_eq!(
            cgroups_path("/kubepods/pod1/", "p").as_deref(),
            Some("/kubepods/pod1/p")
        );
        assert_eq!(
            cgroups_path("kubepods-pod1.slice", "p").as_deref(),
            Some("kubepods-pod1.slice:cri-containerd:p")
        );
    }

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).expect("spec")
    }

    #[test]
    fn containers_bind_the_pods_files_unless_they_bring_their_own() {
        let original = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs", "readonly": true},
            "mounts": [
                {"destination": "/etc/hosts", "type": "bind", "source": "/x", "options": ["rbind"]},
                {"destination": "/dev/shm", "type": "tmpfs", "source": "shm"}
            ],
            "linux": {"namespaces": [{"type": "ipc", "path": "/proc/9/ns/ipc"}]}
        }));
        let mut guest = original.clone();
        let files = bind_pod_files(&mut guest, &original);
        assert_eq!(
            files,
            [
                PathBuf::from("/etc/hostname"),
                PathBuf::from("/etc/resolv.conf")
            ]
        );
        let mounts = guest.mounts().clone().expect("mounts");
        let at = |dest: &str| {
            mounts
                .iter()
                .filter(|m| m.destination() == Path::new(dest))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            at("/etc/hosts")[0].source().as_deref(),
            Some(Path::new("/x"))
        );
        let resolv = at("/etc/resolv.conf");
        assert_eq!(
            resolv[0].source().as_deref(),
            Some(Path::new(GUEST_POD_DIR).join("resolv.conf").as_path())
        );
        assert!(resolv[0].options().iter().flatten().any(|o| o == "ro"));
        let shm = at("/dev/shm");
        assert_eq!(shm.len(), 1);
        assert_eq!(shm[0].typ().as_deref(), Some("bind"));
    }

    #[test]
    fn a_container_in_its_own_ipc_namespace_keeps_its_own_shm() {
        let original = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [{"destination": "/dev/shm", "type": "tmpfs", "source": "shm"}],
            "linux": {"namespaces": [{"type": "ipc"}]}
        }));
        let mut guest = original.clone();
        bind_pod_files(&mut guest, &original);
        let mounts = guest.mounts().clone().expect("mounts");
        let shm: Vec<_> = mounts
            .iter()
            .filter(|m| m.destination() == Path::new("/dev/shm"))
            .collect();
        assert_eq!(shm[0].typ().as_deref(), Some("tmpfs"));
        assert!(mounts
            .iter()
            .any(|m| m.destination() == Path::new("/etc/hosts")
                && m.options().iter().flatten().any(|o| o == "rw")));
    }
}
