//! The processes of a container: exec, start, kill, wait, state, and their stdio.

use std::sync::Arc;
use std::time::Instant;

use containerd_shim::api;
use containerd_shim::protos::events::task::{TaskExecAdded, TaskExecStarted, TaskStart};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics;
use ttrpc::Code;

use super::container::ProcEntry;
use super::convert::{stdio_of, timestamp};
use super::state::{wait_exit, StateError, Status};
use super::{stdio, TaskError, TaskService};
use crate::agent_client::AgentError;
use crate::ids::validate;
use crate::sandbox::pod::{Running, SIGKILL};

/// How long a Kill whose agent connection broke waits for the VM's exit to be seen.
const VM_EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

impl TaskService {
    pub(super) async fn do_exec(&self, req: &api::ExecProcessRequest) -> Result<(), TaskError> {
        validate("exec id", &req.exec_id)?;
        let container = self.container(&req.id)?;
        let running = self.running()?;
        if container.init.state().status() != Status::Running {
            return Err(TaskError::State(StateError::Transition {
                action: "exec in",
                status: container.init.state().status(),
            }));
        }
        let process_json = req
            .spec
            .as_ref()
            .map(|any| any.value.clone())
            .ok_or_else(|| TaskError::Invalid("exec without a process spec".to_string()))?;
        let process: oci_spec::runtime::Process = serde_json::from_slice(&process_json)
            .map_err(|e| TaskError::Invalid(format!("exec process spec: {e}")))?;
        crate::sandbox::spec::check_env(process.env().as_deref().unwrap_or_default())?;
        let stdio = stdio_of(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        let guest = stdio.guest();
        let entry = Arc::new(ProcEntry::new(&req.exec_id, stdio));
        container.add_exec(entry.clone())?;
        let created = running
            .agent
            .exec_process(guest.exec_request(&req.id, &req.exec_id, process_json))
            .await;
        let attached = match created {
            Ok(_) => self.attach_process(&req.id, entry, &running),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = attached {
            container.remove_exec(&req.exec_id);
            let _ = running.agent.delete_process(&req.id, &req.exec_id).await;
            return Err(e);
        }
        self.events
            .send(
                topics::TASK_EXEC_ADDED_EVENT_TOPIC,
                Box::new(TaskExecAdded {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        Ok(())
    }

    /// Opens the process's FIFOs, starts the copies and the exit watcher.
    pub(super) fn attach_process(
        &self,
        container_id: &str,
        entry: Arc<ProcEntry>,
        running: &Running,
    ) -> Result<(), TaskError> {
        let copies = stdio::attach(
            running.agent.clone(),
            container_id,
            &entry.exec_id,
            &entry.stdio,
            entry.stdin_done.clone(),
        )?;
        self.spawn_exit_watcher(container_id.to_string(), entry, running.clone(), copies);
        Ok(())
    }

    pub(super) async fn do_start(&self, req: &api::StartRequest) -> Result<u32, TaskError> {
        let started = Instant::now();
        let container = self.container(&req.id)?;
        let entry = container.process(&req.exec_id)?;
        let running = self.running()?;
        let status = entry.state().status();
        if status != Status::Created {
            return Err(StateError::Transition {
                action: "start",
                status,
            }
            .into());
        }
        if req.exec_id.is_empty() {
            self.pod
                .catch_up_network(container.info.resolv_conf.as_deref())
                .await?;
        }
        running.agent.start_process(&req.id, &req.exec_id).await?;
        entry.state().start()?;
        if req.exec_id.is_empty() {
            container.info.hooks.poststart(running.vmm_pid).await;
            log::info!(
                "container {} start phases: process_started={:.1}ms",
                req.id,
                started.elapsed().as_secs_f64() * 1000.0
            );
            self.events
                .send(
                    topics::TASK_START_EVENT_TOPIC,
                    Box::new(TaskStart {
                        container_id: req.id.clone(),
                        pid: running.vmm_pid,
                        ..Default::default()
                    }),
                )
                .await;
        } else {
            self.events
                .send(
                    topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                    Box::new(TaskExecStarted {
                        container_id: req.id.clone(),
                        exec_id: req.exec_id.clone(),
                        pid: running.vmm_pid,
                        ..Default::default()
                    }),
                )
                .await;
        }
        Ok(running.vmm_pid)
    }

    pub(super) async fn do_kill(&self, req: &api::KillRequest) -> Result<(), TaskError> {
        let container = self.container(&req.id)?;
        let entry = container.process(&req.exec_id)?;
        if entry.state().status() == Status::Stopped && !req.all {
            return Err(TaskError::Finished);
        }
        // A VM that exited took every process with it: as runc answers for a container that is
        // not running, whatever the exit watcher has published so far. Kubernetes' delete (Kill,
        // then Delete) accepts exactly this.
        let running = match self.running() {
            Err(TaskError::VmGone) => return Err(TaskError::Finished),
            other => other?,
        };
        let sent = running
            .agent
            .signal_process(&req.id, &req.exec_id, req.signal, req.all)
            .await;
        // A connection that broke under the call: most likely the VM is exiting, and its exit
        // watch has not said so yet.
        if let Err(AgentError::Transport { .. }) = &sent {
            let exited = tokio::time::timeout(VM_EXIT_GRACE, running.vm_gone()).await;
            if exited.is_ok() {
                return Err(TaskError::Finished);
            }
        }
        match sent {
            Err(AgentError::Rpc {
                code: Code::FAILED_PRECONDITION,
                ..
            }) => Err(TaskError::Finished),
            // An agent that does not answer a SIGKILL has failed its sandbox: the kill still
            // has to happen, and the only way left is to end the VM.
            Err(e @ (AgentError::Timeout { .. } | AgentError::Transport { .. }))
                if req.signal == SIGKILL && running.vm_alive() =>
            {
                log::error!(
                    "container {}: {e}; the agent is not answering, so SIGKILL ends the whole VM (pid {})",
                    req.id,
                    running.vmm_pid
                );
                running.kill_vm();
                Ok(())
            }
            other => other.map_err(Into::into),
        }
    }

    pub(super) fn state_of(
        &self,
        req: &api::StateRequest,
    ) -> Result<api::StateResponse, TaskError> {
        let container = self.container(&req.id)?;
        let entry = container.process(&req.exec_id)?;
        let process = entry.state();
        let status = match process.status() {
            Status::Created => api::Status::CREATED,
            Status::Running if container.paused() => api::Status::PAUSED,
            Status::Running => api::Status::RUNNING,
            Status::Stopped => api::Status::STOPPED,
        };
        let exit = process.exit();
        Ok(api::StateResponse {
            id: container.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle: container.bundle.display().to_string(),
            pid: self.pod.vmm_pid(),
            status: status.into(),
            stdin: entry.stdio.stdin.clone(),
            stdout: entry.stdio.stdout.clone(),
            stderr: entry.stdio.stderr.clone(),
            terminal: entry.stdio.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| timestamp(e.at)).into(),
            ..Default::default()
        })
    }

    pub(super) async fn do_wait(
        &self,
        req: &api::WaitRequest,
    ) -> Result<api::WaitResponse, TaskError> {
        let rx = self
            .container(&req.id)?
            .process(&req.exec_id)?
            .state()
            .exit_watch();
        let exit = wait_exit(rx)
            .await
            .ok_or_else(|| TaskError::NotFound(format!("exit of {}", req.id)))?;
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    pub(super) async fn do_close_io(&self, req: &api::CloseIORequest) -> Result<(), TaskError> {
        let entry = self.container(&req.id)?.process(&req.exec_id)?;
        if req.stdin {
            if entry.stdio.stdin.is_empty() {
                self.running()?
                    .agent
                    .close_stdin(&req.id, &req.exec_id)
                    .await?;
            } else {
                // The copy closes stdin once the FIFO is drained, so no byte is lost.
                entry.stdin_done.notify_one();
            }
        }
        Ok(())
    }

    pub(super) async fn do_resize(&self, req: &api::ResizePtyRequest) -> Result<(), TaskError> {
        let entry = self.container(&req.id)?.process(&req.exec_id)?;
        if !entry.stdio.terminal {
            return Err(TaskError::Invalid(format!("{} has no terminal", req.id)));
        }
        self.running()?
            .agent
            .resize_pty(&req.id, &req.exec_id, req.width, req.height)
            .await?;
        Ok(())
    }
}
