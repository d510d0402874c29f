//! `create` and `exec`: the two commands that start a guest process, and leave its keeper
//! (and, for a sandbox's first container, its server) behind.

use std::fs;
use std::path::Path;

use containerd_shim::api;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageField;
use oci_spec::runtime::Spec;

use super::commands::{ctx, discard, read_bounded, rpc, status_of};
use super::launch::{make_fifos, read_spec, require_root, spawn_keeper, write_pid_file, Lock};
use super::server::{self, NAMESPACE};
use super::state::{rfc3339_now, Keeper, Record, Root};
use super::{console, RuntimeError};
use crate::net::NetworkMode;

const PROCESS_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";

pub struct Create<'a> {
    pub id: &'a str,
    pub bundle: &'a Path,
    pub pid_file: Option<&'a Path>,
    pub console_socket: Option<&'a Path>,
}

pub async fn create(root: &Root, req: Create<'_>) -> Result<(), RuntimeError> {
    require_root()?;
    let bundle = std::path::absolute(req.bundle).map_err(|e| RuntimeError::io(req.bundle, e))?;
    let spec = read_spec(&bundle)?;
    let terminal = spec
        .process()
        .as_ref()
        .is_some_and(|p| p.terminal().unwrap_or(false));
    if terminal && req.console_socket.is_none() {
        return Err(RuntimeError::Refused(
            "the spec asks for a terminal: --console-socket is required".to_string(),
        ));
    }
    root.make()?;
    let _lock = Lock::take(&root.create_lock())?;
    let dir = root.make_container_dir(req.id)?;
    let result = create_in(root, &req, &bundle, &spec, &dir, terminal).await;
    if result.is_err() {
        let _ = root.remove(req.id);
    }
    result
}

async fn create_in(
    root: &Root,
    req: &Create<'_>,
    bundle: &Path,
    spec: &Spec,
    dir: &Path,
    terminal: bool,
) -> Result<(), RuntimeError> {
    let netns = match crate::net::mode(spec) {
        NetworkMode::Namespace(path) => Some(path),
        NetworkMode::Host => return Err(crate::net::NetError::HostNetwork.into()),
        NetworkMode::Isolated => None,
    };
    // A later container of a pod names the pod's network namespace: the VM holding it is its
    // sandbox. Anything else starts a sandbox of its own.
    let sandbox_root = crate::shim::sandbox_root();
    let sandbox = netns
        .as_deref()
        .and_then(|ns| crate::sandbox::holding_netns(&sandbox_root, NAMESPACE, ns))
        .unwrap_or_else(|| req.id.to_string());
    let own_server = sandbox == req.id;
    let socket = if own_server {
        server::spawn(root, &sandbox)?
    } else {
        root.server_socket(&sandbox)?
    };
    let client = server::connect(&socket).await?;
    let outcome = async {
        let pty = terminal.then(console::open).transpose()?;
        let (stdin, stdout, stderr) = make_fifos(dir, terminal)?;
        let mut starting = spawn_keeper(
            &socket,
            req.id,
            "",
            dir,
            pty.as_ref().map(|p| &p.replica),
            netns.as_deref(),
        )?;
        client
            .create(
                ttrpc::context::Context::default(),
                &api::CreateTaskRequest {
                    id: req.id.to_string(),
                    bundle: bundle.to_string_lossy().into_owned(),
                    terminal,
                    stdin,
                    stdout,
                    stderr,
                    ..Default::default()
                },
            )
            .await
            .map_err(rpc("create"))?;
        let keeper_pid = starting.pid;
        let finish = async {
            starting.register(root, &sandbox, req.id, "")?;
            if let (Some(pty), Some(socket)) = (&pty, req.console_socket) {
                console::send_master(socket, &pty.master)?;
            }
            let rootfs = spec
                .root()
                .as_ref()
                .map(|r| bundle.join(r.path()))
                .unwrap_or_else(|| bundle.join("rootfs"));
            root.save(&Record {
                id: req.id.to_string(),
                sandbox: sandbox.clone(),
                bundle: bundle.to_path_buf(),
                rootfs,
                created: rfc3339_now(),
                keeper: Keeper::of(keeper_pid),
                annotations: spec
                    .annotations()
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
            })?;
            if let Some(pid_file) = req.pid_file {
                write_pid_file(pid_file, keeper_pid)?;
            }
            starting.release()
        };
        if let Err(e) = finish.await {
            discard(&client, req.id, "").await;
            return Err(e);
        }
        Ok(())
    }
    .await;
    if outcome.is_err() && own_server {
        // The server has no container left: Shutdown ends it and its sandbox.
        let _ = client
            .shutdown(ctx(), &api::ShutdownRequest::default())
            .await;
    }
    outcome
}

