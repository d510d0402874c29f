//! The container as a whole: pause and resume, its processes, its statistics, new limits.

use containerd_shim::api;
use containerd_shim::protos::events::task::{TaskPaused, TaskResumed};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::topics;

use super::convert::{v2_metrics, METRICS_V2_TYPE};
use super::state::{StateError, Status};
use super::{TaskError, TaskService};
use crate::sandbox::sizing::Needs;
use crate::sandbox::SandboxError;

impl TaskService {
    pub(super) async fn do_pause(&self, id: &str, paused: bool) -> Result<(), TaskError> {
        let container = self.container(id)?;
        if container.init.state().status() != Status::Running {
            return Err(TaskError::State(StateError::Transition {
                action: if paused { "pause" } else { "resume" },
                status: container.init.state().status(),
            }));
        }
        self.running()?.agent.set_paused(id, paused).await?;
        container.set_paused(paused);
        if paused {
            let event = TaskPaused {
                container_id: id.to_string(),
                ..Default::default()
            };
            self.events
                .send(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(event))
                .await;
        } else {
            let event = TaskResumed {
                container_id: id.to_string(),
                ..Default::default()
            };
            self.events
                .send(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(event))
                .await;
        }
        Ok(())
    }

    /// The container's processes as containerd's clients can look them up: the VMM's host
    /// process, one for every container of the pod while its init has not exited. The
    /// container's own processes live in the guest, whose pids name unrelated processes on
    /// the host (`docker top` looks each up in the host's `ps`); `hako ps` lists those.
    pub(super) async fn do_pids(&self, id: &str) -> Result<api::PidsResponse, TaskError> {
        let container = self.container(id)?;
        let exited = container.init.state().status() == Status::Stopped;
        let vmm = self.pod.running().filter(|r| r.vm_alive() && !exited);
        Ok(api::PidsResponse {
            processes: vmm
                .map(|r| containerd_shim::protos::types::task::ProcessInfo {
                    pid: r.vmm_pid,
                    ..Default::default()
                })
                .into_iter()
                .collect(),
            ..Default::default()
        })
    }

    pub(super) async fn do_stats(&self, id: &str) -> Result<api::StatsResponse, TaskError> {
        self.container(id)?;
        let s = self.running()?.agent.stats(id).await?;
        let metrics = v2_metrics(&s);
        let value = metrics
            .write_to_bytes()
            .map_err(|e| TaskError::Invalid(format!("encoding metrics: {e}")))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(Any {
                type_url: METRICS_V2_TYPE.to_string(),
                value,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    pub(super) async fn do_update(&self, req: &api::UpdateTaskRequest) -> Result<(), TaskError> {
        self.container(&req.id)?;
        let resources = req
            .resources
            .as_ref()
            .map(|any| any.value.clone())
            .ok_or_else(|| TaskError::Invalid("update without resources".to_string()))?;
        // Refuse what the guest could not parse before sending it.
        let parsed = serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources)
            .map_err(|e| TaskError::Invalid(format!("resources: {e}")))?;
        let needs = Needs::of(Some(&parsed)).map_err(SandboxError::from)?;
        self.pod.check_fits(&needs).await?;
        self.running()?.agent.update(&req.id, resources).await?;
        Ok(())
    }
}
