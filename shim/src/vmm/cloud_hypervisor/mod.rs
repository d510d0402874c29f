//! Cloud Hypervisor backend: one `cloud-hypervisor` process per VM, driven over its HTTP API
//! (`api/`) on `<sandbox dir>/vmm/control.sock`.
//!
//! Compared with QEMU: no TCG (hardware KVM or nothing), the guest kernel must be an ELF
//! vmlinux, and the agent channel needs no helper process, because Cloud Hypervisor's own
//! virtio-vsock device is a hybrid vsock on a unix socket (the host dials the socket and
//! writes `CONNECT <port>\n`; guest connections to host port P arrive on `<socket>_P`), the
//! protocol `agent_client` already speaks to hako-vsock.
//!
//! Start: spawn `cloud-hypervisor --api-socket ...`, wait for the socket, `vm.create` (memory
//! shared, for virtiofsd), one `vm.add-net` per NIC with its tap fd, `vm.boot`; or, with
//! templates (`snapshot.rs`, ADR 14), `vm.restore` of the shape's saved VM and hot-plugs.

pub mod api;
mod config;
pub mod snapshot;
pub mod types;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Command;
use tokio::sync::watch;

use self::api::{ApiClient, ApiError};
use super::{kvm_usable, Hypervisor, NetDevice, Share, StartKind, VmSpec, VmmError};
use crate::daemon::{resolve_binary, Daemon};
use crate::vmm::template::start;
pub use config::{fs_config, net_config, template_config, vm_config, vsock_config};

