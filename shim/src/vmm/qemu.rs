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
    /// Whether NICs use vhost-net (the host has `/dev/vhost-net`).
    vhost_net: bool,
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
            vhost_net: vhost_net(),
        })
    }

    /// The full QEMU command line (without the binary) for `spec`. With `vhost_net`, each NIC's
    /// tap queues are followed by as many vhost-net descriptors (see `net_fds`).
    pub fn args(
        spec: &VmSpec,
        kvm: bool,
        clock: &str,
        seccomp: bool,
        vhost_net: bool,
    ) -> Vec<String> {
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
            // The console goes to a socket the shim listens on, which caps what it keeps.
            "-chardev".into(),
            format!(
                "socket,id=console,path={}",
                spec.files.console_socket.display()
            ),
            "-serial".into(),
            "chardev:console".into(),
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
                spec.files.vsock_socket.display()
            ),
            "-device".into(),
            "vhost-user-vsock-pci,chardev=vsock0".into(),
            "-qmp".into(),
            format!(
                "unix:{},server=on,wait=off",
                spec.files.control_socket.display()
            ),
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
        let mut numbers = |count: usize| -> Vec<String> {
            let numbers = (0..count)
                .map(|q| (next_fd + q as i32).to_string())
                .collect();
            next_fd += count as i32;
            numbers
        };
        for (index, nic) in spec.net.iter().enumerate() {
            let queues = nic.tap_fds.len().max(1);
            let fds = numbers(queues);
            // QEMU runs unprivileged and cannot open /dev/vhost-net: the shim hands it over.
            let vhost = if vhost_net {
                format!(",vhost=on,vhostfds={}", numbers(queues).join(":"))
            } else {
                String::new()
            };
            let netdev = if queues == 1 && !vhost_net {
                format!("tap,id={},fd={}", nic.id, fds[0])
            } else {
                format!("tap,id={},fds={}{vhost}", nic.id, fds.join(":"))
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
        if self.vhost_net {
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
            spec.files.vsock_socket.display().to_string(),
            "--uds-path".into(),
            spec.files.agent_socket.display().to_string(),
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
        let (how, _held) = super::confinement(spec, false)?;
        crate::daemon::confine(&mut cmd, how);
        let daemon = Daemon::spawn(
            "vhost-device-vsock",
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
        cmd.args(Self::args(
            spec,
            self.accel.kvm,
            &self.clock,
            self.config.seccomp,
            self.vhost_net,
        ));
        let (how, _held) = super::confinement(spec, true)?;
        crate::daemon::confine(&mut cmd, how);
        // In the order `args` numbers them: each NIC's taps, then its vhost descriptors.
        let mut vhost = Vec::new();
        let mut taps: Vec<i32> = Vec::new();
        for nic in &spec.net {
            taps.extend(&nic.tap_fds);
            if self.vhost_net {
                let opened = open_vhost(nic.tap_fds.len().max(1))?;
                taps.extend(opened.iter().map(std::os::fd::AsRawFd::as_raw_fd));
                vhost.extend(opened);
            }
        }
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
        crate::vmm::test_spec(Path::new("/run/hako/default/sb1"))
    }

    fn joined(args: &[String]) -> String {
        args.join(" ")
    }

    #[test]
    fn tcg_command_line() {
        let clock = crate::vmm::clock_params(false, Some(2_600_000));
        let a = joined(&Qemu::args(&spec(), false, &clock, true, false));
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
        // The console goes to the shim's socket, never straight to a file.
        assert!(
            a.contains("-chardev socket,id=console,path=/run/hako/default/sb1/vmm/console.sock -serial chardev:console"),
            "{a}"
        );
        assert!(!a.contains("file:"), "{a}");
        assert!(
            a.contains("-qmp unix:/run/hako/default/sb1/vmm/control.sock,server=on,wait=off"),
            "{a}"
        );
    }

    #[test]
    fn vhost_net_descriptors_follow_each_nics_taps() {
        let a = joined(&Qemu::args(&spec(), true, "", false, true));
        assert!(
            a.contains("-netdev tap,id=nic0,fds=3,vhost=on,vhostfds=4"),
            "{a}"
        );
    }

    #[test]
    fn kvm_uses_the_host_cpu() {
        let clock = crate::vmm::clock_params(true, None);
        let a = joined(&Qemu::args(&spec(), true, &clock, false, false));
        assert!(a.contains("accel=kvm"), "{a}");
        assert!(a.contains("-cpu host"), "{a}");
        assert!(!a.contains("-sandbox"), "{a}");
    }

    #[test]
    fn the_share_is_virtio_fs_or_qemus_own_9p() {
        let a = joined(&Qemu::args(&spec(), false, "", true, false));
        assert!(
            a.contains("-chardev socket,id=fs0,path=/run/hako/default/sb1/fs.sock -device vhost-user-fs-pci,queue-size=1024,chardev=fs0,tag=hakoShared"),
            "{a}"
        );
        assert!(!a.contains("-fsdev"), "{a}");
        let mut s = spec();
        s.share = Share::Virtio9p {
            dir: PathBuf::from("/run/hako/default/sb1/ro"),
        };
        let a = joined(&Qemu::args(&s, false, "", true, false));
        assert!(
            a.contains("-fsdev local,id=fs0,path=/run/hako/default/sb1/ro,security_model=none,multidevs=remap -device virtio-9p-pci,fsdev=fs0,mount_tag=hakoShared"),
            "{a}"
        );
        assert!(!a.contains("vhost-user-fs"), "{a}");
    }

    /// A Qemu whose QMP socket is a fake monitor's, with `ports` root ports.
    fn driven(socket: &Path, ports: Vec<Option<String>>) -> Qemu {
        Qemu {
            config: HypervisorConfig::default(),
            vsock_config: VsockConfig::default(),
            accel: AccelChoice {
                kvm: false,
                reason: "test".into(),
            },
            clock: String::new(),
            vsock: None,
            vmm: None,
            qmp_socket: Some(socket.to_path_buf()),
            ports,
            vhost_net: false,
        }
    }

    #[tokio::test]
    async fn a_nic_is_plugged_into_a_free_port_with_its_queues_and_unplugged_again() {
        let dir = std::env::temp_dir().join(format!("hako-plug-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let socket = dir.join("qmp.sock");
        let ok = "{\"return\": {}}\n";
        let server = super::super::qmp::fake::qemu(&socket, vec![ok, ok, ok, ok, ok]).await;
        let tap = std::fs::File::open("/dev/null").expect("a stand-in for a tap queue");
        let mut qemu = driven(&socket, vec![Some("nic0".into()), None]);
        let nic = NetDevice {
            id: "nic1".into(),
            tap_fds: vec![std::os::fd::AsRawFd::as_raw_fd(&tap)],
            mac: "02:42:ac:11:00:03".into(),
        };
        qemu.add_nic(&nic).await.expect("plugged");
        assert_eq!(
            qemu.ports,
            [Some("nic0".to_string()), Some("nic1".to_string())]
        );
        let seen = server.await.expect("server");
        assert_eq!(
            seen[1..],
            [
                r#"{"arguments":{"fdname":"nic1-q0"},"execute":"getfd"}"#,
                r#"{"arguments":{"fd":"nic1-q0","id":"nic1","type":"tap"},"execute":"netdev_add"}"#,
                r#"{"arguments":{"bus":"nicport1","driver":"virtio-net-pci","id":"nic1","mac":"02:42:ac:11:00:03","netdev":"nic1"},"execute":"device_add"}"#,
            ]
        );
        // No port left: a clear error, nothing sent.
        let err = qemu.add_nic(&nic).await.expect_err("full");
        assert!(
            err.to_string().contains("hypervisor.hotplug_slots"),
            "{err}"
        );

        // Unplugging: the guest already released it (DeviceNotFound), the netdev goes.
        let server = super::super::qmp::fake::qemu(
            &socket,
            vec![
                ok,
                "{\"error\": {\"class\": \"DeviceNotFound\", \"desc\": \"Device 'nic1' not found\"}}\n",
                ok,
            ],
        )
        .await;
        qemu.remove_nic("nic1", Duration::from_secs(1))
            .await
            .expect("unplugged");
        assert_eq!(qemu.ports, [Some("nic0".to_string()), None]);
        let seen = server.await.expect("server");
        assert_eq!(
            seen[1..],
            [
                r#"{"arguments":{"id":"nic1"},"execute":"device_del"}"#,
                r#"{"arguments":{"id":"nic1"},"execute":"netdev_del"}"#,
            ]
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn vsock_backend_is_private_to_the_sandbox() {
        let a = joined(&Qemu::vsock_args(&spec()));
        assert!(
            a.contains("--socket /run/hako/default/sb1/vmm/vhu.sock --uds-path /run/hako/default/sb1/vmm/agent.sock"),
            "{a}"
        );
        assert!(a.contains("--groups hako-sb1"), "{a}");
    }
}
