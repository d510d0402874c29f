//! `hako ps`: a container's processes as the guest sees them. containerd's Pids answers the
//! VMM's host pid for every container (a guest pid names some other process on the host, and
//! `docker top` looks pids up there), so the guest's own list is shown here.
//!
//! The CLI asks the agent itself, on a connection of its own through the sandbox's
//! hybrid-vsock socket (`vmm/agent.sock`, `CONNECT 1024`), beside the shim's: the vsock device
//! (hako-vsock, or Cloud Hypervisor's) carries any number of host connections and the agent's
//! ttrpc server serves each. That needs nothing of the shim (no API of its own beside
//! containerd's Task service) and works while the shim is busy. ListProcesses only reads, and
//! its answer is bounded and escaped on this side (`agent_client::ps`): the guest may be
//! hostile.

use std::time::Duration;

use anyhow::Context;
use hako_shim::agent_client::{connect, TtrpcAgent};
use hako_shim::config::Config;
use hako_shim::ids::validate;
use hako_shim::sandbox::paths::SandboxPaths;

use super::find;

/// Under TCG a busy guest answers slowly; this is only a bound on a stuck one.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

pub fn command(namespace: Option<&str>, container: &str) -> anyhow::Result<bool> {
    if let Some(namespace) = namespace {
        validate("namespace", namespace)?;
    }
    validate("container id", container)?;
    let config = Config::load(None)?.config;
    let root = &config.runtime.sandbox_root;
    let found =
        find::or_by_docker_name(namespace, container, |ns, id| find::container(root, ns, id))?;
    let paths = SandboxPaths::new(root, &found.namespace, &found.sandbox)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let list = runtime.block_on(async {
        let stream = connect(&paths.agent_socket, hako_protocol::AGENT_VSOCK_PORT)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "reaching the agent of sandbox {}/{}: {e}",
                    found.namespace,
                    found.sandbox
                )
            })?;
        let agent = TtrpcAgent::new(stream, CALL_TIMEOUT);
        agent
            .list_processes(&found.container)
            .await
            .with_context(|| format!("container {}", found.container))
    })?;
    print!("{}", list.table());
    if list.truncated {
        eprintln!(
            "hako: the container has more processes than the {} listed",
            list.processes.len()
        );
    }
    Ok(true)
}
