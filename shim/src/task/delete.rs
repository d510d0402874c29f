//! Delete: an exec is forgotten; a container leaves the guest and the share, and the last one
//! takes the sandbox with it.

use std::time::SystemTime;

use containerd_shim::api;
use containerd_shim::protos::events::task::TaskDelete;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics;

use super::convert::timestamp;
use super::state::Exit;
use super::{TaskError, TaskService, UNKNOWN_EXIT_STATUS};

impl TaskService {
    pub(super) async fn do_delete(
        &self,
        req: &api::DeleteRequest,
    ) -> Result<api::DeleteResponse, TaskError> {
        let container = self.container(&req.id)?;
        let entry = container.process(&req.exec_id)?;
        entry.state().check_delete()?;
        entry.end_copies();
        let running = self.pod.running();
        let pid = running.as_ref().map(|r| r.vmm_pid).unwrap_or(0);
        let exit = entry.state().exit().unwrap_or(Exit {
            status: UNKNOWN_EXIT_STATUS,
            at: SystemTime::now(),
        });
        let response = api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        };
        if !req.exec_id.is_empty() {
            if let Some(running) = running.filter(|r| r.vm_alive()) {
                if let Err(e) = running.agent.delete_process(&req.id, &req.exec_id).await {
                    log::warn!("{}/{}: {e}", req.id, req.exec_id);
                }
            }
            container.remove_exec(&req.exec_id);
            return Ok(response);
        }

        self.containers().remove(&req.id);
        self.pod
            .remove_container(&req.id, &container.info.rootfs, container.rootfs_mounted)
            .await?;
        container.info.hooks.poststop(pid).await;
        self.events
            .send(
                topics::TASK_DELETE_EVENT_TOPIC,
                Box::new(TaskDelete {
                    container_id: req.id.clone(),
                    id: req.id.clone(),
                    pid,
                    exit_status: exit.status,
                    exited_at: MessageField::some(timestamp(exit.at)),
                    ..Default::default()
                }),
            )
            .await;
        Ok(response)
    }
}
