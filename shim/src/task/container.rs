//! The shim's book of containers and their processes (the init process and execs).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::state::Process;
use super::stdio::{Copies, StdioPaths};
use super::TaskError;
use crate::hooks::LaterHooks;

/// One process as the shim tracks it.
pub struct ProcEntry {
    /// Empty for the container's init process.
    pub exec_id: String,
    pub stdio: StdioPaths,
    /// Tells the stdin copy that containerd called CloseIO.
    pub stdin_done: Arc<Notify>,
    state: Mutex<Process>,
    /// Output copies still running after the exit was published (a background process still
    /// holds the stream): ended at Delete.
    leftover: Mutex<Option<Copies>>,
}

impl ProcEntry {
    pub fn new(exec_id: &str, stdio: StdioPaths) -> Self {
        Self {
            exec_id: exec_id.to_string(),
            stdio,
            stdin_done: Arc::new(Notify::new()),
            state: Mutex::new(Process::new()),
            leftover: Mutex::new(None),
        }
    }

    pub fn state(&self) -> MutexGuard<'_, Process> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps copies that outlive the exit, for `end_copies`.
    pub fn keep_copies(&self, copies: Copies) {
        *self.leftover.lock().unwrap_or_else(|p| p.into_inner()) = Some(copies);
    }

    /// Ends whatever copies are still running, closing their FIFOs: at Delete, as runc's shim
    /// closes a deleted process's streams.
    pub fn end_copies(&self) {
        if let Some(mut copies) = self
            .leftover
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            copies.outputs.abort_all();
            copies.end_stdin();
        }
    }
}

/// What the shim keeps from a container's spec after create.
pub struct ContainerInfo {
    /// The container's root filesystem on the host.
    pub rootfs: PathBuf,
    /// Host-side hooks for after start and after delete.
    pub hooks: LaterHooks,
    /// The host file bound at its /etc/resolv.conf.
    pub resolv_conf: Option<PathBuf>,
}

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub info: ContainerInfo,
    /// Whether the shim mounted the rootfs (from containerd's mounts) and must unmount it.
    pub rootfs_mounted: bool,
    pub init: Arc<ProcEntry>,
    execs: Mutex<HashMap<String, Arc<ProcEntry>>>,
    paused: AtomicBool,
}

impl Container {
    pub fn new(
        id: &str,
        bundle: PathBuf,
        info: ContainerInfo,
        rootfs_mounted: bool,
        stdio: StdioPaths,
    ) -> Self {
        Self {
            id: id.to_string(),
            bundle,
            info,
            rootfs_mounted,
            init: Arc::new(ProcEntry::new("", stdio)),
            execs: Mutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
        }
    }

    fn execs(&self) -> MutexGuard<'_, HashMap<String, Arc<ProcEntry>>> {
        self.execs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The init process for an empty exec id, else that exec.
    pub fn process(&self, exec_id: &str) -> Result<Arc<ProcEntry>, TaskError> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| TaskError::NotFound(format!("exec {exec_id} in container {}", self.id)))
    }

    pub fn add_exec(&self, entry: Arc<ProcEntry>) -> Result<(), TaskError> {
        let mut execs = self.execs();
        if execs.contains_key(&entry.exec_id) {
            return Err(TaskError::Exists(format!("exec {}", entry.exec_id)));
        }
        execs.insert(entry.exec_id.clone(), entry);
        Ok(())
    }

    pub fn remove_exec(&self, exec_id: &str) {
        self.execs().remove(exec_id);
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }

    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }
}
