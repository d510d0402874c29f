//! Templates for Cloud Hypervisor (ADR 14).
//!
//! Making one: a VMM of its own boots the template definition (`template_config`: no share,
//! no vsock device, no NIC), the agent's `TEMPLATE_POINT` is read on the serial socket, the VM
//! is paused and `vm.snapshot` saves it into a directory of the sandbox's (Cloud Hypervisor
//! runs as the VMM's user and cannot write the store). The shim copies the snapshot into the
//! store, the guest memory without its zero pages.
//!
//! Starting from one: the snapshot is copied into a directory of the VM's own with its
//! definition pointed at this VM's console socket, `vm.restore` loads it (Cloud Hypervisor
//! copies the memory into the VM's own shared memory, which virtiofsd can map; its on-demand
//! mode is not used, because a backend's own mapping of a page the fault handler has not
//! filled yet would read zeros), the directory goes, the VM resumes, and the vsock device, the
//! share and the NICs are hot-plugged. The agent, woken by their uevents, goes on as from a
//! boot.
//!
//! Whatever Cloud Hypervisor wrote is read without following links, and is capped.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;

use super::api::{ApiClient, ApiError};
use super::types::RestoreConfig;
use super::{
    fs_config, net_config, template_config, vsock_config, CloudHypervisor, CloudHypervisorError,
    READY_TIMEOUT,
};
use crate::vmm::template::start::{self, Restored, SnapshotError};
use crate::vmm::template::{self, Shape, Store, Template};
use crate::vmm::{Hypervisor, Share, VmFiles, VmSpec, VmmError};

/// A Cloud Hypervisor template's files: its snapshot, as `vm.snapshot` names them.
pub const FILES: [&str; 3] = ["config.json", "state.json", "memory-ranges"];
/// How long Cloud Hypervisor may take to save or load a VM.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);
/// The most a snapshot's definition or device state may be.
const JSON_MAX: u64 = 16 << 20;

