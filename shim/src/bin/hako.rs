//! The `hako` CLI: `hako check` checks the host, `hako env` prints the effective configuration,
//! `hako logs` prints a running sandbox's logs, `hako ps` a container's processes in the guest,
//! `hako template` manages templates, `hako monitor` serves the node's metrics to Prometheus.

#[path = "hako/docker.rs"]
mod docker;
#[path = "hako/find.rs"]
mod find;
#[path = "hako/monitor.rs"]
mod monitor;
#[path = "hako/podman.rs"]
mod podman;
#[path = "hako/ps.rs"]
mod ps;
#[path = "hako/template.rs"]
mod template;

use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use hako_shim::config::{Config, HypervisorKind};
use hako_shim::daemon::resolve_binary;
use hako_shim::ids::validate;
use hako_shim::logs::{escape, CappedLog};
use hako_shim::vmm::choose_accel;
use hako_shim::vmm::cloud_hypervisor::CloudHypervisor;

const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
const DOCKER_CONFIG: &str = "/etc/docker/daemon.json";
/// The logs of a sandbox, in the order they are worth reading.
const LOGS: [&str; 5] = [
    "console.log",
    "vmm.log",
    "virtiofsd.log",
    "vsock.log",
    "template.log",
];

/// hako runs every pod in a lightweight VM, as containerd's `io.containerd.hako.v2` runtime.
/// This is the operator's tool; containerd starts the runtime itself
/// (`containerd-shim-hako-v2`).
#[derive(Parser)]
#[command(name = "hako", version, disable_help_subcommand = true)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Checks that this host can run hako pods: every required part, what is optional, and
    /// what a VM refuses by its nature. Exits 1 when a required part fails.
    Check,
    /// Prints the effective configuration and the file it came from.
    Env {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Prints a running sandbox's logs: the guest console (kernel and agent), the VMM's,
    /// virtiofsd's and the vsock device's, with the guest's control characters escaped.
    Logs {
        /// The containerd namespace (`default` for ctr, `moby` for Docker, `k8s.io` for
        /// Kubernetes); every namespace is searched when not given.
        #[arg(short, long)]
        namespace: Option<String>,
        /// The sandbox's id (the pod's, or the container's outside Kubernetes), or a prefix
        /// that names one sandbox only, or a Docker container's name (asked of Docker's
        /// daemon).
        sandbox: String,
    },
    /// Lists a running container's processes as the guest sees them (PID in the container,
    /// its parent, the guest's pid, uid, state, CPU time, command line). `docker top` and `ctr
    /// task ps` show the VM's host process instead: the container's processes are not the
    /// host's.
    Ps {
        /// The containerd namespace (`default` for ctr, `moby` for Docker, `k8s.io` for
        /// Kubernetes); every namespace is searched when not given.
        #[arg(short, long)]
        namespace: Option<String>,
        /// The container's id, or a prefix that names one container only, or a Docker
        /// container's name (asked of Docker's daemon).
        container: String,
    },
    /// Serves every pod's metrics on this node to Prometheus (docs/metrics.md): the shims',
    /// the VMs' host processes and the guests', with each sandbox's and pod's labels.
    Monitor(monitor::Args),
    /// Manages the saved VMs pods start from (ADR 14).
    Template {
        #[command(subcommand)]
        action: template::Action,
    },
    /// Prints hako's version (as --version).
    Version,
    /// Prints a completion script for a shell, e.g. `hako completions bash >
    /// /etc/bash_completion.d/hako`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Version => {
            println!("hako {}", env!("CARGO_PKG_VERSION"));
            Ok(true)
        }
        Cmd::Env { json } => env(json),
        Cmd::Check => check(),
        Cmd::Logs { namespace, sandbox } => logs(namespace.as_deref(), &sandbox),
        Cmd::Ps {
            namespace,
            container,
        } => ps::command(namespace.as_deref(), &container),
        Cmd::Template { action } => template::command(action),
        Cmd::Monitor(args) => monitor::command(args),
        Cmd::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "hako", &mut std::io::stdout());
            Ok(true)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("hako: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn env(json: bool) -> anyhow::Result<bool> {
    let loaded = Config::load(None)?;
    let source = loaded
        .source
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "built-in defaults".to_string());
    if json {
        let value = serde_json::json!({ "source": source, "config": loaded.config });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("# effective hako configuration, from {source}");
        print!(
            "{}",
            toml::to_string(&loaded.config).context("printing the configuration")?
        );
    }
    Ok(true)
}

