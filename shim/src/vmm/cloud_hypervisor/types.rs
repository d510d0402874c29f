//! Request and response bodies of the Cloud Hypervisor HTTP API, as its OpenAPI description
//! (`vmm/src/api/openapi/cloud-hypervisor.yaml` upstream) spells them.
//!
//! Only the members hako uses are modelled. Fields the description marks required are plain
//! fields; the rest are `Option`s that are left out of a request when `None`, so Cloud
//! Hypervisor applies its own default. Parsing ignores members not modelled here, because
//! `vm.info` echoes the whole configuration with every default filled in and newer releases
//! add members.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `GET vmm.ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmPingResponse {
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i64>,
    /// Build features, such as "kvm" or "io_uring".
    #[serde(default)]
    pub features: Vec<String>,
}

/// The state `vm.info` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Created,
    Running,
    Shutdown,
    Paused,
    BreakPoint,
}

/// `GET vm.info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub config: VmConfig,
    pub state: VmState,
    /// Bytes of guest memory currently plugged in (boot memory plus hotplug, less balloon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_actual_size: Option<u64>,
}

/// `PUT vm.create`: the whole VM. Only `payload` is required by the API.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmConfig {
    pub payload: PayloadConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<CpusConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<Vec<NetConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<RngConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<Vec<FsConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<ConsoleConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchdog: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvpanic: Option<bool>,
}

/// What the guest boots: firmware, or a kernel with its initramfs and command line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<PathBuf>,
    /// On x86_64 an ELF vmlinux with a PVH entry point (not a bzImage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusConfig {
    pub boot_vcpus: u32,
    pub max_vcpus: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvm_hyperv: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_phys_bits: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// In bytes.
    pub size: u64,
    /// Guest memory mapped MAP_SHARED, which vhost-user backends such as virtiofsd need.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepages: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mergeable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefault: Option<bool>,
    /// In bytes; memory that can be hot-plugged later with `vm.resize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_size: Option<u64>,
}

/// A virtio-net device (`vm.create`'s `net`, or the body of `vm.add-net`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Name of an existing tap to open; with neither this nor fds Cloud Hypervisor creates one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    /// The guest's MAC, "02:42:0a:58:00:02".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Twice the number of tap queue pairs (one rx and one tx queue per tap fd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Tap fds. Not in the OpenAPI description, but in Cloud Hypervisor's `NetConfig`: any
    /// numbers in a request body are discarded (with a warning), and the descriptors that
    /// came with the request as SCM_RIGHTS take their place — on `vm.add-net` only, since
    /// `vm.create` accepts none. So the client leaves this `None` and passes the fds to
    /// `ApiClient::add_net`; it is here so that the `net` of a `vm.info` answer parses whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fds: Option<Vec<i32>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngConfig {
    pub src: PathBuf,
}

/// A vhost-user-fs device; the API requires all four.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsConfig {
    pub tag: String,
    /// virtiofsd's vhost-user socket.
    pub socket: PathBuf,
    pub num_queues: u32,
    pub queue_size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Where a serial port or console goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleMode {
    Off,
    Pty,
    Tty,
    File,
    Socket,
    Null,
}

/// The legacy serial port (ttyS0 in the guest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialConfig {
    pub mode: ConsoleMode,
    /// With mode `File`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// With mode `Socket`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

/// The virtio console (hvc0 in the guest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleConfig {
    pub mode: ConsoleMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu: Option<bool>,
}

/// Cloud Hypervisor's own virtio-vsock device, proxied to a unix socket on the host ("hybrid
/// vsock"): the host dials `socket` and writes `CONNECT <port>\n`; a guest connection to host
/// port P arrives on `<socket>_P`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's CID, 3 or more.
    pub cid: u64,
    pub socket: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// A virtio-balloon device. hako uses it only for free page reporting: `size` (bytes taken
/// from the guest) stays 0.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonConfig {
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_page_reporting: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deflate_on_oom: Option<bool>,
}

/// `PUT vm.remove-device`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRemoveDevice {
    pub id: String,
}

/// `PUT vm.snapshot`: where a paused VM is saved, a `file://` URL of a directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSnapshotConfig {
    pub destination_url: String,
}

/// `PUT vm.restore`: where the saved VM is, a `file://` URL of a directory. The VM comes back
/// paused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreConfig {
    pub source_url: String,
    /// Touch all guest memory up front (false: the copy from the file is all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefault: Option<bool>,
}

