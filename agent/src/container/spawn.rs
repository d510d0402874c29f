//! Starting a process through the init helper (`crate::init`): its pipes, or the socket on fd 5
//! its terminal's master comes back on, the sync and start pipes on fd 3 and 4, a new pid
//! namespace for a container's init, and the wait for "created".

use std::fs;
use std::io::BufReader;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use nix::sched::{unshare, CloneFlags};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::unistd::pipe2;
use tokio::net::unix::pipe;
use tokio::sync::{watch, Mutex};

use super::stdio::{spawn_output_reader, StdioPlan};
use super::{io_err, ContainerError, Containers, Proc, Status};
use crate::cgroup::Cgroup;
use crate::init::console::{receive_master, CONSOLE_FD};
use crate::init::sync::read_until_created;
use crate::init::{InitConfig, HELPER_ARG, START_FD, SYNC_FD};

/// What `Containers::spawn` needs to start one process through the init helper.
pub(super) struct SpawnRequest<'a> {
    pub id: &'a str,
    pub exec_id: &'a str,
    pub config_path: &'a Path,
    pub config: &'a InitConfig,
    pub stdio: StdioPlan,
    /// The process gets a pid namespace of its own (else it joins one, or is an exec).
    pub new_pid_ns: bool,
    /// The container's cgroup, checked for an OOM kill when this (init) process exits.
    pub oom_watch: Option<Cgroup>,
}

impl Containers {
    /// Writes the helper's config, spawns it and waits for "created".
    pub(super) async fn spawn(&self, req: SpawnRequest<'_>) -> Result<Proc, ContainerError> {
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
        let console = spawned.console;
        let outcome = tokio::task::spawn_blocking(move || {
            let result = read_until_created(&mut sync_read).and_then(|pid| {
                let master = console.as_ref().map(receive_master).transpose()?;
                Ok((pid, master))
            });
            (result, sync_read)
        })
        .await;
        let shown = if exec_id.is_empty() {
            id.to_string()
        } else {
            format!("{id}/{exec_id}")
        };
        let ((pid, master), sync_read) = match outcome {
            Ok((Ok(created), reader)) => (created, reader),
            Ok((Err(reason), _)) => return Err(ContainerError::Init { id: shown, reason }),
            Err(join) => {
                return Err(ContainerError::Init {
                    id: shown,
                    reason: join.to_string(),
                })
            }
        };

        let (mut stdin, mut stdout, mut pty) = (spawned.stdin, spawned.stdout, None);
        if let Some(master) = master {
            // One terminal for all three streams: the host writes to and reads from the master,
            // from the runtime's threads, so it must never block them.
            super::stdio::set_nonblocking(&master)
                .map_err(|e| io_err(id, "the terminal")(e.into()))?;
            let clone = |fd: &OwnedFd| fd.try_clone().map_err(io_err(id, "the terminal"));
            stdin = Some(
                pipe::Sender::from_owned_fd_unchecked(clone(&master)?)
                    .map_err(io_err(id, "the terminal"))?,
            );
            stdout = Some(clone(&master)?);
            pty = Some(master);
        }

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
            stdin: stdin.map(|s| Arc::new(Mutex::new(Some(s)))),
            stdout: stdout.map(spawn_output_reader),
            stderr: spawned.stderr.map(spawn_output_reader),
            pty: pty.map(Arc::new),
        })
    }
}

struct Spawned {
    sync: OwnedFd,
    start: OwnedFd,
    stdin: Option<pipe::Sender>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    /// With a terminal: the agent's end of the socket its master comes back on.
    console: Option<OwnedFd>,
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
        console: None,
    };
    let mut console = None;
    if stdio.terminal {
        // The helper makes the terminal inside the container (`crate::init::console`) and
        // sends its master back on this socket; until then it has nothing to say on stdio.
        let (agent_end, helper_end) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        spawned.console = Some(agent_end);
        console = Some(helper_end);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
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
    let console_raw = console.as_ref().map(|c| c.as_raw_fd());
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (unshare, fcntl, dup2).
    unsafe {
        cmd.pre_exec(move || {
            if new_pid_ns {
                unshare(CloneFlags::CLONE_NEWPID)?;
            }
            // Copy to close-on-exec fds out of the way first so the dup2s cannot clobber each
            // other and nothing but fds 3, 4 (and 5) reaches the helper.
            let sync_tmp = libc::fcntl(sync_raw, libc::F_DUPFD_CLOEXEC, 10);
            let start_tmp = libc::fcntl(start_raw, libc::F_DUPFD_CLOEXEC, 10);
            let console_tmp = console_raw.map(|fd| libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10));
            if sync_tmp < 0 || start_tmp < 0 || console_tmp.is_some_and(|fd| fd < 0) {
                return Err(std::io::Error::last_os_error());
            }
            if libc::dup2(sync_tmp, SYNC_FD) < 0 || libc::dup2(start_tmp, START_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = console_tmp {
                if libc::dup2(fd, CONSOLE_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    // The helper is never waited on through Child: the reaper collects it.
    let _child = cmd.spawn()?;
    drop(sync_w);
    drop(start_r);
    // Only the helper's copy left: its end reads as closed once the helper is gone.
    drop(console);
    Ok(spawned)
}