/// Prints the guest console (kernel and agent) and the helpers' logs of a running sandbox.
fn logs(namespace: Option<&str>, sandbox: &str) -> anyhow::Result<bool> {
    if let Some(namespace) = namespace {
        validate("namespace", namespace)?;
    }
    validate("sandbox id", sandbox)?;
    let config = Config::load(None)?.config;
    let root = &config.runtime.sandbox_root;
    let dir = find::or_by_docker_name(namespace, sandbox, |ns, id| find::sandbox(root, ns, id))?;
    // What the guest wrote reaches a terminal here: escaped. A rotated log comes first.
    for name in LOGS {
        let current = dir.join(name);
        for path in [CappedLog::rotated(&current), current] {
            if let Ok(bytes) = std::fs::read(&path) {
                let text = escape(&bytes);
                println!("==> {} <==", path.display());
                print!("{text}");
                if !text.ends_with('\n') && !text.is_empty() {
                    println!();
                }
            }
        }
    }
    Ok(true)
}

fn version_of(binary: &Path) -> String {
    Command::new(binary)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "version unknown".to_string())
}

/// Whether Docker's daemon.json gives the runtime a short name (`--runtime hako`); nothing when
/// the host has no daemon.json.
fn docker_status(config: &Path) -> Option<(bool, String)> {
    let text = std::fs::read_to_string(config).ok()?;
    let named = serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|e| format!("{} is not JSON: {e}", config.display()))
        .map(|json| {
            json["runtimes"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, r)| r["runtimeType"] == "io.containerd.hako.v2")
                .map(|(name, _)| name.clone())
                .collect::<Vec<_>>()
        });
    Some(match named {
        Ok(names) if !names.is_empty() => (
            true,
            format!(
                "{} names io.containerd.hako.v2 as --runtime {}",
                config.display(),
                names.join(", ")
            ),
        ),
        Ok(_) => (
            false,
            format!(
                "{} gives io.containerd.hako.v2 no short name (docker run --runtime io.containerd.hako.v2 works; for --runtime hako: scripts/install.sh --configure)",
                config.display()
            ),
        ),
        Err(e) => (false, e),
    })
}

/// The containerd in $PATH, its version, and whether its configuration names the runtime.
fn containerd_status() -> (bool, String) {
    let Ok(binary) = resolve_binary("containerd", "containerd") else {
        return (
            false,
            "not found in $PATH (hako needs containerd 1.6 or later)".into(),
        );
    };
    let version = version_of(&binary);
    let config = Path::new(CONTAINERD_CONFIG);
    let registered = match std::fs::read_to_string(config) {
        Ok(text) if text.contains("io.containerd.hako.v2") => {
            format!("{} names io.containerd.hako.v2", config.display())
        }
        Ok(_) => format!(
            "{} does not name io.containerd.hako.v2 (ctr and Docker can still use it by that name; for CRI add the runtime: scripts/install.sh --print-config)",
            config.display()
        ),
        Err(_) => format!("no {}", config.display()),
    };
    (
        true,
        format!("{} ({version}); {registered}", binary.display()),
    )
}

