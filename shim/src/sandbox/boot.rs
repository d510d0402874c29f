//! Bringing the VM up: virtiofsd, the VMM and its vsock backend, the agent's readiness and
//! the first call into the guest; and the watch that stops the VM if its share goes away.

use std::sync::Arc;
use std::time::Duration;

use super::forward::Preparing;
use super::network::nic_of;
use super::share::virtiofsd::{FsPaths, Virtiofsd};
use super::{io_err, Sandbox, SandboxError};
use crate::agent_client::{dial, AgentClient, ReadyListener, TtrpcAgent};
use crate::cgroup::PodCgroup;
use crate::config::SharedFsKind;
use crate::daemon::tail;
use crate::hooks;
use crate::net::{NetnsHolder, PodNetwork};
use crate::vmm::{Share, VmSpec, VmmError};

const FS_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Once the agent announced itself, its port answers at once; this only covers slow hosts.
const DIAL_AFTER_READY: Duration = Duration::from_secs(10);

impl Sandbox {
    fn vm_spec(&self) -> VmSpec {
        let share = match self.config.hypervisor.shared_fs {
            SharedFsKind::VirtioFs => Share::VirtioFs {
                socket: self.paths.fs_socket.clone(),
            },
            SharedFsKind::Virtio9p => Share::Virtio9p {
                dir: self.paths.ro.clone(),
            },
        };
        let mut files = self.paths.vm_files(self.config.runtime.log_max_bytes);
        files.console_counts = self.metrics.console_counts();
        VmSpec {
            net: self
                .network
                .iter()
                .flat_map(|n| n.links.iter())
                .map(nic_of)
                .collect(),
            netns: self.netns.clone(),
            share_ns: matches!(share, Share::Virtio9p { .. })
                .then(|| self.share_ns_fd())
                .flatten(),
            user: self.vmm_user().cloned(),
            cgroups: self.cgroup.iter().flat_map(PodCgroup::procs).collect(),
            ..VmSpec::from_config(&self.config, &self.id, files, share)
        }
    }

    /// Runs a container's `prestart` and `createRuntime` hooks on the host, with a thread in
    /// the pod's network namespace standing in for the container's process.
    pub async fn run_create_hooks(
        &mut self,
        hook_list: &[oci_spec::runtime::Hook],
        mut state: hooks::State,
    ) -> Result<(), SandboxError> {
        if hook_list.is_empty() {
            return Ok(());
        }
        if self.holder.is_none() {
            if let Some(netns) = &self.netns {
                self.holder = Some(NetnsHolder::enter(netns)?);
            }
        }
        state.pid = self.holder.as_ref().map(NetnsHolder::pid).unwrap_or(0);
        hooks::run("prestart/createRuntime", hook_list, &state).await?;
        Ok(())
    }

