//! The containerd shim entry points: `start` (spawn or join the sandbox's shim), `delete`
//! (clean up from disk when the shim is gone) and the long-lived server.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::util::write_str_to_file;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::{api, Config as ShimConfig, Error as ShimError, Flags, StartOpts};

use crate::config::Config;
use crate::ids::validate;
use crate::sandbox::{cleanup_on_disk, mounts, SandboxPaths};
use crate::task::events::ContainerdEvents;
use crate::task::{TaskService, SANDBOX_ID_ANNOTATION};

/// containerd's runtime name for hako.
pub const RUNTIME_ID: &str = "io.containerd.hako.v2";
/// Exit status reported by `delete` when the real one is unknown (the shim is gone).
const UNKNOWN_EXIT: u32 = 137;

pub struct HakoShim {
    id: String,
    namespace: String,
    bundle: PathBuf,
    exit: Arc<ExitSignal>,
}

/// The crate's own options: hako reaps its helpers through tokio, not a global reaper, and
/// leaves orphans to init rather than collecting them itself.
pub fn shim_config() -> ShimConfig {
    ShimConfig {
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    }
}

fn invalid(e: impl std::fmt::Display) -> ShimError {
    ShimError::InvalidArgument(e.to_string())
}

/// The sandbox a bundle's container belongs to: the CRI annotation, else the container itself.
fn sandbox_of(bundle: &Path, id: &str) -> Result<String, ShimError> {
    let spec_path = bundle.join("config.json");
    let sandbox = match std::fs::read(&spec_path) {
        Ok(bytes) => {
            let spec: oci_spec::runtime::Spec = serde_json::from_slice(&bytes)
                .map_err(|e| invalid(format!("{}: {e}", spec_path.display())))?;
            spec.annotations()
                .as_ref()
                .and_then(|a| a.get(SANDBOX_ID_ANNOTATION))
                .cloned()
                .unwrap_or_else(|| id.to_string())
        }
        Err(_) => id.to_string(),
    };
    validate("sandbox id", &sandbox).map_err(invalid)?;
    Ok(sandbox)
}

#[async_trait]
impl Shim for HakoShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut ShimConfig) -> Self {
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        HakoShim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            bundle,
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        validate("namespace", &opts.namespace).map_err(invalid)?;
        validate("container id", &opts.id).map_err(invalid)?;
        // One shim per sandbox: containers of a pod reuse the address of its first one.
        let grouping = sandbox_of(&self.bundle, &opts.id)?;
        let address = spawn(opts, &grouping, Vec::new()).await?;
        write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<api::DeleteResponse> {
        validate("namespace", &self.namespace).map_err(invalid)?;
        validate("container id", &self.id).map_err(invalid)?;
        let sandbox = sandbox_of(&self.bundle, &self.id)?;
        let root = Config::load(None)
            .map(|l| l.config.runtime.sandbox_root)
            .unwrap_or_else(|_| Config::default().runtime.sandbox_root);
        if sandbox == self.id {
            cleanup_on_disk(&root, &self.namespace, &sandbox)
                .await
                .map_err(|e| ShimError::Other(e.to_string()))?;
        } else {
            let paths = SandboxPaths::new(&root, &self.namespace, &sandbox).map_err(invalid)?;
            let dir = paths.container_dir(&self.id);
            mounts::unmount_all_under(&dir).map_err(|e| ShimError::Other(e.to_string()))?;
            mounts::remove_tree(&dir).map_err(|e| ShimError::Other(e.to_string()))?;
        }
        mounts::unmount_all_under(&self.bundle.join("rootfs"))
            .map_err(|e| ShimError::Other(e.to_string()))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(api::DeleteResponse {
            pid: 0,
            exit_status: UNKNOWN_EXIT,
            exited_at: MessageField::some(Timestamp {
                seconds: now.as_secs() as i64,
                nanos: now.subsec_nanos() as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let events = Arc::new(ContainerdEvents {
            publisher,
            namespace: self.namespace.clone(),
        });
        TaskService::new(&self.namespace, events, self.exit.clone())
    }
}
