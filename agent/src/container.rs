//! Containers in the guest: creating one through the init helper, execs, starting, signalling,
//! waiting, resources, and the stdio (pipes or a terminal) between each process and the host.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use nix::errno::Errno;
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{pipe2, Pid};
use oci_spec::runtime::{LinuxResources, Process as OciProcess, Spec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch, Mutex};

use crate::cgroup::{Cgroup, CgroupError, Stats};
use crate::init::{InitConfig, Mode, HELPER_ARG, START_FD, SYNC_FD};
use crate::oom::OomMonitor;
use crate::reaper::Reaper;

const STATE_DIR: &str = "/run/hako/containers";
const READ_CHUNK: usize = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The id is not a valid container or exec id.
    #[error("invalid id {0:?}")]
    InvalidId(String),
    /// A container or exec with this id exists already.
    #[error("{0} already exists")]
    Exists(String),
    /// No container or exec with this id.
    #[error("{0} not found")]
    NotFound(String),
    /// The request does not fit the process's state.
    #[error("{id}: {reason}")]
    State { id: String, reason: String },
    /// The OCI spec could not be used.
    #[error("invalid OCI spec for {id}: {reason}")]
    Spec { id: String, reason: String },
    /// Building or starting the process failed inside the guest.
    #[error("{id}: {reason}")]
    Init { id: String, reason: String },
    /// A file or pipe operation failed.
    #[error("{id}: {what}: {source}")]
    Io {
        id: String,
        what: String,
        source: std::io::Error,
    },
    /// A cgroup operation failed.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
}

/// Valid ids: `^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$` (checked again here: the guest trusts no one).
pub fn valid_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Created,
    Running,
    Stopped,
}

/// One output stream of a process, drained by a reader task into a bounded channel so a slow
/// host applies back-pressure to the container instead of growing memory.
struct Output {
    rx: Mutex<mpsc::Receiver<Vec<u8>>>,
}

/// Which streams the host attaches, and whether they are one terminal.
#[derive(Debug, Clone, Copy)]
pub struct StdioPlan {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub terminal: bool,
}

/// One process: a container's init or an exec.
struct Proc {
    status: Status,
    pid: i32,
    exit: watch::Receiver<Option<u32>>,
    start_pipe: Option<OwnedFd>,
    sync_pipe: Option<BufReader<fs::File>>,
    stdin: Option<Arc<Mutex<Option<pipe::Sender>>>>,
    stdout: Option<Arc<Output>>,
    stderr: Option<Arc<Output>>,
    /// The terminal's master side, for window size changes.
    pty: Option<Arc<OwnedFd>>,
}

struct Container {
    init: Proc,
    /// The device filter on its cgroup (`devices`).
    devices: Option<crate::devices::DeviceFilter>,
    /// The container's seccomp profile, which its execs get too.
    seccomp: Option<oci_spec::runtime::LinuxSeccomp>,
    execs: HashMap<String, Proc>,
    cgroup: Cgroup,
    state_dir: PathBuf,
    /// The files the host binds in (hosts, resolv.conf, ...), in the share.
    file_binds: Vec<PathBuf>,
}

/// The share paths of a spec's file bind mounts: files the host may rewrite between Create
/// and Start (Docker 28 writes resolv.conf once it has networked the pod).
fn file_binds(spec: &Spec) -> Vec<PathBuf> {
    spec.mounts()
        .iter()
        .flatten()
        .filter(|m| m.typ().as_deref() == Some("bind"))
        .filter_map(|m| m.source().clone())
        .filter(|source| source.is_file())
        .collect()
}

/// Asks virtiofs for a file's attributes afresh. The guest caches them for a while (virtiofsd's
/// `cache=auto`), and a file the host rewrote meanwhile would read with its old size: cut short,
/// or padded.
fn refresh_attributes(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: statx into a zeroed, correctly sized buffer we own, with a NUL-terminated path.
    unsafe {
        let mut buffer: libc::statx = std::mem::zeroed();
        libc::statx(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            libc::AT_STATX_FORCE_SYNC,
            libc::STATX_BASIC_STATS,
            &mut buffer,
        );
    }
}