pub struct Exec<'a> {
    pub id: &'a str,
    pub process: &'a Path,
    pub pid_file: Option<&'a Path>,
    pub console_socket: Option<&'a Path>,
    pub tty: bool,
}

/// An exec's id: podman's session id (the pid file's directory), else one of our own.
fn exec_id_for(pid_file: Option<&Path>) -> String {
    pid_file
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .filter(|n| crate::ids::validate("exec id", n).is_ok())
        .map(str::to_string)
        .unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            format!("exec-{}-{nanos}", std::process::id())
        })
}

pub async fn exec(root: &Root, req: Exec<'_>) -> Result<(), RuntimeError> {
    require_root()?;
    let record = root.load(req.id)?;
    if status_of(root, &record).await.0 != "running" {
        return Err(RuntimeError::NotRunning);
    }
    let process = read_bounded(req.process)?;
    let parsed: oci_spec::runtime::Process =
        serde_json::from_slice(&process).map_err(|e| RuntimeError::Spec {
            path: req.process.to_path_buf(),
            reason: e.to_string(),
        })?;
    let terminal = req.tty || parsed.terminal().unwrap_or(false);
    if terminal && req.console_socket.is_none() {
        return Err(RuntimeError::Refused(
            "exec with a terminal needs --console-socket".to_string(),
        ));
    }
    let exec_id = exec_id_for(req.pid_file);
    let dir = root.process_dir(req.id, &exec_id)?;
    fs::create_dir_all(&dir).map_err(|e| RuntimeError::io(&dir, e))?;
    let socket = root.server_socket(&record.sandbox)?;
    let client = server::connect(&socket).await?;
    let result = async {
        let pty = terminal.then(console::open).transpose()?;
        let (stdin, stdout, stderr) = make_fifos(&dir, terminal)?;
        let mut starting = spawn_keeper(
            &socket,
            req.id,
            &exec_id,
            &dir,
            pty.as_ref().map(|p| &p.replica),
            None,
        )?;
        client
            .exec(
                ctx(),
                &api::ExecProcessRequest {
                    id: req.id.to_string(),
                    exec_id: exec_id.clone(),
                    terminal,
                    stdin,
                    stdout,
                    stderr,
                    spec: MessageField::some(Any {
                        type_url: PROCESS_TYPE.to_string(),
                        value: process,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )
            .await
            .map_err(rpc("exec"))?;
        let started = async {
            client
                .start(
                    ctx(),
                    &api::StartRequest {
                        id: req.id.to_string(),
                        exec_id: exec_id.clone(),
                        ..Default::default()
                    },
                )
                .await
                .map_err(rpc("exec"))?;
            starting.register(root, &record.sandbox, req.id, &exec_id)?;
            if let (Some(pty), Some(socket)) = (&pty, req.console_socket) {
                console::send_master(socket, &pty.master)?;
            }
            let pid = starting.pid;
            if let Some(pid_file) = req.pid_file {
                write_pid_file(pid_file, pid)?;
            }
            starting.release()
        };
        if let Err(e) = started.await {
            discard(&client, req.id, &exec_id).await;
            return Err(e);
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        let _ = fs::remove_dir_all(&dir);
    }
    result
}
