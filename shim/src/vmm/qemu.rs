//! QEMU backend: q35 with no default devices, direct kernel boot, guest memory in a shared
//! memfd (vhost-user daemons map it), vhost-user-fs for the share, vhost-user-vsock served by
//! `vhost-device-vsock` for the agent channel, and QMP on a unix socket for control.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::Command;
use tokio::sync::watch;

use super::{choose_accel, AccelChoice, Hypervisor, Share, VmSpec, VmmError};
use crate::config::{HypervisorConfig, VsockConfig};
use crate::daemon::{resolve_binary, Daemon};

/// The tap fds reach QEMU as these descriptor numbers.
const FIRST_NET_FD: i32 = 3;
/// How long a helper may take to create its socket.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const QMP_TIMEOUT: Duration = Duration::from_secs(3);
/// The guest's vsock CID. Each VM has its own vsock backend, so every guest can use the same.
const GUEST_CID: u32 = 3;

pub struct Qemu {
    config: HypervisorConfig,
    vsock_config: VsockConfig,
    accel: AccelChoice,
    /// The guest's clock parameters (`super::clock_params`).
    clock: String,
    vsock: Option<Daemon>,
    vmm: Option<Daemon>,
    qmp_socket: Option<PathBuf>,
}

impl Qemu {
    pub fn new(
        config: &HypervisorConfig,
        vsock_config: &VsockConfig,
        tsc_cache: &Path,
    ) -> Result<Self, VmmError> {
        let accel = choose_accel(config.accel)?;
        let tsc_khz = if accel.kvm {
            None
        } else {
            super::host_tsc_khz_cached(tsc_cache)
        };
        Ok(Self {
            config: config.clone(),
            vsock_config: vsock_config.clone(),
            clock: super::clock_params(accel.kvm, tsc_khz),
            accel,
            vsock: None,
            vmm: None,
            qmp_socket: None,
        })
    }

    fn vhost_user_vsock_socket(dir: &Path) -> PathBuf {
        dir.join("vhu.sock")
    }

