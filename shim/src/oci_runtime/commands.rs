//! Each command: read the record, ask the sandbox's server one thing, answer as runc does.
//! `create` and `exec` are the two that start something: the server (first container of a
//! sandbox only) and a keeper, which outlive them.

use std::fs::{self, File};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;

use containerd_shim::api;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::shim_async::TaskClient;
use oci_spec::runtime::Spec;

use super::keeper::{self, STDERR, STDIN, STDOUT};
use super::server::{self, NAMESPACE};
use super::state::{rfc3339_now, Keeper, OciState, Record, Root, StateError};
use super::{console, RuntimeError};
use crate::net::NetworkMode;

/// Generous bounds for RPCs that do not boot anything.
const RPC_TIMEOUT_NS: i64 = 60_000_000_000;
/// The largest process spec `exec` reads, as the agent channel could carry.
const MAX_PROCESS_JSON: u64 = crate::sandbox::pod::MAX_GUEST_SPEC as u64;
const PROCESS_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";
const RESOURCES_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(RPC_TIMEOUT_NS)
}

fn rpc(what: &'static str) -> impl FnOnce(ttrpc::Error) -> RuntimeError {
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

/// A keeper that is forked but not yet released; dropped unreleased, it is killed.
struct Starting {
    /// The keeper's host pid: the process conmon will wait on.
    pid: u32,
    /// The keeper when it is our own child (an exec's), to be reaped if it is killed here.
    child: Option<std::process::Child>,
    go: Option<OwnedFd>,
}

impl Starting {
    /// Has the server watch the keeper (`watch`), so that its guest process dies with it.
    fn register(
        &self,
        root: &Root,
        sandbox: &str,
        id: &str,
        exec_id: &str,
    ) -> Result<(), RuntimeError> {
        let keeper = Keeper::of(self.pid).ok_or_else(|| RuntimeError::Spawn {
            what: "keeper",
            reason: "it exited at once".to_string(),
        })?;
        let registration = super::watch::Registration {
            keeper,
            id: id.to_string(),
            exec_id: exec_id.to_string(),
        };
        super::watch::register(&root.keeper_socket(sandbox)?, &registration)
    }

    /// Lets the keeper go: the process exists.
    fn release(&mut self) -> Result<(), RuntimeError> {
        if let Some(go) = self.go.take() {
            nix::unistd::write(&go, b"g").map_err(|e| RuntimeError::Spawn {
                what: "keeper",
                reason: format!("releasing it: {e}"),
            })?;
        }
        self.child = None;
        self.pid = 0;
        Ok(())
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if self.pid == 0 {
            return;
        }
        // Not released: it has touched nothing yet.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

/// Which FIFOs a process gets: stdin only when there is input (a terminal, or conmon's pipe
/// rather than /dev/null), stderr only without a terminal.
fn make_fifos(dir: &Path, terminal: bool) -> Result<(String, String, String), RuntimeError> {
    let make = |name: &str| -> Result<String, RuntimeError> {
        let path = dir.join(name);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .map_err(|e| RuntimeError::io(&path, e.into()))?;
        Ok(path.to_string_lossy().into_owned())
    };
    let stdin = if terminal || !keeper::stdin_is_null() {
        make(STDIN)?
    } else {
        String::new()
    };
    let stdout = make(STDOUT)?;
    let stderr = if terminal {
        String::new()
    } else {
        make(STDERR)?
    };
    Ok((stdin, stdout, stderr))
}

/// Forks the keeper with the caller's stdio (or the pty replica), in a session of its own.
/// The container's init keeper also enters the pod's network namespace and gets IPC, UTS, PID
/// and mount namespaces of its own, so that `/proc/<pid>/ns/*`, which podman gives later
/// containers of the pod, names the pod and nothing of the host's, and `podman top`, which
/// lists `/proc` in the keeper's mount namespace, sees the keeper alone.
fn spawn_keeper(
    socket: &Path,
    id: &str,
    exec_id: &str,
    dir: &Path,
    replica: Option<&OwnedFd>,
    netns: Option<&Path>,
) -> Result<Starting, RuntimeError> {
    let fail = |reason: String| RuntimeError::Spawn {
        what: "keeper",
        reason,
    };
    let (go_read, go_write) = nix::unistd::pipe().map_err(|e| fail(e.to_string()))?;
    let (pid_read, pid_write) = nix::unistd::pipe().map_err(|e| fail(e.to_string()))?;
    let exe = std::env::current_exe().map_err(|e| fail(e.to_string()))?;
    let netns = match netns {
        Some(path) => Some(File::open(path).map_err(|e| RuntimeError::io(path, e))?),
        None => None,
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("__keep")
        .arg("--socket")
        .arg(socket)
        .arg("--dir")
        .arg(dir);
    if !exec_id.is_empty() {
        cmd.arg("--exec").arg(exec_id);
    }
    cmd.arg(id).env_remove("NOTIFY_SOCKET");
    if let Some(replica) = replica {
        let as_stdio = |fd: &OwnedFd| -> Result<Stdio, RuntimeError> {
            Ok(Stdio::from(
                fd.try_clone().map_err(|e| fail(e.to_string()))?,
            ))
        };
        cmd.stdin(as_stdio(replica)?)
            .stdout(as_stdio(replica)?)
            .stderr(Stdio::null());
    }
    let go_fd = go_read.as_raw_fd();
    let pid_fd = pid_write.as_raw_fd();
    let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: between fork and exec only async-signal-safe calls: setsid, setns,
    // unshare and dup2 on descriptors this process owns.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if let Some(fd) = netns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let own = libc::CLONE_NEWIPC
                    | libc::CLONE_NEWUTS
                    | libc::CLONE_NEWPID
                    | libc::CLONE_NEWNS;
                if libc::unshare(own) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            super::only_fds(&[go_fd, pid_fd])
        });
    }
    let mut child = cmd.spawn().map_err(|e| fail(e.to_string()))?;
    drop(cmd);
    drop(pid_write);
    // The keeper says which process conmon is to wait on: itself, or (the init's) its child,
    // PID 1 of a PID namespace of its own, once the parent has exited.
    let mut text = String::new();
    let read = std::io::Read::read_to_string(
        &mut std::io::Read::take(File::from(pid_read), 32),
        &mut text,
    );
    let pid = read.ok().and_then(|_| text.trim().parse::<u32>().ok());
    let Some(pid) = pid.filter(|p| *p > 1) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(fail(format!("it reported no pid ({text:?})")));
    };
    let child = if pid == child.id() {
        Some(child)
    } else {
        // The intermediate exits once it has forked; its child is conmon's from then on.
        let _ = child.wait();
        None
    };
    Ok(Starting {
        pid,
        child,
        go: Some(go_write),
    })
}

