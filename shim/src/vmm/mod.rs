//! Hypervisors. `Hypervisor` is the narrow seam the sandbox drives; QEMU is the first backend.
//! Accelerator choice lives here too: KVM where the host has hardware virtualisation, TCG
//! otherwise.

pub mod cloud_hypervisor;
pub mod qemu;
pub mod qmp;
pub mod template;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::config::{Accel, SharedFsKind};
use crate::daemon::DaemonError;
use crate::logs::LogCounts;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A helper process failed to start or get ready.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// KVM was forced by the configuration but cannot be used.
    #[error("the configuration asks for KVM but it is not usable here: {0}; set hypervisor.accel = \"auto\" or \"tcg\"")]
    KvmUnavailable(String),
    /// A guest image file is missing.
    #[error("guest {what} {path} not found; build it with guest-image/build.sh and install it (scripts/install.sh)")]
    MissingImage { what: &'static str, path: PathBuf },
    /// The VMM's control channel failed.
    #[error("{vmm} control channel: {message}")]
    Control { vmm: &'static str, message: String },
    /// Cloud Hypervisor cannot be used or refused the VM.
    #[error("cloud-hypervisor: {0}")]
    CloudHypervisor(#[from] cloud_hypervisor::CloudHypervisorError),
    /// The VM is not running.
    #[error("the VM is not running")]
    NotRunning,
    /// The VMM cannot provide a device the configuration asks for.
    #[error("{vmm} does not support {what}")]
    Unsupported {
        vmm: &'static str,
        what: &'static str,
    },
    /// Every hot-plug slot holds a NIC already.
    #[error("no free slot to hot-plug NIC {nic}: all {slots} are in use (hypervisor.hotplug_slots in the hako configuration)")]
    NoFreeSlot { nic: String, slots: usize },
    /// QEMU refused or failed a control command.
    #[error("qemu: {0}")]
    Qmp(#[from] qmp::QmpError),
    /// The pod's network namespace could not be entered.
    #[error("network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file the VMM needs could not be prepared.
    #[error("{path}: {source}")]
    Files {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Opens the pod's network namespace, for a VMM to enter.
pub fn open_netns(path: &Path) -> Result<std::fs::File, VmmError> {
    std::fs::File::open(path).map_err(|source| VmmError::Netns {
        path: path.to_path_buf(),
        source,
    })
}

/// What a VM is made of.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub sandbox_id: String,
    /// Its sockets, logs and pid files, all in the sandbox dir.
    pub files: VmFiles,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Guest kernel (a bzImage, and the same kernel as an ELF vmlinux) and initramfs:
    /// read-only inputs, outside the sandbox dir.
    pub kernel: PathBuf,
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// The device carrying the sandbox share, and the tag the guest mounts.
    pub share: Share,
    pub fs_tag: String,
    /// NICs: their tap queues (owned by the caller until the VMM has started) and MACs.
    pub net: Vec<NetDevice>,
    /// The pod's network namespace: the VMM process runs in it, so the pid containerd and
    /// Docker see names the pod's namespace, never the host's.
    pub netns: Option<PathBuf>,
    /// The share's mount namespace (an open nsfs descriptor of the shim's), which the VMM
    /// enters when it serves the share itself (virtio-9p).
    pub share_ns: Option<std::os::fd::RawFd>,
    /// NICs that can be hot-plugged while the VM runs, beyond those it boots with.
    pub hotplug_slots: u32,
    /// The unprivileged user the VMM and the vsock backend run as; `None`: root.
    pub user: Option<VmmUser>,
    /// The pod's cgroups (their `cgroup.procs` files): the VMM and its helpers join them.
    pub cgroups: Vec<PathBuf>,
}

impl VmSpec {
    /// What the configuration makes of a VM: its size, kernel and command line, with `files`
    /// and `share` its own; no NIC, namespace, user or cgroup yet.
    pub fn from_config(
        config: &crate::config::Config,
        sandbox_id: &str,
        files: VmFiles,
        share: Share,
    ) -> VmSpec {
        let h = &config.hypervisor;
        VmSpec {
            sandbox_id: sandbox_id.to_string(),
            files,
            vcpus: h.vcpus,
            memory_mib: h.memory_mib,
            kernel: h.kernel.clone(),
            vmlinux: h.vmlinux.clone(),
            initrd: h.initrd.clone(),
            cmdline: kernel_cmdline(&config.agent.log_level, &h.kernel_params, h.shared_fs),
            share,
            fs_tag: hako_protocol::SHARED_FS_TAG.to_string(),
            net: Vec::new(),
            netns: None,
            share_ns: None,
            hotplug_slots: h.hotplug_slots,
            user: None,
            cgroups: Vec::new(),
        }
    }
}

/// The files of one VM, in the sandbox dir (`sandbox::paths` names them).
#[derive(Debug, Clone)]
pub struct VmFiles {
    /// Owned by the VMM's user: where the VMM and the vsock backend make their sockets.
    pub vmm_dir: PathBuf,
    /// QMP, or Cloud Hypervisor's API socket.
    pub control_socket: PathBuf,
    /// QEMU's vhost-user vsock socket, served by hako-vsock.
    pub vsock_socket: PathBuf,
    /// The hybrid-vsock socket the host dials the agent on.
    pub agent_socket: PathBuf,
    /// Where the VMM sends the guest's serial console; the shim copies it into `console_log`.
    pub console_socket: PathBuf,
    pub console_log: PathBuf,
    pub vmm_log: PathBuf,
    pub vmm_pid: PathBuf,
    pub vsock_log: PathBuf,
    pub vsock_pid: PathBuf,
    /// The QEMU that makes a template, when this VM's start makes one.
    pub template_log: PathBuf,
    pub template_pid: PathBuf,
    /// Each log's cap in bytes.
    pub log_max: u64,
    /// What the console log kept and dropped, for the sandbox's metrics.
    pub console_counts: Arc<LogCounts>,
}

impl VmFiles {
    /// The files a sandbox at `dir` has: for forms that must not depend on one sandbox (a
    /// template's inputs), and tests.
    pub fn under(dir: &Path, log_max: u64) -> VmFiles {
        VmFiles {
            vmm_dir: dir.join("vmm"),
            control_socket: dir.join("vmm/control.sock"),
            vsock_socket: dir.join("vmm/vhu.sock"),
            agent_socket: dir.join("vmm/agent.sock"),
            console_socket: dir.join("vmm/console.sock"),
            console_log: dir.join("console.log"),
            vmm_log: dir.join("vmm.log"),
            vmm_pid: dir.join("vmm.pid"),
            vsock_log: dir.join("vsock.log"),
            vsock_pid: dir.join("vsock.pid"),
            template_log: dir.join("template.log"),
            template_pid: dir.join("template.pid"),
            log_max,
            console_counts: Arc::default(),
        }
    }
}

/// An unprivileged user for a VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, such as the one `/dev/kvm` belongs to.
    pub groups: Vec<u32>,
}

/// Gives `path` (a socket the shim made for the VMM, or virtiofsd's) to the VMM's user.
pub fn hand_to(user: Option<&VmmUser>, path: &Path) -> Result<(), VmmError> {
    let Some(user) = user else {
        return Ok(());
    };
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid)).map_err(|source| {
        VmmError::Files {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// How a VMM-side helper is confined: the pod's cgroups, no privileges, the VMM's user; and
/// for the VMM itself the pod's network namespace. The files returned hold the descriptors the
/// confinement uses: keep them until the process is spawned.
pub fn confinement(
    spec: &VmSpec,
    in_netns: bool,
) -> Result<(crate::daemon::Confinement, Vec<std::fs::File>), VmmError> {
    use std::os::fd::AsRawFd;
    let mut files = Vec::new();
    let mut how = crate::daemon::Confinement {
        drop_privileges: true,
        user: spec.user.as_ref().map(|u| (u.uid, u.gid, u.groups.clone())),
        ..Default::default()
    };
    for procs in &spec.cgroups {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(procs)
            .map_err(|source| VmmError::Files {
                path: procs.clone(),
                source,
            })?;
        how.cgroups.push(file.as_raw_fd());
        files.push(file);
    }
    if in_netns {
        how.mountns = spec.share_ns;
    }
    if let (true, Some(path)) = (in_netns, &spec.netns) {
        let file = open_netns(path)?;
        how.netns = Some(file.as_raw_fd());
        files.push(file);
    }
    Ok((how, files))
}

/// Copies the guest's serial console from `stream` into its capped log.
pub fn pump_console(stream: tokio::net::UnixStream, files: &VmFiles) {
    match crate::logs::CappedLog::open(&files.console_log, files.log_max) {
        Ok(log) => {
            let log = log.counted(files.console_counts.clone());
            tokio::spawn(crate::logs::pump(stream, log));
        }
        Err(e) => log::warn!(
            "cannot write the guest console to {}: {e}",
            files.console_log.display()
        ),
    }
}

/// How the sandbox share reaches the guest.
#[derive(Debug, Clone, PartialEq)]
pub enum Share {
    /// virtio-fs: the vhost-user socket of the daemon serving it.
    VirtioFs { socket: PathBuf },
    /// virtio-9p: the VMM serves this host directory itself (QEMU only).
    Virtio9p { dir: PathBuf },
}

#[derive(Debug, Clone)]
pub struct NetDevice {
    /// The VMM's id for the NIC, unique while the VM runs.
    pub id: String,
    /// One fd per queue pair of a multiqueue tap (one when the VM has one vCPU).
    pub tap_fds: Vec<std::os::fd::RawFd>,
    pub mac: String,
}

/// A VMM process running one VM.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Starts what the VMM needs before the shared filesystem is ready (such as a vsock
    /// backend), so it can come up in parallel with it.
    async fn prepare(&mut self, spec: &VmSpec) -> Result<(), VmmError>;
    /// Launches the VM; the guest then boots on its own.
    async fn start(&mut self, spec: &VmSpec) -> Result<(), VmmError>;
    /// Stops the VM (asking the VMM first, killing it after `grace`) and its helpers.
    async fn stop(&mut self, grace: Duration);
    /// Host pid of the VMM process.
    fn pid(&self) -> Option<u32>;
    /// Becomes `Some(exit code)` when the VMM process exits, for whatever reason.
    fn exit_watch(&self) -> Option<watch::Receiver<Option<i32>>>;
    /// The last lines the VMM printed, for error messages.
    fn log_tail(&self) -> String;
    /// Hot-plugs a NIC into the running VM; returns once the VMM has added the device (the
    /// guest finds it on its own).
    async fn add_nic(&mut self, nic: &NetDevice) -> Result<(), VmmError>;
    /// Removes a NIC, once the guest has let go of it or `timeout` passed, and closes its
    /// tap queues.
    async fn remove_nic(&mut self, id: &str, timeout: Duration) -> Result<(), VmmError>;
    /// How the last `start` went: a boot, or a restore from a template.
    fn started(&self) -> StartKind {
        StartKind::Cold
    }
    /// The accelerator the VM runs under: "kvm" or "tcg".
    fn accel(&self) -> &'static str {
        "kvm"
    }
}

/// How a VM came up.
#[derive(Debug, Clone, Default)]
pub enum StartKind {
    /// Booted: firmware, kernel, agent.
    #[default]
    Cold,
    /// Restored from a template of its shape (ADR 14).
    Restored(template::start::Restored),
}

/// The configured hypervisor, checked for what it needs on this host.
pub fn for_config(config: &crate::config::Config) -> Result<Box<dyn Hypervisor>, VmmError> {
    Ok(match config.hypervisor.kind {
        crate::config::HypervisorKind::Qemu => Box::new(qemu::Qemu::new(
            &config.hypervisor,
            &config.vsock,
            &config.runtime.sandbox_root,
        )?),
        crate::config::HypervisorKind::CloudHypervisor => {
            Box::new(cloud_hypervisor::CloudHypervisor::from_config(
                &config.hypervisor,
                &config.runtime.sandbox_root,
            )?)
        }
    })
}

/// Ends the VM of a sandbox that has failed (its agent or its shared filesystem is gone):
/// SIGKILL to the VMM, whose exit watch then publishes every process's exit and lets Delete
/// tear down the rest. The caller makes sure the VMM has not exited yet, so `pid` is still it.
pub fn kill_failed_vm(pid: u32) {
    if pid != 0 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The accelerator a VM will use and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub kvm: bool,
    pub reason: String,
}

/// Whether KVM can run ordinary guests here: the CPU must advertise vmx or svm (a nested,
/// paging-based KVM without them hangs real guests) and /dev/kvm must open read-write.
pub fn kvm_usable() -> Result<(), String> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").map_err(|e| format!("/proc/cpuinfo: {e}"))?;
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hw {
        return Err("the CPU advertises no hardware virtualisation (no vmx/svm flag)".to_string());
    }
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm: {e}"))?;
    Ok(())
}

pub fn choose_accel(wanted: Accel) -> Result<AccelChoice, VmmError> {
    match wanted {
        Accel::Tcg => Ok(AccelChoice {
            kvm: false,
            reason: "TCG forced by the configuration".to_string(),
        }),
        Accel::Kvm => kvm_usable()
            .map(|()| AccelChoice {
                kvm: true,
                reason: "KVM forced by the configuration".to_string(),
            })
            .map_err(VmmError::KvmUnavailable),
        Accel::Auto => Ok(match kvm_usable() {
            Ok(()) => AccelChoice {
                kvm: true,
                reason: "hardware virtualisation and /dev/kvm are usable".to_string(),
            },
            Err(why) => AccelChoice {
                kvm: false,
                reason: format!("falling back to TCG software emulation: {why}"),
            },
        }),
    }
}

/// The guest's clock. Under KVM the TSC is invariant and known (kvm-clock on top): trusting it
/// skips the clocksource watchdog. Under TCG the guest's TSC runs at the host's TSC rate, but
/// the guest measures that rate at boot against emulated timers, and on a loaded host the
/// measurement is far off: guests were seen running their clocks several times too fast
/// (`sleep 600` ending after 100 s, the agent's call deadlines expiring early). So a TCG guest
/// is told the rate the host measured (`tsc_khz`); without one it keeps time with the HPET,
/// which is right but makes a TCG boot about 25% slower.
pub fn clock_params(kvm: bool, tsc_khz: Option<u64>) -> String {
    match (kvm, tsc_khz) {
        (true, _) => "tsc=reliable".to_string(),
        (false, Some(khz)) => format!("tsc=reliable tsc_early_khz={khz}"),
        (false, None) => "tsc=unstable clocksource=hpet".to_string(),
    }
}

/// The guest's vsock CID. Each VM has its own vsock device and backend, so every guest can use
/// the same one.
pub const GUEST_CID: u32 = 3;
/// Where the host's measured TSC rate is kept, under the sandbox root (a tmpfs, so it goes
/// with the boot it was measured in); the leading dot keeps it apart from every namespace dir,
/// since containerd namespaces start with a letter or digit.
pub(crate) const TSC_CACHE: &str = ".tsc_khz";

/// `host_tsc_khz`, measured once per host boot: the first start writes it to `cache`, later
/// starts read it there instead of spending 5 ms measuring it again.
pub fn host_tsc_khz_cached(cache: &Path) -> Option<u64> {
    let plausible = |khz: &u64| (100_000..20_000_000).contains(khz);
    if let Some(khz) = fs::read_to_string(cache)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(plausible)
    {
        return Some(khz);
    }
    let khz = host_tsc_khz().filter(plausible)?;
    // Written whole or not at all: concurrent shims may race to it with the same figure.
    let tmp = cache.with_extension(format!("{}.tmp", std::process::id()));
    if fs::write(&tmp, khz.to_string()).is_ok() && fs::rename(&tmp, cache).is_err() {
        let _ = fs::remove_file(&tmp);
    }
    Some(khz)
}

/// The host's TSC rate in kHz, measured against the monotonic clock over a few milliseconds
/// (an error far below the 1% the guest kernel's own refinement tolerates). `None` unless the
/// host's TSC is invariant (constant_tsc and nonstop_tsc), or on other architectures.
pub fn host_tsc_khz() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").ok()?;
        let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
        let has = |f: &str| flags.split_whitespace().any(|x| x == f);
        if !has("constant_tsc") || !has("nonstop_tsc") {
            return None;
        }
        let started = std::time::Instant::now();
        // SAFETY: rdtsc has no preconditions on x86_64.
        let c0 = unsafe { core::arch::x86_64::_rdtsc() };
        std::thread::sleep(Duration::from_millis(5));
        // SAFETY: as above.
        let c1 = unsafe { core::arch::x86_64::_rdtsc() };
        let micros = started.elapsed().as_micros() as u64;
        (micros > 0 && c1 > c0).then(|| (c1 - c0) * 1000 / micros)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Kernel command line: console on the first serial port, no reboot loops, and the options
/// that measurably shorten boot (docs/performance.md has their effect).
pub fn kernel_cmdline(agent_log_level: &str, extra: &str, share: SharedFsKind) -> String {
    let mut cmdline = [
        "console=ttyS0",
        "quiet",
        "panic=-1",
        "reboot=t",
        "no_timer_check",
        "noreplace-smp",
        "cryptomgr.notests",
        "rcupdate.rcu_expedited=1",
        "pci=lastbus=0",
        "audit=0",
        "random.trust_cpu=on",
        "i8042.noaux",
        "i8042.nomux",
        "i8042.nopnp",
        "i8042.dumbkbd",
    ]
    .join(" ");
    cmdline.push_str(&format!(
        " {}={agent_log_level}",
        hako_protocol::CMDLINE_LOG_LEVEL
    ));
    if share == SharedFsKind::Virtio9p {
        cmdline.push_str(&format!(" {}=9p", hako_protocol::CMDLINE_SHARE));
    }
    if !extra.trim().is_empty() {
        cmdline.push(' ');
        cmdline.push_str(extra.trim());
    }
    cmdline
}

/// A VM spec as a sandbox at `dir` would make it, for the backends' tests.
#[cfg(test)]
pub fn test_spec(dir: &Path) -> VmSpec {
    VmSpec {
        sandbox_id: "sb1".into(),
        files: VmFiles::under(dir, 1 << 20),
        vcpus: 2,
        memory_mib: 256,
        kernel: dir.join("guest/vmlinuz"),
        vmlinux: dir.join("guest/vmlinux"),
        initrd: dir.join("guest/initramfs.cpio"),
        cmdline: "console=ttyS0 quiet".into(),
        share: Share::VirtioFs {
            socket: dir.join("fs.sock"),
        },
        fs_tag: "hakoShared".into(),
        net: vec![NetDevice {
            id: "nic0".into(),
            tap_fds: vec![9],
            mac: "02:42:0a:58:00:02".into(),
        }],
        netns: None,
        share_ns: None,
        hotplug_slots: 2,
        user: None,
        cgroups: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tcg_guests_get_the_host_tsc_rate_or_the_hpet() {
        assert_eq!(super::clock_params(true, Some(1)), "tsc=reliable");
        assert_eq!(
            super::clock_params(false, Some(2_595_962)),
            "tsc=reliable tsc_early_khz=2595962"
        );
        assert_eq!(
            super::clock_params(false, None),
            "tsc=unstable clocksource=hpet"
        );
        // This host's TSC, where it is invariant: a plausible rate (0.5 to 10 GHz).
        if let Some(khz) = super::host_tsc_khz() {
            assert!((500_000..10_000_000).contains(&khz), "{khz}");
        }
    }

    #[test]
    fn the_tsc_rate_is_measured_once_and_then_read_back() {
        let dir = std::env::temp_dir().join(format!("hako-tsc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let cache = dir.join("tsc_khz");
        let measured = super::host_tsc_khz_cached(&cache);
        assert_eq!(
            measured.is_some(),
            cache.exists(),
            "kept only when measured"
        );
        // A kept figure is what later starts use, without measuring.
        std::fs::write(&cache, "2000000").expect("write");
        assert_eq!(super::host_tsc_khz_cached(&cache), Some(2_000_000));
        // A damaged or implausible file is measured over.
        std::fs::write(&cache, "7").expect("write");
        let again = super::host_tsc_khz_cached(&cache);
        assert_eq!(again.is_some(), measured.is_some());
        assert_ne!(again, Some(7));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    use super::*;

    #[test]
    fn forced_tcg_needs_no_probe() {
        let choice = choose_accel(Accel::Tcg).expect("tcg always works");
        assert!(!choice.kvm);
    }

    #[test]
    fn auto_agrees_with_the_probe() {
        let choice = choose_accel(Accel::Auto).expect("auto never fails");
        assert_eq!(choice.kvm, kvm_usable().is_ok(), "{}", choice.reason);
    }

    #[test]
    fn cmdline_carries_the_agent_log_level_and_extras() {
        let c = kernel_cmdline("debug", " loglevel=7 ", SharedFsKind::VirtioFs);
        assert!(c.starts_with("console=ttyS0 "));
        assert!(c.contains(" hako.log=debug"));
        assert!(c.ends_with(" loglevel=7"));
        assert!(!c.contains("hako.share"), "{c}");
        let c = kernel_cmdline("info", "", SharedFsKind::Virtio9p);
        assert!(c.ends_with(" hako.share=9p"), "{c}");
    }
}
