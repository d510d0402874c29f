//! The per-sandbox server: the shim's own Task service (`task::TaskService`), served on a
//! socket under the runtime's root instead of to containerd. `create` starts it for the first
//! container of a sandbox; every later command is its client. It is the one place a
//! container's VM, helpers, network and hooks are handled, the same code containerd drives.

use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use containerd_shim::protos::events::task::TaskOOM;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::shim_async::create_task;
use containerd_shim::protos::topics;
use containerd_shim::ExitSignal;

use super::state::Root;
use super::RuntimeError;
use crate::task::events::EventSender;
use crate::task::TaskService;

/// The sandbox namespace under hako's sandbox root for containers of this runtime (short:
/// sockets in a sandbox dir must fit 108 bytes with a 64-character id).
pub const NAMESPACE: &str = "oci";
/// How long a server waits for its first container before it gives up (its `create` died).
const UNUSED_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// Starts the server for `sandbox` and returns once it listens. It runs in a session of its
/// own with no stdio: conmon's pipes must not be held open by the VM's lifetime.
pub fn spawn(root: &Root, sandbox: &str) -> Result<PathBuf, RuntimeError> {
    let socket = root.server_socket(sandbox)?;
    let log = root.server_log(sandbox)?;
    let dir = root.sandboxes();
    fs::create_dir_all(&dir).map_err(|e| RuntimeError::io(&dir, e))?;
    let _ = fs::remove_file(&socket);
    let (ready_read, ready_write) = nix::unistd::pipe().map_err(|e| RuntimeError::Spawn {
        what: "server",
        reason: format!("pipe: {e}"),
    })?;
    let exe = std::env::current_exe().map_err(|e| RuntimeError::Spawn {
        what: "server",
        reason: e.to_string(),
    })?;
    let ready_fd = ready_write.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.arg("__server")
        .arg("--socket")
        .arg(&socket)
        .arg("--log")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env_remove("NOTIFY_SOCKET");
    // SAFETY: between fork and exec only async-signal-safe calls: setsid and dup2.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            super::only_fds(&[ready_fd])
        });
    }
    let child = cmd.spawn().map_err(|e| RuntimeError::Spawn {
        what: "server",
        reason: e.to_string(),
    })?;
    drop(ready_write);
    // The server writes one byte once it listens; end of file means it died first.
    let mut byte = [0u8; 1];
    let n = nix::unistd::read(&ready_read, &mut byte).unwrap_or(0);
    if n != 1 {
        let tail = crate::daemon::tail(&log, 4096);
        return Err(RuntimeError::Spawn {
            what: "server",
            reason: format!("pid {} exited before it listened: {tail}", child.id()),
        });
    }
    Ok(socket)
}

/// The server itself (`hako-runtime __server`): serves the Task service until the last
/// container is deleted (Shutdown with no container left).
pub async fn serve(socket: &Path, log_path: &Path) -> Result<(), RuntimeError> {
    FileLog::install(log_path);
    let listener =
        std::os::unix::net::UnixListener::bind(socket).map_err(|e| RuntimeError::io(socket, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| RuntimeError::io(socket, e))?;
    let root = socket
        .parent()
        .and_then(Path::parent)
        .map(Root::new)
        .ok_or_else(|| RuntimeError::Invalid(format!("socket {}", socket.display())))?;
    let exit = Arc::new(ExitSignal::default());
    let events = Arc::new(OciEvents { root });
    let service = Arc::new(TaskService::new(NAMESPACE, events, exit.clone()));
    service.exit_if_never_used(UNUSED_PATIENCE);
    let keepers = keepers_socket(socket);
    let _ = fs::remove_file(&keepers);
    let keeper_listener =
        tokio::net::UnixListener::bind(&keepers).map_err(|e| RuntimeError::io(&keepers, e))?;
    super::watch::serve(keeper_listener, service.clone());
    let task: Arc<dyn containerd_shim::protos::shim_async::Task + Send + Sync> = service;
    let listener = ttrpc::r#async::transport::Listener::try_from(listener)
        .map_err(|e| RuntimeError::Invalid(format!("listener: {e}")))?;
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(listener)
        .register_service(create_task(task));
    server
        .start()
        .await
        .map_err(|e| RuntimeError::Invalid(format!("serving {}: {e}", socket.display())))?;
    // SAFETY: fd 3 is the readiness pipe `spawn` gave; nothing else owns it.
    let ready = unsafe { fs::File::from_raw_fd(3) };
    let _ = (&ready).write_all(b"1");
    drop(ready);
    log::info!("serving {}", socket.display());
    // The server is conmon's descendant: SIGTERM meant for a container must not end the VM.
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        tokio::spawn(async move {
            while term.recv().await.is_some() {
                log::warn!("ignoring SIGTERM: the sandbox ends when its last container is deleted");
            }
        });
    }
    exit.wait().await;
    let _ = server.shutdown().await;
    let _ = fs::remove_file(socket);
    let _ = fs::remove_file(&keepers);
    let _ = fs::remove_file(log_path);
    Ok(())
}

/// The keeper registration socket beside a server socket (`Root::keeper_socket`).
pub fn keepers_socket(socket: &Path) -> PathBuf {
    socket.with_extension("keepers")
}

/// Events go nowhere (there is no containerd), except an OOM kill, which podman learns from
/// an `oom` file in the bundle.
struct OciEvents {
    root: Root,
}

#[async_trait]
impl EventSender for OciEvents {
    async fn send(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if topic != topics::TASK_OOM_EVENT_TOPIC {
            return;
        }
        let Some(oom) = event.downcast_ref::<TaskOOM>() else {
            return;
        };
        // The record, not the event, names the bundle: the id is checked and the bundle is
        // what podman gave at create.
        match self.root.load(&oom.container_id) {
            Ok(record) => {
                if let Err(e) = fs::write(record.bundle.join("oom"), b"") {
                    log::warn!("{}: recording the OOM kill: {e}", oom.container_id);
                }
            }
            Err(e) => log::warn!(
                "{}: OOM kill of an unknown container: {e}",
                oom.container_id
            ),
        }
    }
}

/// The server's log: one line per record in a file beside its socket, removed when the
/// sandbox ends cleanly. Only the server writes it, and only what the shim logs, which is
/// bounded as it is for containerd's log.
struct FileLog {
    file: Mutex<fs::File>,
}

impl FileLog {
    fn install(path: &Path) {
        let Ok(file) = fs::OpenOptions::new().create(true).append(true).open(path) else {
            return;
        };
        let logger = Box::new(FileLog {
            file: Mutex::new(file),
        });
        if log::set_boxed_logger(logger).is_ok() {
            log::set_max_level(log::LevelFilter::Info);
        }
    }
}

impl log::Log for FileLog {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(
            file,
            "{} {} {}",
            super::state::rfc3339_now(),
            record.level(),
            record.args()
        );
    }

    fn flush(&self) {}
}

/// Connects to a sandbox's server.
pub async fn connect(
    socket: &Path,
) -> Result<containerd_shim::protos::shim_async::TaskClient, RuntimeError> {
    let address = format!("unix://{}", socket.display());
    let client = ttrpc::r#async::Client::connect(&address)
        .await
        .map_err(|e| RuntimeError::ServerGone(format!("{}: {e}", socket.display())))?;
    Ok(containerd_shim::protos::shim_async::TaskClient::new(client))
}
