//! Configuration: TOML with typed values and no unknown keys.
//!
//! Precedence (first found wins, whole file, no merging across files): the `ConfigPath` from
//! containerd's runtime options, `$HAKO_CONFIG`, `/etc/hako/configuration.toml`,
//! `/usr/share/defaults/hako/configuration.toml`, then the built-in defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const ENV_CONFIG: &str = "HAKO_CONFIG";
pub const ETC_CONFIG: &str = "/etc/hako/configuration.toml";
pub const DEFAULTS_CONFIG: &str = "/usr/share/defaults/hako/configuration.toml";
/// Pod annotations hako reads start with this; `io.hako.<key>` overrides one setting.
pub const ANNOTATION_PREFIX: &str = "io.hako.";
/// The settings a pod may override, by annotation key. Nothing else is: host helper paths, their
/// arguments and the kernel command line stay the operator's.
pub const OVERRIDABLE: [&str; 3] = ["vcpus", "memory_mib", "virtiofs_cache"];
/// PCIe root ports take slots on the machine's root bus, which has 32.
pub const MAX_HOTPLUG_SLOTS: u32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but cannot be read.
    #[error("cannot read configuration {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (names the offending key).
    #[error("invalid configuration {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value is out of range.
    #[error("invalid configuration {path}: {message}")]
    Value { path: PathBuf, message: String },
    /// A pod annotation hako does not know, may not take, or cannot parse.
    #[error("annotation {key}: {message}")]
    Annotation { key: String, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum HypervisorKind {
    #[default]
    Qemu,
    /// Needs hardware KVM; see docs/hypervisors.md.
    CloudHypervisor,
}

impl HypervisorKind {
    /// The VMM's program name, as its log lines are labelled.
    pub fn as_str(self) -> &'static str {
        match self {
            HypervisorKind::Qemu => "qemu",
            HypervisorKind::CloudHypervisor => "cloud-hypervisor",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when the host has hardware virtualisation, TCG otherwise.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    Never,
    #[default]
    Auto,
    Always,
}

impl CacheMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::Never => "never",
            CacheMode::Auto => "auto",
            CacheMode::Always => "always",
        }
    }
}

/// The device that carries the sandbox share into the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SharedFsKind {
    /// virtio-fs served by virtiofsd, sandboxed on the host: the default and the only choice
    /// for Cloud Hypervisor.
    #[default]
    VirtioFs,
    /// virtio-9p served by QEMU itself (`-fsdev local`), for comparison only: QEMU then reads
    /// and writes host files directly, and the guest kernel needs the 9p modules. See ADR 9.
    #[serde(rename = "virtio-9p")]
    Virtio9p,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HypervisorConfig {
    pub kind: HypervisorKind,
    /// QEMU binary: a path, or a name looked up in $PATH.
    pub path: String,
    /// Cloud Hypervisor binary, likewise; `$HAKO_CLOUD_HYPERVISOR` overrides it.
    pub cloud_hypervisor_path: String,
    pub accel: Accel,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The most a pod's `io.hako.vcpus` may ask for; unset: `vcpus`, the default pod size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u32>,
    /// The most a pod's `io.hako.memory_mib` may ask for; unset: `memory_mib`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mib: Option<u32>,
    pub kernel: PathBuf,
    /// The same kernel as an ELF image, which Cloud Hypervisor boots.
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
    /// Appended to the built-in kernel command line.
    pub kernel_params: String,
    /// QEMU's `-sandbox on` seccomp filter.
    pub seccomp: bool,
    pub shared_fs: SharedFsKind,
    /// NICs a running VM can gain (Docker 28 and later network a container after Create;
    /// `docker network connect`): QEMU gets a PCIe root port for each.
    pub hotplug_slots: u32,
    /// Under TCG, the size of QEMU's translation cache in MiB (0: QEMU's default, up to 1 GiB
    /// that counts against the pod as it fills).
    pub tcg_tb_size_mib: u32,
    /// Start VMs from a template of their shape instead of booting them (with virtio-fs;
    /// ADR 14). Unset: on with QEMU, off with Cloud Hypervisor (see `templates_on`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub templates: Option<bool>,
    /// Where templates are kept.
    pub template_dir: PathBuf,
}

impl HypervisorConfig {
    /// Whether VMs start from templates: as configured, else with QEMU only. Cloud
    /// Hypervisor's restore is tested against its API but has not booted a guest on a KVM host
    /// yet (docs/hypervisors.md), so it is the operator's choice there.
    pub fn templates_on(&self) -> bool {
        self.templates.unwrap_or(self.kind == HypervisorKind::Qemu)
    }

    pub fn max_vcpus(&self) -> u32 {
        self.max_vcpus.unwrap_or(self.vcpus)
    }

