//! The template files and requests of Cloud Hypervisor, against a fake API server; the real
//! binary drives them in tests/tests/cloud_hypervisor.rs.

#![allow(clippy::unwrap_used)]

use std::os::fd::AsRawFd;

use super::super::api::fake::{fake_server, Reply, TempDir};
use super::*;
use crate::vmm::template::create_file;

fn spec(dir: &Path) -> VmSpec {
    let mut spec = crate::vmm::test_spec(dir);
    spec.files = VmFiles::under(dir, 1 << 20);
    std::fs::create_dir_all(&spec.files.vmm_dir).unwrap();
    spec
}

/// A definition as Cloud Hypervisor saves it: the template's, with defaults filled in and
/// members hako does not model.
fn saved_config() -> serde_json::Value {
    serde_json::json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": false},
        "memory": {"size": 268435456u64, "shared": true, "mergeable": false},
        "payload": {"kernel": "/usr/share/hako/guest/vmlinux"},
        "serial": {"mode": "Socket", "file": null, "socket": "/run/hako/x/vmm/template-console.sock"},
        "console": {"mode": "Off"},
        "fs": null,
        "vsock": null,
        "rng": {"src": "/dev/urandom", "iommu": false},
        "platform": {"num_pci_segments": 1}
    })
}

#[test]
fn a_restored_definition_gets_the_vms_console_and_keeps_everything_else() {
    let bytes = serde_json::to_vec(&saved_config()).unwrap();
    let out = restore_config(&bytes, Path::new("/run/hako/ns/sb/vmm/console.sock")).unwrap();
    let out: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let mut want = saved_config();
    want["serial"]["socket"] = "/run/hako/ns/sb/vmm/console.sock".into();
    assert_eq!(out, want);
}

#[test]
fn a_definition_that_is_not_a_templates_is_refused() {
    let console = Path::new("/c.sock");
    for device in ["fs", "vsock", "net"] {
        let mut config = saved_config();
        config[device] = serde_json::json!([{"socket": "/elsewhere"}]);
        let err = restore_config(&serde_json::to_vec(&config).unwrap(), console).unwrap_err();
        assert!(err.contains(device), "{err}");
    }
    let mut config = saved_config();
    config.as_object_mut().unwrap().remove("serial");
    let err = restore_config(&serde_json::to_vec(&config).unwrap(), console).unwrap_err();
    assert!(err.contains("serial"), "{err}");
    for garbage in [&b"{"[..], b"[]", b"\"x\""] {
        assert!(restore_config(garbage, console).is_err());
    }
}

#[tokio::test]
async fn a_restored_vm_gets_its_vsock_device_share_and_nics() {
    let dir = TempDir::new("plug");
    let mut seen = fake_server(&dir, (0..3).map(|_| Reply::With(204, "")).collect());
    let api = ApiClient::with_timeout(dir.socket(), Duration::from_secs(5)).unwrap();
    let tap = File::open("/dev/null").unwrap();
    let mut spec = spec(&dir.0);
    spec.net[0].tap_fds = vec![tap.as_raw_fd()];
    plug_devices(&api, &spec).await.unwrap();
    let vsock = seen.recv().await.unwrap();
    assert_eq!(vsock.request_line(), "PUT /api/v1/vm.add-vsock HTTP/1.1");
    assert_eq!(
        vsock.json()["socket"],
        spec.files.agent_socket.display().to_string()
    );
    let fs = seen.recv().await.unwrap();
    assert_eq!(fs.request_line(), "PUT /api/v1/vm.add-fs HTTP/1.1");
    assert_eq!(fs.json()["tag"], "hakoShared");
    let net = seen.recv().await.unwrap();
    assert_eq!(net.request_line(), "PUT /api/v1/vm.add-net HTTP/1.1");
    assert_eq!(net.json()["id"], "nic0");
    assert_eq!(net.fds.len(), 1, "the tap queue goes along");
}

