//! Templates for QEMU (ADR 14): making one (boot a VM without its share, vsock device or NICs,
//! wait for the agent's `TEMPLATE_POINT` on the console, save the VM with QEMU's migration to a
//! file) and starting a VM from one (QEMU loads the saved VM into its own memory, then the
//! vsock device, the share and the NICs are hot-plugged and the agent, woken by their uevents,
//! goes on as from a boot).
//!
//! The saved state travels as a descriptor (`getfd`, `fd:` URIs): QEMU runs without the right
//! to spawn (`-sandbox spawn=deny`) and cannot open the template store.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::process::Command;

use super::args::{template_command_line, MEMORY_FD, SHARE_PORT, VSOCK_PORT};
use super::Qemu;
use crate::daemon::{resolve_binary, Daemon};
use crate::vmm::qmp::Qmp;
use crate::vmm::template::start::{self, Restored, SnapshotError};
use crate::vmm::template::{self, Shape, Store, Template};
use crate::vmm::Hypervisor;
use crate::vmm::{Share, VmSpec, VmmError};

/// How long QEMU may take to save or load a VM.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
/// A QEMU template's files: the migration stream, and the guest memory.
const FILES: [&str; 2] = ["state", "mem"];

impl Qemu {
    /// The shape of `spec`: the template command line with the paths that are this VM's own
    /// replaced, so that every VM of the shape has the same text.
    fn shape(&self, spec: &VmSpec, qemu: &Path) -> Shape {
        let mut canonical = spec.clone();
        canonical.sandbox_id = "template".to_string();
        canonical.files = crate::vmm::VmFiles::under(Path::new("/template"), 0);
        let args = template_command_line(&canonical, &self.host);
        Shape {
            // The binary's identity stands for its version: a saved VM loads only into the
            // QEMU that saved it.
            inputs: template::inputs(&args, &[qemu, &spec.kernel, &spec.initrd]),
            vmm: "qemu",
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
        }
    }

    /// Starts the VM from the template of its shape, making the template first if there is
    /// none. A template that cannot be used is removed (the next start makes a fresh one).
    pub(super) async fn start_from_template(
        &mut self,
        spec: &VmSpec,
    ) -> Result<Restored, SnapshotError> {
        let Share::VirtioFs { socket } = &spec.share else {
            return Err(SnapshotError::NotApplicable(
                "virtio-9p shares are served by QEMU itself, which a template cannot carry"
                    .to_string(),
            ));
        };
        if spec.net.len() > spec.hotplug_slots as usize {
            return Err(SnapshotError::NotApplicable(format!(
                "{} NICs, more than the {} hot-plug slots a restored VM has",
                spec.net.len(),
                spec.hotplug_slots
            )));
        }
        let qemu =
            resolve_binary("qemu-system-x86_64", &self.config.path).map_err(VmmError::from)?;
        let store = Store::new(&self.config.template_dir, &self.sandbox_root);
        let shape = self.shape(spec, &qemu);
        let (template, built) =
            start::find_or_build(&store, &shape, &FILES, &spec.sandbox_id, |scratch| {
                self.save_template_vm(spec, &qemu, scratch)
            })
            .await?;
        let started = Instant::now();
        if let Err(e) = self.restore(spec, &qemu, &template).await {
            if e.is_the_templates_fault() {
                store.remove(&template.key);
            }
            return Err(e);
        }
        let restore = started.elapsed();
        let started = Instant::now();
        self.plug_devices(spec, socket).await?;
        Ok(Restored {
            built,
            restore,
            hotplug: started.elapsed(),
        })
    }