impl CloudHypervisor {
    /// The shape of `spec`: the template definition with the paths that are this VM's own
    /// replaced, the binary, kernel and initramfs by identity, and the version.
    fn shape(&self, spec: &VmSpec) -> Shape {
        let mut canonical = spec.clone();
        canonical.sandbox_id = "template".to_string();
        canonical.files = VmFiles::under(Path::new("/template"), 0);
        let definition = serde_json::to_string(&template_config(&canonical)).unwrap_or_default();
        Shape {
            inputs: template::inputs(
                &[self.version.clone(), definition],
                &[&self.binary, &spec.vmlinux, &spec.initrd],
            ),
            vmm: "cloud-hypervisor",
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
        let Some(settings) = self.templates.clone() else {
            return Err(SnapshotError::NotApplicable(
                "templates are off".to_string(),
            ));
        };
        let store = Store::new(&settings.dir, &settings.sandbox_root);
        let shape = self.shape(spec);
        let (template, built) =
            start::find_or_build(&store, &shape, &FILES, &spec.sandbox_id, |scratch| {
                self.save_template_vm(spec, scratch)
            })
            .await?;
        let started = Instant::now();
        if let Err(e) = self.restore(spec, &template).await {
            if e.is_the_templates_fault() {
                store.remove(&template.key);
            }
            self.kill_vmm().await;
            return Err(e);
        }
        let restore = started.elapsed();
        let started = Instant::now();
        let api = self.api.as_ref().ok_or(VmmError::NotRunning)?;
        plug_devices(api, spec)
            .await
            .map_err(|e| VmmError::from(CloudHypervisorError::from(e)))?;
        Ok(Restored {
            built,
            restore,
            hotplug: started.elapsed(),
        })
    }

    /// Boots the template VM in a VMM of its own, waits for its agent's wait, and saves it into
    /// `scratch`.
    async fn save_template_vm(&self, spec: &VmSpec, scratch: PathBuf) -> Result<(), SnapshotError> {
        let vm_spec = start::template_vm_spec(spec);
        let socket = vm_spec.files.control_socket.clone();
        let files = (
            spec.files.template_log.as_path(),
            spec.files.template_pid.as_path(),
        );
        // It has no NIC and reaches nothing: a network namespace of its own, empty.
        let vm = self
            .spawn_daemon(spec, &socket, "cloud-hypervisor (template)", files, true)
            .await?;
        let result = async {
            vm.wait_for_socket(&socket, READY_TIMEOUT)
                .await
                .map_err(VmmError::from)?;
            let api = ApiClient::with_timeout(&socket, SNAPSHOT_TIMEOUT)
                .map_err(CloudHypervisorError::from)
                .map_err(VmmError::from)?;
            let ch = |e: ApiError| SnapshotError::Save(format!("{e}; log: {}", vm.log_tail()));
            api.create(&template_config(&vm_spec)).await.map_err(ch)?;
            // The serial socket is there once the VM is defined: connected before the boot, it
            // misses nothing.
            let console = tokio::net::UnixStream::connect(&vm_spec.files.console_socket).await;
            api.boot().await.map_err(ch)?;
            start::wait_for_template_point(async { console }, &vm).await?;
            save(&api, spec, &scratch).await
        }
        .await;
        let api = ApiClient::with_timeout(&socket, READY_TIMEOUT);
        if let Ok(api) = api {
            let _ = api.vmm_shutdown().await;
        }
        if tokio::time::timeout(Duration::from_secs(5), vm.wait())
            .await
            .is_err()
        {
            vm.kill().await;
        }
        for path in [
            &spec.files.template_pid,
            &vm_spec.files.console_socket,
            &socket,
        ] {
            let _ = std::fs::remove_file(path);
        }
        result
    }

    /// Starts the pod's VMM on the template: its own copy of the snapshot, `vm.restore`, the
    /// console, `vm.resume`.
    async fn restore(&mut self, spec: &VmSpec, template: &Template) -> Result<(), SnapshotError> {
        let dir = write_restore_dir(spec, template)?;
        let loaded = async {
            if let Err(e) = self.spawn_vmm(spec).await {
                return Err(SnapshotError::VmmStart(e.to_string()));
            }
            let api = self.api.as_ref().ok_or(VmmError::NotRunning)?;
            load(&api.with_call_timeout(SNAPSHOT_TIMEOUT), spec, &dir).await
        }
        .await;
        let _ = std::fs::remove_dir_all(&dir);
        let log = self.log_tail();
        loaded.map_err(|e| match e {
            SnapshotError::Restore(reason) => {
                SnapshotError::Restore(format!("{reason}; log: {log}"))
            }
            other => SnapshotError::VmmStart(format!("{other}; log: {log}")),
        })
    }
}

/// Saves the running VM behind `api` into `scratch` (pause, `vm.snapshot` into
/// `<vmm_dir>/template-snapshot`, then a capped copy of each file that follows no link).
pub async fn save(api: &ApiClient, spec: &VmSpec, scratch: &Path) -> Result<(), SnapshotError> {
    let failed = |e: ApiError| SnapshotError::Save(e.to_string());
    api.pause().await.map_err(failed)?;
    let out = spec.files.vmm_dir.join("template-snapshot");
    let _ = std::fs::remove_dir_all(&out);
    let files_err = |source| VmmError::Files {
        path: out.clone(),
        source,
    };
    std::fs::create_dir(&out).map_err(files_err)?;
    crate::vmm::hand_to(spec.user.as_ref(), &out)?;
    let result = async {
        api.snapshot(&file_url(&out)).await.map_err(failed)?;
        let dir = open_dir(&out).map_err(files_err)?;
        let memory = u64::from(spec.memory_mib) << 20;
        for name in FILES {
            let cap = if name == "memory-ranges" {
                memory
            } else {
                JSON_MAX
            };
            let from = open_file_in(&dir, name, cap).map_err(|e| {
                SnapshotError::Save(format!("{name} as Cloud Hypervisor wrote it: {e}"))
            })?;
            let to = template::create_file(scratch, name)?;
            template::copy_sparse(&from, &to).map_err(|source| VmmError::Files {
                path: scratch.join(name),
                source,
            })?;
        }
        Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&out);
    result
}

/// Makes `<vmm_dir>/restore`: the template's snapshot for this VM, readable by its VMM, with
/// the definition's serial socket this VM's console socket. Returns the directory.
pub fn write_restore_dir(spec: &VmSpec, template: &Template) -> Result<PathBuf, SnapshotError> {
    let out = spec.files.vmm_dir.join("restore");
    let _ = std::fs::remove_dir_all(&out);
    let files_err = |path: PathBuf| {
        move |source| VmmError::Files {
            path: path.clone(),
            source,
        }
    };
    std::fs::create_dir(&out).map_err(files_err(out.clone()))?;
    let unusable = |reason: String| template::TemplateError::Unusable {
        key: template.key.clone(),
        reason,
    };
    let config = std::fs::read(template.file("config.json"))
        .map_err(|e| unusable(format!("config.json: {e}")))?;
    let config = restore_config(&config, &spec.files.console_socket).map_err(unusable)?;
    std::fs::write(out.join("config.json"), config).map_err(files_err(out.join("config.json")))?;
    for name in ["state.json", "memory-ranges"] {
        let to = template::create_file(&out, name)?;
        template::copy_sparse(
            &File::open(template.file(name)).map_err(files_err(template.file(name)))?,
            &to,
        )
        .map_err(files_err(out.join(name)))?;
    }
    for name in FILES {
        crate::vmm::hand_to(spec.user.as_ref(), &out.join(name))?;
    }
    crate::vmm::hand_to(spec.user.as_ref(), &out)?;
    Ok(out)
}

/// The template's definition (`config.json`) for one VM: its serial socket is the VM's own.
/// A definition with a share, vsock device or NIC is not a template's.
fn restore_config(config: &[u8], console_socket: &Path) -> Result<Vec<u8>, String> {
    let mut value: serde_json::Value =
        serde_json::from_slice(config).map_err(|e| format!("config.json: {e}"))?;
    let object = value
        .as_object_mut()
        .ok_or("config.json is not an object")?;
    for device in ["fs", "vsock", "net"] {
        if object.get(device).is_some_and(|d| !d.is_null()) {
            return Err(format!(
                "config.json defines {device}, which a template has not"
            ));
        }
    }
    let serial = object
        .get_mut("serial")
        .and_then(|s| s.as_object_mut())
        .ok_or("config.json has no serial port")?;
    serial.insert(
        "socket".to_string(),
        serde_json::Value::String(console_socket.display().to_string()),
    );
    serde_json::to_vec(&value).map_err(|e| e.to_string())
}

/// Loads the snapshot in `dir` into the fresh VMM behind `api`, reads its console and runs it.
pub async fn load(api: &ApiClient, spec: &VmSpec, dir: &Path) -> Result<(), SnapshotError> {
    let failed = |e: ApiError| SnapshotError::Restore(e.to_string());
    api.restore(&RestoreConfig {
        source_url: file_url(dir),
        prefault: Some(false),
    })
    .await
    .map_err(failed)?;
    // The serial socket is there once the VM is restored; it is paused until `resume`.
    match tokio::net::UnixStream::connect(&spec.files.console_socket).await {
        Ok(stream) => crate::vmm::pump_console(stream, &spec.files),
        Err(e) => log::warn!(
            "cannot read the guest console on {}: {e}",
            spec.files.console_socket.display()
        ),
    }
    api.resume().await.map_err(failed)
}

/// Gives a restored VM what is its own: the vsock device, the share, the NICs.
pub async fn plug_devices(api: &ApiClient, spec: &VmSpec) -> Result<(), ApiError> {
    api.add_vsock(&vsock_config(spec)).await?;
    if let (Some(fs), Share::VirtioFs { .. }) = (fs_config(spec), &spec.share) {
        api.add_fs(&fs).await?;
    }
    for nic in &spec.net {
        api.add_net(&net_config(nic), &nic.tap_fds).await?;
    }
    Ok(())
}

/// Makes the template of the configuration's own shape (`hako template build`), replacing the
/// one there.
pub async fn build_for_config(config: &crate::config::Config) -> Result<Template, SnapshotError> {
    let root = &config.runtime.sandbox_root;
    start::in_scratch_sandbox(root, |dir| async move {
        let files = VmFiles::under(&dir, config.runtime.log_max_bytes);
        let share = Share::VirtioFs {
            socket: dir.join("fs.sock"),
        };
        let spec = VmSpec::from_config(config, "template", files, share);
        let ch = CloudHypervisor::from_config(&config.hypervisor, root)?;
        let store = Store::new(&config.hypervisor.template_dir, root);
        let shape = ch.shape(&spec);
        start::build(&store, &shape, &FILES, "template", true, |scratch| {
            ch.save_template_vm(&spec, scratch)
        })
        .await
    })
    .await
}

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// Opens a directory the VMM's user can write, not through a link.
fn open_dir(path: &Path) -> std::io::Result<OwnedFd> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    Ok(fd)
}

/// Opens `name` in `dir` for reading: a regular file (not a link, device or pipe) of at most
/// `cap` bytes.
fn open_file_in(dir: &impl AsFd, name: &str, cap: u64) -> std::io::Result<File> {
    let fd = openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let file = File::from(fd);
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.len() > cap {
        return Err(std::io::Error::other(format!(
            "{} bytes, more than the {cap} it can be",
            meta.len()
        )));
    }
    Ok(file)
}

#[cfg(test)]
mod tests;