fn check() -> anyhow::Result<bool> {
    let mut ok = true;
    let mut report = |good: bool, required: bool, what: &str, detail: String| {
        let mark = match (good, required) {
            (true, _) => "ok  ",
            (false, true) => "FAIL",
            (false, false) => "info",
        };
        println!("{mark} {what:<22} {detail}");
        if !good && required {
            ok = false;
        }
    };
    let loaded = match Config::load(None) {
        Ok(loaded) => {
            let from = loaded.source.as_ref().map(|p| p.display().to_string());
            report(
                true,
                true,
                "configuration",
                from.unwrap_or_else(|| "built-in defaults".into()),
            );
            loaded.config
        }
        Err(e) => {
            report(false, true, "configuration", e.to_string());
            Config::default()
        }
    };
    match choose_accel(loaded.hypervisor.accel) {
        Ok(choice) => report(
            true,
            true,
            "accelerator",
            format!(
                "{}: {}",
                if choice.kvm { "KVM" } else { "TCG" },
                choice.reason
            ),
        ),
        Err(e) => report(false, true, "accelerator", e.to_string()),
    }
    let uses_ch = loaded.hypervisor.kind == HypervisorKind::CloudHypervisor;
    report(
        true,
        true,
        "hypervisor",
        format!(
            "{} (hypervisor.kind)",
            if uses_ch { "cloud-hypervisor" } else { "qemu" }
        ),
    );
    // Optional unless configured: Cloud Hypervisor needs hardware KVM and is not packaged.
    match CloudHypervisor::from_config(&loaded.hypervisor, &loaded.runtime.sandbox_root) {
        Ok(ch) => report(
            true,
            uses_ch,
            "cloud-hypervisor",
            format!("usable: {}", ch.version()),
        ),
        Err(e) => report(
            false,
            uses_ch,
            "cloud-hypervisor",
            format!("not usable: {e}; see docs/hypervisors.md"),
        ),
    }
    if uses_ch {
        let found = loaded.hypervisor.vmlinux.is_file();
        report(
            found,
            true,
            "guest vmlinux",
            format!(
                "{}{}",
                loaded.hypervisor.vmlinux.display(),
                if found {
                    ""
                } else {
                    " missing; fix: scripts/install.sh"
                }
            ),
        );
    }
    let helpers = [
        (
            "qemu",
            &loaded.hypervisor.path,
            "apt-get install qemu-system-x86",
        ),
        (
            "virtiofsd",
            &loaded.virtiofs.path,
            "cargo install virtiofsd (scripts/setup.sh)",
        ),
        (
            "hako-vsock",
            &loaded.vsock.path,
            "install hako with scripts/install.sh",
        ),
    ];
    for (name, wanted, fix) in helpers {
        match resolve_binary(name, wanted) {
            Ok(path) => report(
                true,
                true,
                name,
                format!("{} ({})", path.display(), version_of(&path)),
            ),
            Err(_) => report(false, true, name, format!("{wanted} not found; fix: {fix}")),
        }
    }
    for (what, path) in [
        ("guest kernel", &loaded.hypervisor.kernel),
        ("guest initramfs", &loaded.hypervisor.initrd),
    ] {
        let found = path.is_file();
        let detail = match (found, what) {
            (false, _) => format!("{} missing; fix: scripts/install.sh", path.display()),
            (true, "guest kernel") => format!("{}: {}", path.display(), guest_kernel(path)),
            (true, _) => path.display().to_string(),
        };
        report(found, true, what, detail);
    }
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let has_overlay = filesystems
        .lines()
        .any(|l| l.trim_end().ends_with("overlay"));
    report(
        has_overlay,
        true,
        "overlayfs",
        if has_overlay {
            "available".into()
        } else {
            "missing (modprobe overlay)".into()
        },
    );
    let vhost_net = Path::new("/dev/vhost-net").exists();
    report(
        vhost_net,
        false,
        "vhost-net",
        if vhost_net {
            "available".into()
        } else {
            "absent: networking uses the userspace virtio-net path".into()
        },
    );
    // The shim speaks nf_tables itself (no `nft` binary): what matters is the kernel's side.
    match hako_shim::net::nftables::available() {
        Ok(()) => report(
            true,
            false,
            "nftables",
            "the kernel's nf_tables answers (port forwarding into pods)".into(),
        ),
        Err(e) => report(
            false,
            false,
            "nftables",
            format!("{e}: kubectl port-forward cannot reach pods (a kernel with nf_tables and nft_redir)"),
        ),
    }
    let tun = Path::new("/dev/net/tun").exists();
    report(
        tun,
        false,
        "tun/tap",
        if tun {
            "/dev/net/tun available (pod networking)".into()
        } else {
            "/dev/net/tun missing: pods get no network (modprobe tun)".into()
        },
    );
    let templates = if !loaded.hypervisor.templates_on() {
        match loaded.hypervisor.templates {
            Some(false) => "off (hypervisor.templates = false): every VM boots".to_string(),
            _ => "off: with Cloud Hypervisor, templates are on only with hypervisor.templates = true (docs/hypervisors.md)".to_string(),
        }
    } else if loaded.hypervisor.shared_fs != hako_shim::config::SharedFsKind::VirtioFs {
        "off for this configuration: templates need virtio-fs".to_string()
    } else {
        let store = hako_shim::vmm::template::Store::new(
            &loaded.hypervisor.template_dir,
            &loaded.runtime.sandbox_root,
        );
        format!(
            "on: {} in {} (the first start of a shape makes its own; hako template build)",
            store.list().len(),
            loaded.hypervisor.template_dir.display()
        )
    };
    report(true, false, "templates", templates);
    let cgroup = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "v2 (unified)"
    } else if Path::new("/sys/fs/cgroup/unified").exists() {
        "v1 (hybrid, with a cgroup2 mount at /sys/fs/cgroup/unified)"
    } else {
        "v1"
    };
    report(true, false, "host cgroups", cgroup.to_string());
    let (found, detail) = containerd_status();
    report(found, false, "containerd", detail);
    if let Some((found, detail)) = docker_status(Path::new(DOCKER_CONFIG)) {
        report(found, false, "docker", detail);
    }
    let podman = resolve_binary("podman", "podman")
        .ok()
        .map(|binary| (binary.clone(), version_of(&binary)));
    if let Some((found, detail)) = podman::status(podman) {
        report(found, false, "podman", detail);
    }
    // What a VM cannot share with the host, whatever this host has (README, Kubernetes).
    for (what, detail) in LIMITS {
        report(false, false, what, detail.to_string());
    }
    Ok(ok)
}

