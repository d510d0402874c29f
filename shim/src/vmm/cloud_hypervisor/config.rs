//! The bodies of `vm.create` and `vm.add-net`, built from a `VmSpec`.

use super::types::{
    BalloonConfig, ConsoleConfig, ConsoleMode, CpusConfig, FsConfig, MemoryConfig, NetConfig,
    PayloadConfig, SerialConfig, VmConfig, VsockConfig,
};
use crate::vmm::{NetDevice, Share, VmSpec, GUEST_CID};

/// virtiofsd serves one request queue; 1024 is the size QEMU's vhost-user-fs-pci gets too.
const FS_QUEUES: u32 = 1;
const FS_QUEUE_SIZE: u32 = 1024;
/// One tap fd is one queue pair: a receive and a transmit queue.
const NET_QUEUES_PER_FD: u32 = 2;
const NET_QUEUE_SIZE: u32 = 256;

/// The `vm.create` body for `spec`. NICs are not in it: tap fds are only taken by
/// `vm.add-net` (see `net_config`).
pub fn vm_config(spec: &VmSpec) -> VmConfig {
    VmConfig {
        payload: PayloadConfig {
            kernel: Some(spec.vmlinux.clone()),
            initramfs: Some(spec.initrd.clone()),
            // Cloud Hypervisor runs only on KVM.
            cmdline: Some(format!(
                "{} {}",
                spec.cmdline,
                crate::vmm::clock_params(true, None)
            )),
            firmware: None,
        },
        cpus: Some(CpusConfig {
            boot_vcpus: spec.vcpus,
            max_vcpus: spec.vcpus,
            kvm_hyperv: None,
            max_phys_bits: None,
            nested: None,
        }),
        memory: Some(MemoryConfig {
            size: u64::from(spec.memory_mib) << 20,
            // virtiofsd maps guest memory: it must be MAP_SHARED.
            shared: Some(true),
            hugepages: None,
            mergeable: None,
            prefault: None,
            hotplug_size: None,
        }),
        fs: fs_config(spec).map(|fs| vec![fs]),
        vsock: Some(vsock_config(spec)),
        // Free page reporting: pages the guest frees go back to the host.
        balloon: Some(BalloonConfig {
            size: 0,
            free_page_reporting: Some(true),
            deflate_on_oom: None,
        }),
        // The legacy serial port is the guest's ttyS0, as with QEMU: the command line's
        // console=ttyS0 stays. Cloud Hypervisor serves it on a socket, which the shim reads
        // into the capped console log.
        serial: Some(SerialConfig {
            mode: ConsoleMode::Socket,
            file: None,
            socket: Some(spec.files.console_socket.clone()),
        }),
        // The default virtio console would take the shim's terminal (mode Tty).
        console: Some(ConsoleConfig {
            mode: ConsoleMode::Off,
            file: None,
            socket: None,
            iommu: None,
        }),
        ..VmConfig::default()
    }
}

/// The definition of a template VM (ADR 14): `vm_config` without the share and the vsock
/// device, which each VM restored from it gets of its own.
pub fn template_config(spec: &VmSpec) -> VmConfig {
    VmConfig {
        fs: None,
        vsock: None,
        ..vm_config(spec)
    }
}

/// The share, a `vm.create` member or the body of a `vm.add-fs`; `None` for virtio-9p, which
/// `check` refuses (and the configuration check before it).
pub fn fs_config(spec: &VmSpec) -> Option<FsConfig> {
    match &spec.share {
        Share::VirtioFs { socket } => Some(FsConfig {
            tag: spec.fs_tag.clone(),
            socket: socket.clone(),
            num_queues: FS_QUEUES,
            queue_size: FS_QUEUE_SIZE,
            id: None,
        }),
        Share::Virtio9p { .. } => None,
    }
}

/// The agent's channel: Cloud Hypervisor's hybrid vsock on a unix socket.
pub fn vsock_config(spec: &VmSpec) -> VsockConfig {
    VsockConfig {
        cid: u64::from(GUEST_CID),
        socket: spec.files.agent_socket.clone(),
        iommu: None,
        id: None,
    }
}

/// The `vm.add-net` body for one NIC; its tap fd goes alongside as SCM_RIGHTS.
pub fn net_config(nic: &NetDevice) -> NetConfig {
    NetConfig {
        id: Some(nic.id.clone()),
        mac: Some(nic.mac.clone()),
        num_queues: Some(NET_QUEUES_PER_FD * nic.tap_fds.len().max(1) as u32),
        queue_size: Some(NET_QUEUE_SIZE),
        ..NetConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn vm_config_follows_the_spec() {
        let s = crate::vmm::test_spec(Path::new("/run/hako/default/sb1"));
        let v = serde_json::to_value(vm_config(&s)).expect("json");
        assert_eq!(
            v,
            serde_json::json!({
                "payload": {
                    "kernel": "/run/hako/default/sb1/guest/vmlinux",
                    "initramfs": "/run/hako/default/sb1/guest/initramfs.cpio",
                    "cmdline": "console=ttyS0 quiet tsc=reliable"
                },
                "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
                "memory": {"size": 268435456u64, "shared": true},
                "fs": [{"tag": "hakoShared", "socket": "/run/hako/default/sb1/fs.sock",
                        "num_queues": 1, "queue_size": 1024}],
                "vsock": {"cid": 3, "socket": "/run/hako/default/sb1/vmm/agent.sock"},
                "balloon": {"size": 0, "free_page_reporting": true},
                "serial": {"mode": "Socket", "socket": "/run/hako/default/sb1/vmm/console.sock"},
                "console": {"mode": "Off"}
            })
        );
    }

    #[test]
    fn a_nic_is_its_mac_and_one_queue_pair() {
        let s = crate::vmm::test_spec(Path::new("/x"));
        let v = serde_json::to_value(net_config(&s.net[0])).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"id": "nic0", "mac": "02:42:0a:58:00:02", "num_queues": 2, "queue_size": 256})
        );
    }
}
