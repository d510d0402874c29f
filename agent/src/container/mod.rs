//! Containers in the guest: creating one (its cgroup, device filter and init process, started
//! through the init helper: `spawn`), execs, starting, signalling, waiting, resources, and the
//! stdio between each process and the host (`stdio`).

mod spawn;
mod stdio;

use std::collections::HashMap;
use std::fs;
use std::io::{BufReader, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxResources, Process as OciProcess, Spec};
use tokio::net::unix::pipe;
use tokio::sync::{watch, Mutex};

use spawn::SpawnRequest;
use stdio::Output;
pub use stdio::StdioPlan;

use crate::cgroup::{Cgroup, CgroupError, Stats};
use crate::init::sync::read_exec_result;
use crate::init::{InitConfig, Mode};
use crate::oom::OomMonitor;
use crate::reaper::Reaper;
use hako_protocol::valid_id;

const STATE_DIR: &str = "/run/hako/containers";

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Created,
    Running,
    Stopped,
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