/// What `Containers::spawn` needs to start one process through the init helper.
struct SpawnRequest<'a> {
    id: &'a str,
    exec_id: &'a str,
    config_path: &'a Path,
    config: &'a InitConfig,
    stdio: StdioPlan,
    /// The process gets a pid namespace of its own (else it joins one, or is an exec).
    new_pid_ns: bool,
    /// The container's cgroup, checked for an OOM kill when this (init) process exits.
    oom_watch: Option<Cgroup>,
}

pub struct Containers {
    reaper: Arc<Reaper>,
    oom: Arc<OomMonitor>,
    table: Mutex<HashMap<String, Container>>,
}

fn not_found(id: &str, exec_id: &str) -> ContainerError {
    if exec_id.is_empty() {
        ContainerError::NotFound(format!("container {id}"))
    } else {
        ContainerError::NotFound(format!("exec {exec_id} in container {id}"))
    }
}

impl Container {
    fn proc(&self, id: &str, exec_id: &str) -> Result<&Proc, ContainerError> {
        if exec_id.is_empty() {
            Ok(&self.init)
        } else {
            self.execs
                .get(exec_id)
                .ok_or_else(|| not_found(id, exec_id))
        }
    }

    fn proc_mut(&mut self, id: &str, exec_id: &str) -> Result<&mut Proc, ContainerError> {
        if exec_id.is_empty() {
            Ok(&mut self.init)
        } else {
            self.execs
                .get_mut(exec_id)
                .ok_or_else(|| not_found(id, exec_id))
        }
    }
}

impl Containers {
    pub fn new(reaper: Arc<Reaper>, oom: Arc<OomMonitor>) -> Self {
        Self {
            reaper,
            oom,
            table: Mutex::new(HashMap::new()),
        }
    }