/// What a VM sandbox refuses or cannot provide, by its nature.
const LIMITS: [(&str, &str); 7] = [
    (
        "host network",
        "refused: a pod's network is the VM's (hostNetwork, --network host)",
    ),
    (
        "host IPC",
        "refused: the VM's IPC namespace is its own (hostIPC, --ipc host)",
    ),
    (
        "host PID",
        "refused: the only processes a VM can show are its own (hostPID, --pid host)",
    ),
    (
        "host UTS",
        "refused: the VM's hostname is its own (--uts host)",
    ),
    (
        "rshared mounts",
        "refused: a mount made in a VM cannot reach the host (Bidirectional propagation)",
    ),
    (
        "host devices",
        "refused: a device number opens the guest's device (--device, but null, tun, fuse...)",
    ),
    (
        "limits above the VM",
        "grow it up to max_vcpus/max_memory_mib, else refused (--memory, --cpus, cpuset)",
    ),
];

/// Which kernel the guest boots: the release the guest image records beside it, and whether it
/// is hako's own build (everything built in) or a Debian package's (modules in the initramfs).
fn guest_kernel(kernel: &Path) -> String {
    let release_file = kernel.with_file_name("kernel-release");
    match std::fs::read_to_string(&release_file) {
        Ok(release) if release.trim().ends_with("-hako") => {
            format!("{}, hako's own (no modules)", release.trim())
        }
        Ok(release) => format!(
            "{}, a Debian kernel (modules from the initramfs)",
            release.trim()
        ),
        Err(_) => format!("release unknown ({} missing)", release_file.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_command_has_its_help_and_bad_use_is_a_usage_error() {
        Cli::command().debug_assert();
        for args in [
            vec!["hako", "--help"],
            vec!["hako", "logs", "--help"],
            vec!["hako", "ps", "--help"],
            vec!["hako", "template", "rm", "--help"],
        ] {
            let err = Cli::try_parse_from(&args).err().expect("help");
            assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp, "{args:?}");
        }
        for args in [
            vec!["hako", "logs"],
            vec!["hako", "ps"],
            vec!["hako", "template", "rm"],
            vec!["hako", "nonsense"],
        ] {
            let err = Cli::try_parse_from(&args).err().expect("refused");
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn completions_name_every_command() {
        for shell in ["bash", "zsh", "fish"] {
            let cli = Cli::try_parse_from(["hako", "completions", shell]).expect("a shell");
            let Cmd::Completions { shell } = cli.command else {
                panic!("not completions");
            };
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "hako", &mut script);
            let script = String::from_utf8(script).expect("text");
            for command in ["check", "logs", "ps", "template", "completions"] {
                assert!(script.contains(command), "{shell}: {command}");
            }
        }
        let err = Cli::try_parse_from(["hako", "completions", "tcsh"]).err();
        assert_eq!(err.map(|e| e.exit_code()), Some(2));
    }

    #[test]
    fn dockers_daemon_json_is_read_for_the_runtimes_short_name() {
        let file = std::env::temp_dir().join(format!("hako-daemon-{}.json", std::process::id()));
        let status = |json: &str| {
            std::fs::write(&file, json).expect("write");
            docker_status(&file).expect("a daemon.json")
        };
        let (ok, detail) =
            status(r#"{"runtimes": {"hako": {"runtimeType": "io.containerd.hako.v2"}}}"#);
        assert!(ok && detail.ends_with("as --runtime hako"), "{detail}");
        let (ok, detail) = status(r#"{"log-level": "info"}"#);
        assert!(!ok && detail.contains("no short name"), "{detail}");
        let (ok, detail) = status("{not json");
        assert!(!ok && detail.contains("is not JSON"), "{detail}");
        std::fs::remove_file(&file).expect("cleanup");
        assert_eq!(docker_status(&file), None, "no daemon.json, no line");
    }
}
