//! Every file of a sandbox, by name: `<sandbox_root>/<namespace>/<sandbox id>/`.
//!
//! - `rw/` (the host writes here) and `ro/` (a read-only bind of `rw/`, a slave of it so later
//!   mounts under `rw/` appear; the share serves only `ro/`); `rw/<cid>/rootfs` and
//!   `rw/<cid>/mounts/<n>-<name>` per container; `staging/` for binds being made.
//! - `vmm/`, owned by the VMM's unprivileged user: the sockets the VMM and the vsock backend
//!   make (QMP or Cloud Hypervisor's API, the vhost-user vsock socket, the agent's hybrid-vsock
//!   socket) and the two the shim makes for them (the readiness port, the console).
//! - `fs.sock` (virtiofsd), logs (`console.log`, `vmm.log`, `virtiofsd.log`, `vsock.log`, each
//!   capped with a rotated `.1`), pid files, `net.json` (the pod network, for cleanup),
//!   `netns` (the pod's network namespace when the shim made it), `cgroup.json` (the pod's
//!   cgroup), `vmm-user` (the VMM's uid) and `metrics.sock` (the shim's metrics, root's alone:
//!   not under `vmm/`, which the VMM's user owns).

use std::path::{Path, PathBuf};

use super::SandboxError;
use crate::agent_client::ReadyListener;
use crate::ids::validate;
use crate::vmm::VmFiles;

/// Longest unix socket path the kernel takes (sun_path is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// The helpers' pid files, which `cleanup_on_disk` acts on when the shim is gone.
pub const PID_FILES: [&str; 4] = ["vmm.pid", "virtiofsd.pid", "vsock.pid", "template.pid"];
/// The logs `hako logs` prints, in the order they are worth reading.
pub const LOGS: [&str; 5] = [
    "console.log",
    "vmm.log",
    "virtiofsd.log",
    "vsock.log",
    "template.log",
];

/// The shim's metrics socket in a sandbox's directory.
pub const METRICS_SOCKET: &str = "metrics.sock";

/// The sandbox directories under `root`, in one namespace or in all: `<root>/<ns>/<id>`.
/// hako's own records under the root start with a dot and are not namespaces. The names are
/// not checked here; a caller that trusts them checks them with `ids::validate`.
pub fn sandbox_dirs(root: &Path, namespace: Option<&str>) -> Vec<PathBuf> {
    let namespaces: Vec<PathBuf> = match namespace {
        Some(ns) => vec![root.join(ns)],
        None => subdirs(root)
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect(),
    };
    namespaces.iter().flat_map(|ns| subdirs(ns)).collect()
}

/// The directories in `dir`; none if it cannot be read.
pub fn subdirs(dir: &Path) -> impl Iterator<Item = PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
}

/// Where everything of one sandbox lives.
#[derive(Debug, Clone)]
pub struct SandboxPaths {
    pub dir: PathBuf,
    pub rw: PathBuf,
    pub ro: PathBuf,
    pub staging: PathBuf,
    pub vmm_dir: PathBuf,
    pub fs_socket: PathBuf,
    pub agent_socket: PathBuf,
    pub console_log: PathBuf,
    pub virtiofsd_log: PathBuf,
    pub virtiofsd_pid: PathBuf,
    pub net_record: PathBuf,
    pub netns: PathBuf,
    pub cgroup_record: PathBuf,
    pub vmm_user_record: PathBuf,
    pub metrics_socket: PathBuf,
}

impl SandboxPaths {
    /// Checks the ids, then builds the paths and checks that every socket's path fits a
    /// socket address. Nothing is touched on disk.
    pub fn new(root: &Path, namespace: &str, sandbox_id: &str) -> Result<Self, SandboxError> {
        validate("namespace", namespace)?;
        validate("sandbox id", sandbox_id)?;
        let dir = root.join(namespace).join(sandbox_id);
        let vmm_dir = dir.join("vmm");
        let paths = Self {
            rw: dir.join("rw"),
            ro: dir.join("ro"),
            staging: dir.join("staging"),
            fs_socket: dir.join("fs.sock"),
            agent_socket: vmm_dir.join("agent.sock"),
            console_log: dir.join("console.log"),
            virtiofsd_log: dir.join("virtiofsd.log"),
            virtiofsd_pid: dir.join("virtiofsd.pid"),
            net_record: dir.join("net.json"),
            netns: dir.join("netns"),
            cgroup_record: dir.join("cgroup.json"),
            vmm_user_record: dir.join("vmm-user"),
            metrics_socket: dir.join(METRICS_SOCKET),
            vmm_dir,
            dir,
        };
        let files = paths.vm_files(0);
        for socket in [
            &paths.fs_socket,
            &paths.metrics_socket,
            &paths.ready_socket(),
            &files.control_socket,
            &files.vsock_socket,
            &files.console_socket,
        ] {
            if socket.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(SandboxError::PathTooLong(socket.clone()));
            }
        }
        Ok(paths)
    }

    pub fn container_dir(&self, container_id: &str) -> PathBuf {
        self.rw.join(container_id)
    }

    /// Where the guest's readiness connection (host vsock port 1025) arrives.
    pub fn ready_socket(&self) -> PathBuf {
        ReadyListener::path_for(&self.agent_socket, hako_protocol::READY_VSOCK_PORT)
    }

    /// The VM's files, for the hypervisor backends; logs capped at `log_max` bytes.
    pub fn vm_files(&self, log_max: u64) -> VmFiles {
        VmFiles {
            control_socket: self.vmm_dir.join("control.sock"),
            vsock_socket: self.vmm_dir.join("vhu.sock"),
            agent_socket: self.agent_socket.clone(),
            console_socket: self.vmm_dir.join("console.sock"),
            console_log: self.console_log.clone(),
            vmm_log: self.dir.join("vmm.log"),
            vmm_pid: self.dir.join("vmm.pid"),
            vsock_log: self.dir.join("vsock.log"),
            vsock_pid: self.dir.join("vsock.pid"),
            template_log: self.dir.join("template.log"),
            template_pid: self.dir.join("template.pid"),
            vmm_dir: self.vmm_dir.clone(),
            log_max,
            console_counts: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_before_paths_are_built() {
        let root = Path::new("/run/hako");
        assert!(SandboxPaths::new(root, "default", "../etc").is_err());
        assert!(SandboxPaths::new(root, "a/b", "x").is_err());
        let p = SandboxPaths::new(root, "default", "t1").expect("valid");
        assert_eq!(p.dir, Path::new("/run/hako/default/t1"));
        assert_eq!(p.container_dir("c"), Path::new("/run/hako/default/t1/rw/c"));
        assert_eq!(
            p.ready_socket(),
            Path::new("/run/hako/default/t1/vmm/agent.sock_1025")
        );
        assert_eq!(
            p.metrics_socket,
            Path::new("/run/hako/default/t1/metrics.sock")
        );
    }

    #[test]
    fn overlong_socket_paths_are_refused() {
        let err = SandboxPaths::new(Path::new("/run/hako"), &"n".repeat(60), &"s".repeat(60))
            .expect_err("too long");
        assert!(matches!(err, SandboxError::PathTooLong(_)), "{err}");
    }
}
