//! The containerd shim entry points: `start` (spawn or join the sandbox's shim), `delete`
//! (clean up from disk when the shim is gone) and the long-lived server.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::util::write_str_to_file;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::shim_async::create_task;
use containerd_shim::{api, Config as ShimConfig, Error as ShimError, Flags, StartOpts};
use containerd_shim_protos::sandbox_async::create_sandbox;

use crate::config::Config;
use crate::ids::validate;
use crate::sandbox::pod::sandbox_id_for;
use crate::sandbox::{cleanup_on_disk, holding_netns, mounts, SandboxPaths};
use crate::sandboxer::SandboxService;
use crate::task::events::ContainerdEvents;
use crate::task::{timestamp, TaskService, UNKNOWN_EXIT_STATUS};

/// containerd's runtime name for hako.
pub const RUNTIME_ID: &str = "io.containerd.hako.v2";
/// containerd sends Create right after it started a shim; one that waited this long for it
/// was abandoned.
const UNUSED_SHIM_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// The shim's short-lived commands, `start` and `delete`. The long-lived server is `serve`.
pub struct HakoShim {
    id: String,
    namespace: String,
    bundle: PathBuf,
}

/// The `Shim` trait's task service, which `serve` never asks for: the server builds its own
/// `TaskService`. Every method keeps ttrpc's default answer ("not supported").
pub struct NoTasks;

impl containerd_shim::protos::shim_async::Task for NoTasks {}

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

/// The task API generation to speak: containerd 2.x gets `containerd.task.v3.Task` (announced
/// through its JSON bootstrap), containerd 1.x the plain address and v2. The `-publish-binary`
/// containerd passes is containerd itself, so ask it.
fn task_api_version(containerd: &str) -> u32 {
    let output = std::process::Command::new(containerd)
        .arg("--version")
        .output();
    let line = output
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    match containerd_major(&line) {
        Some(major) if major >= 2 => 3,
        _ => 2,
    }
}

/// `task_api_version`, remembered under the sandbox root per containerd binary (by device,
/// inode, size and modification time, so an upgraded binary is asked again): asking starts a
/// containerd process, about 40 ms of every container's start.
fn task_api_version_cached(root: &Path, containerd: &str) -> u32 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(containerd) else {
        return task_api_version(containerd);
    };
    let key = format!(
        "{:x}-{:x}-{:x}-{}.{}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec()
    );
    let cache = root.join(CONTAINERD_API_CACHE).join(key);
    if let Some(version) = std::fs::read_to_string(&cache)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .filter(|v| matches!(v, 2 | 3))
    {
        return version;
    }
    let version = task_api_version(containerd);
    // Best effort: without the record the next start asks again.
    if let Some(dir) = cache.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::write(&cache, version.to_string());
    version
}

/// hako's record of which task API each containerd binary speaks, under the sandbox root.
const CONTAINERD_API_CACHE: &str = ".containerd-api";