    /// The full QEMU command line (without the binary) for `spec`.
    pub fn args(spec: &VmSpec, kvm: bool, clock: &str, seccomp: bool, qmp: &Path) -> Vec<String> {
        let mem = format!("{}M", spec.memory_mib);
        let mut args: Vec<String> = vec![
            "-name".into(),
            format!("hako-{},debug-threads=on", spec.sandbox_id),
            "-machine".into(),
            format!(
                "q35,accel={},smbus=off,sata=off,usb=off,memory-backend=mem",
                if kvm { "kvm" } else { "tcg" }
            ),
            "-cpu".into(),
            if kvm { "host" } else { "max" }.into(),
            "-smp".into(),
            spec.vcpus.to_string(),
            "-m".into(),
            mem.clone(),
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-serial".into(),
            format!("file:{}", spec.console_log.display()),
            "-kernel".into(),
            spec.kernel.display().to_string(),
            "-initrd".into(),
            spec.initrd.display().to_string(),
            "-append".into(),
            format!("{} {clock}", spec.cmdline),
        ];
        args.extend(Self::share_args(spec));
        args.extend([
            "-chardev".into(),
            format!(
                "socket,id=vsock0,path={}",
                Self::vhost_user_vsock_socket(&spec.dir).display()
            ),
            "-device".into(),
            "vhost-user-vsock-pci,chardev=vsock0".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp.display()),
        ]);
        let vhost = if std::path::Path::new("/dev/vhost-net").exists() {
            ",vhost=on"
        } else {
            ""
        };
        let mut next_fd = FIRST_NET_FD;
        for (i, nic) in spec.net.iter().enumerate() {
            let queues = nic.tap_fds.len().max(1);
            let fds: Vec<String> = (0..queues)
                .map(|q| (next_fd + q as i32).to_string())
                .collect();
            next_fd += queues as i32;
            // Several queues: a queue pair per vCPU, and MSI-X vectors for each queue plus the
            // config interrupt and a spare.
            let (netdev, multiqueue) = if queues == 1 {
                (format!("tap,id=net{i},fd={}{vhost}", fds[0]), String::new())
            } else {
                (
                    format!("tap,id=net{i},fds={}{vhost}", fds.join(":")),
                    format!(",mq=on,vectors={}", 2 * queues + 2),
                )
            };
            args.extend([
                "-netdev".into(),
                netdev,
                "-device".into(),
                format!("virtio-net-pci,netdev=net{i},mac={}{multiqueue}", nic.mac),
            ]);
        }
        if seccomp {
            args.push("-sandbox".into());
            args.push(
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
            );
        }
        args
    }

    /// The share's device. For 9p, QEMU itself serves the directory: `security_model=none`
    /// because QEMU has no capabilities to change owners, `multidevs=remap` because the share
    /// crosses into the containers' root filesystem mounts, whose inode numbers could collide.
    fn share_args(spec: &VmSpec) -> Vec<String> {
        match &spec.share {
            Share::VirtioFs { socket } => vec![
                "-chardev".into(),
                format!("socket,id=fs0,path={}", socket.display()),
                "-device".into(),
                format!(
                    "vhost-user-fs-pci,queue-size=1024,chardev=fs0,tag={}",
                    spec.fs_tag
                ),
            ],
            Share::Virtio9p { dir } => vec![
                "-fsdev".into(),
                format!(
                    "local,id=fs0,path={},security_model=none,multidevs=remap",
                    dir.display()
                ),
                "-device".into(),
                format!("virtio-9p-pci,fsdev=fs0,mount_tag={}", spec.fs_tag),
            ],
        }
    }

    pub fn vsock_args(spec: &VmSpec) -> Vec<String> {
        vec![
            "--guest-cid".into(),
            GUEST_CID.to_string(),
            "--socket".into(),
            Self::vhost_user_vsock_socket(&spec.dir)
                .display()
                .to_string(),
            "--uds-path".into(),
            spec.agent_socket.display().to_string(),
            // A group of its own: no sibling traffic with any other guest.
            "--groups".into(),
            format!("hako-{}", spec.sandbox_id),
        ]
    }

    async fn qmp_quit(&self) -> Result<(), VmmError> {
        let socket = self.qmp_socket.as_ref().ok_or(VmmError::NotRunning)?;
        let err = |message: String| VmmError::Control {
            vmm: "qemu",
            message,
        };
        let talk = async {
            let stream = UnixStream::connect(socket)
                .await
                .map_err(|e| err(format!("connect {}: {e}", socket.display())))?;
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            // Greeting, then capabilities negotiation, then the command.
            let _greeting = lines.next_line().await.map_err(|e| err(e.to_string()))?;
            write
                .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
                .await
                .map_err(|e| err(e.to_string()))?;
            qmp_expect_return(&mut lines).await.map_err(err)?;
            write
                .write_all(b"{\"execute\":\"quit\"}\n")
                .await
                .map_err(|e| err(e.to_string()))?;
            // QEMU may close the socket before or after answering; either means it is going.
            let _ = qmp_expect_return(&mut lines).await;
            Ok(())
        };
        tokio::time::timeout(QMP_TIMEOUT, talk)
            .await
            .map_err(|_| err(format!("no answer within {QMP_TIMEOUT:?}")))?
    }
}

type QmpLines = tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>;

