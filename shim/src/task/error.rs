//! What a task RPC can fail with, and the ttrpc status containerd gets for each.

use std::path::PathBuf;

use ttrpc::{Code, Error as TtrpcError};

use super::state::StateError;
use super::stdio::StdioError;
use crate::agent_client::AgentError;
use crate::ids::IdError;
use crate::sandbox::spec::SpecError;
use crate::sandbox::SandboxError;

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Id(#[from] IdError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Stdio(#[from] StdioError),
    /// config.json could not be read or parsed.
    #[error("cannot read the OCI spec {path}: {reason}")]
    Bundle { path: PathBuf, reason: String },
    /// A request carried something unusable.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// No such container or process.
    #[error("{0} not found")]
    NotFound(String),
    /// An exec with this id exists.
    #[error("{0} already exists")]
    Exists(String),
    /// The process already exited.
    #[error("process already finished")]
    Finished,
    /// The sandbox's VM exited: nothing in it can be reached any more.
    #[error("the pod's VM has exited; its processes are gone")]
    VmGone,
    /// Not implemented.
    #[error("{0} is not implemented by hako")]
    Unimplemented(&'static str),
}

impl TaskError {
    pub fn code(&self) -> Code {
        match self {
            TaskError::Id(_)
            | TaskError::Spec(_)
            | TaskError::Bundle { .. }
            | TaskError::Invalid(_) => Code::INVALID_ARGUMENT,
            TaskError::NotFound(_) | TaskError::Finished => Code::NOT_FOUND,
            TaskError::Exists(_) => Code::ALREADY_EXISTS,
            TaskError::State(_) | TaskError::VmGone => Code::FAILED_PRECONDITION,
            TaskError::Agent(e) => e.code(),
            TaskError::Unimplemented(_) => Code::UNIMPLEMENTED,
            TaskError::Sandbox(e) => sandbox_code(e),
            TaskError::Stdio(_) => Code::INTERNAL,
        }
    }
}

/// A sandbox error is the request's fault when it names a bad id, configuration or spec.
fn sandbox_code(e: &SandboxError) -> Code {
    match e {
        SandboxError::Id(_)
        | SandboxError::Config(_)
        | SandboxError::Spec(_)
        | SandboxError::Sizing(_)
        | SandboxError::SpecTooLarge(_) => Code::INVALID_ARGUMENT,
        SandboxError::Exists(_) => Code::ALREADY_EXISTS,
        SandboxError::Foreign { .. } => Code::FAILED_PRECONDITION,
        SandboxError::Agent(e) => e.code(),
        _ => Code::INTERNAL,
    }
}

/// The one mapping from our errors to ttrpc statuses at the service boundary.
pub fn to_ttrpc(e: TaskError) -> TtrpcError {
    log::error!("{e}");
    TtrpcError::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::validate;

    #[test]
    fn errors_map_to_the_codes_containerd_expects() {
        assert_eq!(TaskError::Finished.code(), Code::NOT_FOUND);
        assert_eq!(TaskError::Unimplemented("x").code(), Code::UNIMPLEMENTED);
        let id = validate("container id", "a/b").expect_err("bad id");
        assert_eq!(TaskError::Id(id).code(), Code::INVALID_ARGUMENT);
        let exists = TaskError::Sandbox(SandboxError::Exists("c1".into()));
        assert_eq!(exists.code(), Code::ALREADY_EXISTS);
        assert_eq!(exists.to_string(), "container c1 already exists");
        let foreign = SandboxError::Foreign {
            id: "c1".into(),
            sandbox: "other".into(),
        };
        assert_eq!(
            TaskError::Sandbox(foreign).code(),
            Code::FAILED_PRECONDITION
        );
    }
}
