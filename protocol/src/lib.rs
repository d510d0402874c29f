//! The agent API: messages and ttrpc service generated at build time from `proto/agent.proto`.
//!
//! The same crate is used by the shim (client) and the agent (server), so both sides always agree
//! on the wire format. Constants that both sides must agree on live here too.

#[allow(warnings, clippy::all, clippy::unwrap_used)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}
#[allow(warnings, clippy::all, clippy::unwrap_used)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

pub use agent::*;
pub use agent_ttrpc::{create_agent_service, AgentService, AgentServiceClient};
pub use ttrpc;

/// vsock port the agent's ttrpc server listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Host-side vsock port the agent connects to, once, when it serves: the host dials the agent
/// only after this, so no connection reaches the guest before its vsock driver is up.
pub const READY_VSOCK_PORT: u32 = 1025;

/// What the agent writes on the readiness connection.
pub const READY_MESSAGE: &[u8] = b"READY\n";

/// virtio-fs tag of the sandbox share.
pub const SHARED_FS_TAG: &str = "hakoShared";

/// Where the agent mounts the sandbox share inside the guest.
pub const GUEST_SHARED_DIR: &str = "/run/hako/shared";

/// Kernel command line key that says which device carries the sandbox share: absent or
/// `virtiofs` for virtio-fs, `9p` for virtio-9p (QEMU only, for comparison).
pub const CMDLINE_SHARE: &str = "hako.share";

/// The 9p message size the guest asks for: large, so that big reads and writes take few
/// round trips (the kernel caps it to what its virtio transport can carry).
pub const NINEP_MSIZE: u32 = 512_000;

/// Kernel command line key that carries the agent's log level.
pub const CMDLINE_LOG_LEVEL: &str = "hako.log";