/// A template with Cloud Hypervisor's files, in a store under `dir`.
fn stored_template(dir: &Path) -> Template {
    let store = Store::new(&dir.join("templates"), &dir.join("run"));
    let scratch = store.scratch("k1").unwrap();
    std::fs::write(
        scratch.join("config.json"),
        serde_json::to_vec(&saved_config()).unwrap(),
    )
    .unwrap();
    std::fs::write(scratch.join("state.json"), b"{\"snapshots\":[]}").unwrap();
    let memory = create_file(&scratch, "memory-ranges").unwrap();
    memory.set_len(8 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&memory, b"guest", 4 << 20).unwrap();
    let shape = Shape {
        inputs: "inputs".into(),
        vmm: "cloud-hypervisor",
        vcpus: 1,
        memory_mib: 256,
    };
    store.finish("k1", &scratch, &shape, &FILES).unwrap()
}

#[test]
fn a_restore_directory_is_the_templates_snapshot_with_this_vms_console() {
    let dir = TempDir::new("restore-dir");
    let template = stored_template(&dir.0);
    let spec = spec(&dir.0);
    let out = write_restore_dir(&spec, &template).unwrap();
    assert_eq!(out, spec.files.vmm_dir.join("restore"));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["serial"]["socket"],
        spec.files.console_socket.display().to_string()
    );
    for name in ["state.json", "memory-ranges"] {
        assert_eq!(
            std::fs::read(out.join(name)).unwrap(),
            std::fs::read(template.file(name)).unwrap(),
            "{name}"
        );
    }
    // Written again for the next VM, whatever the last one left there.
    std::fs::write(out.join("stale"), b"x").unwrap();
    write_restore_dir(&spec, &template).unwrap();
    assert!(!out.join("stale").exists());
}

#[test]
fn what_the_vmm_wrote_is_read_only_as_regular_files_within_their_cap() {
    let dir = TempDir::new("hostile");
    let out = dir.0.join("template-snapshot");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(dir.0.join("secret"), b"root's").unwrap();
    std::os::unix::fs::symlink(dir.0.join("secret"), out.join("config.json")).unwrap();
    nix::unistd::mkfifo(&out.join("state.json"), Mode::from_bits_truncate(0o600)).unwrap();
    std::fs::write(out.join("memory-ranges"), vec![1u8; 8192]).unwrap();
    let fd = open_dir(&out).unwrap();
    let link = open_file_in(&fd, "config.json", JSON_MAX).unwrap_err();
    assert_eq!(link.raw_os_error(), Some(libc::ELOOP), "{link}");
    let fifo = open_file_in(&fd, "state.json", JSON_MAX).unwrap_err();
    assert!(fifo.to_string().contains("not a regular file"), "{fifo}");
    let big = open_file_in(&fd, "memory-ranges", 4096).unwrap_err();
    assert!(big.to_string().contains("more than"), "{big}");
    assert!(open_file_in(&fd, "memory-ranges", 8192).is_ok());
    // The directory itself swapped for a link.
    std::fs::rename(&out, dir.0.join("moved")).unwrap();
    std::os::unix::fs::symlink(dir.0.join("moved"), &out).unwrap();
    let err = open_dir(&out).unwrap_err();
    assert!(
        matches!(err.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)),
        "{err}"
    );
}

#[test]
fn the_shape_follows_the_definition_and_leaves_out_the_vms_own_paths() {
    let dir = TempDir::new("shape");
    let ch = CloudHypervisor {
        binary: PathBuf::from("/bin/true"),
        version: "v54.0.0".into(),
        vmm: None,
        api: None,
        templates: None,
        started: crate::vmm::StartKind::Cold,
    };
    let a = spec(&dir.0.join("a"));
    let one = ch.shape(&a);
    let mut b = a.clone();
    b.sandbox_id = "b".into();
    b.files = VmFiles::under(&dir.0.join("b"), 1 << 20);
    assert_eq!(one.inputs, ch.shape(&b).inputs);
    let mut bigger = a.clone();
    bigger.memory_mib *= 2;
    assert_ne!(one.inputs, ch.shape(&bigger).inputs);
    assert!(one.inputs.contains("v54.0.0"), "{}", one.inputs);
    assert!(!one.inputs.contains("\"fs\""), "{}", one.inputs);
}