    /// Boots the template VM with its memory in `scratch`'s `mem`, waits for its agent's wait,
    /// and saves the rest into `state`.
    async fn save_template_vm(
        &self,
        spec: &VmSpec,
        qemu: &Path,
        scratch: PathBuf,
    ) -> Result<(), SnapshotError> {
        let state = template::create_file(&scratch, "state")?;
        let mem = template::create_file(&scratch, "mem")?;
        let vm_spec = start::template_vm_spec(spec);
        let listener =
            tokio::net::UnixListener::bind(&vm_spec.files.console_socket).map_err(|source| {
                VmmError::Files {
                    path: vm_spec.files.console_socket.clone(),
                    source,
                }
            })?;
        crate::vmm::hand_to(spec.user.as_ref(), &vm_spec.files.console_socket)?;
        let mut cmd = Command::new(qemu);
        cmd.args(template_command_line(&vm_spec, &self.host));
        // It has no NIC and reaches nothing: a network namespace of its own, empty.
        let (mut how, _held) = crate::vmm::confinement(spec, false)?;
        how.empty_netns = true;
        crate::daemon::confine(&mut cmd, how);
        hand_memory(&mut cmd, spec, &mem)?;
        let vm = Daemon::spawn(
            "qemu (template)",
            cmd,
            &spec.files.template_log,
            spec.files.log_max,
            &spec.files.template_pid,
        )
        .map_err(VmmError::from)?;
        drop(mem);
        let result = async {
            let console = async { listener.accept().await.map(|(stream, _)| stream) };
            start::wait_for_template_point(console, &vm).await?;
            let mut qmp = connect(&vm_spec.files.control_socket).await?;
            qmp.execute("stop", None).await.map_err(VmmError::from)?;
            migration_capabilities(&mut qmp).await?;
            qmp.send_fd("template", std::os::fd::AsRawFd::as_raw_fd(&state))
                .await
                .map_err(VmmError::from)?;
            qmp.execute("migrate", Some(json!({ "uri": "fd:template" })))
                .await
                .map_err(VmmError::from)?;
            migration_done(&mut qmp).await?;
            let _ = qmp.execute("quit", None).await;
            Ok::<(), SnapshotError>(())
        }
        .await;
        if tokio::time::timeout(Duration::from_secs(5), vm.wait())
            .await
            .is_err()
        {
            vm.stop(Duration::from_secs(1)).await;
        }
        let _ = std::fs::remove_file(&spec.files.template_pid);
        let _ = std::fs::remove_file(&vm_spec.files.console_socket);
        result
    }

    /// Starts QEMU on the template's machine, loads the saved VM into it and runs it.
    async fn restore(
        &mut self,
        spec: &VmSpec,
        qemu: &Path,
        template: &Template,
    ) -> Result<(), SnapshotError> {
        let state_path = template.file("state");
        let state = std::fs::File::open(&state_path).map_err(|source| VmmError::Files {
            path: state_path.clone(),
            source,
        })?;
        let mem = own_memory(spec, template)?;
        let mut args = template_command_line(spec, &self.host);
        args.extend(["-incoming".to_string(), "defer".to_string()]);
        let fds = [std::os::fd::AsRawFd::as_raw_fd(&mem)];
        self.spawn_vmm(spec, qemu, args, &fds).await?;
        drop(mem);
        let loaded = async {
            let mut qmp = self.qmp_when_listening(&spec.files.control_socket).await?;
            migration_capabilities(&mut qmp).await?;
            qmp.send_fd("template", std::os::fd::AsRawFd::as_raw_fd(&state))
                .await
                .map_err(VmmError::from)?;
            qmp.execute("migrate-incoming", Some(json!({ "uri": "fd:template" })))
                .await
                .map_err(VmmError::from)?;
            // Only here does the saved state itself meet QEMU.
            migration_done(&mut qmp)
                .await
                .map_err(|e| SnapshotError::Restore(e.to_string()))?;
            // The template was saved stopped, and a VM keeps its run state across a migration.
            qmp.execute("cont", None).await.map_err(VmmError::from)?;
            Ok::<(), SnapshotError>(())
        }
        .await;
        if let Err(e) = loaded {
            let log = self.log_tail();
            self.kill_vmm().await;
            return Err(match e {
                SnapshotError::Restore(reason) => {
                    SnapshotError::Restore(format!("{reason}; qemu: {log}"))
                }
                other => SnapshotError::VmmStart(format!("{other}; qemu: {log}")),
            });
        }
        Ok(())
    }

