//! The commands that start nothing: read the record, ask the sandbox's server one thing,
//! answer as runc does.

use std::fs::{self, File};
use std::path::Path;

use containerd_shim::api;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::shim_async::TaskClient;

use super::server::{self, NAMESPACE};
use super::state::{Keeper, OciState, Record, Root, StateError};
use super::RuntimeError;

/// Generous bounds for RPCs that do not boot anything.
const RPC_TIMEOUT_NS: i64 = 60_000_000_000;
/// The largest process spec `exec` reads, as the agent channel could carry.
pub const MAX_PROCESS_JSON: u64 = crate::sandbox::pod::MAX_GUEST_SPEC as u64;
const RESOURCES_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";

pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(RPC_TIMEOUT_NS)
}

pub fn rpc(what: &'static str) -> impl FnOnce(ttrpc::Error) -> RuntimeError {
    move |e| RuntimeError::Rpc {
        what,
        message: match e {
            ttrpc::Error::RpcStatus(s) => s.message().to_string(),
            other => other.to_string(),
        },
    }
}

async fn client_of(root: &Root, record: &Record) -> Result<TaskClient, RuntimeError> {
    server::connect(&root.server_socket(&record.sandbox)?).await
}

/// Undoes a process the server made when a later step failed: killed, then forgotten. Errors
/// are the process being gone already.
pub async fn discard(client: &TaskClient, id: &str, exec_id: &str) {
    let _ = client
        .kill(
            ctx(),
            &api::KillRequest {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
                signal: 9,
                ..Default::default()
            },
        )
        .await;
    let _ = client
        .delete(
            ctx(),
            &api::DeleteRequest {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
                ..Default::default()
            },
        )
        .await;
}

pub async fn start(root: &Root, id: &str) -> Result<(), RuntimeError> {
    let record = root.load(id)?;
    let client = client_of(root, &record).await?;
    client
        .start(
            ctx(),
            &api::StartRequest {
                id: id.to_string(),
                ..Default::default()
            },
        )
        .await
        .map_err(rpc("start"))?;
    Ok(())
}

/// The container's status as runc names it, and the pid `state` shows (0 once stopped).
pub async fn status_of(root: &Root, record: &Record) -> (&'static str, u32) {
    let Some(keeper) = record.keeper.filter(Keeper::alive) else {
        return ("stopped", 0);
    };
    let Ok(client) = client_of(root, record).await else {
        return ("stopped", 0);
    };
    let answer = client
        .state(
            ctx(),
            &api::StateRequest {
                id: record.id.clone(),
                ..Default::default()
            },
        )
        .await;
    let status = match answer.map(|s| s.status.enum_value_or(api::Status::UNKNOWN)) {
        Ok(api::Status::CREATED) => "created",
        Ok(api::Status::RUNNING) => "running",
        Ok(api::Status::PAUSED | api::Status::PAUSING) => "paused",
        _ => "stopped",
    };
    (status, if status == "stopped" { 0 } else { keeper.pid })
}

pub async fn state(root: &Root, id: &str) -> Result<(), RuntimeError> {
    let record = root.load(id)?;
    let (status, pid) = status_of(root, &record).await;
    let state = OciState {
        oci_version: "1.2.1",
        id,
        pid,
        status,
        bundle: &record.bundle,
        rootfs: &record.rootfs,
        created: &record.created,
        annotations: &record.annotations,
        owner: "",
    };
    let text =
        serde_json::to_string_pretty(&state).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
    println!("{text}");
    Ok(())
}

pub async fn kill(root: &Root, id: &str, signal: u32, all: bool) -> Result<(), RuntimeError> {
    let record = root.load(id)?;
    if status_of(root, &record).await.0 == "stopped" {
        return Err(RuntimeError::NotRunning);
    }
    let client = client_of(root, &record).await?;
    client
        .kill(
            ctx(),
            &api::KillRequest {
                id: id.to_string(),
                signal,
                all,
                ..Default::default()
            },
        )
        .await
        .map_err(rpc("kill"))?;
    Ok(())
}

pub async fn pause(root: &Root, id: &str, pause: bool) -> Result<(), RuntimeError> {
    let record = root.load(id)?;
    let client = client_of(root, &record).await?;
    let result = if pause {
        client
            .pause(
                ctx(),
                &api::PauseRequest {
                    id: id.to_string(),
                    ..Default::default()
                },
            )
            .await
    } else {
        client
            .resume(
                ctx(),
                &api::ResumeRequest {
                    id: id.to_string(),
                    ..Default::default()
                },
            )
            .await
    };
    result.map_err(rpc(if pause { "pause" } else { "resume" }))?;
    Ok(())
}

