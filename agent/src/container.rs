//! Containers in the guest: creating one through the init helper, starting, signalling, waiting
//! and removing it, and the stdio pipes between its init process and the host.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use nix::errno::Errno;
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{pipe2, Pid};
use oci_spec::runtime::Spec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch, Mutex};

use crate::init::{InitConfig, HELPER_ARG, START_FD, SYNC_FD};
use crate::reaper::Reaper;

const STATE_DIR: &str = "/run/hako/containers";
const CGROUP_ROOT: &str = "/sys/fs/cgroup/hako";
const READ_CHUNK: usize = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The id is not a valid container id.
    #[error("invalid container id {0:?}")]
    InvalidId(String),
    /// A container with this id exists already.
    #[error("container {0} already exists")]
    Exists(String),
    /// No container with this id.
    #[error("container {0} not found")]
    NotFound(String),
    /// The request does not fit the container's state.
    #[error("container {id}: {reason}")]
    State { id: String, reason: String },
    /// The OCI spec could not be used.
    #[error("invalid OCI spec for {id}: {reason}")]
    Spec { id: String, reason: String },
    /// Building or starting the container failed inside the guest.
    #[error("container {id}: {reason}")]
    Init { id: String, reason: String },
    /// A file or pipe operation failed.
    #[error("container {id}: {what}: {source}")]
    Io {
        id: String,
        what: String,
        source: std::io::Error,
    },
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

struct Container {
    status: Status,
    pid: i32,
    cgroup_dir: PathBuf,
    state_dir: PathBuf,
    exit: watch::Receiver<Option<u32>>,
    start_pipe: Option<OwnedFd>,
    sync_pipe: Option<BufReader<fs::File>>,
    stdin: Option<Arc<Mutex<Option<pipe::Sender>>>>,
    stdout: Option<Arc<Output>>,
    stderr: Option<Arc<Output>>,
}

pub struct Containers {
    reaper: Arc<Reaper>,
    table: Mutex<HashMap<String, Container>>,
}

pub struct CreateOptions {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

impl Containers {
    pub fn new(reaper: Arc<Reaper>) -> Self {
        Self {
            reaper,
            table: Mutex::new(HashMap::new()),
        }
    }

    pub async fn create(
        &self,
        id: &str,
        spec_json: &[u8],
        opts: CreateOptions,
    ) -> Result<u32, ContainerError> {
        if !valid_id(id) {
            return Err(ContainerError::InvalidId(id.to_string()));
        }
        if self.table.lock().await.contains_key(id) {
            return Err(ContainerError::Exists(id.to_string()));
        }
        let spec: Spec = serde_json::from_slice(spec_json).map_err(|e| ContainerError::Spec {
            id: id.to_string(),
            reason: e.to_string(),
        })?;
        check_root(id, &spec)?;
        let io_err = |what: &str| {
            let id = id.to_string();
            let what = what.to_string();
            move |source| ContainerError::Io { id, what, source }
        };

        let state_dir = Path::new(STATE_DIR).join(id);
        fs::create_dir_all(&state_dir).map_err(io_err("creating the state dir"))?;
        let cgroup_dir = Path::new(CGROUP_ROOT).join(id);
        fs::create_dir_all(&cgroup_dir).map_err(io_err("creating the cgroup"))?;
        let config_path = state_dir.join("init.json");
        let config = InitConfig {
            container_id: id.to_string(),
            spec,
            cgroup_dir: Some(cgroup_dir.clone()),
        };
        let config_bytes = serde_json::to_vec(&config).map_err(|e| ContainerError::Spec {
            id: id.to_string(),
            reason: e.to_string(),
        })?;
        fs::write(&config_path, config_bytes).map_err(io_err("writing the init config"))?;

        let spawned = spawn_helper(&config_path, &opts).map_err(io_err("spawning the init helper"));
        let (sync_read, start_write, stdio) = match spawned {
            Ok(v) => v,
            Err(e) => {
                cleanup_dirs(&state_dir, &cgroup_dir);
                return Err(e);
            }
        };

        // The helper always answers or exits (EOF); the shim's call timeout bounds the rest.
        let mut sync_read = BufReader::new(fs::File::from(sync_read));
        let outcome = tokio::task::spawn_blocking(move || {
            let result = read_until_created(&mut sync_read);
            (result, sync_read)
        })
        .await;
        let failure = match outcome {
            Ok((Ok(pid), reader)) => Ok((pid, reader)),
            Ok((Err(reason), _)) => Err(reason),
            Err(join) => Err(join.to_string()),
        };
        let (pid, sync_read) = match failure {
            Ok(v) => v,
            Err(reason) => {
                cleanup_dirs(&state_dir, &cgroup_dir);
                return Err(ContainerError::Init {
                    id: id.to_string(),
                    reason,
                });
            }
        };

        let (exit_tx, exit_rx) = watch::channel(None);
        let exit_watch = self.reaper.watch(pid);
        tokio::spawn(async move {
            if let Ok(status) = exit_watch.await {
                let _ = exit_tx.send(Some(status));
            }
        });
        let (stdin, stdout, stderr) = stdio;
        let mut table = self.table.lock().await;
        table.insert(
            id.to_string(),
            Container {
                status: Status::Created,
                pid,
                cgroup_dir,
                state_dir,
                exit: exit_rx,
                start_pipe: Some(start_write),
                sync_pipe: Some(sync_read),
                stdin: stdin.map(|s| Arc::new(Mutex::new(Some(s)))),
                stdout: stdout.map(spawn_output_reader),
                stderr: stderr.map(spawn_output_reader),
            },
        );
        Ok(pid as u32)
    }