fn read_spec(bundle: &Path) -> Result<Spec, RuntimeError> {
    let path = bundle.join("config.json");
    let bytes = fs::read(&path).map_err(|e| RuntimeError::io(&path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| RuntimeError::Spec {
        path,
        reason: e.to_string(),
    })
}

/// Writes the pid file as runc does: the decimal pid, nothing else, in one rename.
fn write_pid_file(path: &Path, pid: u32) -> Result<(), RuntimeError> {
    let temp = path.with_extension("hako-new");
    fs::write(&temp, pid.to_string()).map_err(|e| RuntimeError::io(&temp, e))?;
    fs::rename(&temp, path).map_err(|e| RuntimeError::io(path, e))
}

fn require_root() -> Result<(), RuntimeError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(RuntimeError::Refused(super::cli::ROOTLESS.to_string()))
    }
}

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
    fs::create_dir_all(&root.dir).map_err(|e| RuntimeError::io(&root.dir, e))?;
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
            let _ = client
                .delete(
                    ctx(),
                    &api::DeleteRequest {
                        id: req.id.to_string(),
                        ..Default::default()
                    },
                )
                .await;
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
async fn status_of(root: &Root, record: &Record) -> (&'static str, u32) {
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

fn read_bounded(path: &Path) -> Result<Vec<u8>, RuntimeError> {
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
            if let Err(e) = deleted {
                let e = rpc("delete")(e);
                if !e.to_string().contains("not found") {
                    return Err(e);
                }
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
            let _ = client
                .delete(
                    ctx(),
                    &api::DeleteRequest {
                        id: req.id.to_string(),
                        exec_id: exec_id.clone(),
                        ..Default::default()
                    },
                )
                .await;
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

/// `create` holds this while it finds or starts the sandbox and creates the container.
struct Lock {
    _file: File,
}

impl Lock {
    fn take(path: &Path) -> Result<Lock, RuntimeError> {
        let file = File::create(path).map_err(|e| RuntimeError::io(path, e))?;
        // SAFETY: flock on a descriptor this process owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } < 0 {
            return Err(RuntimeError::io(path, std::io::Error::last_os_error()));
        }
        Ok(Lock { _file: file })
    }
}
