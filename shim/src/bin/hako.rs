//! The `hako` CLI: `hako check` checks the host, `hako env` prints the effective configuration,
//! `hako logs` prints a running sandbox's logs, `hako template` manages templates.

#[path = "hako/template.rs"]
mod template;

use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::Context;
use hako_shim::config::{Config, HypervisorKind};
use hako_shim::daemon::resolve_binary;
use hako_shim::ids::validate;
use hako_shim::logs::{escape, CappedLog};
use hako_shim::vmm::choose_accel;
use hako_shim::vmm::cloud_hypervisor::CloudHypervisor;

const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
const USAGE: &str = "usage: hako check | hako env [--json] | hako logs [-n NAMESPACE] SANDBOX | hako template list|build|rm | hako --version";
/// The logs of a sandbox, in the order they are worth reading.
const LOGS: [&str; 5] = [
    "console.log",
    "vmm.log",
    "virtiofsd.log",
    "vsock.log",
    "template.log",
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["--version"] | ["version"] => {
            println!("hako {}", env!("CARGO_PKG_VERSION"));
            Ok(true)
        }
        ["env"] => env(false),
        ["env", "--json"] => env(true),
        ["check"] => check(),
        ["logs", sandbox] => logs("default", sandbox),
        ["logs", "-n" | "--namespace", namespace, sandbox] => logs(namespace, sandbox),
        ["template", rest @ ..] => template::command(rest),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
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
fn logs(namespace: &str, sandbox: &str) -> anyhow::Result<bool> {
    validate("namespace", namespace)?;
    validate("sandbox id", sandbox)?;
    let config = Config::load(None)?.config;
    let dir = config.runtime.sandbox_root.join(namespace).join(sandbox);
    if !dir.is_dir() {
        anyhow::bail!(
            "no sandbox {sandbox} in namespace {namespace} ({} does not exist); logs live there while the sandbox runs, and containerd's log keeps the shim's",
            dir.display()
        );
    }
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
    // What a VM cannot share with the host, whatever this host has (README, Kubernetes).
    for (what, detail) in LIMITS {
        report(false, false, what, detail.to_string());
    }
    Ok(ok)
}

/// What a VM sandbox refuses or cannot provide, by its nature.
const LIMITS: [(&str, &str); 3] = [
    (
        "host network",
        "refused: a pod's network is the VM's (hostNetwork, --network host)",
    ),
    (
        "host IPC",
        "refused: the VM's IPC namespace is its own (hostIPC, --ipc host)",
    ),
    (
        "rshared mounts",
        "refused: a mount made in a VM cannot reach the host (Bidirectional propagation)",
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
