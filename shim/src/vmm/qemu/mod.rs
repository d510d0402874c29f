//! QEMU backend: q35 with no default devices, direct kernel boot, guest memory in a shared
//! memfd (vhost-user daemons map it), vhost-user-fs for the share, vhost-user-vsock served by
//! `hako-vsock` (the vsock device) for the agent channel, and QMP on a unix socket for control.

mod args;
mod hotplug;
pub mod snapshot;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Command;
use tokio::sync::watch;

use super::qmp::{Qmp, QmpError};
use super::{choose_accel, AccelChoice, Hypervisor, NetDevice, StartKind, VmSpec, VmmError};
use crate::config::{HypervisorConfig, VsockConfig};
use crate::daemon::{resolve_binary, Daemon};
use crate::vmm::template::start;
use args::{command_line, vsock_args, HostOptions, FIRST_NET_FD};

/// How long a helper may take to create its socket.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const QMP_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Qemu {
    config: HypervisorConfig,
    vsock_config: VsockConfig,
    accel: AccelChoice,
    host: HostOptions,
    vsock: Option<Daemon>,
    vmm: Option<Daemon>,
    qmp_socket: Option<PathBuf>,
    /// The PCIe root ports NICs sit in (`port_id`), and the NIC each holds.
    ports: Vec<Option<String>>,
    /// Where the sandboxes live: host-wide caches and marks are kept beside them.
    sandbox_root: PathBuf,
    started: StartKind,
}

impl Qemu {
    pub fn new(
        config: &HypervisorConfig,
        vsock_config: &VsockConfig,
        sandbox_root: &Path,
    ) -> Result<Self, VmmError> {
        let tsc_cache = sandbox_root.join(super::TSC_CACHE);
        let accel = choose_accel(config.accel)?;
        let tsc_khz = if accel.kvm {
            None
        } else {
            super::host_tsc_khz_cached(&tsc_cache)
        };
        let host = HostOptions {
            kvm: accel.kvm,
            clock: super::clock_params(accel.kvm, tsc_khz),
            seccomp: config.seccomp,
            vhost_net: vhost_net(),
            tb_size_mib: config.tcg_tb_size_mib,
        };
        Ok(Self {
            config: config.clone(),
            vsock_config: vsock_config.clone(),
            accel,
            host,
            vsock: None,
            vmm: None,
            qmp_socket: None,
            ports: Vec::new(),
            sandbox_root: sandbox_root.to_path_buf(),
            started: StartKind::Cold,
        })
    }

    async fn qmp(&self) -> Result<Qmp, VmmError> {
        let socket = self.qmp_socket.as_ref().ok_or(VmmError::NotRunning)?;
        tokio::time::timeout(QMP_TIMEOUT, Qmp::connect(socket))
            .await
            .map_err(|_| VmmError::Control {
                vmm: "qemu",
                message: format!("no QMP greeting within {QMP_TIMEOUT:?}"),
            })?
            .map_err(Into::into)
    }

    /// QMP on a QEMU that has just started. QEMU makes its socket file before it listens on it,
    /// and a connect in between is refused (ten QEMUs starting at once on two CPUs meet that
    /// window): connect again until one is taken, QEMU exits, or READY_TIMEOUT passes.
    async fn qmp_when_listening(&self, socket: &Path) -> Result<Qmp, VmmError> {
        let vmm = self.vmm.as_ref().ok_or(VmmError::NotRunning)?;
        let started = std::time::Instant::now();
        loop {
            let left = READY_TIMEOUT.saturating_sub(started.elapsed());
            vmm.wait_for_socket(socket, left).await?;
            match self.qmp().await {
                Err(VmmError::Qmp(QmpError::Connect { source, .. }))
                    if source.kind() == std::io::ErrorKind::ConnectionRefused
                        && started.elapsed() < READY_TIMEOUT =>
                {
                    // Look again in a moment, or at once if QEMU exits (wait_for_socket then
                    // says how it ended).
                    let _ = tokio::time::timeout(Duration::from_millis(2), vmm.wait()).await;
                }
                other => return other,
            }
        }
    }

    async fn qmp_quit(&self) -> Result<(), VmmError> {
        let quit = async {
            let mut qmp = self.qmp().await?;
            // QEMU may close the socket before or after answering; either means it is going.
            let _ = qmp.execute("quit", None).await;
            Ok::<(), VmmError>(())
        };
        tokio::time::timeout(QMP_TIMEOUT, quit)
            .await
            .map_err(|_| VmmError::Control {
                vmm: "qemu",
                message: format!("no answer within {QMP_TIMEOUT:?}"),
            })?
    }
}

