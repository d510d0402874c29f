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

pub mod dns;
pub mod forward;
pub mod metrics;
pub mod mount_options;
pub mod sysctl;

pub use agent::*;
pub use agent_ttrpc::{create_agent_service, AgentService, AgentServiceClient};
pub use ttrpc;

/// vsock port the agent's ttrpc server listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Host-side vsock port the agent connects to, once, when it serves: the host dials the agent
/// only after this, so no connection reaches the guest before its vsock driver is up.
pub const READY_VSOCK_PORT: u32 = 1025;

/// vsock port of the agent's port forwarder (`forward`): `kubectl port-forward` into the pod.
pub const FORWARD_VSOCK_PORT: u32 = 1026;

/// vsock port of the agent's DNS relay (`dns`): Docker's embedded DNS server for the pod.
pub const DNS_VSOCK_PORT: u32 = 1027;

/// vsock port of the agent's metrics (`metrics`): one request and one answer per connection.
pub const METRICS_VSOCK_PORT: u32 = 1028;

/// What the agent writes first on the readiness connection; its `HealthResponse` follows,
/// protobuf-encoded, so the host needs no Health call before its first real one.
pub const READY_MESSAGE: &[u8] = b"READY\n";

/// The most the host reads of a readiness message.
pub const MAX_READY_MESSAGE: usize = 4096;

/// The line the agent writes on the console when it waits for the host's devices: the moment a
/// template is taken (a VM booted without its share and vsock device), from which every VM
/// restored from it resumes and gets them hot-plugged.
pub const TEMPLATE_POINT: &str = "hako-agent: waiting for the host's devices";

/// The most entropy the host sends in CreateSandbox, in bytes.
pub const MAX_ENTROPY: usize = 512;

/// The largest pod file (`PodInit.hosts`, `PodInit.resolv_conf`) the agent accepts, in bytes.
pub const MAX_POD_FILE: usize = 64 * 1024;
/// The most processes one ListProcesses answer lists; the host cuts a longer list as well.
pub const MAX_LISTED_PROCESSES: usize = 4096;
/// The most bytes of one process's command line a ListProcesses answer carries.
pub const MAX_CMDLINE: usize = 4096;
/// The most command-line bytes one ListProcesses answer carries in all: with every process's
/// other fields it stays well inside ttrpc's 4 MiB message, which 4096 full command lines
/// would not.
pub const MAX_CMDLINES_TOTAL: usize = 1 << 20;
/// The longest process name (/proc/PID/comm) the host takes; the kernel's are 15 bytes.
pub const MAX_COMM: usize = 64;

/// Where the agent keeps a pod init's files in the guest: `hostname`, `hosts`, `resolv.conf`
/// and the pod's `shm` mount. Containers bind them from here.
pub const GUEST_POD_DIR: &str = "/run/hako/pod";
/// The pod init's name as the pod's processes see it (`/proc/1/cmdline`): runc's pause.
pub const POD_INIT_NAME: &str = "/pause";

/// The readiness message for `health`.
pub fn ready_message(health: &HealthResponse) -> Result<Vec<u8>, protobuf::Error> {
    use protobuf::Message;
    let mut message = READY_MESSAGE.to_vec();
    message.extend(health.write_to_bytes()?);
    Ok(message)
}

/// The agent's `HealthResponse` from a whole readiness message; `None` if it is not one.
pub fn parse_ready_message(message: &[u8]) -> Option<HealthResponse> {
    use protobuf::Message;
    let body = message.strip_prefix(READY_MESSAGE)?;
    if message.len() > MAX_READY_MESSAGE {
        return None;
    }
    HealthResponse::parse_from_bytes(body).ok()
}

/// The one id rule both sides apply to container, exec, sandbox and namespace ids before they
/// reach a path: `^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`, which refuses `/`, `..`, `.`, NUL, empty
/// and over-long ids.
pub fn valid_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

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

/// The value of `key=value` on a kernel command line, the first one wins.
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_message_carries_the_agents_health() {
        let health = HealthResponse {
            agent_version: "0.1.0".into(),
            kernel_release: "6.1.0".into(),
            ready_since_boot_ms: 1500,
            init_since_boot_ms: 1200,
            ..Default::default()
        };
        let message = ready_message(&health).expect("encodes");
        assert!(message.starts_with(READY_MESSAGE));
        assert_eq!(parse_ready_message(&message), Some(health));
        assert_eq!(parse_ready_message(b"HELLO\n"), None);
        assert_eq!(parse_ready_message(b"READY\n\xff\xff\xff"), None);
        let mut huge = READY_MESSAGE.to_vec();
        huge.resize(MAX_READY_MESSAGE + 1, 0);
        assert_eq!(parse_ready_message(&huge), None);
    }

    #[test]
    fn ids_follow_one_rule() {
        for ok in ["a", "t1", "k8s.io", "abc_DEF-012.x", &"f".repeat(128)] {
            assert!(valid_id(ok), "{ok:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a\0b",
            "-a",
            "_a",
            &"a".repeat(129),
        ] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn cmdline_values_are_whole_keys() {
        let cmdline = "quiet hako.logx=1 hako.log=debug hako.log=info";
        assert_eq!(cmdline_value(cmdline, CMDLINE_LOG_LEVEL), Some("debug"));
        assert_eq!(cmdline_value(cmdline, CMDLINE_SHARE), None);
        assert_eq!(cmdline_value("quiet", "quiet"), None);
    }
}
