//! `impl Task`: each RPC, from containerd's request to its answer.

use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::r#async::TtrpcContext;

use super::convert::create_event;
use super::error::to_ttrpc;
use super::{TaskError, TaskService};

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> ttrpc::Result<api::CreateTaskResponse> {
        let pid = self.do_create(&req).await.map_err(to_ttrpc)?;
        self.events
            .send(
                topics::TASK_CREATE_EVENT_TOPIC,
                Box::new(create_event(&req, pid)),
            )
            .await;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> ttrpc::Result<api::StartResponse> {
        let pid = self.do_start(&req).await.map_err(to_ttrpc)?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> ttrpc::Result<api::StateResponse> {
        self.state_of(&req).map_err(to_ttrpc)
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> ttrpc::Result<api::WaitResponse> {
        self.do_wait(&req).await.map_err(to_ttrpc)
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> ttrpc::Result<api::Empty> {
        self.do_kill(&req).await.map_err(to_ttrpc)?;
        Ok(api::Empty::default())
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> ttrpc::Result<api::DeleteResponse> {
        self.do_delete(&req).await.map_err(to_ttrpc)
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> ttrpc::Result<api::Empty> {
        self.do_exec(&req).await.map_err(to_ttrpc)?;
        Ok(api::Empty::default())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> ttrpc::Result<api::Empty> {
        self.do_resize(&req).await.map_err(to_ttrpc)?;
        Ok(api::Empty::default())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> ttrpc::Result<api::Empty> {
        self.do_close_io(&req).await.map_err(to_ttrpc)?;
        Ok(api::Empty::default())
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> ttrpc::Result<api::PidsResponse> {
        self.do_pids(&req.id).await.map_err(to_ttrpc)
    }

    async fn pause(
        &self,
        _ctx: &TtrpcContext,
        req: api::PauseRequest,
    ) -> ttrpc::Result<api::Empty> {
        self.do_pause(&req.id, true).await.map_err(to_ttrpc)?;
        Ok(api::Empty::default())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> ttrpc::Result<api::Empty> {
        self.do_pause(&req.id, false).await.map_err(to_ttrpc)?;
        Ok(api::Empty::default())
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> ttrpc::Result<api::StatsResponse> {
        self.do_stats(&req.id).await.map_err(to_ttrpc)
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> ttrpc::Result<api::Empty> {
        self.do_update(&req).await.map_err(to_ttrpc)?;
        Ok(api::Empty::default())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> ttrpc::Result<api::Empty> {
        Err(to_ttrpc(TaskError::Unimplemented("Checkpoint")))
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> ttrpc::Result<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.pod.vmm_pid(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> ttrpc::Result<api::Empty> {
        // A pod made through the Sandbox API ends with ShutdownSandbox only.
        if !self.containers().is_empty() || self.pod.is_standalone() {
            return Ok(api::Empty::default());
        }
        self.pod.shutdown().await;
        self.exit_signal.signal();
        Ok(api::Empty::default())
    }
}
