//! End-to-end: Cloud Hypervisor. Neither test can run on a host without the parts it needs, and
//! `scripts/test.sh` runs each only where they are, reporting it as SKIPPED otherwise:
//!
//! - the API tests need a `cloud-hypervisor` binary (`$HAKO_CLOUD_HYPERVISOR` or $PATH) and a
//!   /dev/kvm that opens; they drive the real process (the VM hako defines; the template VM
//!   booted, paused, resumed and saved where the host can);
//! - the others also need hardware virtualisation (`hako check` says "ok cloud-hypervisor"):
//!   a template saved and restored with the pod's devices, and the whole container path on
//!   Cloud Hypervisor, booted and restored from a template.
//!
//! Run by hand: `HAKO_CLOUD_HYPERVISOR=/path/to/cloud-hypervisor cargo test -p hako-tests
//! --test cloud_hypervisor -- --ignored --test-threads=1 <name>`.

#![allow(clippy::unwrap_used)] // Test code: a failed step should fail the test loudly.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hako_shim::daemon::{resolve_binary, Daemon};
use hako_shim::sandbox::SandboxPaths;
use hako_shim::vmm::cloud_hypervisor::api::ApiClient;
use hako_shim::vmm::cloud_hypervisor::snapshot;
use hako_shim::vmm::cloud_hypervisor::types::{FsConfig, VmState};
use hako_shim::vmm::cloud_hypervisor::{binary_from_env, net_config, template_config, vm_config};
use hako_shim::vmm::template::start::SnapshotError;
use hako_shim::vmm::template::{Shape, Store};
use hako_shim::vmm::{NetDevice, Share, VmSpec};
use hako_tests::*;

const GUEST: &str = "/usr/share/hako/guest";

fn binary() -> PathBuf {
    let wanted = binary_from_env("cloud-hypervisor");
    resolve_binary("cloud-hypervisor", &wanted).unwrap_or_else(|e| {
        panic!("this test needs Cloud Hypervisor ({e}); scripts/test.sh skips it without one")
    })
}

/// The spec the sandbox would give the backend, with the installed guest.
fn spec(dir: &Path, tap_fd: i32) -> VmSpec {
    let files = SandboxPaths::new(dir, "ns", "ch-e2e")
        .unwrap()
        .vm_files(1 << 20);
    fs::create_dir_all(&files.vmm_dir).unwrap();
    VmSpec {
        sandbox_id: "ch-e2e".into(),
        files,
        vcpus: 1,
        memory_mib: 256,
        kernel: PathBuf::from(GUEST).join("vmlinuz"),
        vmlinux: PathBuf::from(GUEST).join("vmlinux"),
        initrd: PathBuf::from(GUEST).join("initramfs.cpio"),
        cmdline: "console=ttyS0".into(),
        share: Share::VirtioFs {
            socket: dir.join("fs.sock"),
        },
        fs_tag: "hakoShared".into(),
        net: vec![NetDevice {
            id: "nic0".into(),
            tap_fds: vec![tap_fd],
            mac: "02:42:0a:58:00:02".into(),
        }],
        netns: None,
        share_ns: None,
        hotplug_slots: 0,
        user: None,
        cgroups: Vec::new(),
    }
}