    /// Starts virtiofsd and the VM and waits for the agent. The VM takes over the interfaces of
    /// the namespace `choose_network` picked. On error the caller runs `shutdown`, which stops
    /// whatever did start.
    pub async fn boot(&mut self, hostname: &str) -> Result<(), SandboxError> {
        // The port forwarder's listener and redirect are made while the VM boots.
        let forward = (self.netns.as_deref())
            .filter(|_| self.forward_ports)
            .map(Preparing::start);
        if let Some(netns) = self.netns.clone() {
            let mut network = PodNetwork::new(&netns, self.config.hypervisor.vcpus);
            // What the namespace holds now is plugged in at boot; what comes later, hot.
            let scan = crate::net::ip::scan(&netns)?;
            for link in scan.links.clone() {
                if let Err(e) = network.attach(link) {
                    network.teardown();
                    return Err(e.into());
                }
            }
            network.refresh(&scan);
            log::info!(
                "sandbox {}: {} interface(s) from {}",
                self.id,
                network.links.len(),
                netns.display()
            );
            self.network = Some(network);
            self.write_net_record()?;
        }
        self.timings.mark("sandbox_prepare");
        if let Some(cgroup) = &self.cgroup {
            cgroup.check_joinable()?;
        }
        let spec = self.vm_spec();
        // With virtio-9p the VMM serves the share itself: no daemon.
        if let Share::VirtioFs { socket } = &spec.share {
            let fs = Virtiofsd::spawn(
                &self.config.virtiofs,
                &self.paths.ro,
                FsPaths {
                    socket,
                    log: &self.paths.virtiofsd_log,
                    log_max: self.config.runtime.log_max_bytes,
                    pid_file: &self.paths.virtiofsd_pid,
                    cgroups: &spec.cgroups,
                    mountns: self.share_ns_fd(),
                },
            )?;
            self.fs = Some(Box::new(fs));
        }
        let mut vmm = crate::vmm::for_config(&self.config)?;
        // The vsock backend comes up while virtiofsd does.
        vmm.prepare(&spec).await?;
        let vmm = self.vmm.insert(vmm);
        let ready = ReadyListener::bind(&spec.files.agent_socket, hako_protocol::READY_VSOCK_PORT)
            .map_err(io_err("listening on", &self.paths.ready_socket()))?;
        crate::vmm::hand_to(spec.user.as_ref(), &self.paths.ready_socket())?;
        if let Some(fs) = &self.fs {
            fs.wait_ready(FS_READY_TIMEOUT).await?;
            crate::vmm::hand_to(spec.user.as_ref(), fs.socket())?;
        }
        self.timings.mark("virtiofsd_ready");
        vmm.start(&spec).await?;
        self.timings.mark("vmm_started");
        let restored = match vmm.started() {
            crate::vmm::StartKind::Restored(r) => Some(r),
            crate::vmm::StartKind::Cold => None,
        };
        if let Some(r) = &restored {
            if let Some(built) = r.built {
                self.timings.detail("vmm_started.template_build", built);
            }
            self.timings.detail("vmm_started.restore", r.restore);
            self.timings.detail("vmm_started.hotplug", r.hotplug);
        }
        self.metrics.note_vm(crate::metrics::VmInfo {
            hypervisor: self.config.hypervisor.kind.as_str(),
            accel: vmm.accel(),
            from_template: restored.is_some(),
            vcpus: spec.vcpus,
            memory_bytes: u64::from(spec.memory_mib) * 1024 * 1024,
        });
        self.fs_watch = self.watch_shared_fs();
        let Some(vmm) = self.vmm.as_ref() else {
            return Err(VmmError::NotRunning.into());
        };

        // Dial only once the agent says it serves: a connection that reaches the guest before
        // its vsock driver is up can stall in the vsock backend. The readiness message carries
        // the agent's Health answer (guest input, quoted when logged), so no call is made for it.
        let connected = match ready
            .wait(self.config.agent.dial_timeout(), vmm.exit_watch())
            .await
        {
            Ok(health) => {
                self.timings.mark("agent_ready");
                dial(
                    &spec.files.agent_socket,
                    hako_protocol::AGENT_VSOCK_PORT,
                    DIAL_AFTER_READY,
                    vmm.exit_watch(),
                )
                .await
                .map(|stream| (stream, health))
            }
            Err(e) => Err(e),
        };
        drop(ready);
        let (stream, health) = match connected {
            Ok(connected) => connected,
            Err(e) => {
                return Err(SandboxError::Boot {
                    reason: format!(
                        "{e}; {} log: {}",
                        self.config.hypervisor.kind.as_str(),
                        vmm.log_tail()
                    ),
                    console: tail(&self.paths.console_log, 3000),
                })
            }
        };
        let agent: Arc<dyn AgentClient> = Arc::new(
            TtrpcAgent::new(stream, self.config.agent.call_timeout())
                .with_metrics(self.metrics.clone()),
        );
        self.timings.mark("agent_connected");
        // A restored VM's clock says nothing of this start: it booted when its template did.
        if restored.is_none() {
            self.record_boot_details(&health);
        }
        log::info!(
            "sandbox {}: agent {:?} on guest kernel {:?} ready {} ms after guest boot",
            self.id,
            health.agent_version,
            health.kernel_release,
            health.ready_since_boot_ms
        );
        let (interfaces, routes) = match &self.network {
            Some(n) => (n.interfaces(), n.routes.clone()),
            None => (Vec::new(), Vec::new()),
        };
        let called = std::time::Instant::now();
        self.pod_init_pid = agent
            .create_sandbox(
                &self.id,
                hostname,
                interfaces,
                routes,
                self.pod_init.clone(),
            )
            .await?;
        self.timings
            .detail("guest.create_sandbox", called.elapsed());
        self.agent = Some(agent);
        if let Some(forward) = forward {
            match forward
                .serve(&spec.files.agent_socket, self.metrics.clone())
                .await
            {
                Ok(port_forward) => self.port_forward = Some(port_forward),
                // The pod runs without it; `hako check` says what the host lacks.
                Err(e) => log::warn!("sandbox {}: no port forwarding: {e}", self.id),
            }
        }
        Ok(())
    }

    /// Without virtiofsd the guest has lost every container's root filesystem and its requests
    /// hang or fail: the sandbox has failed. The VM is stopped, so every process's exit is
    /// published (as for a VM that died) and Delete tears down the rest.
    fn watch_shared_fs(&self) -> Option<tokio::task::JoinHandle<()>> {
        let mut fs_exit = self.fs.as_ref()?.process().exit_watch();
        let mut vm_exit = self.vm_exit()?;
        let vmm_pid = self.vmm_pid();
        let id = self.id.clone();
        Some(tokio::spawn(async move {
            let code = tokio::select! {
                code = fs_exit.wait_for(Option::is_some) => match code {
                    Ok(code) => *code,
                    Err(_) => return,
                },
                // The VM went first: nothing to stop, and its pid may be reused.
                _ = vm_exit.wait_for(Option::is_some) => return,
            };
            log::error!(
                "sandbox {id}: virtiofsd exited ({code:?}) under the running VM; the guest lost its root filesystems, stopping the VM"
            );
            crate::vmm::kill_failed_vm(vmm_pid);
        }))
    }

    /// Splits `agent_ready` by the guest's clock: the VMM and firmware up to the kernel's first
    /// tick (with the kernel's decompression), the kernel until it ran /init, and the agent's
    /// own start. The guest clock keeps the host's rate (see `vmm::clock_params`).
    fn record_boot_details(&mut self, health: &hako_protocol::agent::HealthResponse) {
        let Some(ready) = self.timings.phase("agent_ready") else {
            return;
        };
        let ms = Duration::from_millis;
        let guest_ready = ms(health.ready_since_boot_ms);
        let kernel = ms(health.init_since_boot_ms.min(health.ready_since_boot_ms));
        self.timings
            .detail("agent_ready.firmware", ready.saturating_sub(guest_ready));
        self.timings.detail("agent_ready.kernel", kernel);
        self.timings
            .detail("agent_ready.agent", guest_ready.saturating_sub(kernel));
    }
}
