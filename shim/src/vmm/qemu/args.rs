//! QEMU's command line and the vsock backend's: every device, with the NICs the VM boots with
//! in root ports of their own and spare ports for the NICs it may gain.

use crate::vmm::{Share, VmSpec, GUEST_CID};

/// The tap fds reach QEMU as these descriptor numbers.
pub const FIRST_NET_FD: i32 = 3;

/// The PCIe root port `index`: every NIC sits in one, so that any can be unplugged.
pub fn port_id(index: usize) -> String {
    format!("nicport{index}")
}

/// How this host runs QEMU, beside what the VM is (`VmSpec`).
#[derive(Debug, Clone, Default)]
pub struct HostOptions {
    pub kvm: bool,
    /// The guest's clock parameters (`vmm::clock_params`).
    pub clock: String,
    /// QEMU's `-sandbox on` seccomp filter.
    pub seccomp: bool,
    /// NICs use vhost-net: each NIC's tap queues are followed by as many vhost-net descriptors.
    pub vhost_net: bool,
    /// TCG's translation cache in MiB; 0 leaves QEMU's default (1 GiB of address space, which
    /// fills, and counts against the pod, as the guest runs new code).
    pub tb_size_mib: u32,
}

/// The full QEMU command line (without the binary) for a VM that boots with its devices.
pub fn command_line(spec: &VmSpec, host: &HostOptions) -> Vec<String> {
    let mut args = machine_args(spec, host, Memory::Memfd);
    args.extend(share_args(spec));
    args.extend([
        "-chardev".into(),
        format!(
            "socket,id=vsock0,path={}",
            spec.files.vsock_socket.display()
        ),
        "-device".into(),
        "vhost-user-vsock-pci,chardev=vsock0".into(),
    ]);
    args.extend(control_args(spec));
    // A root port per NIC the VM boots with and per NIC it may gain: PCIe hot-plug needs a
    // port to plug into, and a NIC in a port can leave again.
    args.extend(root_ports(spec.net.len() + spec.hotplug_slots as usize));
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
        let vhost = if host.vhost_net {
            format!(",vhost=on,vhostfds={}", numbers(queues).join(":"))
        } else {
            String::new()
        };
        let netdev = if queues == 1 && !host.vhost_net {
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
    args.extend(seccomp_args(host));
    args
}

/// A VM's memory: a memfd of its own, or a file the shim hands over as `MEMORY_FD` (a
/// template's, or a restored VM's copy of it: QEMU migrates everything but its memory,
/// `x-ignore-shared`).
#[derive(Debug, Clone, Copy)]
enum Memory {
    Memfd,
    File,
}

/// The descriptor a template's or a restored VM's memory file reaches QEMU as.
pub const MEMORY_FD: i32 = 3;

/// The root port a restored VM's vsock device is hot-plugged into.
pub const VSOCK_PORT: &str = "vsockport";
/// The root port a restored VM's share is hot-plugged into.
pub const SHARE_PORT: &str = "fsport";

/// The command line of a VM made to be a template, and of every VM restored from one (ADR 14):
/// the same machine without the share, the vsock device or NICs, which are hot-plugged after a
/// restore into root ports of their own, its memory in a file (`MEMORY_FD`), and with a VM
/// generation id, which QEMU changes at each restore and the guest's kernel answers by
/// reseeding its random generator.
pub fn template_command_line(spec: &VmSpec, host: &HostOptions) -> Vec<String> {
    let mut args = machine_args(spec, host, Memory::File);
    args.extend(control_args(spec));
    args.extend(["-device".into(), "vmgenid,guid=auto".into()]);
    let nic_ports = spec.hotplug_slots as usize;
    args.extend(root_ports(nic_ports));
    for (offset, id) in [VSOCK_PORT, SHARE_PORT].iter().enumerate() {
        args.extend([
            "-device".into(),
            format!(
                "pcie-root-port,id={id},bus=pcie.0,chassis=1,slot={}",
                nic_ports + offset + 1
            ),
        ]);
    }
    args.extend(seccomp_args(host));
    args
}

/// The machine, its memory, console and kernel: what every QEMU command line starts with.
fn machine_args(spec: &VmSpec, host: &HostOptions, memory: Memory) -> Vec<String> {
    let accel = match (host.kvm, host.tb_size_mib) {
        (true, _) => "kvm".to_string(),
        (false, 0) => "tcg".to_string(),
        (false, mib) => format!("tcg,tb-size={mib}"),
    };
    let mem = format!("{}M", spec.memory_mib);
    vec![
        "-name".into(),
        format!("hako-{},debug-threads=on", spec.sandbox_id),
        "-machine".into(),
        "q35,smbus=off,sata=off,usb=off,memory-backend=mem".into(),
        "-accel".into(),
        accel,
        "-cpu".into(),
        if host.kvm { "host" } else { "max" }.into(),
        "-smp".into(),
        spec.vcpus.to_string(),
        "-m".into(),
        mem.clone(),
        "-object".into(),
        match memory {
            Memory::Memfd => format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            Memory::File => format!(
                "memory-backend-file,id=mem,size={mem},mem-path=/proc/self/fd/{MEMORY_FD},share=on"
            ),
        },
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
        format!("{} {}", spec.cmdline, host.clock),
    ]
}

/// QMP, and the balloon.
fn control_args(spec: &VmSpec) -> Vec<String> {
    vec![
        "-qmp".into(),
        format!(
            "unix:{},server=on,wait=off",
            spec.files.control_socket.display()
        ),
        // Free page reporting: the guest hands back the pages it frees (the initramfs it
        // unpacked, memory a container used), and QEMU drops them from the pod's memory.
        "-device".into(),
        "virtio-balloon-pci,id=balloon0,free-page-reporting=on".into(),
    ]
}

/// `count` PCIe root ports for NICs, `nicport0` on.
fn root_ports(count: usize) -> Vec<String> {
    (0..count)
        .flat_map(|index| {
            [
                "-device".to_string(),
                format!(
                    "pcie-root-port,id={},bus=pcie.0,chassis=1,slot={}",
                    port_id(index),
                    index + 1
                ),
            ]
        })
        .collect()
}

fn seccomp_args(host: &HostOptions) -> Vec<String> {
    if host.seccomp {
        vec![
            "-sandbox".into(),
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
        ]
    } else {
        Vec::new()
    }
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

/// The arguments of `hako-vsock`, the agent channel's device.
pub fn vsock_args(spec: &VmSpec) -> Vec<String> {
    vec![
        "--guest-cid".into(),
        GUEST_CID.to_string(),
        "--socket".into(),
        spec.files.vsock_socket.display().to_string(),
        "--uds-path".into(),
        spec.files.agent_socket.display().to_string(),
    ]
}

/// Several queues: a queue pair per vCPU, and MSI-X vectors for each queue plus the config
/// interrupt and a spare.
pub fn multiqueue_option(queues: usize) -> String {
    if queues > 1 {
        format!(",mq=on,vectors={}", 2 * queues + 2)
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn spec() -> VmSpec {
        crate::vmm::test_spec(Path::new("/run/hako/default/sb1"))
    }

    fn joined(args: &[String]) -> String {
        args.join(" ")
    }

    fn tcg(clock: &str) -> HostOptions {
        HostOptions {
            clock: clock.to_string(),
            seccomp: true,
            tb_size_mib: 64,
            ..HostOptions::default()
        }
    }

    #[test]
    fn tcg_command_line() {
        let clock = crate::vmm::clock_params(false, Some(2_600_000));
        let a = joined(&command_line(&spec(), &tcg(&clock)));
        assert!(a.contains("-machine q35,smbus=off,"), "{a}");
        assert!(a.contains("-accel tcg,tb-size=64 "), "{a}");
        assert!(
            a.contains("-device virtio-balloon-pci,id=balloon0,free-page-reporting=on"),
            "{a}"
        );
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
        let a = joined(&command_line(
            &spec(),
            &HostOptions {
                kvm: true,
                vhost_net: true,
                ..HostOptions::default()
            },
        ));
        assert!(
            a.contains("-netdev tap,id=nic0,fds=3,vhost=on,vhostfds=4"),
            "{a}"
        );
    }

    #[test]
    fn kvm_uses_the_host_cpu() {
        let clock = crate::vmm::clock_params(true, None);
        let a = joined(&command_line(
            &spec(),
            &HostOptions {
                kvm: true,
                clock,
                ..HostOptions::default()
            },
        ));
        assert!(a.contains("-accel kvm "), "{a}");
        assert!(a.contains("-cpu host"), "{a}");
        assert!(!a.contains("-sandbox"), "{a}");
    }

    #[test]
    fn the_share_is_virtio_fs_or_qemus_own_9p() {
        let a = joined(&command_line(&spec(), &tcg("")));
        assert!(
            a.contains("-chardev socket,id=fs0,path=/run/hako/default/sb1/fs.sock -device vhost-user-fs-pci,queue-size=1024,chardev=fs0,tag=hakoShared"),
            "{a}"
        );
        assert!(!a.contains("-fsdev"), "{a}");
        let mut s = spec();
        s.share = Share::Virtio9p {
            dir: PathBuf::from("/run/hako/default/sb1/ro"),
        };
        let a = joined(&command_line(&s, &tcg("")));
        assert!(
            a.contains("-fsdev local,id=fs0,path=/run/hako/default/sb1/ro,security_model=none,multidevs=remap -device virtio-9p-pci,fsdev=fs0,mount_tag=hakoShared"),
            "{a}"
        );
        assert!(!a.contains("vhost-user-fs"), "{a}");
    }

    #[test]
    fn vsock_backend_is_private_to_the_sandbox() {
        let a = joined(&vsock_args(&spec()));
        assert!(
            a.contains("--socket /run/hako/default/sb1/vmm/vhu.sock --uds-path /run/hako/default/sb1/vmm/agent.sock"),
            "{a}"
        );
    }
}
