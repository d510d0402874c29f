//! What both backends do around the template store: find a shape's template or make it (under
//! its lock), wait for a template VM's agent to reach the point it is saved at, and say how a
//! start from a template went.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use super::{Shape, Store, Template, TemplateError};
use crate::daemon::Daemon;
use crate::vmm::{VmSpec, VmmError};

/// How long a template's VM may take to boot to its agent's wait.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// The most of a template VM's console kept to explain a failure.
const CONSOLE_KEPT: usize = 16 * 1024;

/// What a start from a template took.
#[derive(Debug, Clone, Default)]
pub struct Restored {
    /// Building the template first (this start was its shape's first), if it was needed.
    pub built: Option<Duration>,
    /// The VMM's start and the load of the saved VM.
    pub restore: Duration,
    /// Hot-plugging the vsock device, the share and the NICs.
    pub hotplug: Duration,
}

/// Why a start from a template did not happen; each is logged and the VM boots cold.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Store(#[from] TemplateError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// The VM made to be a template did not reach its agent's wait.
    #[error("the template VM did not come up: {reason}; its console: {console}")]
    Boot { reason: String, console: String },
    /// This VM cannot start from a template.
    #[error("{0}")]
    NotApplicable(String),
    /// The VMM could not save the template VM.
    #[error("saving the template VM failed: {0}")]
    Save(String),
    /// The VMM could not load the saved VM: the template is at fault.
    #[error("loading the saved VM failed: {0}")]
    Restore(String),
    /// The VMM that was to load the saved VM could not be started or reached: this says nothing
    /// of the template.
    #[error("starting the VMM for the saved VM failed: {0}")]
    VmmStart(String),
}

impl SnapshotError {
    /// Whether the template itself failed, so that it is not used again. A VMM that did not come
    /// up (under load, say) is no reason to throw away a good template and make every pod of
    /// its shape boot until the next one is made.
    pub fn is_the_templates_fault(&self) -> bool {
        matches!(self, SnapshotError::Restore(_))
    }
}

/// What a backend's start makes of its attempt to start from a template: `Some` when the VM
/// was restored; `None` when the attempt went wrong before any VMM was left running, which
/// leaves nothing behind, so the VM boots as it would without templates (said once in the
/// log); an error when a restored VM could not take its devices.
pub fn settle(
    attempt: Result<Restored, SnapshotError>,
    vmm_left_running: bool,
    vmm: &'static str,
    sandbox_id: &str,
) -> Result<Option<Restored>, VmmError> {
    match attempt {
        Ok(restored) => Ok(Some(restored)),
        Err(e) if !vmm_left_running => {
            log::warn!("sandbox {sandbox_id}: not starting from a template ({e}); booting");
            Ok(None)
        }
        Err(e) => Err(VmmError::Control {
            vmm,
            message: format!("a VM restored from a template could not take its devices: {e}"),
        }),
    }
}

/// The template of `shape` (with the files `names`), made first by `save` (which fills the
/// scratch directory it is given) if there is none. Returns it, and how long making it took.
/// A template that cannot be used is removed, so that the next start makes a fresh one.
pub async fn find_or_build<F, Fut>(
    store: &Store,
    shape: &Shape,
    names: &[&str],
    sandbox_id: &str,
    save: F,
) -> Result<(Template, Option<Duration>), SnapshotError>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: Future<Output = Result<(), SnapshotError>>,
{
    let key = super::key(&shape.inputs);
    match store.lookup(&key, &shape.inputs, names) {
        Ok(Some(found)) => return Ok((found, None)),
        Ok(None) => {}
        Err(e) => {
            store.remove(&key);
            return Err(e.into());
        }
    }
    let started = Instant::now();
    let made = build(store, shape, names, sandbox_id, false, save).await?;
    Ok((made, Some(started.elapsed())))
}

/// Makes the template of `shape` under its lock, unless another start made it meanwhile (or
/// `replace`, when an operator asked for a fresh one).
pub async fn build<F, Fut>(
    store: &Store,
    shape: &Shape,
    names: &[&str],
    sandbox_id: &str,
    replace: bool,
    save: F,
) -> Result<Template, SnapshotError>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: Future<Output = Result<(), SnapshotError>>,
{
    let key = super::key(&shape.inputs);
    let lock_store = store.clone();
    let lock_key = key.clone();
    let lock = tokio::task::spawn_blocking(move || lock_store.lock(&lock_key))
        .await
        .map_err(|e| {
            SnapshotError::NotApplicable(format!("waiting for the template lock: {e}"))
        })??;
    if replace {
        store.remove(&key);
    } else if let Some(found) = store.lookup(&key, &shape.inputs, names)? {
        return Ok(found);
    }
    let scratch = store.scratch(&key)?;
    let made = save(scratch.clone())
        .await
        .and_then(|()| Ok(store.finish(&key, &scratch, shape, names)?));
    if made.is_err() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    drop(lock);
    let made = made?;
    log::info!(
        "sandbox {sandbox_id}: made template {key} ({} MiB) in {}",
        made.meta.data() >> 20,
        store.dir.display()
    );
    Ok(made)
}

/// The template VM's own spec: `spec`'s, with a console and a control socket of its own beside
/// the pod's (the pod's VM may start while it is saved).
pub fn template_vm_spec(spec: &VmSpec) -> VmSpec {
    let dir = &spec.files.vmm_dir;
    let mut vm_spec = spec.clone();
    vm_spec.files.console_socket = dir.join("template-console.sock");
    vm_spec.files.control_socket = dir.join("template-control.sock");
    for socket in [&vm_spec.files.console_socket, &vm_spec.files.control_socket] {
        let _ = std::fs::remove_file(socket);
    }
    vm_spec
}

/// Reads the template VM's console, once `console` has connected it, until the agent says it
/// waits for the host's devices.
pub async fn wait_for_template_point(
    console: impl Future<Output = std::io::Result<tokio::net::UnixStream>>,
    vm: &Daemon,
) -> Result<(), SnapshotError> {
    let mut seen = Vec::new();
    let marker = hako_protocol::TEMPLATE_POINT.as_bytes();
    let read = async {
        let mut stream = console.await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the console closed".to_string());
            }
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(marker.len()).any(|w| w == marker) {
                return Ok(());
            }
            if seen.len() > 2 * CONSOLE_KEPT {
                seen.drain(..seen.len() - CONSOLE_KEPT);
            }
        }
    };
    let outcome = tokio::select! {
        read = tokio::time::timeout(BOOT_TIMEOUT, read) => match read {
            Ok(read) => read,
            Err(_) => Err(format!("no agent wait within {BOOT_TIMEOUT:?}")),
        },
        code = vm.wait() => Err(format!("the VMM exited ({code}): {}", vm.log_tail())),
    };
    outcome.map_err(|reason| SnapshotError::Boot {
        reason,
        console: crate::logs::escape(&seen[seen.len().saturating_sub(3000)..]),
    })
}

/// Runs `build` on a scratch sandbox directory under the sandbox root (`hako template build`),
/// removed afterwards.
pub async fn in_scratch_sandbox<F, Fut, T>(
    sandbox_root: &Path,
    build: F,
) -> Result<T, SnapshotError>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: Future<Output = Result<T, SnapshotError>>,
{
    let dir = sandbox_root.join(format!(".template-build-{}", std::process::id()));
    let result = async {
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(dir.join("vmm"))
            .map_err(|source| VmmError::Files {
                path: dir.clone(),
                source,
            })?;
        build(dir.clone()).await
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}