/// The major version from `containerd --version`: "containerd <module> <version> <revision>".
fn containerd_major(line: &str) -> Option<u32> {
    let version = line.split_whitespace().nth(2)?;
    version
        .trim_start_matches('v')
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// What `start` prints: the address, or for task API v3 the bootstrap parameters.
fn bootstrap_output(address: &str, version: u32) -> String {
    if version >= 3 {
        serde_json::json!({ "version": version, "address": address, "protocol": "ttrpc" })
            .to_string()
    } else {
        address.to_string()
    }
}

/// The long-lived shim server: the Task service under both generations' names (the messages
/// are the same), on the socket `start` chose. Returns when the service signals exit.
pub async fn serve(flags: &Flags) -> Result<(), ShimError> {
    validate("namespace", &flags.namespace).map_err(invalid)?;
    containerd_shim::logger::init(flags.debug, "info", &flags.namespace, &flags.id)?;
    let ttrpc_address =
        std::env::var("TTRPC_ADDRESS").map_err(|e| invalid(format!("TTRPC_ADDRESS: {e}")))?;
    let socket_path = flags
        .socket
        .strip_prefix("unix://")
        .ok_or_else(|| invalid(format!("socket {} is not unix://", flags.socket)))?;

    let listener = match bind_socket(socket_path)? {
        Some(listener) => listener,
        None => {
            // Another shim serves this sandbox already: it answers for this container too.
            write_str_to_file("address", &flags.socket).await?;
            signal_server_started();
            return Ok(());
        }
    };
    let publisher = RemotePublisher::new(&ttrpc_address).await?;
    let exit = Arc::new(ExitSignal::default());
    let events = Arc::new(ContainerdEvents {
        publisher,
        namespace: flags.namespace.clone(),
    });
    let service = Arc::new(TaskService::new(&flags.namespace, events, exit.clone()));
    service.exit_if_never_used(UNUSED_SHIM_PATIENCE);
    let task: Arc<dyn containerd_shim::protos::shim_async::Task + Send + Sync> = service.clone();
    let mut services = create_task(task.clone());
    if let Some(v2) = create_task(task).remove(TASK_V2) {
        services.insert(TASK_V3.to_string(), v2);
    }
    // containerd 2.x's shim sandboxer asks for the pod itself through the Sandbox API.
    services.extend(create_sandbox(Arc::new(SandboxService::new(service))));
    let listener = ttrpc::r#async::transport::Listener::try_from(listener)
        .map_err(|e| ShimError::Other(format!("listener: {e}")))?;
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(listener)
        .register_service(services);
    server.start().await?;
    signal_server_started();
    log::info!(
        "shim serving {} ({TASK_V2}, {TASK_V3} and {SANDBOX_V1})",
        flags.socket
    );

    // containerd does not signal shims; a stray SIGTERM must not orphan the VM.
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        tokio::spawn(async move {
            while term.recv().await.is_some() {
                log::warn!("ignoring SIGTERM: containerd stops shims with Shutdown");
            }
        });
    }
    exit.wait().await;
    server.shutdown().await?;
    let _ = std::fs::remove_file(socket_path);
    Ok(())
}

const TASK_V2: &str = "containerd.task.v2.Task";
const TASK_V3: &str = "containerd.task.v3.Task";
const SANDBOX_V1: &str = "containerd.runtime.sandbox.v1.Sandbox";

/// Binds the shim socket; `None` when a live shim already serves it.
fn bind_socket(path: &str) -> Result<Option<std::os::unix::net::UnixListener>, ShimError> {
    use std::os::unix::net::{UnixListener, UnixStream};
    if let Some(parent) = Path::new(path).parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| ShimError::Other(format!("{}: {e}", parent.display())))?;
    }
    let listener = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Ok(None);
            }
            // A stale socket from a shim that died.
            let _ = std::fs::remove_file(path);
            UnixListener::bind(path).map_err(|e| ShimError::Other(format!("bind {path}: {e}")))?
        }
        Err(e) => return Err(ShimError::Other(format!("bind {path}: {e}"))),
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| ShimError::Other(format!("{path}: {e}")))?;
    Ok(Some(listener))
}

/// `start` reads the server's stdout until it closes; pointing stdout at stderr closes it.
fn signal_server_started() {
    // SAFETY: dup2 on the process's own standard descriptors.
    unsafe {
        libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO);
    }
}

/// The sandbox a bundle's container belongs to (`sandbox_id_for`), looking for a sandbox that
/// holds its network namespace on disk.
fn sandbox_of(root: &Path, bundle: &Path, namespace: &str, id: &str) -> Result<String, ShimError> {
    let spec_path = bundle.join("config.json");
    let sandbox = match std::fs::read(&spec_path) {
        Ok(bytes) => {
            let spec: oci_spec::runtime::Spec = serde_json::from_slice(&bytes)
                .map_err(|e| invalid(format!("{}: {e}", spec_path.display())))?;
            sandbox_id_for(&spec, id, |netns| holding_netns(root, namespace, netns))
        }
        Err(_) => id.to_string(),
    };
    validate("sandbox id", &sandbox).map_err(invalid)?;
    Ok(sandbox)
}