pub async fn update(root: &Root, id: &str, resources: &Path) -> Result<(), RuntimeError> {
    let record = root.load(id)?;
    let bytes = if resources == Path::new("-") {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(std::io::stdin(), MAX_PROCESS_JSON),
            &mut buf,
        )
        .map_err(|e| RuntimeError::io(resources, e))?;
        buf
    } else {
        read_bounded(resources)?
    };
    let client = client_of(root, &record).await?;
    client
        .update(
            ctx(),
            &api::UpdateTaskRequest {
                id: id.to_string(),
                resources: MessageField::some(Any {
                    type_url: RESOURCES_TYPE.to_string(),
                    value: bytes,
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .map_err(rpc("update"))?;
    Ok(())
}

pub fn read_bounded(path: &Path) -> Result<Vec<u8>, RuntimeError> {
    let file = File::open(path).map_err(|e| RuntimeError::io(path, e))?;
    let mut buf = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, MAX_PROCESS_JSON + 1),
        &mut buf,
    )
    .map_err(|e| RuntimeError::io(path, e))?;
    if buf.len() as u64 > MAX_PROCESS_JSON {
        return Err(RuntimeError::Invalid(format!(
            "{}: more than {MAX_PROCESS_JSON} bytes",
            path.display()
        )));
    }
    Ok(buf)
}

/// `delete`: the container leaves its sandbox (the last one takes the VM with it) and its
/// record goes. With `--force` a running container is killed first; an unknown id is fine.
pub async fn delete(root: &Root, id: &str, force: bool) -> Result<(), RuntimeError> {
    let record = match root.load(id) {
        Ok(record) => record,
        Err(StateError::NotFound) if force => {
            // A create that failed half-way may have left the directory without a record.
            root.remove(id)?;
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let (status, _) = status_of(root, &record).await;
    if status != "stopped" && !force {
        return Err(RuntimeError::Invalid(format!(
            "cannot delete container {id} that is not stopped: {status}"
        )));
    }
    match client_of(root, &record).await {
        Ok(client) => {
            if status != "stopped" {
                let _ = client
                    .kill(
                        ctx(),
                        &api::KillRequest {
                            id: id.to_string(),
                            signal: 9,
                            all: true,
                            ..Default::default()
                        },
                    )
                    .await;
                let _ = client
                    .wait(
                        ctx(),
                        &api::WaitRequest {
                            id: id.to_string(),
                            ..Default::default()
                        },
                    )
                    .await;
            }
            let deleted = client
                .delete(
                    ctx(),
                    &api::DeleteRequest {
                        id: id.to_string(),
                        ..Default::default()
                    },
                )
                .await;
            match deleted {
                // Never created in the server (a create that failed half-way): nothing to do.
                Err(ttrpc::Error::RpcStatus(s)) if s.code() == ttrpc::Code::NOT_FOUND => {}
                Err(e) => return Err(rpc("delete")(e)),
                Ok(_) => {}
            }
            // Ends the server and its sandbox once no container is left in it. The server may
            // close the connection before its answer is read: it is gone, which is the point.
            let _ = client
                .shutdown(ctx(), &api::ShutdownRequest::default())
                .await;
        }
        Err(_) => {
            // The server is gone (killed, or the host rebooted its /run): clean up from disk.
            if root.members(&record.sandbox, id).is_empty() {
                crate::sandbox::cleanup_on_disk(
                    &crate::shim::sandbox_root(),
                    NAMESPACE,
                    &record.sandbox,
                )
                .await
                .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
                if let Ok(socket) = root.server_socket(&record.sandbox) {
                    let _ = fs::remove_file(socket);
                }
            }
        }
    }
    if let Some(keeper) = record.keeper.filter(Keeper::alive) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(keeper.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    root.remove(id)?;
    Ok(())
}

/// `ps`: the host processes that stand for the container, its keepers (the guest's pids mean
/// nothing on the host; `hako ps` lists those).
pub fn ps(root: &Root, id: &str, json: bool) -> Result<(), RuntimeError> {
    let record = root.load(id)?;
    let pids: Vec<u32> = record
        .keeper
        .filter(Keeper::alive)
        .map(|k| k.pid)
        .into_iter()
        .collect();
    if json {
        println!("{}", serde_json::to_string(&pids).unwrap_or_default());
    } else {
        println!("PID");
        for pid in pids {
            println!("{pid}");
        }
    }
    Ok(())
}

pub fn features() {
    let text = serde_json::to_string_pretty(&crate::features::features()).unwrap_or_default();
    println!("{text}");
}
