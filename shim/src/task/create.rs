//! Create: the bundle's spec read, the pod asked to add the container, and its init process's
//! stdio and exit watcher set up on the host.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_shim::api;
use oci_spec::runtime::Spec;

use super::container::{Container, ContainerInfo};
use super::convert::{config_path_option, stdio_of};
use super::{TaskError, TaskService};
use crate::ids::validate;
use crate::sandbox::mounts::RootfsMount;
use crate::sandbox::pod::NewContainer;

impl TaskService {
    /// Creates the container; returns its task pid (the VMM's).
    pub(super) async fn do_create(&self, req: &api::CreateTaskRequest) -> Result<u32, TaskError> {
        validate("container id", &req.id)?;
        if self.containers().contains_key(&req.id) {
            return Err(TaskError::Exists(format!("container {}", req.id)));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = read_spec(&bundle)?;
        let rootfs: Vec<RootfsMount> = req
            .rootfs
            .iter()
            .map(|m| RootfsMount {
                fstype: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let stdio = stdio_of(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        let config_path = config_path_option(req);
        let added = self
            .pod
            .add_container(&NewContainer {
                id: &req.id,
                bundle: &bundle,
                spec: &spec,
                rootfs: &rootfs,
                config_path: config_path.as_deref(),
                stdio: stdio.guest(),
            })
            .await?;
        if added.booted {
            self.spawn_oom_watcher(added.running.clone());
        }
        let container = Arc::new(Container::new(
            &req.id,
            bundle,
            ContainerInfo {
                rootfs: added.rootfs,
                hooks: added.hooks,
                resolv_conf: added.resolv_conf,
            },
            !rootfs.is_empty(),
            stdio,
        ));
        let init = container.init.clone();
        if let Err(e) = self.attach_process(&container.id, init, &added.running) {
            self.pod
                .discard_container(&req.id, &container.info.rootfs, container.rootfs_mounted)
                .await;
            return Err(e);
        }
        self.containers().insert(req.id.clone(), container);
        Ok(added.running.vmm_pid)
    }
}

fn read_spec(bundle: &Path) -> Result<Spec, TaskError> {
    let path = bundle.join("config.json");
    let bytes = std::fs::read(&path).map_err(|e| TaskError::Bundle {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| TaskError::Bundle {
        path,
        reason: e.to_string(),
    })
}