/// The configured sandbox root (the defaults' when the configuration cannot be read: the
/// shim that serves the sandbox reports that error).
pub fn sandbox_root() -> PathBuf {
    Config::load(None)
        .map(|l| l.config.runtime.sandbox_root)
        .unwrap_or_else(|_| Config::default().runtime.sandbox_root)
}

#[async_trait]
impl Shim for HakoShim {
    type T = NoTasks;

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
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        validate("namespace", &opts.namespace).map_err(invalid)?;
        validate("container id", &opts.id).map_err(invalid)?;
        // One shim per sandbox: containers of a pod reuse the address of its first one.
        let root = sandbox_root();
        let grouping = sandbox_of(&root, &self.bundle, &opts.namespace, &opts.id)?;
        let version = task_api_version_cached(&root, &opts.publish_binary);
        let address = spawn(opts, &grouping, Vec::new()).await?;
        write_str_to_file("address", &address).await?;
        Ok(bootstrap_output(&address, version))
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<api::DeleteResponse> {
        validate("namespace", &self.namespace).map_err(invalid)?;
        validate("container id", &self.id).map_err(invalid)?;
        let root = sandbox_root();
        let sandbox = sandbox_of(&root, &self.bundle, &self.namespace, &self.id)?;
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
        Ok(api::DeleteResponse {
            pid: 0,
            exit_status: UNKNOWN_EXIT_STATUS,
            exited_at: MessageField::some(timestamp(std::time::SystemTime::now())),
            ..Default::default()
        })
    }

    /// Never reached: `main` runs `serve` for the server, which waits on its own exit signal.
    async fn wait(&mut self) {}

    async fn create_task_service(&self, _publisher: RemotePublisher) -> Self::T {
        NoTasks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_versions_pick_the_task_api() {
        let v2 = "containerd github.com/containerd/containerd/v2 2.1.9+unknown ";
        let v1 = "containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1";
        assert_eq!(containerd_major(v2), Some(2));
        assert_eq!(containerd_major(v1), Some(1));
        assert_eq!(containerd_major("garbage"), None);
        assert_eq!(task_api_version("/nonexistent/containerd"), 2);
    }

    #[test]
    fn the_task_api_is_asked_once_per_containerd_binary() {
        let root = std::env::temp_dir().join(format!("hako-api-cache-{}", std::process::id()));
        // echo stands in for a containerd without a recognisable version: task API v2.
        assert_eq!(task_api_version_cached(&root, "/bin/echo"), 2);
        let records: Vec<_> = std::fs::read_dir(root.join(CONTAINERD_API_CACHE))
            .expect("the answer is recorded")
            .flatten()
            .map(|e| e.path())
            .collect();
        assert_eq!(records.len(), 1, "{records:?}");
        // The record, not the binary, answers the next start.
        std::fs::write(&records[0], "3").expect("record");
        assert_eq!(task_api_version_cached(&root, "/bin/echo"), 3);
        std::fs::write(&records[0], "garbage").expect("record");
        assert_eq!(task_api_version_cached(&root, "/bin/echo"), 2);
        std::fs::remove_dir_all(&root).expect("cleanup");
    }

    #[test]
    fn v3_bootstraps_with_json() {
        let json = bootstrap_output("unix:///run/containerd/s/abc", 3);
        let value: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(value["version"], 3);
        assert_eq!(value["address"], "unix:///run/containerd/s/abc");
        assert_eq!(value["protocol"], "ttrpc");
        assert_eq!(bootstrap_output("unix:///x", 2), "unix:///x");
    }
}
