//! The container's init process, run as `hako-agent container-init <config>`.
//!
//! The agent spawns this helper inside a fresh pid namespace (it unshares CLONE_NEWPID before the
//! exec), so the helper's one child is PID 1 there. The helper reports that child's pid (in the
//! agent's namespace) and exits; the child is reparented to the agent, which reaps it and so
//! sees its real exit status. The child builds the container (`rootfs`), makes its terminal if
//! it has one (`console`), says "created" and blocks until Start, then runs the process
//! (`process`); `sync` is the pipe protocol between them and the agent.
//!
//! An exec (`Mode::Exec`) takes the same path but joins the namespaces and cgroup of the
//! container's init process instead of making new ones.
//!
//! This process is single-threaded from start to finish, so fork() here is safe.

mod caps;
pub mod console;
mod devnodes;
mod error;
mod process;
mod rootfs;
mod seccomp;
pub mod sync;

use std::fs::{self, File};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;

use nix::sched::{setns, CloneFlags};
use nix::unistd::{fork, ForkResult};
use oci_spec::runtime::{LinuxNamespaceType, LinuxSeccomp, Process, Spec};
use serde::{Deserialize, Serialize};

use console::{Pty, CONSOLE_FD};
pub use error::InitError;
use error::{io, sys};
use sync::{report, report_and_exit};
pub use sync::{START_FD, SYNC_FD};

pub const HELPER_ARG: &str = "container-init";

/// What the agent hands the helper: written to a file the helper reads.
#[derive(Debug, Serialize, Deserialize)]
pub struct InitConfig {
    pub container_id: String,
    pub mode: Mode,
    /// cgroup v2 directory the process joins before anything else.
    pub cgroup_dir: Option<PathBuf>,
    /// stdin/stdout/stderr are a terminal: become a session leader with it as controlling tty.
    pub terminal: bool,
    /// The container's seccomp profile (execs get their container's).
    pub seccomp: Option<LinuxSeccomp>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Mode {
    /// Build a new container from the spec. Namespaces with a path are joined, not created.
    Init { spec: Box<Spec> },
    /// Run another process in the container whose init has this (agent-namespace) pid.
    Exec {
        init_pid: i32,
        process: Box<Process>,
    },
}

/// Entry point of the helper. Never returns.
pub fn helper_main(config_path: &str) -> ! {
    // SAFETY: the agent passes the write end of the sync pipe as fd 3; nothing else owns it.
    let mut sync = unsafe { File::from_raw_fd(SYNC_FD) };
    let config = match read_config(config_path) {
        Ok(config) => config,
        Err(e) => report_and_exit(&mut sync, &e),
    };
    if let Err(e) = prepare_before_fork(&config) {
        report_and_exit(&mut sync, &e);
    }
    // SAFETY: this process has a single thread (it was just exec'd and started none).
    match unsafe { fork() } {
        Ok(ForkResult::Parent { child }) => {
            let _ = report(&mut sync, &format!("pid {child}"));
            std::process::exit(0);
        }
        Ok(ForkResult::Child) => {
            let result = match &config.mode {
                Mode::Init { spec } => init_container(&config, spec, &mut sync),
                // An exec is in the container's mount namespace already (prepare_before_fork):
                // its terminal is one of the container's too.
                Mode::Exec { process, .. } => terminal(&config, process)
                    .and_then(|pty| process::run(&config, process, pty, &mut sync)),
            };
            let e = match result {
                Ok(never) => match never {},
                Err(e) => e,
            };
            report_and_exit(&mut sync, &e)
        }
        Err(e) => report_and_exit(&mut sync, &sys("fork")(e)),
    }
}

fn read_config(path: &str) -> Result<InitConfig, InitError> {
    let err = |reason: String| InitError::Config {
        path: path.to_string(),
        reason,
    };
    let bytes = fs::read(path).map_err(|e| err(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))
}

/// Before the fork: join the cgroup (the child inherits it) and, for an exec or a namespace
/// given by path, the pid namespace (setns on a pid namespace only applies to children).
fn prepare_before_fork(config: &InitConfig) -> Result<(), InitError> {
    if let Some(dir) = &config.cgroup_dir {
        // "0" moves the writer itself.
        fs::write(dir.join("cgroup.procs"), "0")
            .map_err(io(format!("joining cgroup {}", dir.display())))?;
    }
    match &config.mode {
        Mode::Exec { init_pid, .. } => {
            let kinds = ["ipc", "uts", "cgroup", "pid", "mnt"];
            let ns = |kind: &str| PathBuf::from(format!("/proc/{init_pid}/ns/{kind}"));
            // Open all first: once in the container's mount namespace, /proc is its own.
            let files = kinds
                .iter()
                .map(|kind| {
                    File::open(ns(kind)).map_err(io(format!("opening {}", ns(kind).display())))
                })
                .collect::<Result<Vec<_>, _>>()?;
            for (file, kind) in files.iter().zip(kinds) {
                setns(file, CloneFlags::empty())
                    .map_err(sys(format!("joining the {kind} namespace")))?;
            }
        }
        Mode::Init { spec } => {
            if let Some(path) = namespace_path(spec, LinuxNamespaceType::Pid) {
                let file = File::open(&path).map_err(io(format!("opening {}", path.display())))?;
                setns(&file, CloneFlags::CLONE_NEWPID).map_err(sys("joining the pid namespace"))?;
            }
        }
    }
    Ok(())
}

fn namespace_path(spec: &Spec, kind: LinuxNamespaceType) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == kind)?
        .path()
        .clone()
}

/// A container's init: build the container, then run its process.
fn init_container(
    config: &InitConfig,
    spec: &Spec,
    sync: &mut File,
) -> Result<std::convert::Infallible, InitError> {
    let process = spec.process().as_ref().ok_or(InitError::NoProcess)?;
    rootfs::enter(spec)?;
    // After pivot_root, so /dev/ptmx is the container's; before the root may turn read-only, as
    // /dev/console may have to be made.
    let pty = terminal(config, process)?;
    if let Some((pty, _)) = &pty {
        pty.bind_console()?;
    }
    rootfs::finish(spec)?;
    process::run(config, process, pty, sync)
}

/// The process's terminal, when it has one, sized as its spec says, and the socket its master
/// goes back on.
fn terminal(config: &InitConfig, process: &Process) -> Result<Option<(Pty, OwnedFd)>, InitError> {
    if !config.terminal {
        return Ok(None);
    }
    // SAFETY: with a terminal the agent passes its end of the console socket as fd 5; nothing
    // else in this process owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(CONSOLE_FD) };
    let pty = console::open()?;
    pty.set_size(process.console_size())?;
    Ok(Some((pty, socket)))
}