#[tokio::test]
#[ignore = "needs a cloud-hypervisor binary: run through scripts/test.sh"]
async fn a_real_cloud_hypervisor_takes_the_vm_hako_defines() {
    let binary = binary();
    let dir = std::env::temp_dir().join(format!("hako-ch-e2e-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("api.sock");
    let mut cmd = tokio::process::Command::new(&binary);
    cmd.arg("--api-socket").arg(&socket);
    let vmm = Daemon::spawn(
        "cloud-hypervisor",
        cmd,
        &dir.join("vmm.log"),
        1 << 20,
        &dir.join("vmm.pid"),
    )
    .unwrap();
    vmm.wait_for_socket(&socket, Duration::from_secs(10))
        .await
        .unwrap();
    let api = ApiClient::new(&socket).unwrap();

    let pong = api.ping().await.unwrap();
    assert!(!pong.version.is_empty(), "{pong:?}");

    // The exact definition the backend sends, then what it adds before boot.
    let stand_in_tap = fs::File::create(dir.join("stand-in-tap")).unwrap();
    let spec = spec(&dir, stand_in_tap.as_raw_fd());
    api.create(&vm_config(&spec)).await.unwrap();
    api.add_fs(&FsConfig {
        tag: "second".into(),
        socket: dir.join("second-fs.sock"),
        num_queues: 1,
        queue_size: 1024,
        id: None,
    })
    .await
    .unwrap();
    api.add_net(&net_config(&spec.net[0]), &[stand_in_tap.as_raw_fd()])
        .await
        .unwrap();

    let info = api.info().await.unwrap();
    assert_eq!(info.state, VmState::Created);
    let config = &info.config;
    assert_eq!(
        config.payload.kernel.as_deref(),
        Some(spec.vmlinux.as_path())
    );
    assert_eq!(
        config.payload.initramfs.as_deref(),
        Some(spec.initrd.as_path())
    );
    let memory = config.memory.as_ref().unwrap();
    assert_eq!(memory.size, 256 << 20);
    assert_eq!(memory.shared, Some(true), "virtiofsd needs shared memory");
    let tags: Vec<&str> = config.fs.iter().flatten().map(|f| f.tag.as_str()).collect();
    assert_eq!(tags, ["hakoShared", "second"]);
    assert_eq!(
        config.vsock.as_ref().map(|v| v.socket.clone()),
        Some(spec.files.agent_socket.clone())
    );
    let nets = config.net.as_deref().unwrap();
    assert_eq!(nets[0].mac.as_deref(), Some("02:42:0a:58:00:02"));
    assert_eq!(
        nets[0].id.as_deref(),
        Some("nic0"),
        "the id hako unplugs it by"
    );
    // Cloud Hypervisor's own number for the descriptor that arrived by SCM_RIGHTS.
    assert!(
        matches!(nets[0].fds.as_deref(), Some([fd]) if *fd > 2),
        "{nets:?}"
    );

    // A NIC the pod lost goes by its id; an id it never had is an error.
    let unknown = api.remove_device("nic9").await.unwrap_err();
    assert!(unknown.status().is_some(), "{unknown}");
    api.remove_device("nic0").await.unwrap();
    let info = api.info().await.unwrap();
    assert!(
        info.config.net.iter().flatten().next().is_none(),
        "{info:?}"
    );

    // Errors carry the API's status and message.
    let again = api.create(&vm_config(&spec)).await.unwrap_err();
    assert!(again.to_string().contains("500"), "{again}");
    api.delete().await.unwrap();
    let gone = api.info().await.unwrap_err();
    assert_eq!(gone.status(), Some(404), "{gone}");

    api.vmm_shutdown().await.unwrap();
    let code = tokio::time::timeout(Duration::from_secs(10), vmm.wait())
        .await
        .expect("the VMM exits after vmm.shutdown");
    assert_eq!(code, 0, "log: {}", vmm.log_tail());
    assert!(api.ping().await.is_err());
    drop(stand_in_tap);
    fs::remove_dir_all(&dir).unwrap();
    assert_no_leaks("cloud-hypervisor API test");
}

/// A `cloud-hypervisor` serving its API on `socket`, its log and pid file beside it.
async fn vmm(binary: &Path, dir: &Path, name: &str) -> (Daemon, ApiClient) {
    let socket = dir.join(format!("{name}.sock"));
    let mut cmd = tokio::process::Command::new(binary);
    cmd.arg("--api-socket").arg(&socket);
    let vmm = Daemon::spawn(
        "cloud-hypervisor",
        cmd,
        &dir.join(format!("{name}.log")),
        1 << 20,
        &dir.join(format!("{name}.pid")),
    )
    .unwrap();
    vmm.wait_for_socket(&socket, Duration::from_secs(10))
        .await
        .unwrap();
    (vmm, ApiClient::new(&socket).unwrap())
}

/// A fresh `dir` and, in a VMM of its own, the template VM of the spec for it (no NIC, no share,
/// no vsock device) created and booted.
async fn running_template_vm(dir: &Path) -> (VmSpec, Daemon, ApiClient) {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).unwrap();
    let mut spec = spec(dir, -1);
    spec.net.clear();
    let (vmm, api) = vmm(&binary(), dir, "template").await;
    api.create(&template_config(&spec)).await.unwrap();
    api.boot().await.unwrap();
    assert_eq!(api.info().await.unwrap().state, VmState::Running);
    (spec, vmm, api)
}

async fn shut_down(vmm: Daemon, api: &ApiClient) {
    api.vmm_shutdown().await.unwrap();
    let code = tokio::time::timeout(Duration::from_secs(10), vmm.wait())
        .await
        .expect("the VMM exits after vmm.shutdown");
    assert_eq!(code, 0, "log: {}", vmm.log_tail());
}

/// The part of a template start that runs without hardware virtualisation, with the real
/// binary: the template definition (no share, no vsock device) is created and booted, paused
/// and resumed, and hako's `save` is tried. Where the host's KVM can save a VM (hardware KVM) it
/// saves the three files; where it cannot (kvm-pvm refuses the vCPUs' nested state) the save
/// fails naming the snapshot, and leaves nothing: no copy in the VMM's directory, no file in
/// the scratch directory, no template in the store. Either way is printed.
#[tokio::test]
#[ignore = "needs a cloud-hypervisor binary: run through scripts/test.sh"]
async fn a_real_cloud_hypervisor_runs_the_template_vm_and_a_save_it_refuses_leaves_nothing() {
    let dir = std::env::temp_dir().join(format!("hako-ch-save-{}", std::process::id()));
    let (spec, template_vmm, api) = running_template_vm(&dir).await;
    api.pause().await.unwrap();
    assert_eq!(api.info().await.unwrap().state, VmState::Paused);
    api.resume().await.unwrap();
    assert_eq!(api.info().await.unwrap().state, VmState::Running);

    let store = Store::new(&dir.join("templates"), &dir.join("run"));
    let scratch = store.scratch("k1").unwrap();
    match snapshot::save(&api, &spec, &scratch).await {
        Ok(()) => {
            println!("this host's KVM saves a VM: the three files were copied");
            for name in snapshot::FILES {
                assert!(scratch.join(name).is_file(), "{name}");
            }
        }
        Err(e) => {
            println!("this host's KVM cannot save a VM: {e}");
            assert!(
                matches!(e, SnapshotError::Save(_)) && e.to_string().contains("snapshot"),
                "{e}"
            );
            let left: Vec<_> = fs::read_dir(&scratch).unwrap().flatten().collect();
            assert!(left.is_empty(), "left in the scratch directory: {left:?}");
        }
    }
    assert!(
        !spec.files.vmm_dir.join("template-snapshot").exists(),
        "the VMM's own copy goes either way"
    );
    assert!(store
        .lookup("k1", "test", &snapshot::FILES)
        .unwrap()
        .is_none());
    shut_down(template_vmm, &api).await;
    fs::remove_dir_all(&dir).unwrap();
    assert_no_leaks("cloud-hypervisor template VM test");
}

/// What a template start does with Cloud Hypervisor, with the real binary and a real
/// virtiofsd: the template definition is booted (the agent's wait is the container test's),
/// saved with hako's `save` into the
/// store, and a second VMM restores it with hako's own restore directory and gets the pod's
/// vsock device and share hot-plugged. The NIC's hot-plug needs a real tap and is the
/// container test's, on a KVM host.
#[tokio::test]
#[ignore = "needs cloud-hypervisor and hardware KVM (vm.snapshot reads the vCPUs' state): run through scripts/test.sh"]
async fn a_real_cloud_hypervisor_saves_a_template_vm_and_restores_it_with_the_pods_devices() {
    let binary = binary();
    let dir = std::env::temp_dir().join(format!("hako-ch-template-{}", std::process::id()));
    // The template VM: defined without share or vsock device, booted, saved.
    let (spec, template_vmm, api) = running_template_vm(&dir).await;
    fs::create_dir_all(dir.join("shared")).unwrap();
    let store = Store::new(&dir.join("templates"), &dir.join("run"));
    let scratch = store.scratch("k1").unwrap();
    snapshot::save(&api, &spec, &scratch).await.unwrap();
    assert_eq!(api.info().await.unwrap().state, VmState::Paused);
    assert!(
        !spec.files.vmm_dir.join("template-snapshot").exists(),
        "the VMM's own copy goes once the store has it"
    );
    shut_down(template_vmm, &api).await;
    let shape = Shape {
        inputs: "test".into(),
        vmm: "cloud-hypervisor",
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
    };
    let template = store
        .finish("k1", &scratch, &shape, &snapshot::FILES)
        .unwrap();
    let memory = &template.meta.files[2];
    assert_eq!(memory.name, "memory-ranges");
    assert_eq!(memory.len, u64::from(spec.memory_mib) << 20, "{template:?}");
    // The kernel and initramfs were loaded; the rest of the memory was never touched.
    assert!(
        memory.data > 0 && memory.data < memory.len / 2,
        "{} of {} bytes kept",
        memory.data,
        memory.len
    );
    assert!(store
        .lookup("k1", "test", &snapshot::FILES)
        .unwrap()
        .is_some());

    // The pod's VM: restored from the template, then given its devices.
    let share = fs::canonicalize(dir.join("shared")).unwrap();
    let Share::VirtioFs { socket: fs_socket } = &spec.share else {
        unreachable!()
    };
    let mut cmd = tokio::process::Command::new(resolve_binary("virtiofsd", "virtiofsd").unwrap());
    cmd.arg(format!("--socket-path={}", fs_socket.display()))
        .arg(format!("--shared-dir={}", share.display()))
        .arg("--sandbox=none");
    let virtiofsd = Daemon::spawn(
        "virtiofsd",
        cmd,
        &dir.join("virtiofsd.log"),
        1 << 20,
        &dir.join("virtiofsd.pid"),
    )
    .unwrap();
    virtiofsd
        .wait_for_socket(fs_socket, Duration::from_secs(10))
        .await
        .unwrap();
    let (pod_vmm, api) = vmm(&binary, &dir, "pod").await;
    let restore_dir = snapshot::write_restore_dir(&spec, &template).unwrap();
    snapshot::load(&api, &spec, &restore_dir).await.unwrap();
    let info = api.info().await.unwrap();
    assert_eq!(info.state, VmState::Running);
    assert_eq!(
        info.config.serial.as_ref().and_then(|s| s.socket.clone()),
        Some(spec.files.console_socket.clone()),
        "the restored VM's console is its own"
    );
    assert!(info.config.fs.is_none() && info.config.vsock.is_none());
    snapshot::plug_devices(&api, &spec).await.unwrap();
    let info = api.info().await.unwrap();
    let tags: Vec<&str> = info
        .config
        .fs
        .iter()
        .flatten()
        .map(|f| f.tag.as_str())
        .collect();
    assert_eq!(tags, ["hakoShared"]);
    assert_eq!(
        info.config.vsock.as_ref().map(|v| v.socket.clone()),
        Some(spec.files.agent_socket.clone())
    );
    fs::remove_dir_all(&restore_dir).unwrap();
    shut_down(pod_vmm, &api).await;
    virtiofsd.stop(Duration::from_secs(5)).await;
    fs::remove_dir_all(&dir).unwrap();
    assert_no_leaks("cloud-hypervisor template API test");
}

#[test]
#[ignore = "needs cloud-hypervisor and hardware KVM: run through scripts/test.sh"]
fn a_container_runs_on_cloud_hypervisor() {
    let binary = binary();
    let config = HakoConfig::new(&format!(
        "[hypervisor]\nkind = \"cloud-hypervisor\"\ncloud_hypervisor_path = \"{}\"\n",
        binary.display()
    ));
    for install in containerd_versions() {
        assert_no_leaks("before the test");
        let c = Containerd::start_with_env(&install, &config.env());
        let r = c.run_rm(
            "ch1",
            &[
                "sh",
                "-c",
                "echo on-ch; cat /proc/cmdline; ls /sys/class/net",
            ],
        );
        assert_eq!(r.code, 0, "{r:?}\n{}", c.log());
        assert!(r.stdout.starts_with("on-ch\n"), "{r:?}");

        // The task's pid is the VMM's: it must be Cloud Hypervisor, not QEMU.
        let r = c.run_detached("ch2", &[], &["sleep", "600"]);
        assert_eq!(r.code, 0, "{r:?}");
        let tasks = c.ctr(&["task", "ls"]).stdout;
        let pid = tasks
            .lines()
            .find(|l| l.starts_with("ch2 "))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or_else(|| panic!("ch2 in {tasks}"));
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert!(comm.starts_with("cloud-hyperv"), "{comm}");
        c.remove_task("ch2");
        drop(c);
        assert_no_leaks(&format!("containerd {}", install.display()));
    }
}

/// Cloud Hypervisor with templates on (`hypervisor.templates = true`; they are off by default on
/// this backend): the first pod makes the template and every pod, the first too, starts from it
/// with its own share, vsock channel and network.
#[test]
#[ignore = "needs cloud-hypervisor and hardware KVM: run through scripts/test.sh"]
fn a_container_starts_from_a_template_on_cloud_hypervisor() {
    let binary = binary();
    let templates = std::env::temp_dir().join(format!("hako-ch-templates-{}", std::process::id()));
    let config = HakoConfig::new(&format!(
        "[hypervisor]\nkind = \"cloud-hypervisor\"\ncloud_hypervisor_path = \"{}\"\n\
         templates = true\ntemplate_dir = \"{}\"\n",
        binary.display(),
        templates.display()
    ));
    let install = &containerd_versions()[0];
    assert_no_leaks("before the test");
    let c = Containerd::start_with_env(install, &config.env());
    for id in ["cht1", "cht2"] {
        let r = c.run_rm(id, &["sh", "-c", "echo from-template; ls /sys/class/net"]);
        assert_eq!(r.code, 0, "{r:?}\n{}", c.log());
        assert!(r.stdout.starts_with("from-template\n"), "{r:?}");
        assert!(
            r.stdout.contains("eth0"),
            "the pod's NIC was plugged: {r:?}"
        );
        assert!(c.restored(id), "{id}: {}", c.start_phases(id));
    }
    assert!(
        c.start_phases("cht1")
            .contains("vmm_started.template_build="),
        "the first start made the template"
    );
    let kept: Vec<_> = fs::read_dir(&templates)
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert_eq!(kept.len(), 1, "one template: {kept:?}");
    drop(c);
    assert_no_leaks("cloud-hypervisor templates");
    fs::remove_dir_all(&templates).unwrap();
}