/// Reads QMP messages until a command's answer: events in between are skipped.
async fn qmp_expect_return(lines: &mut QmpLines) -> Result<(), String> {
    loop {
        match lines.next_line().await {
            Ok(Some(line)) if line.contains("\"return\"") => return Ok(()),
            Ok(Some(line)) if line.contains("\"error\"") => return Err(line),
            Ok(Some(_)) => continue,
            Ok(None) => return Err("connection closed".to_string()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[async_trait]
impl Hypervisor for Qemu {
    async fn prepare(&mut self, spec: &VmSpec) -> Result<(), VmmError> {
        let binary = resolve_binary("vhost-device-vsock", &self.vsock_config.path)?;
        let mut cmd = Command::new(binary);
        cmd.args(Self::vsock_args(spec));
        crate::daemon::confine(&mut cmd);
        let daemon = Daemon::spawn(
            "vhost-device-vsock",
            cmd,
            &spec.dir.join("vsock.log"),
            &spec.dir.join("vsock.pid"),
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
                .wait_for_socket(&Self::vhost_user_vsock_socket(&spec.dir), READY_TIMEOUT)
                .await?;
        }
        let qmp = spec.dir.join("qmp.sock");
        let mut cmd = Command::new(binary);
        cmd.args(Self::args(
            spec,
            self.accel.kvm,
            &self.clock,
            self.config.seccomp,
            &qmp,
        ));
        crate::daemon::confine(&mut cmd);
        let taps: Vec<i32> = spec.net.iter().flat_map(|n| n.tap_fds.clone()).collect();
        if !taps.is_empty() {
            // SAFETY: runs in the forked child before exec and only calls dup2 (async-signal-safe).
            unsafe {
                cmd.pre_exec(move || {
                    for (i, fd) in taps.iter().enumerate() {
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
            &spec.dir.join("vmm.log"),
            &spec.dir.join("vmm.pid"),
        )?;
        log::info!(
            "sandbox {}: qemu pid {} ({}, {})",
            spec.sandbox_id,
            daemon.pid(),
            if self.accel.kvm { "KVM" } else { "TCG" },
            self.accel.reason
        );
        self.vmm = Some(daemon);
        self.qmp_socket = Some(qmp);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            sandbox_id: "sb1".into(),
            dir: PathBuf::from("/run/hako/default/sb1"),
            vcpus: 2,
            memory_mib: 256,
            kernel: PathBuf::from("/k"),
            vmlinux: PathBuf::from("/v"),
            initrd: PathBuf::from("/i"),
            cmdline: "console=ttyS0".into(),
            share: Share::VirtioFs {
                socket: PathBuf::from("/run/hako/default/sb1/fs.sock"),
            },
            fs_tag: "hakoShared".into(),
            agent_socket: PathBuf::from("/run/hako/default/sb1/agent.sock"),
            console_log: PathBuf::from("/run/hako/default/sb1/console.log"),
            net: vec![super::super::NetDevice {
                tap_fds: vec![9],
                mac: "02:42:0a:58:00:02".into(),
            }],
        }
    }

    fn joined(args: &[String]) -> String {
        args.join(" ")
    }

    #[test]
    fn tcg_command_line() {
        let clock = crate::vmm::clock_params(false, Some(2_600_000));
        let a = joined(&Qemu::args(
            &spec(),
            false,
            &clock,
            true,
            Path::new("/q.sock"),
        ));
        assert!(a.contains("-machine q35,accel=tcg,"), "{a}");
        assert!(a.contains("-cpu max"), "{a}");
        assert!(a.contains("tsc=reliable tsc_early_khz=2600000"), "{a}");
        assert!(
            a.contains("memory-backend-memfd,id=mem,size=256M,share=on"),
            "{a}"
        );
        assert!(
            a.contains("vhost-user-fs-pci,queue-size=1024,chardev=fs0,tag=hakoShared"),
            "{a}"
        );
        assert!(a.contains("-smp 2"), "{a}");
        assert!(a.contains("-sandbox on,"), "{a}");
        assert!(a.contains("-nodefaults"), "{a}");
        assert!(a.contains("-netdev tap,id=net0,fd=3"), "{a}");
        assert!(
            a.contains("virtio-net-pci,netdev=net0,mac=02:42:0a:58:00:02"),
            "{a}"
        );
    }

    #[test]
    fn kvm_uses_the_host_cpu() {
        let clock = crate::vmm::clock_params(true, None);
        let a = joined(&Qemu::args(
            &spec(),
            true,
            &clock,
            false,
            Path::new("/q.sock"),
        ));
        assert!(a.contains("accel=kvm"), "{a}");
        assert!(a.contains("-cpu host"), "{a}");
        assert!(!a.contains("-sandbox"), "{a}");
    }

    #[test]
    fn the_share_is_virtio_fs_or_qemus_own_9p() {
        let q = Path::new("/q.sock");
        let a = joined(&Qemu::args(&spec(), false, "", true, q));
        assert!(
            a.contains("-chardev socket,id=fs0,path=/run/hako/default/sb1/fs.sock -device vhost-user-fs-pci,queue-size=1024,chardev=fs0,tag=hakoShared"),
            "{a}"
        );
        assert!(!a.contains("-fsdev"), "{a}");
        let mut s = spec();
        s.share = Share::Virtio9p {
            dir: PathBuf::from("/run/hako/default/sb1/ro"),
        };
        let a = joined(&Qemu::args(&s, false, "", true, q));
        assert!(
            a.contains("-fsdev local,id=fs0,path=/run/hako/default/sb1/ro,security_model=none,multidevs=remap -device virtio-9p-pci,fsdev=fs0,mount_tag=hakoShared"),
            "{a}"
        );
        assert!(!a.contains("vhost-user-fs"), "{a}");
    }

    #[test]
    fn vsock_backend_is_private_to_the_sandbox() {
        let a = joined(&Qemu::vsock_args(&spec()));
        assert!(
            a.contains("--uds-path /run/hako/default/sb1/agent.sock"),
            "{a}"
        );
        assert!(a.contains("--groups hako-sb1"), "{a}");
    }
}
