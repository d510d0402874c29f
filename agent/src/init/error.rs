//! What can go wrong while a container's init builds it and runs its process.

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The config file could not be read.
    #[error("reading the init config {path}: {reason}")]
    Config { path: String, reason: String },
    /// The spec has no process.
    #[error("the OCI spec has no process")]
    NoProcess,
    /// The spec's process has no arguments.
    #[error("the OCI spec's process has no args")]
    NoArgs,
    /// The spec has no root.
    #[error("the OCI spec has no root")]
    NoRoot,
    /// A mount destination was refused.
    #[error(transparent)]
    Mount(#[from] crate::mounts::MountError),
    /// An env entry is not KEY=VALUE with a valid key.
    #[error(
        "invalid environment entry {0:?}: it must be KEY=VALUE with a non-empty key and no NUL"
    )]
    Env(String),
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        what: String,
        source: nix::errno::Errno,
    },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// The seccomp profile could not be compiled or installed.
    #[error("seccomp: {0}")]
    Seccomp(String),
    /// Capabilities could not be set.
    #[error("capabilities: {0}")]
    Caps(String),
    // The three below are worded as runc words them: Docker reads the wording to choose the
    // exit code it reports (127 for a missing command, 126 for one it cannot run).
    /// The command's path names nothing.
    #[error("exec: {0:?}: stat {0}: no such file or directory")]
    Missing(String),
    /// The command's path is not an executable file.
    #[error("exec: {0:?}: permission denied")]
    NotExecutable(String),
    /// The command was not found in the container.
    #[error("exec: {0:?}: executable file not found in $PATH")]
    NotFound(String),
    /// A sysctl could not be set, or may not be.
    #[error("sysctl: {0}")]
    Sysctl(String),
    /// A device node could not be made as the spec asks.
    #[error("device: {0}")]
    Device(String),
    /// A terminal was asked for and the container's ptmx cannot give one.
    #[error("the container has no usable {ptmx} for its terminal: {source}")]
    Terminal {
        ptmx: String,
        source: nix::errno::Errno,
    },
    /// The terminal could not be made the container's console.
    #[error("the container's console: {0}")]
    Console(String),
    /// A bind mount carries options hako does not know.
    #[error("bind mount {destination}: unknown mount options {option:?}")]
    MountOption { destination: String, option: String },
}

pub fn sys(what: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> InitError {
    let what = what.into();
    move |source| InitError::Sys { what, source }
}

pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> InitError {
    let what = what.into();
    move |source| InitError::Io { what, source }
}
