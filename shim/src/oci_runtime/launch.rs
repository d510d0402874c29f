//! A new guest process's host side, before it exists: its FIFOs, its keeper forked and held
//! until the process is there (then released, or killed if a later step fails), the pid file.

use std::fs::{self, File};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;

use oci_spec::runtime::Spec;

use super::keeper::{self, STDERR, STDIN, STDOUT};
use super::state::{Keeper, Root};
use super::RuntimeError;

/// A keeper that is forked but not yet released; dropped unreleased, it is killed.
pub struct Starting {
    /// The keeper's host pid: the process conmon will wait on.
    pub pid: u32,
    /// The keeper when it is our own child (an exec's), to be reaped if it is killed here.
    child: Option<std::process::Child>,
    go: Option<OwnedFd>,
}

impl Starting {
    /// Has the server watch the keeper (`watch`), so that its guest process dies with it.
    pub fn register(
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
    pub fn release(&mut self) -> Result<(), RuntimeError> {
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
pub fn make_fifos(dir: &Path, terminal: bool) -> Result<(String, String, String), RuntimeError> {
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
pub fn spawn_keeper(
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

pub fn read_spec(bundle: &Path) -> Result<Spec, RuntimeError> {
    let path = bundle.join("config.json");
    let bytes = fs::read(&path).map_err(|e| RuntimeError::io(&path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| RuntimeError::Spec {
        path,
        reason: e.to_string(),
    })
}

/// Writes the pid file as runc does: the decimal pid, nothing else, in one rename.
pub fn write_pid_file(path: &Path, pid: u32) -> Result<(), RuntimeError> {
    let temp = path.with_extension("hako-new");
    fs::write(&temp, pid.to_string()).map_err(|e| RuntimeError::io(&temp, e))?;
    fs::rename(&temp, path).map_err(|e| RuntimeError::io(path, e))
}

pub fn require_root() -> Result<(), RuntimeError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(RuntimeError::Refused(super::cli::ROOTLESS.to_string()))
    }
}

/// `create` holds this while it finds or starts the sandbox and creates the container.
pub struct Lock {
    _file: File,
}

impl Lock {
    pub fn take(path: &Path) -> Result<Lock, RuntimeError> {
        let file = File::create(path).map_err(|e| RuntimeError::io(path, e))?;
        // SAFETY: flock on a descriptor this process owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } < 0 {
            return Err(RuntimeError::io(path, std::io::Error::last_os_error()));
        }
        Ok(Lock { _file: file })
    }
}
