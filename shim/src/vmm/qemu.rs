//! QEMU backend: q35 with no default devices, direct kernel boot, guest memory in a shared
//! memfd (vhost-user daemons map it), vhost-user-fs for the share, vhost-user-vsock served by
//! `vhost-device-vsock` for the agent channel, and QMP on a unix socket for control.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tokio::process::Command;
use tokio::sync::watch;

use super::qmp::{Qmp, QmpError};
use super::{choose_accel, AccelChoice, Hypervisor, NetDevice, Share, VmSpec, VmmError};
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
    /// The PCIe root ports NICs sit in (`port_id`), and the NIC each holds.
    ports: Vec<Option<String>>,
}

/// The PCIe root port `index`: every NIC sits in one, so that any can be unplugged.
fn port_id(index: usize) -> String {
    format!("nicport{index}")
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
            ports: Vec::new(),
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
        // A root port per NIC the VM boots with and per NIC it may gain: PCIe hot-plug needs a
        // port to plug into, and a NIC in a port can leave again.
        let ports = spec.net.len() + spec.hotplug_slots as usize;
        for index in 0..ports {
            args.extend([
                "-device".into(),
                format!(
                    "pcie-root-port,id={},bus=pcie.0,chassis=1,slot={}",
                    port_id(index),
                    index + 1
                ),
            ]);
        }
        let mut next_fd = FIRST_NET_FD;
        for (index, nic) in spec.net.iter().enumerate() {
            let queues = nic.tap_fds.len().max(1);
            let fds: Vec<String> = (0..queues)
                .map(|q| (next_fd + q as i32).to_string())
                .collect();
            next_fd += queues as i32;
            let netdev = if queues == 1 {
                format!("tap,id={},fd={}{}", nic.id, fds[0], vhost_option())
            } else {
                format!("tap,id={},fds={}{}", nic.id, fds.join(":"), vhost_option())
            };
            args.extend([
                "-netdev".into(),
                netdev,
                "-device".into(),
                format!(
                    "virtio-net-pci,id={id},netdev={id},mac={mac},bus={port}{mq}",
                    id = nic.id,
                    mac = nic.mac,
                    port = port_id(index),
                    mq = multiqueue_option(queues)
                ),
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

    /// Hot-plugs `nic` into a free root port: its tap queues go over the QMP socket, a tap
    /// netdev takes them, and a virtio-net device on the port uses it.
    async fn plug(&mut self, nic: &NetDevice) -> Result<(), VmmError> {
        let port =
            self.ports
                .iter()
                .position(Option::is_none)
                .ok_or_else(|| VmmError::NoFreeSlot {
                    nic: nic.id.clone(),
                    slots: self.ports.len(),
                })?;
        let mut qmp = self.qmp().await?;
        let names: Vec<String> = (0..nic.tap_fds.len())
            .map(|q| format!("{}-q{q}", nic.id))
            .collect();
        for (name, fd) in names.iter().zip(&nic.tap_fds) {
            qmp.send_fd(name, *fd).await?;
        }
        let mut netdev = json!({ "type": "tap", "id": nic.id });
        if names.len() == 1 {
            netdev["fd"] = json!(names[0]);
        } else {
            netdev["fds"] = json!(names.join(":"));
        }
        if vhost_net() {
            netdev["vhost"] = json!(true);
        }
        if let Err(e) = qmp.execute("netdev_add", Some(netdev)).await {
            for name in &names {
                let _ = qmp
                    .execute("closefd", Some(json!({ "fdname": name })))
                    .await;
            }
            return Err(e.into());
        }
        let mut device = json!({
            "driver": "virtio-net-pci",
            "id": nic.id,
            "netdev": nic.id,
            "mac": nic.mac,
            "bus": port_id(port),
        });
        if names.len() > 1 {
            device["mq"] = json!(true);
            device["vectors"] = json!(2 * names.len() + 2);
        }
        if let Err(e) = qmp.execute("device_add", Some(device)).await {
            let _ = qmp
                .execute("netdev_del", Some(json!({ "id": nic.id })))
                .await;
            return Err(e.into());
        }
        self.ports[port] = Some(nic.id.clone());
        Ok(())
    }

    /// Unplugs a NIC. The agent has powered its slot off already, which unplugs it at once; a
    /// guest that did not gets the standard unplug request (an attention button the guest
    /// honours after five seconds), bounded by `timeout`. The netdev, which holds the tap
    /// queues, goes either way.
    async fn unplug(&mut self, id: &str, timeout: Duration) -> Result<(), VmmError> {
        let mut qmp = self.qmp().await?;
        match qmp.execute("device_del", Some(json!({ "id": id }))).await {
            Ok(_) => {
                let deleted = qmp
                    .wait_event("DEVICE_DELETED", |e| e["data"]["device"] == id, timeout)
                    .await;
                if let Err(e) = deleted {
                    log::warn!("NIC {id} is still in the VM after {timeout:?} ({e}); its network is cut off regardless");
                }
            }
            Err(QmpError::Command { class, .. }) if class == "DeviceNotFound" => {}
            Err(e) => log::warn!("unplugging NIC {id}: {e}"),
        }
        let _ = qmp.execute("netdev_del", Some(json!({ "id": id }))).await;
        for port in &mut self.ports {
            if port.as_deref() == Some(id) {
                *port = None;
            }
        }
        Ok(())
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

fn vhost_net() -> bool {
    Path::new("/dev/vhost-net").exists()
}

fn vhost_option() -> &'static str {
    if vhost_net() {
        ",vhost=on"
    } else {
        ""
    }
}

/// Several queues: a queue pair per vCPU, and MSI-X vectors for each queue plus the config
/// interrupt and a spare.
fn multiqueue_option(queues: usize) -> String {
    if queues > 1 {
        format!(",mq=on,vectors={}", 2 * queues + 2)
    } else {
        String::new()
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
        let netns = spec.netns.as_deref().map(super::open_netns).transpose()?;
        if let Some(netns) = &netns {
            super::enter_netns(&mut cmd, netns);
        }
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

    async fn remove_nic(&mut self, id: &str, timeout: Duration) -> Result<(), VmmError> {
        self.unplug(id, timeout).await
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
                id: "nic0".into(),
                tap_fds: vec![9],
                mac: "02:42:0a:58:00:02".into(),
            }],
            netns: None,
            hotplug_slots: 2,
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
        assert!(a.contains("-netdev tap,id=nic0,fd=3"), "{a}");
        assert!(
            a.contains("virtio-net-pci,id=nic0,netdev=nic0,mac=02:42:0a:58:00:02,bus=nicport0"),
            "{a}"
        );
        // One port for the NIC it boots with, two for NICs plugged in later.
        for (port, slot) in [("nicport0", 1), ("nicport1", 2), ("nicport2", 3)] {
            assert!(
                a.contains(&format!(
                    "pcie-root-port,id={port},bus=pcie.0,chassis=1,slot={slot}"
                )),
                "{a}"
            );
        }
        assert!(!a.contains("nicport3"), "{a}");
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
