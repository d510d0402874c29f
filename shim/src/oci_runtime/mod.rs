//! `hako-runtime`: hako as an OCI runtime command line, for podman and conmon (and anything
//! else that drives runc). It is a client of the shim's own Task service: `create` starts a
//! per-sandbox server (`server`) that runs exactly the code containerd drives, and a keeper
//! (`keeper`) per container process that conmon waits on. The other commands are one RPC
//! each. See docs/adr/0017-an-oci-runtime-for-podman.md.

pub mod cli;
mod commands;
mod console;
mod create;
mod keeper;
mod launch;
mod server;
pub mod state;
mod watch;

use std::io::Write;
use std::path::{Path, PathBuf};

use cli::{Command, Global};
use state::Root;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Spec { path: PathBuf, reason: String },
    #[error("starting the {what}: {reason}")]
    Spawn { what: &'static str, reason: String },
    #[error("the sandbox's server does not answer: {0}")]
    ServerGone(String),
    #[error("{what}: {message}")]
    Rpc { what: &'static str, message: String },
    #[error("terminal: {0}")]
    Terminal(String),
    #[error("container not running")]
    NotRunning,
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Refused(String),
}

impl RuntimeError {
    pub fn io(path: &Path, source: std::io::Error) -> RuntimeError {
        RuntimeError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// In a child between fork and exec: puts `fds` at descriptors 3, 4, ... for the program to
/// come and closes every other descriptor above 2. The caller's (conmon's sync and start pipes,
/// podman's port reservations) must not live on in a process that outlives the command, nor
/// reach the VM's helpers. Only async-signal-safe calls.
fn only_fds(fds: &[i32]) -> std::io::Result<()> {
    // Out of the way first, so that no source is overwritten by another's target.
    let mut high = [0i32; 4];
    for (slot, fd) in high.iter_mut().zip(fds) {
        // SAFETY: fcntl on a descriptor of this (child) process.
        *slot = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 64) };
        if *slot < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    for (i, fd) in high.iter().take(fds.len()).enumerate() {
        // SAFETY: dup2 onto a fixed descriptor; the result is inherited (no CLOEXEC).
        if unsafe { libc::dup2(*fd, 3 + i as i32) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // SAFETY: closes this process's descriptors above the ones just placed.
    if unsafe { libc::close_range(3 + fds.len() as u32, u32::MAX, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What `--version` prints, in runc's shape.
pub fn version() -> String {
    format!(
        "hako-runtime version {}\nspec: 1.2.1\nruntime: VM per sandbox (hako)",
        env!("CARGO_PKG_VERSION")
    )
}

pub const HELP: &str = "hako-runtime: hako as an OCI runtime, for podman and conmon.

Each container runs in a lightweight VM; containers that share a network namespace (a podman
pod, --network container:X) share one VM.

  podman --runtime /usr/local/bin/hako-runtime run IMAGE COMMAND
  or, in /etc/containers/containers.conf.d/hako.conf:
    [engine.runtimes]
    hako = [\"/usr/local/bin/hako-runtime\"]
  then: podman --runtime hako run ...

USAGE: hako-runtime [--root DIR] [--log FILE] [--log-format text|json] COMMAND [FLAGS] ID
COMMANDS: create, start, state, kill, delete, exec, pause, resume, update, ps, features
Refused: rootless use, checkpoint/restore, --preserve-fds, the host's network namespace.";

/// What must happen before any thread starts: a keeper's fork into its own PID namespace.
pub fn before_threads(args: &[String]) {
    if args.first().is_some_and(|a| a == "__keep") {
        keeper::prepare();
    }
}

/// Runs one command line; returns the exit status.
pub async fn main(args: &[String]) -> i32 {
    let (global, command) = match cli::parse(args) {
        Ok(parsed) => parsed,
        Err(e) => {
            report(&Global::default(), &e.to_string());
            return e.exit_code();
        }
    };
    match run(&global, command).await {
        Ok(code) => code,
        Err(e) => {
            report(&global, &e.to_string());
            1
        }
    }
}

async fn run(global: &Global, command: Command) -> Result<i32, RuntimeError> {
    let root = Root::new(&global.root);
    match command {
        Command::Create {
            id,
            bundle,
            pid_file,
            console_socket,
        } => {
            create::create(
                &root,
                create::Create {
                    id: &id,
                    bundle: &bundle,
                    pid_file: pid_file.as_deref(),
                    console_socket: console_socket.as_deref(),
                },
            )
            .await?
        }
        Command::Start { id } => commands::start(&root, &id).await?,
        Command::State { id } => commands::state(&root, &id).await?,
        Command::Kill { id, signal, all } => commands::kill(&root, &id, signal, all).await?,
        Command::Delete { id, force } => commands::delete(&root, &id, force).await?,
        Command::Exec {
            id,
            process,
            pid_file,
            console_socket,
            tty,
        } => {
            create::exec(
                &root,
                create::Exec {
                    id: &id,
                    process: &process,
                    pid_file: pid_file.as_deref(),
                    console_socket: console_socket.as_deref(),
                    tty,
                },
            )
            .await?
        }
        Command::Pause { id } => commands::pause(&root, &id, true).await?,
        Command::Resume { id } => commands::pause(&root, &id, false).await?,
        Command::Update { id, resources } => commands::update(&root, &id, &resources).await?,
        Command::Ps { id, json } => commands::ps(&root, &id, json)?,
        Command::Features => commands::features(),
        Command::Version => println!("{}", version()),
        Command::Help => println!("{HELP}"),
        Command::Server { socket, log } => server::serve(&socket, &log).await?,
        Command::Keep {
            socket,
            id,
            exec_id,
            dir,
        } => return Ok(keeper::run(&socket, &id, &exec_id, &dir).await),
    }
    Ok(0)
}

/// An error as runc reports it: a logrus line on stderr and, with `--log`, in that file too
/// (one JSON object with `--log-format json`, which podman reads back as the error).
fn report(global: &Global, message: &str) {
    let time = state::rfc3339_now();
    let _ = writeln!(
        std::io::stderr(),
        "time=\"{time}\" level=error msg={message:?}"
    );
    let Some(path) = &global.log else {
        return;
    };
    let line = if global.log_json {
        serde_json::json!({"level": "error", "msg": message, "time": time}).to_string()
    } else {
        format!("time=\"{time}\" level=error msg={message:?}")
    };
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(file, "{line}");
    }
}
