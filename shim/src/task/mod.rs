//! The containerd Task service: one shim serves one sandbox (one VM) and its containers.
//!
//! This module translates: each RPC (`service.rs`) checks and converts the request, asks the
//! pod (`sandbox::pod`) or the agent for one thing, and converts the answer. The sandbox
//! orchestrates; the container book (`container.rs`) and the processes' state (`state.rs`)
//! are what containerd asks about.

mod container;
mod control;
mod convert;
mod create;
mod delete;
mod error;
pub mod events;
mod fifo;
mod process;
mod service;
mod state;
pub mod stdio;
#[cfg(test)]
mod tests;
mod watchers;

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex, MutexGuard};
use std::time::Duration;

use containerd_shim::ExitSignal;

use crate::sandbox::pod::{Pod, Running};
use container::Container;
pub use convert::timestamp;
pub use error::{to_ttrpc, TaskError};
use events::EventSender;

/// Exit status reported when the real one is unknown: the VM died under a process, or the
/// shim is gone. Killed, never 0.
pub const UNKNOWN_EXIT_STATUS: u32 = 137;

pub struct TaskService {
    events: Arc<dyn EventSender>,
    exit_signal: Arc<ExitSignal>,
    pod: Pod,
    containers: Arc<StdMutex<HashMap<String, Arc<Container>>>>,
}

impl TaskService {
    pub fn new(
        namespace: &str,
        events: Arc<dyn EventSender>,
        exit_signal: Arc<ExitSignal>,
    ) -> Self {
        Self::with_pod(Pod::new(namespace), events, exit_signal)
    }

    pub fn with_pod(pod: Pod, events: Arc<dyn EventSender>, exit_signal: Arc<ExitSignal>) -> Self {
        Self {
            events,
            exit_signal,
            pod,
            containers: Arc::new(StdMutex::new(HashMap::new())),
        }
    }

    /// Ends the shim if containerd started it but never gave it a container within `patience`
    /// (containerd gave up after starting it): a shim with nothing to serve must not linger.
    pub fn exit_if_never_used(self: &Arc<Self>, patience: Duration) {
        let service = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(patience).await;
            let Some(service) = service.upgrade() else {
                return;
            };
            if !service.pod.is_standalone()
                && service.pod.is_empty().await
                && service.containers().is_empty()
            {
                log::warn!("no container came within {patience:?} of the shim's start; exiting");
                service.exit_signal.signal();
            }
        });
    }

    /// The pod this shim serves, for the Sandbox API (`sandboxer`).
    pub fn pod(&self) -> &Pod {
        &self.pod
    }

    /// Signals a process as containerd's Kill would, for a caller in the same process (the
    /// OCI runtime's server, when the host process that stands for a guest process has died).
    pub async fn kill_process(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
    ) -> Result<(), TaskError> {
        self.do_kill(&containerd_shim::api::KillRequest {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            signal,
            ..Default::default()
        })
        .await
    }

    /// Ends the shim: its server stops serving and the process exits.
    pub fn exit(&self) {
        self.exit_signal.signal();
    }

    fn containers(&self) -> MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn container(&self, id: &str) -> Result<Arc<Container>, TaskError> {
        self.containers()
            .get(id)
            .cloned()
            .ok_or_else(|| TaskError::NotFound(format!("container {id}")))
    }

    /// The sandbox's VM and agent, for a call that needs the guest. Once the VM has exited
    /// (powered off, panicked, killed) no call can reach it: the answer is immediate, never an
    /// agent timeout.
    fn running(&self) -> Result<Running, TaskError> {
        let running = self
            .pod
            .running()
            .ok_or_else(|| TaskError::NotFound("sandbox".to_string()))?;
        if !running.vm_alive() {
            return Err(TaskError::VmGone);
        }
        Ok(running)
    }
}