    pub async fn create(
        &self,
        id: &str,
        spec_json: &[u8],
        stdio: StdioPlan,
    ) -> Result<u32, ContainerError> {
        if !valid_id(id) {
            return Err(ContainerError::InvalidId(id.to_string()));
        }
        if self.table.lock().await.contains_key(id) {
            return Err(ContainerError::Exists(format!("container {id}")));
        }
        let spec_err = |reason: String| ContainerError::Spec {
            id: id.to_string(),
            reason,
        };
        let spec: Spec = serde_json::from_slice(spec_json).map_err(|e| spec_err(e.to_string()))?;
        check_root(&spec).map_err(|r| spec_err(r.to_string()))?;

        let state_dir = Path::new(STATE_DIR).join(id);
        fs::create_dir_all(&state_dir).map_err(io_err(id, "creating the state dir"))?;
        let cgroup = match Cgroup::create(id) {
            Ok(cgroup) => cgroup,
            Err(e) => {
                let _ = fs::remove_dir_all(&state_dir);
                return Err(e.into());
            }
        };
        let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
        let file_binds = file_binds(&spec);
        let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
        let new_pid_ns = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_none_or(|ns| {
                ns.iter().any(|n| {
                    n.typ() == oci_spec::runtime::LinuxNamespaceType::Pid && n.path().is_none()
                })
            });
        let config = InitConfig {
            container_id: id.to_string(),
            mode: Mode::Init {
                spec: Box::new(spec),
            },
            cgroup_dir: Some(cgroup.dir.clone()),
            terminal: stdio.terminal,
            seccomp: seccomp.clone(),
        };
        let device_rules = resources
            .as_ref()
            .and_then(|r| r.devices().clone())
            .unwrap_or_default();
        let mut devices = None;
        let result = async {
            if let Some(resources) = &resources {
                cgroup.apply(resources)?;
            }
            // Before the container's first process exists: it never runs unfiltered.
            devices = Some(
                crate::devices::attach(&cgroup.dir, &device_rules, None).map_err(|e| {
                    ContainerError::Spec {
                        id: id.to_string(),
                        reason: e.to_string(),
                    }
                })?,
            );
            self.spawn(SpawnRequest {
                id,
                exec_id: "",
                config_path: &state_dir.join("init.json"),
                config: &config,
                stdio,
                new_pid_ns,
                oom_watch: Some(cgroup.clone()),
            })
            .await
        }
        .await;
        let init = match result {
            Ok(proc) => proc,
            Err(e) => {
                cgroup.remove();
                let _ = fs::remove_dir_all(&state_dir);
                return Err(e);
            }
        };
        let pid = init.pid as u32;
        self.table.lock().await.insert(
            id.to_string(),
            Container {
                init,
                file_binds,
                devices,
                seccomp,
                execs: HashMap::new(),
                cgroup,
                state_dir,
            },
        );
        Ok(pid)
    }

    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio: StdioPlan,
    ) -> Result<u32, ContainerError> {
        if !valid_id(exec_id) {
            return Err(ContainerError::InvalidId(exec_id.to_string()));
        }
        let process: OciProcess =
            serde_json::from_slice(process_json).map_err(|e| ContainerError::Spec {
                id: id.to_string(),
                reason: e.to_string(),
            })?;
        let (init_pid, cgroup_dir, state_dir, seccomp) = {
            let table = self.table.lock().await;
            let c = table.get(id).ok_or_else(|| not_found(id, ""))?;
            if c.execs.contains_key(exec_id) {
                return Err(ContainerError::Exists(format!("exec {exec_id}")));
            }
            if c.init.status != Status::Running || c.init.exit.borrow().is_some() {
                return Err(ContainerError::State {
                    id: id.to_string(),
                    reason: "exec needs a running container".to_string(),
                });
            }
            (
                c.init.pid,
                c.cgroup.dir.clone(),
                c.state_dir.clone(),
                c.seccomp.clone(),
            )
        };
        let config = InitConfig {
            container_id: id.to_string(),
            mode: Mode::Exec {
                init_pid,
                process: Box::new(process),
            },
            cgroup_dir: Some(cgroup_dir),
            terminal: stdio.terminal,
            seccomp,
        };
        let config_path = state_dir.join(format!("exec-{exec_id}.json"));
        let proc = self
            .spawn(SpawnRequest {
                id,
                exec_id,
                config_path: &config_path,
                config: &config,
                stdio,
                new_pid_ns: false,
                oom_watch: None,
            })
            .await;
        let _ = fs::remove_file(&config_path);
        let proc = proc?;
        let pid = proc.pid as u32;
        let mut table = self.table.lock().await;
        let c = table.get_mut(id).ok_or_else(|| not_found(id, ""))?;
        c.execs.insert(exec_id.to_string(), proc);
        Ok(pid)
    }

    /// Writes the helper's config, spawns it and waits for "created".
    async fn spawn(&self, req: SpawnRequest<'_>) -> Result<Proc, ContainerError> {
        let SpawnRequest {
            id,
            exec_id,
            config_path,
            config,
            stdio,
            new_pid_ns,
            oom_watch,
        } = req;
        let config_bytes = serde_json::to_vec(config).map_err(|e| ContainerError::Spec {
            id: id.to_string(),
            reason: e.to_string(),
        })?;
        fs::write(config_path, config_bytes).map_err(io_err(id, "writing the init config"))?;
        let spawned = spawn_helper(config_path, stdio, new_pid_ns)
            .map_err(io_err(id, "spawning the init helper"))?;

        // The helper always answers or exits (EOF); the shim's call timeout bounds the rest.
        let mut sync_read = BufReader::new(fs::File::from(spawned.sync));
        let outcome = tokio::task::spawn_blocking(move || {
            let result = read_until_created(&mut sync_read);
            (result, sync_read)
        })
        .await;
        let shown = if exec_id.is_empty() {
            id.to_string()
        } else {
            format!("{id}/{exec_id}")
        };
        let (pid, sync_read) = match outcome {
            Ok((Ok(pid), reader)) => (pid, reader),
            Ok((Err(reason), _)) => return Err(ContainerError::Init { id: shown, reason }),
            Err(join) => {
                return Err(ContainerError::Init {
                    id: shown,
                    reason: join.to_string(),
                })
            }
        };

        let (exit_tx, exit_rx) = watch::channel(None);
        let exit_watch = self.reaper.watch(pid);
        let oom = self.oom.clone();
        let container_id = id.to_string();
        tokio::spawn(async move {
            if let Ok(status) = exit_watch.await {
                // An init killed for memory: report the OOM before the exit, as the host's
                // event order then reads naturally.
                if let Some(cgroup) = oom_watch {
                    oom.check(&container_id, &cgroup).await;
                }
                let _ = exit_tx.send(Some(status));
            }
        });
        Ok(Proc {
            status: Status::Created,
            pid,
            exit: exit_rx,
            start_pipe: Some(spawned.start),
            sync_pipe: Some(sync_read),
            stdin: spawned.stdin.map(|s| Arc::new(Mutex::new(Some(s)))),
            stdout: spawned.stdout.map(spawn_output_reader),
            stderr: spawned.stderr.map(spawn_output_reader),
            pty: spawned.pty.map(Arc::new),
        })
    }

    pub async fn start(&self, id: &str, exec_id: &str) -> Result<u32, ContainerError> {
        let (start, sync, pid) = {
            let mut table = self.table.lock().await;
            let c = table.get_mut(id).ok_or_else(|| not_found(id, exec_id))?;
            let p = c.proc_mut(id, exec_id)?;
            if p.status != Status::Created {
                return Err(ContainerError::State {
                    id: id.to_string(),
                    reason: "can only start a created process".to_string(),
                });
            }
            let taken = (p.start_pipe.take(), p.sync_pipe.take(), p.pid);
            if exec_id.is_empty() {
                c.file_binds.iter().for_each(|f| refresh_attributes(f));
            }
            taken
        };
        let (Some(start), Some(mut sync)) = (start, sync) else {
            return Err(ContainerError::State {
                id: id.to_string(),
                reason: "already started".to_string(),
            });
        };
        let outcome = tokio::task::spawn_blocking(move || {
            let mut start = fs::File::from(start);
            start
                .write_all(b"s")
                .map_err(|e| format!("signalling start: {e}"))?;
            drop(start);
            read_exec_result(&mut sync)
        });
        let result = match outcome.await {
            Ok(result) => result,
            Err(join) => Err(join.to_string()),
        };
        let mut table = self.table.lock().await;
        let c = table.get_mut(id).ok_or_else(|| not_found(id, exec_id))?;
        let p = c.proc_mut(id, exec_id)?;
        match result {
            Ok(()) => {
                p.status = Status::Running;
                Ok(pid as u32)
            }
            Err(reason) => {
                p.status = Status::Stopped;
                Err(ContainerError::Init {
                    id: id.to_string(),
                    reason,
                })
            }
        }
    }

    /// Waits for the process to exit and returns its status.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<u32, ContainerError> {
        let mut rx = {
            let table = self.table.lock().await;
            let c = table.get(id).ok_or_else(|| not_found(id, exec_id))?;
            c.proc(id, exec_id)?.exit.clone()
        };
        loop {
            if let Some(status) = *rx.borrow_and_update() {
                return Ok(status);
            }
            if rx.changed().await.is_err() {
                return Err(ContainerError::State {
                    id: id.to_string(),
                    reason: "the exit watcher went away".to_string(),
                });
            }
        }
    }

    pub async fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), ContainerError> {
        let table = self.table.lock().await;
        let c = table.get(id).ok_or_else(|| not_found(id, exec_id))?;
        let p = c.proc(id, exec_id)?;
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| ContainerError::State {
                id: id.to_string(),
                reason: format!("unknown signal {signal}"),
            })?;
        if p.exit.borrow().is_some() && !all {
            return Err(ContainerError::State {
                id: id.to_string(),
                reason: "process already finished".to_string(),
            });
        }
        let mut pids = vec![p.pid];
        if all && exec_id.is_empty() {
            pids.extend(c.cgroup.pids());
        }
        for pid in pids {
            match kill(Pid::from_raw(pid), sig) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => {
                    return Err(ContainerError::Io {
                        id: id.to_string(),
                        what: format!("kill {pid}"),
                        source: e.into(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Removes a container whose processes have exited (a created one is killed first).
    pub async fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let mut table = self.table.lock().await;
        let c = table.get(id).ok_or_else(|| not_found(id, ""))?;
        if c.init.exit.borrow().is_none() && c.init.status == Status::Running {
            return Err(ContainerError::State {
                id: id.to_string(),
                reason: "cannot remove a running container".to_string(),
            });
        }
        if c.init.exit.borrow().is_none() {
            // Created but never started: its init is blocked on the start pipe.
            let _ = kill(Pid::from_raw(c.init.pid), Signal::SIGKILL);
        }
        // Execs die with the pid namespace's init; make sure of it.
        for pid in c.cgroup.pids() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if let Some(c) = table.remove(id) {
            let _ = fs::remove_dir_all(&c.state_dir);
            c.cgroup.remove();
        }
        self.oom.forget(id);
        Ok(())
    }

    pub async fn delete_process(&self, id: &str, exec_id: &str) -> Result<(), ContainerError> {
        let mut table = self.table.lock().await;
        let c = table.get_mut(id).ok_or_else(|| not_found(id, exec_id))?;
        let p = c.proc(id, exec_id)?;
        if p.status == Status::Running && p.exit.borrow().is_none() {
            return Err(ContainerError::State {
                id: id.to_string(),
                reason: format!("exec {exec_id} is still running"),
            });
        }
        if p.exit.borrow().is_none() {
            let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
        }
        c.execs.remove(exec_id);
        Ok(())
    }

    /// Kills every container process: the sandbox is going away.
    pub async fn kill_all(&self) {
        let table = self.table.lock().await;
        for c in table.values() {
            for pid in c.cgroup.pids() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = kill(Pid::from_raw(c.init.pid), Signal::SIGKILL);
        }
    }

    async fn stdin_of(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<Option<Arc<Mutex<Option<pipe::Sender>>>>, ContainerError> {
        let table = self.table.lock().await;
        let c = table.get(id).ok_or_else(|| not_found(id, exec_id))?;
        Ok(c.proc(id, exec_id)?.stdin.clone())
    }

    pub async fn write_stdin(
        &self,
        id: &str,
        exec_id: &str,
        data: &[u8],
    ) -> Result<usize, ContainerError> {
        let state = |reason: &str| ContainerError::State {
            id: id.to_string(),
            reason: reason.to_string(),
        };
        let stdin = self
            .stdin_of(id, exec_id)
            .await?
            .ok_or_else(|| state("has no stdin"))?;
        let mut guard = stdin.lock().await;
        let pipe = guard.as_mut().ok_or_else(|| state("stdin is closed"))?;
        pipe.write_all(data)
            .await
            .map_err(io_err(id, "writing stdin"))?;
        Ok(data.len())
    }

    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), ContainerError> {
        if let Some(stdin) = self.stdin_of(id, exec_id).await? {
            stdin.lock().await.take();
        }
        Ok(())
    }

    /// Next chunk of stdout (or stderr); `None` at end of stream.
    pub async fn read_output(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
        max: usize,
    ) -> Result<Option<Vec<u8>>, ContainerError> {
        let output = {
            let table = self.table.lock().await;
            let c = table.get(id).ok_or_else(|| not_found(id, exec_id))?;
            let p = c.proc(id, exec_id)?;
            if stderr {
                p.stderr.clone()
            } else {
                p.stdout.clone()
            }
        };
        let Some(output) = output else {
            return Ok(None);
        };
        let mut rx = output.rx.lock().await;
        Ok(rx.recv().await.map(|mut chunk| {
            chunk.truncate(max.max(1));
            chunk
        }))
    }

    pub async fn resize(
        &self,
        id: &str,
        exec_id: &str,
        width: u16,
        height: u16,
    ) -> Result<(), ContainerError> {
        let pty = {
            let table = self.table.lock().await;
            let c = table.get(id).ok_or_else(|| not_found(id, exec_id))?;
            c.proc(id, exec_id)?.pty.clone()
        };
        let pty = pty.ok_or_else(|| ContainerError::State {
            id: id.to_string(),
            reason: "the process has no terminal".to_string(),
        })?;
        let size = libc::winsize {
            ws_row: height,
            ws_col: width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer; the fd is a pty master we own.
        if unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &size) } < 0 {
            return Err(io_err(id, "resizing the terminal")(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    async fn cgroup_of(&self, id: &str) -> Result<Cgroup, ContainerError> {
        let table = self.table.lock().await;
        Ok(table
            .get(id)
            .ok_or_else(|| not_found(id, ""))?
            .cgroup
            .clone())
    }

    pub async fn pids(&self, id: &str) -> Result<Vec<u32>, ContainerError> {
        Ok(self
            .cgroup_of(id)
            .await?
            .pids()
            .into_iter()
            .map(|p| p as u32)
            .collect())
    }

    pub async fn set_paused(&self, id: &str, paused: bool) -> Result<(), ContainerError> {
        Ok(self.cgroup_of(id).await?.set_frozen(paused).await?)
    }

    pub async fn stats(&self, id: &str) -> Result<Stats, ContainerError> {
        Ok(self.cgroup_of(id).await?.stats())
    }

    pub async fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), ContainerError> {
        let resources: LinuxResources =
            serde_json::from_slice(resources_json).map_err(|e| ContainerError::Spec {
                id: id.to_string(),
                reason: e.to_string(),
            })?;
        self.cgroup_of(id).await?.apply(&resources)?;
        if let Some(rules) = resources.devices() {
            let mut table = self.table.lock().await;
            let c = table.get_mut(id).ok_or_else(|| not_found(id, ""))?;
            let filter =
                crate::devices::attach(&c.cgroup.dir, rules, c.devices.take()).map_err(|e| {
                    ContainerError::Spec {
                        id: id.to_string(),
                        reason: e.to_string(),
                    }
                })?;
            c.devices = Some(filter);
        }
        Ok(())
    }

    /// Checks every container for OOM kills (of any of its processes).
    pub async fn check_oom(&self) {
        let cgroups: Vec<(String, Cgroup)> = {
            let table = self.table.lock().await;
            table
                .iter()
                .map(|(id, c)| (id.clone(), c.cgroup.clone()))
                .collect()
        };
        for (id, cgroup) in cgroups {
            self.oom.check(&id, &cgroup).await;
        }
    }
}

fn io_err(id: &str, what: &str) -> impl FnOnce(std::io::Error) -> ContainerError {
    let id = id.to_string();
    let what = what.to_string();
    move |source| ContainerError::Io { id, what, source }
}

fn check_root(spec: &Spec) -> Result<(), &'static str> {
    let root = spec.root().as_ref().ok_or("no root")?;
    let shared = Path::new(hako_protocol::GUEST_SHARED_DIR);
    let path = root.path();
    if !path.starts_with(shared) || path.components().any(|c| c.as_os_str() == "..") {
        return Err("the root must be inside the sandbox share");
    }
    if !path.is_dir() {
        return Err("the root directory does not exist in the share");
    }
    if spec.process().is_none() {
        return Err("no process");
    }
    Ok(())
}

struct Spawned {
    sync: OwnedFd,
    start: OwnedFd,
    stdin: Option<pipe::Sender>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    pty: Option<OwnedFd>,
}

fn spawn_helper(
    config_path: &Path,
    stdio: StdioPlan,
    new_pid_ns: bool,
) -> std::io::Result<Spawned> {
    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    let (sync_r, sync_w) = pipe2(cloexec)?;
    let (start_r, start_w) = pipe2(cloexec)?;

    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(HELPER_ARG).arg(config_path);
    let mut spawned = Spawned {
        sync: sync_r,
        start: start_w,
        stdin: None,
        stdout: None,
        stderr: None,
        pty: None,
    };
    if stdio.terminal {
        // One terminal for all three streams: the host writes to and reads from the master.
        let pty = nix::pty::openpty(None, None).map_err(std::io::Error::from)?;
        nix::fcntl::fcntl(
            pty.master.as_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(std::io::Error::from)?;
        cmd.stdin(Stdio::from(pty.slave.try_clone()?))
            .stdout(Stdio::from(pty.slave.try_clone()?))
            .stderr(Stdio::from(pty.slave));
        spawned.stdin = Some(pipe::Sender::from_owned_fd_unchecked(
            pty.master.try_clone()?,
        )?);
        spawned.stdout = Some(pty.master.try_clone()?);
        spawned.pty = Some(pty.master);
    } else {
        if stdio.stdin {
            let (r, w) = pipe2(cloexec)?;
            cmd.stdin(Stdio::from(r));
            spawned.stdin = Some(pipe::Sender::from_owned_fd(w)?);
        } else {
            cmd.stdin(Stdio::null());
        }
        if stdio.stdout {
            let (r, w) = pipe2(cloexec)?;
            cmd.stdout(Stdio::from(w));
            spawned.stdout = Some(r);
        } else {
            cmd.stdout(Stdio::null());
        }
        if stdio.stderr {
            let (r, w) = pipe2(cloexec)?;
            cmd.stderr(Stdio::from(w));
            spawned.stderr = Some(r);
        } else {
            cmd.stderr(Stdio::null());
        }
    }

    let sync_raw = sync_w.as_raw_fd();
    let start_raw = start_r.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (unshare, fcntl, dup2).
    unsafe {
        cmd.pre_exec(move || {
            if new_pid_ns {
                unshare(CloneFlags::CLONE_NEWPID)?;
            }
            // Copy to close-on-exec fds out of the way first so the two dup2s cannot clobber
            // each other and nothing but fds 3 and 4 reaches the container.
            let sync_tmp = libc::fcntl(sync_raw, libc::F_DUPFD_CLOEXEC, 10);
            let start_tmp = libc::fcntl(start_raw, libc::F_DUPFD_CLOEXEC, 10);
            if sync_tmp < 0 || start_tmp < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::dup2(sync_tmp, SYNC_FD) < 0 || libc::dup2(start_tmp, START_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // The helper is never waited on through Child: the reaper collects it.
    let _child = cmd.spawn()?;
    drop(sync_w);
    drop(start_r);
    Ok(spawned)
}

/// Reads the helper's report: "pid N" and then "created", or "error ...".
fn read_until_created(sync: &mut BufReader<fs::File>) -> Result<i32, String> {
    let mut pid = None;
    let mut created = false;
    let mut line = String::new();
    while pid.is_none() || !created {
        line.clear();
        match sync.read_line(&mut line) {
            Ok(0) => return Err("the init helper exited without reporting".to_string()),
            Ok(_) => {}
            Err(e) => return Err(format!("reading the init helper's report: {e}")),
        }
        let line = line.trim_end();
        if let Some(p) = line.strip_prefix("pid ") {
            pid = p.parse::<i32>().ok();
        } else if line == "created" {
            created = true;
        } else if let Some(e) = line.strip_prefix("error ") {
            return Err(e.to_string());
        }
    }
    pid.ok_or_else(|| "the init helper reported no pid".to_string())
}

/// After the start byte: EOF means the exec succeeded (fd 3 is close-on-exec).
fn read_exec_result(sync: &mut BufReader<fs::File>) -> Result<(), String> {
    let mut line = String::new();
    match sync.read_line(&mut line) {
        Ok(0) => Ok(()),
        Ok(_) => Err(line
            .trim_end()
            .strip_prefix("error ")
            .unwrap_or(line.trim_end())
            .to_string()),
        Err(e) => Err(format!("reading the exec result: {e}")),
    }
}

fn spawn_output_reader(fd: OwnedFd) -> Arc<Output> {
    let (tx, rx) = mpsc::channel(64);
    let output = Arc::new(Output { rx: Mutex::new(rx) });
    tokio::spawn(async move {
        // A pty master is not a FIFO; both poll the same way.
        let Ok(mut reader) = pipe::Receiver::from_owned_fd_unchecked(fd) else {
            return;
        };
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            // A pty master reads EIO once the last slave is closed: that is its end of stream.
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    output
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(valid_id("abc"));
        assert!(valid_id("a.b-c_d"));
        assert!(valid_id(&"a".repeat(128)));
        for bad in ["", ".", "..", "../x", "a/b", "a\0b", "-a", &"a".repeat(129)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn helper_report_is_parsed() {
        let (r, w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let mut w = fs::File::from(w);
        w.write_all(b"created\npid 42\n").expect("write");
        drop(w);
        let mut reader = BufReader::new(fs::File::from(r));
        assert_eq!(read_until_created(&mut reader), Ok(42));
        assert_eq!(read_exec_result(&mut reader), Ok(()));
    }

    #[test]
    fn helper_errors_are_passed_on() {
        let (r, w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let mut w = fs::File::from(w);
        w.write_all(b"pid 42\nerror mounting proc on /proc: EPERM\n")
            .expect("write");
        drop(w);
        let mut reader = BufReader::new(fs::File::from(r));
        assert_eq!(
            read_until_created(&mut reader),
            Err("mounting proc on /proc: EPERM".to_string())
        );
    }
}