    pub async fn start(&self, id: &str) -> Result<(), ContainerError> {
        let (start, sync) = {
            let mut table = self.table.lock().await;
            let c = table
                .get_mut(id)
                .ok_or_else(|| ContainerError::NotFound(id.to_string()))?;
            if c.status != Status::Created {
                return Err(ContainerError::State {
                    id: id.to_string(),
                    reason: "can only start a created container".to_string(),
                });
            }
            (c.start_pipe.take(), c.sync_pipe.take())
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
        let c = table
            .get_mut(id)
            .ok_or_else(|| ContainerError::NotFound(id.to_string()))?;
        match result {
            Ok(()) => {
                c.status = Status::Running;
                Ok(())
            }
            Err(reason) => {
                c.status = Status::Stopped;
                Err(ContainerError::Init {
                    id: id.to_string(),
                    reason,
                })
            }
        }
    }

    async fn exit_receiver(
        &self,
        id: &str,
    ) -> Result<watch::Receiver<Option<u32>>, ContainerError> {
        let table = self.table.lock().await;
        table
            .get(id)
            .map(|c| c.exit.clone())
            .ok_or_else(|| ContainerError::NotFound(id.to_string()))
    }

    /// Waits for the container's init process to exit and returns its status.
    pub async fn wait(&self, id: &str) -> Result<u32, ContainerError> {
        let mut rx = self.exit_receiver(id).await?;
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

    pub async fn signal(&self, id: &str, signal: u32, all: bool) -> Result<(), ContainerError> {
        let table = self.table.lock().await;
        let c = table
            .get(id)
            .ok_or_else(|| ContainerError::NotFound(id.to_string()))?;
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| ContainerError::State {
                id: id.to_string(),
                reason: format!("unknown signal {signal}"),
            })?;
        if c.exit.borrow().is_some() {
            return Err(ContainerError::State {
                id: id.to_string(),
                reason: "process already finished".to_string(),
            });
        }
        let mut pids = vec![c.pid];
        if all {
            if let Ok(procs) = fs::read_to_string(c.cgroup_dir.join("cgroup.procs")) {
                pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
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

    pub async fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let mut table = self.table.lock().await;
        let c = table
            .get(id)
            .ok_or_else(|| ContainerError::NotFound(id.to_string()))?;
        if c.exit.borrow().is_none() && c.status == Status::Running {
            return Err(ContainerError::State {
                id: id.to_string(),
                reason: "cannot remove a running container".to_string(),
            });
        }
        if c.exit.borrow().is_none() {
            // Created but never started: its init is blocked on the start pipe. Kill it.
            let _ = kill(Pid::from_raw(c.pid), Signal::SIGKILL);
        }
        if let Some(c) = table.remove(id) {
            cleanup_dirs(&c.state_dir, &c.cgroup_dir);
        }
        Ok(())
    }

    /// Kills every container process: the sandbox is going away.
    pub async fn kill_all(&self) {
        let table = self.table.lock().await;
        for c in table.values() {
            if let Ok(procs) = fs::read_to_string(c.cgroup_dir.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            let _ = kill(Pid::from_raw(c.pid), Signal::SIGKILL);
        }
    }

    pub async fn write_stdin(&self, id: &str, data: &[u8]) -> Result<usize, ContainerError> {
        let stdin = {
            let table = self.table.lock().await;
            let c = table
                .get(id)
                .ok_or_else(|| ContainerError::NotFound(id.to_string()))?;
            c.stdin.clone()
        };
        let Some(stdin) = stdin else {
            return Err(ContainerError::State {
                id: id.to_string(),
                reason: "has no stdin".to_string(),
            });
        };
        let mut guard = stdin.lock().await;
        let Some(pipe) = guard.as_mut() else {
            return Err(ContainerError::State {
                id: id.to_string(),
                reason: "stdin is closed".to_string(),
            });
        };
        pipe.write_all(data)
            .await
            .map_err(|source| ContainerError::Io {
                id: id.to_string(),
                what: "writing stdin".to_string(),
                source,
            })?;
        Ok(data.len())
    }

    pub async fn close_stdin(&self, id: &str) -> Result<(), ContainerError> {
        let stdin = {
            let table = self.table.lock().await;
            let c = table
                .get(id)
                .ok_or_else(|| ContainerError::NotFound(id.to_string()))?;
            c.stdin.clone()
        };
        if let Some(stdin) = stdin {
            stdin.lock().await.take();
        }
        Ok(())
    }

    /// Next chunk of stdout (or stderr); `None` at end of stream.
    pub async fn read_output(
        &self,
        id: &str,
        stderr: bool,
        max: usize,
    ) -> Result<Option<Vec<u8>>, ContainerError> {
        let output = {
            let table = self.table.lock().await;
            let c = table
                .get(id)
                .ok_or_else(|| ContainerError::NotFound(id.to_string()))?;
            if stderr {
                c.stderr.clone()
            } else {
                c.stdout.clone()
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
}

fn check_root(id: &str, spec: &Spec) -> Result<(), ContainerError> {
    let spec_err = |reason: &str| ContainerError::Spec {
        id: id.to_string(),
        reason: reason.to_string(),
    };
    let root = spec.root().as_ref().ok_or_else(|| spec_err("no root"))?;
    let shared = Path::new(hako_protocol::GUEST_SHARED_DIR);
    let path = root.path();
    if !path.starts_with(shared) || path.components().any(|c| c.as_os_str() == "..") {
        return Err(spec_err("the root must be inside the sandbox share"));
    }
    if !path.is_dir() {
        return Err(spec_err("the root directory does not exist in the share"));
    }
    if spec.process().is_none() {
        return Err(spec_err("no process"));
    }
    Ok(())
}

fn cleanup_dirs(state_dir: &Path, cgroup_dir: &Path) {
    let _ = fs::remove_dir_all(state_dir);
    // A cgroup directory goes away with rmdir once it has no processes.
    let _ = fs::remove_dir(cgroup_dir);
}

type Stdio3 = (Option<pipe::Sender>, Option<OwnedFd>, Option<OwnedFd>);

fn spawn_helper(
    config_path: &Path,
    opts: &CreateOptions,
) -> std::io::Result<(OwnedFd, OwnedFd, Stdio3)> {
    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    let (sync_r, sync_w) = pipe2(cloexec)?;
    let (start_r, start_w) = pipe2(cloexec)?;

    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(HELPER_ARG).arg(config_path);
    let mut stdin_w = None;
    let mut stdout_r = None;
    let mut stderr_r = None;
    if opts.stdin {
        let (r, w) = pipe2(cloexec)?;
        cmd.stdin(Stdio::from(r));
        stdin_w = Some(pipe::Sender::from_owned_fd(w)?);
    } else {
        cmd.stdin(Stdio::null());
    }
    if opts.stdout {
        let (r, w) = pipe2(cloexec)?;
        cmd.stdout(Stdio::from(w));
        stdout_r = Some(r);
    } else {
        cmd.stdout(Stdio::null());
    }
    if opts.stderr {
        let (r, w) = pipe2(cloexec)?;
        cmd.stderr(Stdio::from(w));
        stderr_r = Some(r);
    } else {
        cmd.stderr(Stdio::null());
    }

    let sync_raw = sync_w.as_raw_fd();
    let start_raw = start_r.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (unshare, dup2).
    unsafe {
        cmd.pre_exec(move || {
            unshare(CloneFlags::CLONE_NEWPID)?;
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
    Ok((sync_r, start_w, (stdin_w, stdout_r, stderr_r)))
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
        let Ok(mut reader) = pipe::Receiver::from_owned_fd(fd) else {
            return;
        };
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
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
