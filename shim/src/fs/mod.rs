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

/// Where the daemon writes: socket, log and pid file, all in the sandbox dir.
pub struct FsPaths<'a> {
    pub socket: &'a Path,
    pub log: &'a Path,
    pub pid_file: &'a Path,
}

impl Virtiofsd {
    /// Arguments for serving `shared_dir`. The namespace sandbox and `--seccomp kill` are
    /// virtiofsd's defaults; they are spelled out so a change of defaults cannot drop them.
    pub fn args(config: &VirtiofsConfig, shared_dir: &Path, socket: &Path) -> Vec<String> {
        vec![
            format!("--socket-path={}", socket.display()),
            format!("--shared-dir={}", shared_dir.display()),
            format!("--cache={}", config.cache.as_str()),
            "--sandbox=namespace".to_string(),
            "--seccomp=kill".to_string(),
            "--log-level=warn".to_string(),
        ]
    }

    pub fn spawn(
        config: &VirtiofsConfig,
        shared_dir: &Path,
        paths: FsPaths<'_>,
    ) -> Result<Self, DaemonError> {
        let binary = resolve_binary("virtiofsd", &config.path)?;
        let mut cmd = Command::new(binary);
        cmd.args(Self::args(config, shared_dir, paths.socket));
        let daemon = Daemon::spawn("virtiofsd", cmd, paths.log, paths.pid_file)?;
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
    }
}