/// Overrides `hypervisor.cloud_hypervisor_path` (for tests and by-hand checks).
pub const ENV_BINARY: &str = "HAKO_CLOUD_HYPERVISOR";
/// v28 dropped the top-level `kernel`/`cmdline` members of `vm.create` for `payload`, which is
/// all this backend sends.
pub const MIN_MAJOR_VERSION: u32 = 28;
const READY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CloudHypervisorError {
    #[error(transparent)]
    Api(#[from] ApiError),
    /// `--version` could not be run.
    #[error("cannot run {} --version: {source}", binary.display())]
    VersionRun {
        binary: PathBuf,
        source: std::io::Error,
    },
    /// `--version` printed something else than "cloud-hypervisor v<major>...".
    #[error("{} --version printed {output:?}, not a Cloud Hypervisor version", binary.display())]
    VersionUnknown { binary: PathBuf, output: String },
    #[error("{} is Cloud Hypervisor {version}; hako needs v{MIN_MAJOR_VERSION} or later", binary.display())]
    TooOld { binary: PathBuf, version: String },
    /// Cloud Hypervisor has no software emulation to fall back on.
    #[error("Cloud Hypervisor needs hardware virtualisation through KVM, which is not usable here: {0}; Cloud Hypervisor has no software emulation, use QEMU on this host")]
    NoKvm(String),
    #[error("cannot remove the stale API socket {}: {source}", path.display())]
    StaleSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The VM could not be set up or booted once the VMM ran.
    #[error("{source}; cloud-hypervisor's log says: {log}")]
    Boot { source: ApiError, log: String },
}

pub struct CloudHypervisor {
    binary: PathBuf,
    version: String,
    vmm: Option<Daemon>,
    api: Option<ApiClient>,
    /// Where VMs start from templates, when they do.
    templates: Option<TemplateStore>,
    started: StartKind,
}

/// `hypervisor.template_dir`, and the sandbox root (where checked templates are marked).
#[derive(Debug, Clone)]
struct TemplateStore {
    dir: PathBuf,
    sandbox_root: PathBuf,
}

impl CloudHypervisor {
    /// Checks up front that `binary` (a path, or a name looked up like the other helpers) is a
    /// recent enough Cloud Hypervisor and that KVM is usable.
    pub fn new(binary: &str) -> Result<Self, VmmError> {
        let binary = resolve_binary("cloud-hypervisor", binary)?;
        let version = probe_version(&binary)?;
        kvm_usable().map_err(CloudHypervisorError::NoKvm)?;
        Ok(Self {
            binary,
            version,
            vmm: None,
            api: None,
            templates: None,
            started: StartKind::Cold,
        })
    }

    /// `new` with `$HAKO_CLOUD_HYPERVISOR`, else the configured binary, and the configured
    /// templates.
    pub fn from_config(
        config: &crate::config::HypervisorConfig,
        sandbox_root: &Path,
    ) -> Result<Self, VmmError> {
        let mut ch = Self::new(&binary_from_env(&config.cloud_hypervisor_path))?;
        if config.templates_on() {
            ch.templates = Some(TemplateStore {
                dir: config.template_dir.clone(),
                sandbox_root: sandbox_root.to_path_buf(),
            });
        }
        Ok(ch)
    }

    /// The version `--version` printed, such as "v48.0.0".
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn api_socket(spec: &VmSpec) -> PathBuf {
        spec.files.control_socket.clone()
    }

    /// The ELF kernel: Cloud Hypervisor loads a vmlinux through its PVH entry point, not a
    /// bzImage.
    pub fn vmlinux(spec: &VmSpec) -> PathBuf {
        spec.vmlinux.clone()
    }

    /// Everything `start` checks before it spawns anything.
    fn check(spec: &VmSpec) -> Result<(), VmmError> {
        if let Share::Virtio9p { .. } = spec.share {
            return Err(VmmError::Unsupported {
                vmm: "cloud-hypervisor",
                what: "virtio-9p",
            });
        }
        for (what, path) in [
            (
                "kernel (an ELF vmlinux for Cloud Hypervisor)",
                Self::vmlinux(spec),
            ),
            ("initramfs", spec.initrd.clone()),
        ] {
            if !path.is_file() {
                return Err(VmmError::MissingImage { what, path });
            }
        }
        // The API socket's length was checked with the sandbox's other sockets (sandbox/paths.rs).
        Ok(())
    }

    /// Spawns a `cloud-hypervisor` serving its API on `socket`, confined as the pod's VMM (in
    /// the pod's network namespace, or with `empty_netns` one of its own, empty).
    async fn spawn_daemon(
        &self,
        spec: &VmSpec,
        socket: &Path,
        name: &'static str,
        (log, pid): (&Path, &Path),
        empty_netns: bool,
    ) -> Result<Daemon, VmmError> {
        // A socket file left by an earlier VMM would make the new one fail to bind.
        match std::fs::remove_file(socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(CloudHypervisorError::StaleSocket {
                    path: socket.to_path_buf(),
                    source,
                }
                .into())
            }
        }
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--api-socket").arg(socket);
        let (mut how, _held) = super::confinement(spec, !empty_netns)?;
        how.empty_netns = empty_netns;
        crate::daemon::confine(&mut cmd, how);
        let daemon = Daemon::spawn(name, cmd, log, spec.files.log_max, pid)?;
        log::info!(
            "sandbox {}: {name} {} pid {} (KVM)",
            spec.sandbox_id,
            self.version,
            daemon.pid()
        );
        Ok(daemon)
    }

    /// Spawns the pod's VMM and keeps it (before anything else can fail, so that `stop` reaps
    /// it whatever happens) and its API client.
    async fn spawn_vmm(&mut self, spec: &VmSpec) -> Result<(), VmmError> {
        let socket = Self::api_socket(spec);
        let files = (spec.files.vmm_log.as_path(), spec.files.vmm_pid.as_path());
        let daemon = self
            .spawn_daemon(spec, &socket, "cloud-hypervisor", files, false)
            .await?;
        let vmm = &*self.vmm.insert(daemon);
        vmm.wait_for_socket(&socket, READY_TIMEOUT).await?;
        self.api = Some(ApiClient::new(&socket).map_err(CloudHypervisorError::from)?);
        Ok(())
    }

    /// Ends the pod's VMM at once (a restore that went wrong) and forgets it.
    async fn kill_vmm(&mut self) {
        if let Some(vmm) = self.vmm.take() {
            vmm.kill().await;
        }
        self.api = None;
    }

    /// Defines the VM, plugs its NICs in and boots it.
    async fn configure(api: &ApiClient, spec: &VmSpec) -> Result<(), ApiError> {
        api.create(&vm_config(spec)).await?;
        // The serial socket exists once the VM is defined; reading it before boot misses
        // nothing the guest writes.
        match tokio::net::UnixStream::connect(&spec.files.console_socket).await {
            Ok(stream) => super::pump_console(stream, &spec.files),
            Err(e) => log::warn!(
                "cannot read the guest console on {}: {e}",
                spec.files.console_socket.display()
            ),
        }
        for nic in &spec.net {
            api.add_net(&net_config(nic), &nic.tap_fds).await?;
        }
        api.boot().await
    }
}