    /// Hot-plugs the vsock device, the share and the NICs into a restored VM's root ports.
    async fn plug_devices(&mut self, spec: &VmSpec, share_socket: &Path) -> Result<(), VmmError> {
        let mut qmp = self.qmp().await?;
        for (id, socket, port, device) in [
            (
                "vsock0",
                &spec.files.vsock_socket,
                VSOCK_PORT,
                json!({ "driver": "vhost-user-vsock-pci" }),
            ),
            (
                "fs0",
                &share_socket.to_path_buf(),
                SHARE_PORT,
                json!({ "driver": "vhost-user-fs-pci", "queue-size": 1024, "tag": spec.fs_tag }),
            ),
        ] {
            qmp.execute(
                "chardev-add",
                Some(json!({
                    "id": id,
                    "backend": { "type": "socket", "data": {
                        "addr": { "type": "unix", "data": { "path": socket.display().to_string() } },
                        "server": false,
                    }},
                })),
            )
            .await?;
            let mut device = device;
            device["id"] = json!(id);
            device["chardev"] = json!(id);
            device["bus"] = json!(port);
            qmp.execute("device_add", Some(device)).await?;
        }
        drop(qmp);
        self.ports = vec![None; spec.hotplug_slots as usize];
        for nic in &spec.net {
            self.plug(nic).await?;
        }
        Ok(())
    }
}

/// Makes the template of the configuration's own shape (`hako template build`), replacing the
/// one there.
pub async fn build_for_config(config: &crate::config::Config) -> Result<Template, SnapshotError> {
    let root = &config.runtime.sandbox_root;
    start::in_scratch_sandbox(root, |dir| async move {
        let files = crate::vmm::VmFiles::under(&dir, config.runtime.log_max_bytes);
        let share = Share::VirtioFs {
            socket: dir.join("fs.sock"),
        };
        let spec = VmSpec::from_config(config, "template", files, share);
        let qemu = Qemu::new(&config.hypervisor, &config.vsock, root)?;
        let binary = resolve_binary("qemu-system-x86_64", &config.hypervisor.path)
            .map_err(VmmError::from)?;
        let store = Store::new(&config.hypervisor.template_dir, root);
        let shape = qemu.shape(&spec, &binary);
        start::build(&store, &shape, &FILES, "template", true, |scratch| {
            qemu.save_template_vm(&spec, &binary, scratch)
        })
        .await
    })
    .await
}

/// QEMU makes its QMP socket as it starts: it is there by the time the guest speaks.
async fn connect(socket: &Path) -> Result<Qmp, VmmError> {
    Ok(Qmp::connect(socket).await?)
}

/// Events for the migration's end, and its memory left out of the stream: it is in the file
/// the VM's memory lives in (`x-ignore-shared`).
async fn migration_capabilities(qmp: &mut Qmp) -> Result<(), VmmError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [
            { "capability": "events", "state": true },
            { "capability": "x-ignore-shared", "state": true },
        ] })),
    )
    .await?;
    Ok(())
}

/// Gives QEMU (running as the VMM's user) the memory file as `MEMORY_FD`.
fn hand_memory(cmd: &mut Command, spec: &VmSpec, mem: &std::fs::File) -> Result<(), VmmError> {
    use std::os::fd::AsRawFd;
    if let Some(user) = &spec.user {
        std::os::unix::fs::fchown(mem, Some(user.uid), Some(user.gid)).map_err(|source| {
            VmmError::Files {
                path: spec.files.vmm_dir.join("mem"),
                source,
            }
        })?;
    }
    let fd = mem.as_raw_fd();
    // SAFETY: runs in the forked child before exec and only calls dup2 (async-signal-safe).
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, MEMORY_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// The restored VM's own memory: a copy of the template's data in a file of its sandbox
/// (`vmm/mem`, on the sandbox root's tmpfs), which QEMU and the device backends map shared.
fn own_memory(spec: &VmSpec, template: &Template) -> Result<std::fs::File, VmmError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = spec.files.vmm_dir.join("mem");
    let files_err = |source| VmmError::Files {
        path: path.clone(),
        source,
    };
    let _ = std::fs::remove_file(&path);
    let file = std::fs::OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(files_err)?;
    let from = std::fs::File::open(template.file("mem")).map_err(files_err)?;
    template::copy_sparse(&from, &file).map_err(files_err)?;
    if let Some(user) = &spec.user {
        std::os::unix::fs::fchown(&file, Some(user.uid), Some(user.gid)).map_err(files_err)?;
    }
    Ok(file)
}

