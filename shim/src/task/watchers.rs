//! The host's watch on the guest's processes: each process's exit (or the VM's death under it)
//! and the OOM kills the agent reports, published to containerd as they happen.

use std::sync::Arc;
use std::time::Duration;

use containerd_shim::protos::events::task::{TaskExit, TaskOOM};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics;

use super::container::ProcEntry;
use super::convert::timestamp;
use super::{TaskService, UNKNOWN_EXIT_STATUS};
use crate::metrics::families;
use crate::rate_limit::RateLimit;
use crate::sandbox::pod::Running;

/// How long an exit waits for the last output to reach containerd's FIFOs.
/// How long output may stay open without moving a byte once its process has exited, before
/// the exit is reported without waiting for its end.
const OUTPUT_IDLE: Duration = Duration::from_secs(5);

/// Waits for the output copies to reach end of stream, however long that takes while bytes
/// move (a slow reader delays the exit, it does not cut the output); false if they stop moving
/// for `OUTPUT_IDLE` first. A VM that is gone sends nothing more: its copies end at once.
async fn drain(copies: &mut super::stdio::Copies, running: &Running) -> bool {
    use std::sync::atomic::Ordering;
    let mut seen = copies.progress.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            next = copies.outputs.join_next() => if next.is_none() {
                return true;
            },
            _ = running.vm_gone() => {
                copies.outputs.abort_all();
                return true;
            }
            () = tokio::time::sleep(OUTPUT_IDLE) => {
                let now = copies.progress.load(Ordering::Relaxed);
                if now == seen {
                    return false;
                }
                seen = now;
            }
        }
    }
}
/// The most OOM events a guest may report per second.
const OOM_EVENTS_PER_SECOND: u32 = 10;

impl TaskService {
    /// Waits for the process's exit (or the VM's death), lets the output drain, records the
    /// exit and publishes it.
    pub(super) fn spawn_exit_watcher(
        &self,
        container_id: String,
        entry: Arc<ProcEntry>,
        running: Running,
        mut copies: super::stdio::Copies,
    ) {
        let events = self.events.clone();
        tokio::spawn(async move {
            let shown = if entry.exec_id.is_empty() {
                container_id.clone()
            } else {
                format!("{container_id}/{}", entry.exec_id)
            };
            let status = tokio::select! {
                result = running.agent.wait_process(&container_id, &entry.exec_id) => match result {
                    Ok(status) => status,
                    Err(e) => {
                        log::error!("{shown}: waiting for the exit failed: {e}");
                        UNKNOWN_EXIT_STATUS
                    }
                },
                code = running.vm_gone() => {
                    log::error!("{shown}: the VM exited (status {code}) under it");
                    UNKNOWN_EXIT_STATUS
                }
            };
            copies.end_stdin();
            if !drain(&mut copies, &running).await {
                // A process the exit left behind holds the stream: the exit is reported anyway,
                // and the copy goes on until the stream ends or the process is deleted.
                log::warn!("{shown}: output still open, and idle for {OUTPUT_IDLE:?}, after exit");
                entry.keep_copies(copies);
            }
            let exit = entry.state().set_exited(status);
            if let Some(exit) = exit {
                log::info!("{shown} exited with status {status}");
                let id = if entry.exec_id.is_empty() {
                    container_id.clone()
                } else {
                    entry.exec_id.clone()
                };
                events
                    .send(
                        topics::TASK_EXIT_EVENT_TOPIC,
                        Box::new(TaskExit {
                            container_id,
                            id,
                            pid: running.vmm_pid,
                            exit_status: exit.status,
                            exited_at: MessageField::some(timestamp(exit.at)),
                            ..Default::default()
                        }),
                    )
                    .await;
            }
        });
    }

    /// Publishes `/tasks/oom` for every OOM kill the agent reports, for the VM's lifetime. The
    /// agent is the guest's: an id that is not one of this sandbox's containers is refused (a
    /// guest must not mark another pod's container OOM-killed), ids are quoted in logs, and the
    /// loop takes at most `OOM_EVENTS_PER_SECOND`, however fast the guest answers.
    pub(crate) fn spawn_oom_watcher(&self, running: Running) {
        let events = self.events.clone();
        let containers = self.containers.clone();
        tokio::spawn(async move {
            let mut bucket = RateLimit::new(OOM_EVENTS_PER_SECOND);
            let mut refused = 0u64;
            loop {
                bucket.take().await;
                let event = tokio::select! {
                    event = running.agent.oom_event() => event,
                    _ = running.vm_gone() => return,
                };
                let container_id = match event {
                    Ok(id) => id,
                    Err(e) => {
                        log::debug!("OOM watcher stopped: {e}");
                        return;
                    }
                };
                let known = containers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(&container_id);
                if !known {
                    refused += 1;
                    running
                        .metrics
                        .count(&families::GUEST_EVENTS_REFUSED_TOTAL, &["oom", "foreign"]);
                    // Said once, then at every power of two: a flood costs a few lines.
                    if refused.is_power_of_two() {
                        log::warn!(
                            "the guest reported an OOM kill of {container_id:?}, which is not a container of this sandbox: ignored ({refused} so far)"
                        );
                    }
                    continue;
                }
                log::warn!("container {container_id:?} was OOM-killed");
                events
                    .send(
                        topics::TASK_OOM_EVENT_TOPIC,
                        Box::new(TaskOOM {
                            container_id,
                            ..Default::default()
                        }),
                    )
                    .await;
            }
        });
    }
}