/// `$HAKO_CLOUD_HYPERVISOR` if set and not empty, else `configured`.
pub fn binary_from_env(configured: &str) -> String {
    std::env::var(ENV_BINARY)
        .ok()
        .filter(|b| !b.trim().is_empty())
        .unwrap_or_else(|| configured.to_string())
}

/// Runs `binary --version` and checks it is a Cloud Hypervisor we can drive.
fn probe_version(binary: &Path) -> Result<String, CloudHypervisorError> {
    let output = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|source| CloudHypervisorError::VersionRun {
            binary: binary.to_path_buf(),
            source,
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    let unknown = || CloudHypervisorError::VersionUnknown {
        binary: binary.to_path_buf(),
        output: text.trim().to_string(),
    };
    let (version, major) = parse_version(&text).ok_or_else(unknown)?;
    if major < MIN_MAJOR_VERSION {
        return Err(CloudHypervisorError::TooOld {
            binary: binary.to_path_buf(),
            version,
        });
    }
    Ok(version)
}

/// "cloud-hypervisor v48.0.0" (or a `git describe` such as "v48.0-12-gabcdef-dirty", or a
/// fork's "msft/v38.0.72") gives the version word and its major number.
fn parse_version(output: &str) -> Option<(String, u32)> {
    let mut words = output.lines().next()?.split_whitespace();
    if words.next()? != "cloud-hypervisor" {
        return None;
    }
    let version = words.next()?;
    let number = &version[version.find(|c: char| c.is_ascii_digit())?..];
    let major = number
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((version.to_string(), major))
}

#[async_trait]
impl Hypervisor for CloudHypervisor {
    /// Nothing to start ahead: the vsock device is part of the VMM. Checks the inputs so a
    /// missing kernel is reported before virtiofsd has been waited for.
    async fn prepare(&mut self, spec: &VmSpec) -> Result<(), VmmError> {
        Self::check(spec)
    }

    async fn start(&mut self, spec: &VmSpec) -> Result<(), VmmError> {
        Self::check(spec)?;
        self.started = StartKind::Cold;
        if self.templates.is_some() {
            let attempt = self.start_from_template(spec).await;
            let vmm_left_running = self.vmm.is_some();
            if let Some(restored) = start::settle(
                attempt,
                vmm_left_running,
                "cloud-hypervisor",
                &spec.sandbox_id,
            )? {
                self.started = StartKind::Restored(restored);
                return Ok(());
            }
        }
        self.spawn_vmm(spec).await?;
        let (Some(vmm), Some(api)) = (&self.vmm, &self.api) else {
            return Err(VmmError::NotRunning);
        };
        Self::configure(api, spec).await.map_err(|source| {
            VmmError::from(CloudHypervisorError::Boot {
                source,
                log: vmm.log_tail(),
            })
        })
    }

    async fn stop(&mut self, grace: Duration) {
        let Some(vmm) = &self.vmm else {
            return;
        };
        if vmm.exit_code().is_some() {
            return;
        }
        let Some(api) = &self.api else {
            // It never got as far as its API: nothing to ask.
            vmm.stop(grace).await;
            return;
        };
        let api = api.with_call_timeout(grace);
        let ask = async {
            // Fails when the VM never booted; vmm.shutdown still applies.
            if let Err(e) = api.shutdown().await {
                log::debug!("cloud-hypervisor vm.shutdown: {e}");
            }
            match api.vmm_shutdown().await {
                Ok(()) => {}
                // It may exit before its answer is out.
                Err(ApiError::Disconnected { .. }) => {}
                Err(e) => log::warn!("cloud-hypervisor vmm.shutdown: {e}"),
            }
            vmm.wait().await
        };
        if tokio::time::timeout(grace, ask).await.is_err() {
            log::warn!(
                "cloud-hypervisor (pid {}) still runs {grace:?} after vmm.shutdown; killing it",
                vmm.pid()
            );
            vmm.kill().await;
        }
    }

    fn pid(&self) -> Option<u32> {
        self.vmm.as_ref().map(Daemon::pid)
    }

    fn exit_watch(&self) -> Option<watch::Receiver<Option<i32>>> {
        self.vmm.as_ref().map(Daemon::exit_watch)
    }

    fn log_tail(&self) -> String {
        self.vmm
            .as_ref()
            .map(Daemon::log_tail)
            .unwrap_or_else(|| "(cloud-hypervisor not started)".to_string())
    }

    fn started(&self) -> StartKind {
        self.started.clone()
    }

    /// `vm.add-net` with the tap queues: Cloud Hypervisor plugs the NIC through its ACPI
    /// hot-plug controller.
    async fn add_nic(&mut self, nic: &NetDevice) -> Result<(), VmmError> {
        let api = self.api.as_ref().ok_or(VmmError::NotRunning)?;
        api.add_net(&net_config(nic), &nic.tap_fds)
            .await
            .map(drop)
            .map_err(|e| CloudHypervisorError::from(e).into())
    }

    /// `vm.remove-device`: Cloud Hypervisor removes the device (and closes its taps) once the
    /// guest has ejected it.
    async fn remove_nic(&mut self, id: &str, _timeout: Duration) -> Result<(), VmmError> {
        let api = self.api.as_ref().ok_or(VmmError::NotRunning)?;
        api.remove_device(id)
            .await
            .map_err(|e| CloudHypervisorError::from(e).into())
    }
}

#[cfg(test)]
mod tests {
    use super::api::fake::{fake_server, Reply, TempDir};
    use super::*;
    use std::os::fd::AsRawFd;

    fn spec(dir: &Path) -> VmSpec {
        crate::vmm::test_spec(dir)
    }

    /// A CloudHypervisor without the up-front checks, for driving `start` and `stop`.
    fn unchecked(binary: &Path) -> CloudHypervisor {
        CloudHypervisor {
            binary: binary.to_path_buf(),
            version: "v0-test".into(),
            vmm: None,
            api: None,
            templates: None,
            started: StartKind::Cold,
        }
    }

    /// The executable is written by `install`, never by this process: a parallel test forking
    /// while this process held it open for writing would make running it fail with ETXTBSY.
    fn script(dir: &TempDir, name: &str, body: &str) -> PathBuf {
        let path = dir.0.join(name);
        let text = dir.0.join(format!("{name}.txt"));
        std::fs::write(&text, format!("#!/bin/sh\n{body}\n")).expect("write script");
        let installed = std::process::Command::new("install")
            .args(["-m", "0755"])
            .arg(&text)
            .arg(&path)
            .status()
            .expect("install");
        assert!(installed.success(), "install {}", path.display());
        path
    }

    fn guest_images(spec: &VmSpec) {
        std::fs::create_dir_all(spec.kernel.parent().expect("dir")).expect("mkdir");
        std::fs::write(CloudHypervisor::vmlinux(spec), b"elf").expect("vmlinux");
        std::fs::write(&spec.initrd, b"cpio").expect("initrd");
    }

    #[test]
    fn versions_parse() {
        for (out, want) in [
            ("cloud-hypervisor v48.0.0\n", Some(("v48.0.0", 48))),
            (
                "cloud-hypervisor v54.0-12-gabcdef-dirty\n",
                Some(("v54.0-12-gabcdef-dirty", 54)),
            ),
            (
                "cloud-hypervisor msft/v38.0.72\n",
                Some(("msft/v38.0.72", 38)),
            ),
            ("cloud-hypervisor 41.0.0", Some(("41.0.0", 41))),
            ("qemu 7.2", None),
            ("cloud-hypervisor", None),
            ("", None),
        ] {
            let got = parse_version(out);
            assert_eq!(got.as_ref().map(|(v, m)| (v.as_str(), *m)), want, "{out:?}");
        }
    }

    #[test]
    fn new_checks_binary_version_and_kvm() {
        let dir = TempDir::new("new");
        let err = CloudHypervisor::new("no-such-cloud-hypervisor")
            .err()
            .expect("missing binary");
        assert!(err.to_string().contains("not found"), "{err}");

        let old = script(&dir, "old", "echo cloud-hypervisor v27.0");
        let err = CloudHypervisor::new(&old.display().to_string())
            .err()
            .expect("too old");
        assert!(err.to_string().contains("needs v28 or later"), "{err}");

        let other = script(&dir, "other", "echo QEMU emulator version 7.2.22");
        let err = CloudHypervisor::new(&other.display().to_string())
            .err()
            .expect("not cloud-hypervisor");
        assert!(err.to_string().contains("not a Cloud Hypervisor"), "{err}");

        let good = script(&dir, "good", "echo cloud-hypervisor v48.0.0");
        match (
            CloudHypervisor::new(&good.display().to_string()),
            kvm_usable(),
        ) {
            (Ok(ch), Ok(())) => assert_eq!(ch.version(), "v48.0.0"),
            (Err(e), Err(_)) => assert!(e.to_string().contains("no software emulation"), "{e}"),
            (Ok(_), Err(why)) => panic!("accepted without KVM ({why})"),
            (Err(e), Ok(())) => panic!("refused with KVM usable: {e}"),
        }
    }

    #[test]
    fn the_binary_comes_from_the_environment_or_the_configuration() {
        // Only read here: setting the variable would race with other tests.
        let want = std::env::var(ENV_BINARY)
            .ok()
            .filter(|b| !b.trim().is_empty())
            .unwrap_or_else(|| "/opt/ch/cloud-hypervisor".into());
        assert_eq!(binary_from_env("/opt/ch/cloud-hypervisor"), want);
    }

    #[tokio::test]
    async fn missing_images_are_named_before_anything_runs() {
        let dir = TempDir::new("images");
        let s = spec(&dir.0);
        let mut ch = unchecked(Path::new("/bin/false"));
        let err = ch.prepare(&s).await.expect_err("no vmlinux");
        assert!(err.to_string().contains("vmlinux"), "{err}");
        assert!(err.to_string().contains("guest/vmlinux"), "{err}");
        assert!(ch.pid().is_none());
        assert_eq!(ch.log_tail(), "(cloud-hypervisor not started)");
        // Stopping what never started is a no-op.
        ch.stop(Duration::from_millis(10)).await;
    }

    #[tokio::test]
    async fn a_vmm_that_exits_at_once_is_reported_with_its_log_and_pid_file() {
        let dir = TempDir::new("early");
        let s = spec(&dir.0);
        guest_images(&s);
        let binary = script(&dir, "ch", "echo \"bad api socket $2\" >&2; exit 3");
        let mut ch = unchecked(&binary);
        let err = ch.start(&s).await.expect_err("exits");
        let text = err.to_string();
        assert!(text.contains("status 3"), "{text}");
        assert!(
            text.contains(&format!(
                "bad api socket {}",
                dir.0.join("vmm/control.sock").display()
            )),
            "{text}"
        );
        assert!(dir.0.join("vmm.pid").is_file());
        assert!(ch.pid().is_some());
    }

    #[tokio::test]
    async fn configure_creates_adds_each_nic_with_its_fd_then_boots() {
        let dir = TempDir::new("configure");
        let mut s = spec(&dir.0);
        let tap = std::fs::File::create(dir.0.join("stand-in-tap")).expect("file");
        s.net[0].tap_fds = vec![tap.as_raw_fd()];
        let mut seen = fake_server(
            &dir,
            vec![
                Reply::With(204, ""),
                Reply::With(204, ""),
                Reply::With(204, ""),
            ],
        );
        let api = ApiClient::new(dir.socket()).expect("client");
        CloudHypervisor::configure(&api, &s)
            .await
            .expect("configure");
        let create = seen.recv().await.expect("create");
        assert_eq!(create.request_line(), "PUT /api/v1/vm.create HTTP/1.1");
        assert!(create.json().get("net").is_none());
        let add = seen.recv().await.expect("add-net");
        assert_eq!(add.request_line(), "PUT /api/v1/vm.add-net HTTP/1.1");
        assert_eq!(add.json()["mac"], "02:42:0a:58:00:02");
        assert_eq!(add.fds.len(), 1);
        let boot = seen.recv().await.expect("boot");
        assert_eq!(boot.request_line(), "PUT /api/v1/vm.boot HTTP/1.1");
    }

    #[tokio::test]
    async fn nics_are_hot_plugged_with_their_fds_and_removed_by_id() {
        let dir = TempDir::new("hotplug");
        let tap = std::fs::File::create(dir.0.join("stand-in-tap")).expect("file");
        let nic = NetDevice {
            id: "nic4".into(),
            tap_fds: vec![tap.as_raw_fd()],
            mac: "02:42:ac:11:00:04".into(),
        };
        let mut seen = fake_server(
            &dir,
            vec![
                Reply::With(200, r#"{"id": "nic4", "bdf": "0000:00:06.0"}"#),
                Reply::With(204, ""),
            ],
        );
        let mut ch = unchecked(Path::new("/bin/false"));
        ch.api = Some(ApiClient::new(dir.socket()).expect("client"));
        ch.add_nic(&nic).await.expect("plugged");
        ch.remove_nic("nic4", Duration::from_secs(1))
            .await
            .expect("removed");
        let add = seen.recv().await.expect("add-net");
        assert_eq!(add.request_line(), "PUT /api/v1/vm.add-net HTTP/1.1");
        assert_eq!(add.json()["id"], "nic4");
        assert_eq!(add.fds.len(), 1, "the tap queue went along");
        let remove = seen.recv().await.expect("remove-device");
        assert_eq!(
            remove.request_line(),
            "PUT /api/v1/vm.remove-device HTTP/1.1"
        );
        assert_eq!(remove.json(), serde_json::json!({"id": "nic4"}));
    }

    #[tokio::test]
    async fn configure_stops_at_the_first_refusal() {
        let dir = TempDir::new("refusal");
        let mut s = spec(&dir.0);
        s.net.clear();
        let mut seen = fake_server(
            &dir,
            vec![Reply::With(
                400,
                r#"["Error from API","The VM could not be created","Invalid memory size"]"#,
            )],
        );
        let api = ApiClient::new(dir.socket()).expect("client");
        let err = CloudHypervisor::configure(&api, &s).await.expect_err("400");
        assert_eq!(err.status(), Some(400));
        assert!(err.to_string().contains("Invalid memory size"), "{err}");
        assert!(seen.recv().await.is_some());
        // The server was told to serve one request: a second one would find no answer.
        assert!(seen.recv().await.is_none());
    }

    #[tokio::test]
    async fn stop_asks_then_kills_a_vmm_that_stays() {
        let dir = TempDir::new("stop");
        // Answers both shutdown calls but does not exit, like a wedged VMM.
        let mut seen = fake_server(&dir, vec![Reply::With(204, ""), Reply::With(204, "")]);
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let daemon = Daemon::spawn(
            "cloud-hypervisor",
            cmd,
            &dir.0.join("vmm.log"),
            1 << 20,
            &dir.0.join("vmm.pid"),
        )
        .expect("spawn");
        let mut ch = unchecked(Path::new("/bin/false"));
        ch.vmm = Some(daemon);
        ch.api = Some(ApiClient::new(dir.socket()).expect("client"));
        let exit = ch.exit_watch().expect("watch");
        ch.stop(Duration::from_millis(300)).await;
        assert_eq!(*exit.borrow(), Some(128 + 9));
        let first = seen.recv().await.expect("vm.shutdown");
        assert_eq!(first.request_line(), "PUT /api/v1/vm.shutdown HTTP/1.1");
        let second = seen.recv().await.expect("vmm.shutdown");
        assert_eq!(second.request_line(), "PUT /api/v1/vmm.shutdown HTTP/1.1");
    }
}
