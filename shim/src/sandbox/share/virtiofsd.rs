//! The shared filesystem between host and guest: virtiofsd serving the sandbox's read-only
//! mirror over vhost-user.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Command;

use crate::config::VirtiofsConfig;
use crate::daemon::{resolve_binary, Daemon, DaemonError};

/// A daemon that serves one host directory to the guest through a vhost-user socket.
#[async_trait]
pub trait SharedFs: Send + Sync {
    /// The vhost-user socket the VMM connects to.
    fn socket(&self) -> &Path;
    /// The daemon process.
    fn process(&self) -> &Daemon;
    /// Returns once the daemon accepts the VMM's connection.
    async fn wait_ready(&self, timeout: Duration) -> Result<(), DaemonError> {
        self.process().wait_for_socket(self.socket(), timeout).await
    }
}

pub struct Virtiofsd {
    daemon: Daemon,
    socket: PathBuf,
}

/// Where the daemon writes (socket, log and pid file, all in the sandbox dir), and the pod
/// cgroups it joins.
pub struct FsPaths<'a> {
    pub socket: &'a Path,
    pub log: &'a Path,
    /// The log's cap in bytes.
    pub log_max: u64,
    pub pid_file: &'a Path,
    /// `cgroup.procs` files of the pod's cgroups.
    pub cgroups: &'a [PathBuf],
    /// The share's mount namespace, where the tree it serves is mounted.
    pub mountns: Option<std::os::fd::RawFd>,
}

impl Virtiofsd {
    /// Arguments for serving `shared_dir`. The namespace sandbox and `--seccomp kill` are
    /// virtiofsd's defaults; they are spelled out so a change of defaults cannot drop them.
    /// Without `allow_mknod` it also gives up CAP_MKNOD: the guest cannot make device nodes in
    /// read-write volumes (and the host binds them nodev anyway).
    pub fn args(config: &VirtiofsConfig, shared_dir: &Path, socket: &Path) -> Vec<String> {
        let mut args = vec![
            format!("--socket-path={}", socket.display()),
            format!("--shared-dir={}", shared_dir.display()),
            format!("--cache={}", config.cache.as_str()),
            "--sandbox=namespace".to_string(),
            "--seccomp=kill".to_string(),
            "--log-level=warn".to_string(),
        ];
        if !config.allow_mknod {
            args.push("--modcaps=-mknod".to_string());
        }
        args
    }

    pub fn spawn(
        config: &VirtiofsConfig,
        shared_dir: &Path,
        paths: FsPaths<'_>,
    ) -> Result<Self, DaemonError> {
        let binary = resolve_binary("virtiofsd", &config.path)?;
        let mut cmd = Command::new(binary);
        cmd.args(Self::args(config, shared_dir, paths.socket));
        // Only into the pod's cgroups: virtiofsd needs its capabilities to serve files as their
        // owners, and sandboxes itself in namespaces of its own.
        let cgroups = paths
            .cgroups
            .iter()
            .map(|procs| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(procs)
                    .map_err(|source| DaemonError::Spawn {
                        name: "virtiofsd".to_string(),
                        path: procs.display().to_string(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        crate::daemon::confine(
            &mut cmd,
            crate::daemon::Confinement {
                cgroups: cgroups
                    .iter()
                    .map(std::os::fd::AsRawFd::as_raw_fd)
                    .collect(),
                mountns: paths.mountns,
                ..Default::default()
            },
        );
        let daemon = Daemon::spawn("virtiofsd", cmd, paths.log, paths.log_max, paths.pid_file)?;
        drop(cgroups);
        Ok(Self {
            daemon,
            socket: paths.socket.to_path_buf(),
        })
    }
}

impl SharedFs for Virtiofsd {
    fn socket(&self) -> &Path {
        &self.socket
    }
    fn process(&self) -> &Daemon {
        &self.daemon
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheMode;

    #[test]
    fn serves_the_mirror_with_sandbox_and_seccomp() {
        let config = VirtiofsConfig {
            path: "virtiofsd".into(),
            cache: CacheMode::Never,
            allow_mknod: false,
        };
        let args = Virtiofsd::args(
            &config,
            Path::new("/run/hako/ns/s/ro"),
            Path::new("/s/fs.sock"),
        );
        assert!(args.contains(&"--shared-dir=/run/hako/ns/s/ro".to_string()));
        assert!(args.contains(&"--sandbox=namespace".to_string()));
        assert!(args.contains(&"--seccomp=kill".to_string()));
        assert!(args.contains(&"--cache=never".to_string()));
        assert!(args.contains(&"--modcaps=-mknod".to_string()));
        let mknod = VirtiofsConfig {
            allow_mknod: true,
            ..config
        };
        let args = Virtiofsd::args(&mknod, Path::new("/ro"), Path::new("/fs.sock"));
        assert!(!args.iter().any(|a| a.starts_with("--modcaps")), "{args:?}");
    }
}
