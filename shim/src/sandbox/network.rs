//! The pod's network as the VM sees it: which namespace the VMM runs in, and keeping the VM's
//! NICs in step with that namespace while the pod runs.

use std::fs;
use std::path::Path;
use std::time::Duration;

use super::{io_err, Sandbox, SandboxError};
use crate::net::watch::Watch;
use crate::net::{NetError, NetnsHolder, NetworkMode};

/// How long a guest may take to let go of a NIC the pod lost.
const NIC_UNPLUG_TIMEOUT: Duration = Duration::from_secs(10);

impl Sandbox {
    /// Decides where the pod's network lives, before `boot`: the namespace the spec names
    /// (never the host's own), or, when the spec asks for a new one, one the shim makes.
    /// Either way the VMM runs in it, and what appears there (from a hook, a plugin, or
    /// Docker after Create) reaches the VM. `forward_ports`: whether the pod's loopback on the
    /// host is carried into the VM (ADR 11), which only Kubernetes asks for.
    pub fn choose_network(
        &mut self,
        mode: &NetworkMode,
        forward_ports: bool,
    ) -> Result<(), SandboxError> {
        self.forward_ports = forward_ports;
        self.netns = match mode {
            NetworkMode::Host => return Err(NetError::HostNetwork.into()),
            NetworkMode::Namespace(path) => {
                crate::net::namespace::refuse_host(path)?;
                Some(path.clone())
            }
            NetworkMode::Isolated => {
                let path = self.paths.netns.clone();
                self.holder = Some(NetnsHolder::create(&path)?);
                Some(path)
            }
        };
        Ok(())
    }

    pub(super) fn write_net_record(&self) -> Result<(), SandboxError> {
        let Some(network) = &self.network else {
            return Ok(());
        };
        let record = serde_json::to_vec(&network.record()).unwrap_or_default();
        let at = &self.paths.net_record;
        fs::write(at, record).map_err(io_err("writing", at))
    }

    /// Starts following the pod's network namespace; `resync` is called after each change
    /// (with the sandbox's lock, by the caller that owns the sandbox).
    pub fn watch_network(&mut self) -> Result<Option<Watch>, SandboxError> {
        let Some(netns) = &self.netns else {
            return Ok(None);
        };
        let watch = Watch::start(netns)?;
        self.network_dirty = Some(watch.dirty.clone());
        Ok(Some(watch))
    }

    /// Keeps the task that follows the namespace, to end it with the sandbox.
    pub fn keep_network_watch(&mut self, task: tokio::task::JoinHandle<()>) {
        self.network_watch = Some(task);
    }

    /// Starts the relay to Docker's DNS server in the pod's namespace (ADR 12), once, if the
    /// container's `resolv_conf` names that server. Without it the pod runs on, unable to
    /// resolve through that server, and the log says why.
    pub async fn relay_docker_dns(&mut self, resolv_conf: &Path) {
        // Checked before the file is read: later containers of the pod pay nothing.
        let (Some(netns), None) = (&self.netns, &self.dns_relay) else {
            return;
        };
        let asks = super::resolve::open_source(resolv_conf, &self.guest_writable)
            .is_ok_and(|source| super::dns::names_docker_server(&source));
        if !asks {
            return;
        }
        match super::dns::DnsRelay::start(netns, &self.paths.agent_socket, self.metrics.clone())
            .await
        {
            Ok(relay) => self.dns_relay = Some(relay),
            Err(e) => log::warn!("sandbox {}: no relay to Docker's DNS server: {e}", self.id),
        }
    }

    /// Whether the namespace changed since the VM last matched it.
    pub fn network_changed(&self) -> bool {
        self.network_dirty
            .as_ref()
            .is_some_and(|d| d.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Makes the VM's network match the pod's namespace: NICs for new veths are hot-plugged,
    /// the guest is told the whole picture (it waits for the new NICs, configures them and
    /// releases those the pod lost), and then the lost NICs are unplugged and their taps go.
    pub async fn sync_network(&mut self) -> Result<(), SandboxError> {
        if let Some(dirty) = &self.network_dirty {
            dirty.store(false, std::sync::atomic::Ordering::SeqCst);
        }
        let (Some(network), Some(vmm), Some(agent)) = (
            self.network.as_mut(),
            self.vmm.as_mut(),
            self.agent.as_ref(),
        ) else {
            return Ok(());
        };
        let scan = crate::net::ip::scan(&network.netns)?;
        let plan = network.plan(&scan);
        if plan.is_empty() {
            return Ok(());
        }
        let mut gone = Vec::new();
        for nic in &plan.removed {
            gone.extend(network.take(nic));
        }
        let mut plugged = Vec::new();
        let mut failed = None;
        for link in plan.added {
            let name = link.name.clone();
            let nic = match network.attach(link) {
                Ok(attached) => nic_of(attached),
                Err(e) => {
                    failed = Some(SandboxError::from(e));
                    break;
                }
            };
            let plugging = std::time::Instant::now();
            let added = vmm.add_nic(&nic).await;
            self.metrics
                .observe_hotplug("nic", "add", plugging.elapsed(), added.is_ok());
            if let Err(e) = added {
                if let Some(link) = network.take(&nic.id) {
                    network.release(link);
                }
                failed = Some(e.into());
                break;
            }
            plugged.push(format!("{name} as {}", nic.id));
        }
        network.refresh(&scan);
        let updated = agent
            .update_interfaces(network.interfaces(), network.routes.clone())
            .await;
        for link in gone {
            let unplugging = std::time::Instant::now();
            let removed = vmm.remove_nic(&link.nic, NIC_UNPLUG_TIMEOUT).await;
            self.metrics
                .observe_hotplug("nic", "remove", unplugging.elapsed(), removed.is_ok());
            if let Err(e) = removed {
                log::warn!("sandbox {}: unplugging {}: {e}", self.id, link.nic);
            }
            log::info!(
                "sandbox {}: {} left the pod; NIC {} unplugged",
                self.id,
                link.veth.name,
                link.nic
            );
            network.release(link);
        }
        if !plugged.is_empty() {
            log::info!("sandbox {}: hot-plugged {}", self.id, plugged.join(", "));
        }
        self.write_net_record()?;
        // A NIC that could not be plugged is the cause; the guest then also fails the routes
        // through it, which is only the consequence.
        match (failed, updated) {
            (Some(e), Err(guest)) => {
                log::warn!(
                    "sandbox {}: the guest's network, after: {e}: {guest}",
                    self.id
                );
                Err(e)
            }
            (Some(e), Ok(())) => Err(e),
            (None, updated) => Ok(updated?),
        }
    }
}

/// The VMM's view of a NIC: its id, tap queues and MAC.
pub(super) fn nic_of(link: &crate::net::TapLink) -> crate::vmm::NetDevice {
    crate::vmm::NetDevice {
        id: link.nic.clone(),
        tap_fds: link
            .fds
            .iter()
            .map(std::os::fd::AsRawFd::as_raw_fd)
            .collect(),
        mac: link.veth.mac.clone(),
    }
}