    pub fn max_memory_mib(&self) -> u32 {
        self.max_memory_mib.unwrap_or(self.memory_mib)
    }
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        Self {
            kind: HypervisorKind::Qemu,
            path: "qemu-system-x86_64".to_string(),
            cloud_hypervisor_path: "cloud-hypervisor".to_string(),
            accel: Accel::Auto,
            vcpus: 1,
            memory_mib: 512,
            max_vcpus: None,
            max_memory_mib: None,
            kernel: PathBuf::from("/usr/share/hako/guest/vmlinux"),
            vmlinux: PathBuf::from("/usr/share/hako/guest/vmlinux"),
            initrd: PathBuf::from("/usr/share/hako/guest/initramfs.cpio"),
            kernel_params: String::new(),
            seccomp: true,
            shared_fs: SharedFsKind::VirtioFs,
            hotplug_slots: 4,
            tcg_tb_size_mib: 64,
            templates: None,
            template_dir: PathBuf::from("/var/lib/hako/templates"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VirtiofsConfig {
    pub path: String,
    pub cache: CacheMode,
    /// Let the guest make device nodes in read-write volumes (virtiofsd keeps CAP_MKNOD).
    pub allow_mknod: bool,
}

impl Default for VirtiofsConfig {
    fn default() -> Self {
        Self {
            path: "virtiofsd".to_string(),
            cache: CacheMode::Auto,
            allow_mknod: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VsockConfig {
    /// `hako-vsock`, the vsock device of QEMU guests (a vhost-user backend).
    pub path: String,
}

impl Default for VsockConfig {
    fn default() -> Self {
        Self {
            path: "hako-vsock".to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// How long to keep dialling the agent while the guest boots.
    pub dial_timeout_ms: u64,
    /// Timeout of each agent call that is not a wait or a stream read.
    pub call_timeout_ms: u64,
    /// The agent's log level (error, warn, info, debug, trace), on the guest console.
    pub log_level: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            dial_timeout_ms: 60_000,
            call_timeout_ms: 30_000,
            log_level: "info".to_string(),
        }
    }
}

impl AgentConfig {
    pub fn dial_timeout(&self) -> Duration {
        Duration::from_millis(self.dial_timeout_ms)
    }
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Where sandbox directories live: `<root>/<namespace>/<sandbox id>/`.
    pub sandbox_root: PathBuf,
    /// The settings (of `OVERRIDABLE`) a pod may override with an `io.hako.<key>` annotation.
    pub pod_annotations: Vec<String>,
    /// The cap of every log the host writes from what the guest controls (console, helpers),
    /// per file; one rotated copy is kept.
    pub log_max_bytes: u64,
    /// The VMM and the vsock backend run as a uid of the pod's own, from
    /// `vmm_uid_base..vmm_uid_base + vmm_uid_count`; a count of 0 runs them as root.
    pub vmm_uid_base: u32,
    pub vmm_uid_count: u32,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            sandbox_root: PathBuf::from("/run/hako"),
            pod_annotations: OVERRIDABLE.iter().map(|k| k.to_string()).collect(),
            log_max_bytes: 1024 * 1024,
            vmm_uid_base: 1_900_000_000,
            vmm_uid_count: 65_536,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub hypervisor: HypervisorConfig,
    pub virtiofs: VirtiofsConfig,
    pub vsock: VsockConfig,
    pub agent: AgentConfig,
    pub runtime: RuntimeConfig,
}

/// A loaded configuration and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// `None` for the built-in defaults.
    pub source: Option<PathBuf>,
}

impl Config {
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        config.check(path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |message: &str| {
            Err(ConfigError::Value {
                path: path.to_path_buf(),
                message: message.to_string(),
            })
        };
        let h = &self.hypervisor;
        if !(1..=64).contains(&h.vcpus) || !(1..=64).contains(&h.max_vcpus()) {
            return bad("hypervisor.vcpus and max_vcpus must be between 1 and 64");
        }
        if !(64..=65536).contains(&h.memory_mib) || !(64..=65536).contains(&h.max_memory_mib()) {
            return bad("hypervisor.memory_mib and max_memory_mib must be between 64 and 65536");
        }
        if self.runtime.log_max_bytes < 4096 {
            return bad("runtime.log_max_bytes must be at least 4096");
        }
        if u64::from(self.runtime.vmm_uid_base) + u64::from(self.runtime.vmm_uid_count)
            > u64::from(u32::MAX)
            || (self.runtime.vmm_uid_count > 0 && self.runtime.vmm_uid_base < 1000)
        {
            return bad("runtime.vmm_uid_base and vmm_uid_count must name unused uids (at least 1000, below 2^32)");
        }
        if self.hypervisor.hotplug_slots > MAX_HOTPLUG_SLOTS {
            return bad(&format!(
                "hypervisor.hotplug_slots must be at most {MAX_HOTPLUG_SLOTS}"
            ));
        }
        let tb = self.hypervisor.tcg_tb_size_mib;
        if tb != 0 && !(16..=2048).contains(&tb) {
            return bad("hypervisor.tcg_tb_size_mib must be 0 (QEMU's default) or 16 to 2048");
        }
        if self.agent.log_level.parse::<log::LevelFilter>().is_err() {
            return bad("agent.log_level must be one of off, error, warn, info, debug, trace");
        }
        if self.hypervisor.shared_fs == SharedFsKind::Virtio9p
            && self.hypervisor.kind != HypervisorKind::Qemu
        {
            return bad("hypervisor.shared_fs = \"virtio-9p\" needs kind = \"qemu\"");
        }
        if self.hypervisor.kernel_params.contains(['\n', '\0']) {
            return bad("hypervisor.kernel_params must be one line");
        }
        if let Some(key) = self
            .runtime
            .pod_annotations
            .iter()
            .find(|k| !OVERRIDABLE.contains(&k.as_str()))
        {
            return bad(&format!(
                "runtime.pod_annotations: {key:?} cannot be overridden per pod (only {OVERRIDABLE:?})"
            ));
        }
        Ok(())
    }

    /// Applies a pod's `io.hako.<key>` annotations. Only keys the configuration allow-lists in
    /// `runtime.pod_annotations` may change a setting; an unknown or refused key, or a value
    /// out of range, is an error that names the annotation. Other annotations are ignored.
    pub fn with_pod_annotations<'a>(
        mut self,
        annotations: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<Config, ConfigError> {
        for (name, value) in annotations {
            let Some(key) = name.strip_prefix(ANNOTATION_PREFIX) else {
                continue;
            };
            let refuse = |message: String| ConfigError::Annotation {
                key: name.clone(),
                message,
            };
            if !OVERRIDABLE.contains(&key) {
                return Err(refuse(format!(
                    "unknown; a pod may set only {}",
                    OVERRIDABLE
                        .map(|k| format!("{ANNOTATION_PREFIX}{k}"))
                        .join(", ")
                )));
            }
            if !self.runtime.pod_annotations.iter().any(|k| k == key) {
                return Err(refuse(
                    "not allowed by runtime.pod_annotations in the hako configuration".to_string(),
                ));
            }
            let number = || {
                value
                    .parse::<u32>()
                    .map_err(|_| refuse(format!("{value:?} is not a whole number")))
            };
            // Pods choose within the operator's bounds, which default to the default pod size.
            let within = |value: u32, max: u32, key: &str| {
                if value > max {
                    Err(refuse(format!(
                        "{value} is more than the {max} the hako configuration allows (hypervisor.max_{key})"
                    )))
                } else {
                    Ok(value)
                }
            };
            match key {
                "vcpus" => {
                    self.hypervisor.vcpus = within(number()?, self.hypervisor.max_vcpus(), "vcpus")?
                }
                "memory_mib" => {
                    self.hypervisor.memory_mib =
                        within(number()?, self.hypervisor.max_memory_mib(), "memory_mib")?
                }
                _ => {
                    self.virtiofs.cache = match value.as_str() {
                        "never" => CacheMode::Never,
                        "auto" => CacheMode::Auto,
                        "always" => CacheMode::Always,
                        _ => {
                            return Err(refuse(format!(
                                "{value:?} is not one of never, auto, always"
                            )))
                        }
                    }
                }
            }
        }
        self.check(Path::new("(pod annotations)"))
            .map_err(|e| ConfigError::Annotation {
                key: "io.hako.*".to_string(),
                message: e.to_string(),
            })?;
        Ok(self)
    }

    /// Loads by precedence. `explicit` is containerd's `ConfigPath` option, if any.
    pub fn load(explicit: Option<&Path>) -> Result<Loaded, ConfigError> {
        let env = std::env::var_os(ENV_CONFIG).map(PathBuf::from);
        let candidates = [
            explicit.map(Path::to_path_buf),
            env,
            Some(PathBuf::from(ETC_CONFIG)),
            Some(PathBuf::from(DEFAULTS_CONFIG)),
        ];
        // An explicitly named file must exist; the standard locations are optional.
        for (i, path) in candidates.into_iter().enumerate() {
            let Some(path) = path.filter(|p| !p.as_os_str().is_empty()) else {
                continue;
            };
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    return Ok(Loaded {
                        config: Config::parse(&text, &path)?,
                        source: Some(path),
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && i >= 2 => continue,
                Err(source) => return Err(ConfigError::Read { path, source }),
            }
        }
        Ok(Loaded {
            config: Config::default(),
            source: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_file_equals_the_defaults() {
        let text = include_str!("../../configs/configuration.toml");
        let parsed = Config::parse(text, Path::new("configuration.toml")).expect("parses");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::parse("[hypervisor]\nmemroy_mib = 5\n", Path::new("x.toml"))
            .expect_err("unknown key");
        assert!(err.to_string().contains("memroy_mib"), "{err}");
    }

    #[test]
    fn enums_are_typed() {
        let err = Config::parse("[hypervisor]\naccel = \"fast\"\n", Path::new("x.toml"))
            .expect_err("bad enum");
        assert!(
            err.to_string().contains("accel") || err.to_string().contains("fast"),
            "{err}"
        );
        let ok = Config::parse(
            "[hypervisor]\naccel = \"tcg\"\n[virtiofs]\ncache = \"never\"\n",
            Path::new("x"),
        )
        .expect("valid");
        assert_eq!(ok.hypervisor.accel, Accel::Tcg);
        assert_eq!(ok.virtiofs.cache, CacheMode::Never);
    }

    #[test]
    fn ranges_are_checked() {
        let err =
            Config::parse("[hypervisor]\nvcpus = 0\n", Path::new("x.toml")).expect_err("0 vcpus");
        assert!(err.to_string().contains("vcpus"), "{err}");
    }

    #[test]
    fn virtio_9p_is_for_qemu_only() {
        let ok = Config::parse("[hypervisor]\nshared_fs = \"virtio-9p\"\n", Path::new("x"))
            .expect("qemu serves 9p");
        assert_eq!(ok.hypervisor.shared_fs, SharedFsKind::Virtio9p);
        let err = Config::parse(
            "[hypervisor]\nkind = \"cloud-hypervisor\"\nshared_fs = \"virtio-9p\"\n",
            Path::new("x.toml"),
        )
        .expect_err("cloud hypervisor has no 9p");
        assert!(err.to_string().contains("shared_fs"), "{err}");
    }

    #[test]
    fn pods_override_only_what_is_allow_listed() {
        let annotations = |pairs: &[(&str, &str)]| -> std::collections::HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let mut roomy = Config::default();
        roomy.hypervisor.max_vcpus = Some(4);
        let config = roomy
            .with_pod_annotations(&annotations(&[
                ("io.hako.vcpus", "2"),
                ("io.hako.memory_mib", "256"),
                ("io.hako.virtiofs_cache", "never"),
                ("io.kubernetes.cri.sandbox-id", "ignored"),
            ]))
            .expect("allowed");
        assert_eq!(config.hypervisor.vcpus, 2);
        assert_eq!(config.hypervisor.memory_mib, 256);
        assert_eq!(config.virtiofs.cache, CacheMode::Never);

        let refused = |pairs: &[(&str, &str)], config: Config| {
            config
                .with_pod_annotations(&annotations(pairs))
                .expect_err("refused")
                .to_string()
        };
        // Unknown keys, host paths and the kernel command line are never taken.
        for key in [
            "io.hako.kernel_params",
            "io.hako.hypervisor.path",
            "io.hako.cpus",
        ] {
            let e = refused(&[(key, "x")], Config::default());
            assert!(e.contains(key) && e.contains("unknown"), "{e}");
        }
        // Known keys only when the configuration allows them.
        let mut strict = Config::default();
        strict.runtime.pod_annotations = vec!["vcpus".into()];
        let e = refused(&[("io.hako.memory_mib", "256")], strict);
        assert!(
            e.contains("io.hako.memory_mib") && e.contains("not allowed"),
            "{e}"
        );
        // Values are parsed and range-checked.
        let e = refused(&[("io.hako.vcpus", "two")], Config::default());
        assert!(e.contains("not a whole number"), "{e}");
        // Beyond the operator's bounds, which default to the default pod size.
        for (key, value) in [
            ("io.hako.vcpus", "64"),
            ("io.hako.memory_mib", "65536"),
            ("io.hako.vcpus", "2"),
        ] {
            let e = refused(&[(key, value)], Config::default());
            assert!(e.contains(key) && e.contains("more than"), "{e}");
        }
        let mut roomy = Config::default();
        roomy.hypervisor.max_vcpus = Some(64);
        let e = refused(&[("io.hako.vcpus", "500")], roomy);
        assert!(e.contains("more than the 64"), "{e}");
        let e = refused(
            &[("io.hako.virtiofs_cache", "sometimes")],
            Config::default(),
        );
        assert!(e.contains("never, auto, always"), "{e}");
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/hako.toml"))).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/hako.toml"), "{err}");
    }
}