/// Waits for the migration to end, in either direction.
async fn migration_done(qmp: &mut Qmp) -> Result<(), SnapshotError> {
    let event = qmp
        .wait_event(
            "MIGRATION",
            |e| matches!(e["data"]["status"].as_str(), Some("completed" | "failed")),
            MIGRATION_TIMEOUT,
        )
        .await
        .map_err(VmmError::from)?;
    if event["data"]["status"] == "completed" {
        Ok(())
    } else {
        let info = qmp.execute("query-migrate", None).await.unwrap_or_default();
        Err(VmmError::Control {
            vmm: "qemu",
            message: format!(
                "the migration failed: {}",
                info["error-desc"].as_str().unwrap_or("no reason given")
            ),
        }
        .into())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::vmm::NetDevice;

    #[tokio::test]
    async fn a_restored_vm_gets_its_vsock_device_share_and_nics_in_their_ports() {
        let dir = std::env::temp_dir().join(format!("hako-restore-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let socket = dir.join("qmp.sock");
        let ok = "{\"return\": {}}\n";
        // plug_devices' own connection, then the NIC's.
        let server =
            crate::vmm::qmp::fake::qemu_sessions(&socket, vec![vec![ok; 5], vec![ok; 4]]).await;
        let mut qemu = crate::vmm::qemu::on_socket(&socket, Vec::new(), None);
        let tap = std::fs::File::open("/dev/null").expect("a stand-in for a tap queue");
        let mut spec = crate::vmm::test_spec(Path::new("/run/hako/default/sb1"));
        spec.hotplug_slots = 2;
        spec.net = vec![NetDevice {
            id: "nic0".into(),
            tap_fds: vec![std::os::fd::AsRawFd::as_raw_fd(&tap)],
            mac: "02:42:ac:11:00:02".into(),
        }];
        qemu.plug_devices(&spec, Path::new("/run/hako/default/sb1/fs.sock"))
            .await
            .expect("plugged");
        assert_eq!(qemu.ports, [Some("nic0".to_string()), None]);
        let seen = server.await.expect("server");
        let seen: Vec<&str> = seen.iter().map(String::as_str).collect();
        assert_eq!(
            seen[1..5],
            [
                r#"{"arguments":{"backend":{"data":{"addr":{"data":{"path":"/run/hako/default/sb1/vmm/vhu.sock"},"type":"unix"},"server":false},"type":"socket"},"id":"vsock0"},"execute":"chardev-add"}"#,
                r#"{"arguments":{"bus":"vsockport","chardev":"vsock0","driver":"vhost-user-vsock-pci","id":"vsock0"},"execute":"device_add"}"#,
                r#"{"arguments":{"backend":{"data":{"addr":{"data":{"path":"/run/hako/default/sb1/fs.sock"},"type":"unix"},"server":false},"type":"socket"},"id":"fs0"},"execute":"chardev-add"}"#,
                r#"{"arguments":{"bus":"fsport","chardev":"fs0","driver":"vhost-user-fs-pci","id":"fs0","queue-size":1024,"tag":"hakoShared"},"execute":"device_add"}"#,
            ]
        );
        assert!(
            seen[7].contains("netdev_add") && seen[8].contains("nicport0"),
            "{seen:?}"
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