impl Qemu {
    /// Spawns QEMU with `args`, the console already listened for, `fds` at `FIRST_NET_FD` on;
    /// it becomes the sandbox's VMM.
    async fn spawn_vmm(
        &mut self,
        spec: &VmSpec,
        binary: &Path,
        args: Vec<String>,
        fds: &[i32],
    ) -> Result<(), VmmError> {
        // QEMU connects to the console socket as it starts: listen first.
        let console = &spec.files.console_socket;
        let _ = std::fs::remove_file(console);
        let listener =
            tokio::net::UnixListener::bind(console).map_err(|source| VmmError::Files {
                path: console.clone(),
                source,
            })?;
        super::hand_to(spec.user.as_ref(), console)?;
        let files = spec.files.clone();
        tokio::spawn(async move {
            if let Ok((stream, _)) = listener.accept().await {
                super::pump_console(stream, &files);
            }
            let _ = std::fs::remove_file(&files.console_socket);
        });
        let mut cmd = Command::new(binary);
        cmd.args(args);
        let (how, _held) = super::confinement(spec, true)?;
        crate::daemon::confine(&mut cmd, how);
        if !fds.is_empty() {
            let fds = fds.to_vec();
            // SAFETY: runs in the forked child before exec and only calls dup2 (async-signal-safe).
            unsafe {
                cmd.pre_exec(move || {
                    for (i, fd) in fds.iter().enumerate() {
                        // dup2 leaves the new descriptor open across exec.
                        if libc::dup2(*fd, FIRST_NET_FD + i as i32) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let daemon = Daemon::spawn(
            "qemu",
            cmd,
            &spec.files.vmm_log,
            spec.files.log_max,
            &spec.files.vmm_pid,
        )?;
        log::info!(
            "sandbox {}: qemu pid {} ({}, {})",
            spec.sandbox_id,
            daemon.pid(),
            if self.accel.kvm { "KVM" } else { "TCG" },
            self.accel.reason
        );
        self.vmm = Some(daemon);
        self.qmp_socket = Some(spec.files.control_socket.clone());
        Ok(())
    }

    /// Ends a VMM that failed to start, and forgets it.
    async fn kill_vmm(&mut self) {
        if let Some(vmm) = self.vmm.take() {
            vmm.stop(Duration::from_secs(1)).await;
        }
        self.qmp_socket = None;
    }
}

fn vhost_net() -> bool {
    Path::new("/dev/vhost-net").exists()
}

/// One vhost-net descriptor per queue, opened by the shim for QEMU, which runs unprivileged.
fn open_vhost(queues: usize) -> Result<Vec<std::os::fd::OwnedFd>, VmmError> {
    (0..queues)
        .map(|_| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/vhost-net")
                .map(std::os::fd::OwnedFd::from)
                .map_err(|source| VmmError::Files {
                    path: PathBuf::from("/dev/vhost-net"),
                    source,
                })
        })
        .collect()
}

#[async_trait]
impl Hypervisor for Qemu {
    fn accel(&self) -> &'static str {
        if self.accel.kvm {
            "kvm"
        } else {
            "tcg"
        }
    }

    async fn prepare(&mut self, spec: &VmSpec) -> Result<(), VmmError> {
        let binary = resolve_binary("hako-vsock", &self.vsock_config.path)?;
        let mut cmd = Command::new(binary);
        cmd.args(vsock_args(spec));
        let (mut how, _held) = super::confinement(spec, false)?;
        // It parses what the guest writes and needs no network: none at all (ADR 13).
        how.empty_netns = true;
        crate::daemon::confine(&mut cmd, how);
        let daemon = Daemon::spawn(
            "hako-vsock",
            cmd,
            &spec.files.vsock_log,
            spec.files.log_max,
            &spec.files.vsock_pid,
        )?;
        self.vsock = Some(daemon);
        Ok(())
    }

    async fn start(&mut self, spec: &VmSpec) -> Result<(), VmmError> {
        for (what, path) in [("kernel", &spec.kernel), ("initramfs", &spec.initrd)] {
            if !path.is_file() {
                return Err(VmmError::MissingImage {
                    what,
                    path: path.clone(),
                });
            }
        }
        let binary = resolve_binary("qemu-system-x86_64", &self.config.path)?;
        if let Some(vsock) = &self.vsock {
            vsock
                .wait_for_socket(&spec.files.vsock_socket, READY_TIMEOUT)
                .await?;
        }
        self.started = StartKind::Cold;
        if self.config.templates_on() {
            let attempt = self.start_from_template(spec).await;
            let vmm_left_running = self.vmm.is_some();
            if let Some(restored) =
                start::settle(attempt, vmm_left_running, "qemu", &spec.sandbox_id)?
            {
                self.started = StartKind::Restored(restored);
                return Ok(());
            }
        }
        // In the order `args` numbers them: each NIC's taps, then its vhost descriptors.
        let mut vhost = Vec::new();
        let mut taps: Vec<i32> = Vec::new();
        for nic in &spec.net {
            taps.extend(&nic.tap_fds);
            if self.host.vhost_net {
                let opened = open_vhost(nic.tap_fds.len().max(1))?;
                taps.extend(opened.iter().map(std::os::fd::AsRawFd::as_raw_fd));
                vhost.extend(opened);
            }
        }
        self.spawn_vmm(spec, &binary, command_line(spec, &self.host), &taps)
            .await?;
        self.ports = spec
            .net
            .iter()
            .map(|nic| Some(nic.id.clone()))
            .chain((0..spec.hotplug_slots).map(|_| None))
            .collect();
        Ok(())
    }

    async fn stop(&mut self, grace: Duration) {
        if let Some(vmm) = &self.vmm {
            if vmm.exit_code().is_none() {
                if let Err(e) = self.qmp_quit().await {
                    log::warn!("qemu did not take quit over QMP ({e}); signalling it");
                }
                if tokio::time::timeout(grace, vmm.wait()).await.is_err() {
                    vmm.stop(grace).await;
                }
            }
        }
        if let Some(vsock) = &self.vsock {
            vsock.stop(grace).await;
        }
    }

    fn pid(&self) -> Option<u32> {
        self.vmm.as_ref().map(Daemon::pid)
    }

    fn exit_watch(&self) -> Option<watch::Receiver<Option<i32>>> {
        self.vmm.as_ref().map(Daemon::exit_watch)
    }

    fn log_tail(&self) -> String {
        self.vmm
            .as_ref()
            .map(Daemon::log_tail)
            .unwrap_or_else(|| "(qemu not started)".to_string())
    }

    async fn add_nic(&mut self, nic: &NetDevice) -> Result<(), VmmError> {
        self.plug(nic).await
    }

    fn started(&self) -> StartKind {
        self.started.clone()
    }

    async fn remove_nic(&mut self, id: &str, timeout: Duration) -> Result<(), VmmError> {
        self.unplug(id, timeout).await
    }
}

/// A Qemu that drives the QMP socket at `socket` (a fake monitor's), with `ports` root ports
/// and `vmm` as its process, for this backend's tests.
#[cfg(test)]
fn on_socket(socket: &Path, ports: Vec<Option<String>>, vmm: Option<Daemon>) -> Qemu {
    Qemu {
        config: HypervisorConfig::default(),
        vsock_config: VsockConfig::default(),
        accel: AccelChoice {
            kvm: false,
            reason: "test".into(),
        },
        host: HostOptions::default(),
        vsock: None,
        vmm,
        qmp_socket: Some(socket.to_path_buf()),
        ports,
        sandbox_root: socket.parent().unwrap_or(Path::new("/")).to_path_buf(),
        started: StartKind::Cold,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType};

    use super::*;

    /// QEMU makes its QMP socket file a moment before it listens on it; a restore connects at
    /// once, and was refused when ten started together. It now connects once QEMU listens.
    #[tokio::test]
    async fn qmp_is_reached_on_a_socket_made_before_qemu_listens() {
        let dir = std::env::temp_dir().join(format!("hako-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("qmp.sock");
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let vmm = Daemon::spawn("qemu", cmd, &dir.join("log"), 1 << 16, &dir.join("pid"))
            .expect("a stand-in for QEMU");
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &nix::sys::socket::UnixAddr::new(&path).expect("address"),
        )
        .expect("bind");
        let refused = std::os::unix::net::UnixStream::connect(&path).expect_err("not listening");
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);

        let qemu = on_socket(&path, Vec::new(), Some(vmm));
        let server = tokio::spawn(async move {
            // The window QEMU leaves, made wide.
            tokio::time::sleep(Duration::from_millis(200)).await;
            listen(&fd, Backlog::new(1).expect("backlog")).expect("listen");
            let listener = UnixListener::from(fd);
            listener.set_nonblocking(true).expect("non-blocking");
            let listener = tokio::net::UnixListener::from_std(listener).expect("listener");
            crate::vmm::qmp::fake::session(&listener, vec!["{\"return\": {}}\n"]).await
        });
        let reached = qemu.qmp_when_listening(&path).await;
        assert!(reached.is_ok(), "{:?}", reached.err());
        drop(reached);
        let seen = server.await.expect("server");
        assert!(seen[0].contains("qmp_capabilities"), "{seen:?}");
        if let Some(vmm) = &qemu.vmm {
            vmm.stop(Duration::from_secs(1)).await;
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