/// The answer to a device hot-plug into a running VM (HTTP 200). Adding a device to a VM that
/// is created but not booted answers 204 with no body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceInfo {
    pub id: String,
    pub bdf: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn to_value<T: Serialize>(v: &T) -> Value {
        serde_json::to_value(v).expect("serialises")
    }

    #[test]
    fn vm_config_serialises_with_the_api_names_and_omits_unset_members() {
        let config = VmConfig {
            payload: PayloadConfig {
                kernel: Some("/g/vmlinux".into()),
                initramfs: Some("/g/initramfs.cpio".into()),
                cmdline: Some("console=ttyS0 quiet".into()),
                firmware: None,
            },
            cpus: Some(CpusConfig {
                boot_vcpus: 2,
                max_vcpus: 2,
                kvm_hyperv: None,
                max_phys_bits: None,
                nested: None,
            }),
            memory: Some(MemoryConfig {
                size: 512 << 20,
                shared: Some(true),
                hugepages: None,
                mergeable: None,
                prefault: None,
                hotplug_size: None,
            }),
            fs: Some(vec![FsConfig {
                tag: "hakoShared".into(),
                socket: "/run/sb/fs.sock".into(),
                num_queues: 1,
                queue_size: 1024,
                id: None,
            }]),
            vsock: Some(VsockConfig {
                cid: 3,
                socket: "/run/sb/agent.sock".into(),
                iommu: None,
                id: None,
            }),
            serial: Some(SerialConfig {
                mode: ConsoleMode::File,
                file: Some("/run/sb/console.log".into()),
                socket: None,
            }),
            console: Some(ConsoleConfig {
                mode: ConsoleMode::Off,
                file: None,
                socket: None,
                iommu: None,
            }),
            ..VmConfig::default()
        };
        assert_eq!(
            to_value(&config),
            json!({
                "payload": {
                    "kernel": "/g/vmlinux",
                    "initramfs": "/g/initramfs.cpio",
                    "cmdline": "console=ttyS0 quiet"
                },
                "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
                "memory": {"size": 536870912u64, "shared": true},
                "fs": [{"tag": "hakoShared", "socket": "/run/sb/fs.sock",
                        "num_queues": 1, "queue_size": 1024}],
                "vsock": {"cid": 3, "socket": "/run/sb/agent.sock"},
                "serial": {"mode": "File", "file": "/run/sb/console.log"},
                "console": {"mode": "Off"}
            })
        );
    }

    #[test]
    fn console_modes_use_the_api_spellings() {
        let modes = [
            (ConsoleMode::Off, "Off"),
            (ConsoleMode::Pty, "Pty"),
            (ConsoleMode::Tty, "Tty"),
            (ConsoleMode::File, "File"),
            (ConsoleMode::Socket, "Socket"),
            (ConsoleMode::Null, "Null"),
        ];
        for (mode, name) in modes {
            assert_eq!(to_value(&mode), json!(name));
            let back: ConsoleMode = serde_json::from_value(json!(name)).expect("parses");
            assert_eq!(back, mode);
        }
        assert!(serde_json::from_value::<ConsoleMode>(json!("off")).is_err());
    }

    #[test]
    fn net_config_carries_mac_and_queues_but_no_fd_numbers_unless_set() {
        let net = NetConfig {
            mac: Some("02:42:0a:58:00:02".into()),
            num_queues: Some(2),
            queue_size: Some(256),
            ..NetConfig::default()
        };
        assert_eq!(
            to_value(&net),
            json!({"mac": "02:42:0a:58:00:02", "num_queues": 2, "queue_size": 256})
        );
        let with_fds = NetConfig {
            fds: Some(vec![7]),
            ..NetConfig::default()
        };
        assert_eq!(to_value(&with_fds), json!({"fds": [7]}));
    }

    #[test]
    fn ping_parses_with_and_without_optional_members() {
        let full: VmmPingResponse = serde_json::from_str(
            r#"{"build_version":"v48.0-12-gabcdef","version":"48.0.0","pid":4242,
                "features":["kvm","io_uring"]}"#,
        )
        .expect("parses");
        assert_eq!(full.version, "48.0.0");
        assert_eq!(full.pid, Some(4242));
        assert_eq!(full.features, ["kvm", "io_uring"]);
        let bare: VmmPingResponse = serde_json::from_str(r#"{"version":"40.0"}"#).expect("parses");
        assert_eq!(bare.build_version, None);
        assert!(bare.features.is_empty());
        // `version` is the one required member.
        assert!(serde_json::from_str::<VmmPingResponse>(r#"{"pid":1}"#).is_err());
    }

    /// Shaped like a real `vm.info` answer: every default filled in, members this module does
    /// not model (rng's iommu, pci_segment, platform, ...), and net fds echoed back.
    const VM_INFO: &str = r#"{
      "config": {
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": false, "max_phys_bits": 46,
                 "features": {}, "nested": true, "core_scheduling": "Vm"},
        "memory": {"size": 268435456, "mergeable": false, "hotplug_method": "Acpi",
                   "shared": true, "hugepages": false, "prefault": false, "reserve": false,
                   "thp": true},
        "payload": {"kernel": "/g/vmlinux", "cmdline": "console=ttyS0",
                    "initramfs": "/g/initramfs.cpio"},
        "rate_limit_groups": null,
        "disks": null,
        "net": [{"tap": null, "ip": "192.168.249.1", "mask": "255.255.255.0",
                 "mac": "02:42:0a:58:00:02", "num_queues": 2, "queue_size": 256,
                 "vhost_user": false, "vhost_mode": "Client", "id": "_net2",
                 "fds": [-1], "pci_segment": 0, "offload_tso": true}],
        "rng": {"src": "/dev/urandom", "iommu": false},
        "balloon": null,
        "fs": [{"tag": "hakoShared", "socket": "/run/sb/fs.sock", "num_queues": 1,
                "queue_size": 1024, "id": "_fs0", "pci_segment": 0}],
        "pmem": null,
        "serial": {"file": "/run/sb/console.log", "mode": "File", "socket": null},
        "console": {"file": null, "mode": "Off", "iommu": false, "socket": null},
        "debug_console": {"file": null, "mode": "Off", "iobase": 233},
        "devices": null,
        "vsock": {"cid": 3, "socket": "/run/sb/agent.sock", "iommu": false,
                  "id": "_vsock1", "pci_segment": 0},
        "pvpanic": false,
        "iommu": false,
        "watchdog": false,
        "platform": null,
        "landlock_enable": false
      },
      "state": "Created",
      "memory_actual_size": 268435456,
      "device_tree": {}
    }"#;

    #[test]
    fn vm_info_parses_a_full_answer() {
        let info: VmInfo = serde_json::from_str(VM_INFO).expect("parses");
        assert_eq!(info.state, VmState::Created);
        assert_eq!(info.memory_actual_size, Some(256 << 20));
        let c = &info.config;
        assert_eq!(c.payload.kernel, Some(PathBuf::from("/g/vmlinux")));
        assert_eq!(c.cpus.as_ref().map(|c| c.boot_vcpus), Some(1));
        assert_eq!(c.memory.as_ref().and_then(|m| m.shared), Some(true));
        let fs = c.fs.as_deref().expect("fs");
        assert_eq!(fs[0].tag, "hakoShared");
        assert_eq!(fs[0].id.as_deref(), Some("_fs0"));
        let net = c.net.as_deref().expect("net");
        assert_eq!(net[0].mac.as_deref(), Some("02:42:0a:58:00:02"));
        assert_eq!(net[0].fds, Some(vec![-1]));
        assert_eq!(c.serial.as_ref().map(|s| s.mode), Some(ConsoleMode::File));
        assert_eq!(c.console.as_ref().map(|s| s.mode), Some(ConsoleMode::Off));
        assert_eq!(c.vsock.as_ref().map(|v| v.cid), Some(3));
        assert_eq!(
            c.rng.as_ref().map(|r| r.src.clone()),
            Some("/dev/urandom".into())
        );
    }

    #[test]
    fn vm_states_use_the_api_spellings() {
        for (state, name) in [
            (VmState::Created, "Created"),
            (VmState::Running, "Running"),
            (VmState::Shutdown, "Shutdown"),
            (VmState::Paused, "Paused"),
            (VmState::BreakPoint, "BreakPoint"),
        ] {
            let parsed: VmState = serde_json::from_value(json!(name)).expect("parses");
            assert_eq!(parsed, state);
        }
        assert!(serde_json::from_value::<VmState>(json!("Booted")).is_err());
    }

    #[test]
    fn required_members_are_required() {
        // FsConfig needs tag, socket, num_queues and queue_size.
        assert!(serde_json::from_str::<FsConfig>(r#"{"tag":"t","socket":"/s"}"#).is_err());
        // VsockConfig needs cid and socket; VmInfo needs config and state.
        assert!(serde_json::from_str::<VsockConfig>(r#"{"cid":3}"#).is_err());
        assert!(serde_json::from_str::<VmInfo>(r#"{"state":"Running"}"#).is_err());
        // VmConfig needs a payload.
        assert!(serde_json::from_str::<VmConfig>(r#"{"cpus":null}"#).is_err());
    }
}
