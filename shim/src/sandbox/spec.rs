//! Rewriting a container's OCI spec from host paths to guest paths. Host-only parts (hooks,
//! namespace paths, the host cgroup path) are dropped: they mean nothing inside the VM.

use std::path::{Path, PathBuf};

use hako_protocol::{mount_options, sysctl};
use oci_spec::runtime::{LinuxNamespaceType, Mount, Root, Spec};

/// A host file or directory the guest must see, and where it appears in the share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedBind {
    pub host_source: PathBuf,
    /// Name under `<share>/<cid>/mounts/`.
    pub name: String,
    /// Read-only itself (`ro`); what is mounted below it keeps its own flags, as with runc.
    pub readonly: bool,
    /// Read-only on every level (`rro`).
    pub recursive_readonly: bool,
    /// Mounts the host makes below the source later reach the container (`rslave`).
    pub follows_host: bool,
    /// Where the container sees it.
    pub destination: PathBuf,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// The spec has no process to run.
    #[error("the OCI spec has no process")]
    NoProcess,
    /// The process has no args.
    #[error("the OCI spec's process has no args")]
    NoArgs,
    /// A mount destination is unusable.
    #[error("mount destination {0:?} must be an absolute path without '..'")]
    BadDestination(String),
    /// A bind mount source is not an absolute host path.
    #[error("bind mount source {0:?} must be an absolute host path")]
    BadSource(String),
    /// An env entry is malformed.
    #[error("invalid environment entry {0:?}: it must be KEY=VALUE with a non-empty key, no '=' in the key and no NUL")]
    Env(String),
    /// A bind asks that mounts made below it in the container reach the host.
    #[error("bind mount {destination:?}: propagation {option:?} would carry mounts made in the container back to the host, which a VM cannot (Kubernetes' Bidirectional mount propagation); use rslave (HostToContainer) or private")]
    SharedPropagation { destination: String, option: String },
    /// The spec shares the host's IPC namespace, which a VM cannot.
    #[error("the container asks for the host's IPC namespace (hostIPC, --ipc host), which a pod in a VM cannot share: its IPC namespace is the VM's")]
    HostIpc,
    /// The spec shares the host's PID namespace, which a VM cannot.
    #[error("the container asks for the host's PID namespace (hostPID, --pid host), which a pod in a VM cannot share: the only processes it could see are the VM's")]
    HostPid,
    /// The spec shares the host's UTS namespace, which a VM cannot.
    #[error("the container asks for the host's UTS namespace (--uts host), which a pod in a VM cannot share: its hostname would be the VM's")]
    HostUts,
    /// A file the pod gets in the guest would be too large.
    #[error("the pod's {0} would be larger than {max} bytes", max = hako_protocol::MAX_POD_FILE)]
    PodFile(&'static str),
    /// A device the guest cannot have.
    #[error(transparent)]
    Device(#[from] super::devices::DeviceError),
    /// A sysctl the container may not set (runc's rules).
    #[error(transparent)]
    Sysctl(#[from] hako_protocol::sysctl::SysctlError),
    /// A bind mount carries an option hako does not know: it might promise a protection hako
    /// would not give.
    #[error("bind mount {destination:?}: hako does not know the mount option {option:?}, so it cannot promise what it asks for; remove it")]
    UnknownOption { destination: String, option: String },
}

/// What is mounted below a host path: the mount points under it, relative to it, outermost
/// first. `to_guest` needs it for read-only volumes (see there).
pub type Submounts<'a> = &'a dyn Fn(&Path) -> Vec<PathBuf>;

/// The mount points strictly below `dir` in the shim's mount namespace, relative to it.
pub fn host_submounts(dir: &Path) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return Vec::new();
    };
    super::mounts::mount_points()
        .into_iter()
        .filter_map(|p| p.strip_prefix(&dir).ok().map(Path::to_path_buf))
        .filter(|rel| !rel.as_os_str().is_empty())
        .collect()
}

/// Whether mounts the host makes below a bind's source later reach the container: the last
/// propagation option says (`slave`/`rslave` yes; `private`, `rprivate` and the unbindable
/// ones no). With none, yes, as under runc, whose container root is `rslave` and whose binds
/// inherit that (Docker and Kubernetes always say, `rprivate` unless asked otherwise).
fn follows_host(options: &[String]) -> bool {
    options
        .iter()
        .rev()
        .find_map(|o| match o.as_str() {
            "slave" | "rslave" => Some(true),
            "private" | "rprivate" | "unbindable" | "runbindable" => Some(false),
            _ => None,
        })
        .unwrap_or(true)
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|o| o == "bind" || o == "rbind")
}

/// Checks env entries before anything is created, so a bad entry is a clear error at Create.
pub fn check_env(env: &[String]) -> Result<(), SpecError> {
    for entry in env {
        match entry.split_once('=') {
            Some((key, _)) if !key.is_empty() && !entry.contains('\0') => {}
            _ => return Err(SpecError::Env(entry.clone())),
        }
    }
    Ok(())
}

/// The directories the guest mounts on that are not host binds (proc, tmpfs, the mounts below
/// read-only volumes): with the binds' destinations, what a read-only root must hold already.
pub fn plain_mount_points(guest: &Spec, binds: &[SharedBind]) -> Vec<PathBuf> {
    guest
        .mounts()
        .iter()
        .flatten()
        .map(|m| m.destination().clone())
        .filter(|d| !binds.iter().any(|b| &b.destination == d))
        .collect()
}

/// Rewrites `spec` for the guest. Returns the spec and the host binds the share must carry.
///
/// `join` is the guest pid of the pod's sandbox container when this container belongs to a pod:
/// namespaces the spec gives by path (CRI points them at the sandbox container) are joined in the
/// guest through that process. Otherwise host paths mean nothing in the guest and new
/// namespaces are made.
///
/// A read-only (`ro`, not `rro`) volume is read-only itself, and what the host has mounted
/// below it keeps its own flags, as with runc. In the guest the whole volume is one directory
/// of the share, so each host submount (`submounts`) gets a guest mount of its own after the
/// volume's, which the volume's read-only flag does not cover.
pub fn to_guest(
    spec: &Spec,
    container_id: &str,
    guest_share: &Path,
    join: Option<u32>,
    submounts: Submounts,
) -> Result<(Spec, Vec<SharedBind>), SpecError> {
    let process = spec.process().as_ref().ok_or(SpecError::NoProcess)?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(SpecError::NoArgs);
    }
    check_env(process.env().as_deref().unwrap_or_default())?;

    // A namespace the spec does not list is the host's under runc. A VM has only its own to
    // give, so asking for the host's is refused, never quietly answered with the VM's.
    let has = |typ| {
        spec.linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|n| n.iter().any(|n| n.typ() == typ))
    };
    if !has(LinuxNamespaceType::Ipc) {
        return Err(SpecError::HostIpc);
    }
    if !has(LinuxNamespaceType::Pid) {
        return Err(SpecError::HostPid);
    }
    // Host networking brings the host's UTS namespace with it (CRI's hostNetwork): that pod
    // is refused for its network, with that reason, when its network is chosen.
    if !has(LinuxNamespaceType::Uts) && has(LinuxNamespaceType::Network) {
        return Err(SpecError::HostUts);
    }

    let container_dir = guest_share.join(container_id);
    let mut out = spec.clone();
    let mut root = Root::default();
    root.set_path(container_dir.join("rootfs"));
    root.set_readonly(spec.root().as_ref().and_then(|r| r.readonly()));
    out.set_root(Some(root));
    out.set_hooks(None);

    let mut binds = Vec::new();
    let mut mounts = Vec::new();
    for (index, m) in spec
        .mounts()
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let dest = m.destination();
        if !dest.is_absolute() || dest.components().any(|c| c.as_os_str() == "..") {
            return Err(SpecError::BadDestination(dest.display().to_string()));
        }
        let mut m = m.clone();
        if !is_bind(&m) {
            mounts.push(m);
            continue;
        }
        let options = m.options().clone().unwrap_or_default();
        if let Some(option) = mount_options::unknown_bind_option(&options) {
            return Err(SpecError::UnknownOption {
                destination: dest.display().to_string(),
                option: option.to_string(),
            });
        }
        if let Some(option) = options.iter().find(|o| *o == "shared" || *o == "rshared") {
            return Err(SpecError::SharedPropagation {
                destination: dest.display().to_string(),
                option: option.clone(),
            });
        }
        let source = m.source().clone().unwrap_or_default();
        if !source.is_absolute() || source.components().any(|c| c.as_os_str() == "..") {
            return Err(SpecError::BadSource(source.display().to_string()));
        }
        let base = source
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "root".to_string());
        let name = format!("{index}-{base}");
        // The last of ro/rw wins, as for mount(8).
        let readonly = options
            .iter()
            .rev()
            .find(|o| *o == "ro" || *o == "rw")
            .is_some_and(|o| o == "ro");
        let recursive_readonly = mount_options::recursively_readonly(&options);
        let follows_host = follows_host(&options);
        let guest_source = container_dir.join("mounts").join(&name);
        m.set_source(Some(guest_source.clone()));
        mounts.push(m);
        if readonly && !recursive_readonly {
            for rel in submounts(&source) {
                let mut below = Mount::default();
                below.set_destination(dest.join(&rel));
                below.set_typ(Some("bind".to_string()));
                below.set_source(Some(guest_source.join(&rel)));
                below.set_options(Some(vec!["rbind".to_string()]));
                mounts.push(below);
            }
        }
        binds.push(SharedBind {
            host_source: source,
            name,
            readonly,
            recursive_readonly,
            follows_host,
            destination: dest.clone(),
        });
    }
    out.set_mounts(Some(mounts));

    if let Some(linux) = spec.linux() {
        check_sysctls(linux)?;
        let mut linux = linux.clone();
        if let Some(namespaces) = linux.namespaces() {
            let cleaned = namespaces
                .iter()
                .cloned()
                .map(|mut ns| {
                    let joined = match (join, ns.path().is_some(), ns.typ()) {
                        (Some(pid), true, LinuxNamespaceType::Ipc) => {
                            Some(format!("/proc/{pid}/ns/ipc"))
                        }
                        (Some(pid), true, LinuxNamespaceType::Uts) => {
                            Some(format!("/proc/{pid}/ns/uts"))
                        }
                        (Some(pid), true, LinuxNamespaceType::Pid) => {
                            Some(format!("/proc/{pid}/ns/pid"))
                        }
                        _ => None,
                    };
                    ns.set_path(joined.map(PathBuf::from));
                    ns
                })
                .collect();
            linux.set_namespaces(Some(cleaned));
        }
        linux.set_cgroups_path(None);
        if let Some(devices) = linux.devices() {
            let rules = linux
                .resources()
                .as_ref()
                .and_then(|r| r.devices().as_deref())
                .unwrap_or_default();
            linux.set_devices(Some(super::devices::for_guest(devices, rules)?));
        }
        out.set_linux(Some(linux));
    }
    Ok((out, binds))
}

/// The spec's sysctls, against the namespaces the container will have (the network namespace
/// in the guest is the VM's, which is the pod's).
fn check_sysctls(linux: &oci_spec::runtime::Linux) -> Result<(), SpecError> {
    let has = |kind| linux.namespaces().iter().flatten().any(|n| n.typ() == kind);
    let namespaces = sysctl::Namespaces {
        ipc: has(LinuxNamespaceType::Ipc),
        uts: has(LinuxNamespaceType::Uts),
        net: has(LinuxNamespaceType::Network),
    };
    for (name, value) in linux.sysctl().iter().flatten() {
        sysctl::check(name, value, namespaces)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).expect("valid test spec")
    }

    fn none(_: &Path) -> Vec<PathBuf> {
        Vec::new()
    }

    const BASE: &str = r#"{
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "env": ["PATH=/bin"]},
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "h",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind", "ro"]}
        ],
        "hooks": {"prestart": [{"path": "/usr/bin/true"}]},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "network", "path": "/var/run/netns/x"}],
                  "cgroupsPath": "/default/t1"}
    }"#;

    #[test]
    fn root_and_binds_point_into_the_share() {
        let (guest, binds) = to_guest(
            &spec(BASE),
            "t1",
            Path::new("/run/hako/shared"),
            None,
            &none,
        )
        .expect("ok");
        let root = guest.root().as_ref().expect("root");
        assert_eq!(root.path(), Path::new("/run/hako/shared/t1/rootfs"));
        assert_eq!(root.readonly(), Some(true));
        let mounts = guest.mounts().as_ref().expect("mounts");
        assert_eq!(mounts[0].source().as_deref(), Some(Path::new("proc")));
        assert_eq!(
            mounts[1].source().as_deref(),
            Some(Path::new("/run/hako/shared/t1/mounts/1-hosts"))
        );
        assert_eq!(
            binds,
            vec![SharedBind {
                host_source: "/var/lib/x/hosts".into(),
                name: "1-hosts".into(),
                readonly: true,
                recursive_readonly: false,
                follows_host: true,
                destination: "/etc/hosts".into(),
            }]
        );
    }

    #[test]
    fn unknown_bind_options_are_refused_and_rro_is_kept() {
        let json = BASE.replace(
            r#""options": ["rbind", "ro"]"#,
            r#""options": ["rbind", "idmap"]"#,
        );
        let err = to_guest(&spec(&json), "t1", Path::new("/s"), None, &none).expect_err("idmap");
        assert!(
            matches!(&err, SpecError::UnknownOption { option, .. } if option == "idmap"),
            "{err}"
        );
        let json = BASE.replace(
            r#""options": ["rbind", "ro"]"#,
            r#""options": ["rbind", "rro"]"#,
        );
        let (guest, binds) =
            to_guest(&spec(&json), "t1", Path::new("/s"), None, &none).expect("rro");
        assert!(binds[0].recursive_readonly && !binds[0].readonly);
        let options = guest.mounts().as_ref().expect("mounts")[1]
            .options()
            .clone();
        assert_eq!(options, Some(vec!["rbind".to_string(), "rro".to_string()]));
    }

    #[test]
    fn what_is_mounted_below_a_read_only_volume_gets_its_own_guest_mount() {
        let json = BASE.replace(
            r#"{"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind", "ro"]}"#,
            r#"{"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "ro"]},
               {"destination": "/all-ro", "type": "bind", "source": "/srv/data", "options": ["rbind", "rro"]}"#,
        );
        let below = |source: &Path| {
            assert_eq!(source, Path::new("/srv/data"));
            vec![PathBuf::from("tmpfs"), PathBuf::from("tmpfs/deeper")]
        };
        let (guest, _) = to_guest(&spec(&json), "t1", Path::new("/s"), None, &below).expect("ok");
        let mounts: Vec<(String, String)> = guest
            .mounts()
            .iter()
            .flatten()
            .map(|m| {
                (
                    m.destination().display().to_string(),
                    m.source()
                        .as_ref()
                        .map(|s| s.display().to_string())
                        .unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            mounts[1..],
            [
                ("/data".to_string(), "/s/t1/mounts/1-data".to_string()),
                (
                    "/data/tmpfs".to_string(),
                    "/s/t1/mounts/1-data/tmpfs".to_string()
                ),
                (
                    "/data/tmpfs/deeper".to_string(),
                    "/s/t1/mounts/1-data/tmpfs/deeper".to_string()
                ),
                // rro covers everything: no mounts of its own below it.
                ("/all-ro".to_string(), "/s/t1/mounts/2-data".to_string()),
            ]
        );
    }

    #[test]
    fn host_only_parts_are_dropped() {
        let (guest, _) = to_guest(&spec(BASE), "t1", Path::new("/s"), None, &none).expect("ok");
        assert!(guest.hooks().is_none());
        let linux = guest.linux().as_ref().expect("linux");
        assert!(linux.cgroups_path().is_none());
        assert!(linux
            .namespaces()
            .as_ref()
            .expect("namespaces")
            .iter()
            .all(|n| n.path().is_none()));
    }

    #[test]
    fn pod_members_join_the_sandbox_containers_namespaces() {
        let json = BASE.replace(
            r#"[{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "network", "path": "/var/run/netns/x"}]"#,
            r#"[{"type": "pid"}, {"type": "ipc", "path": "/proc/99/ns/ipc"},
               {"type": "uts", "path": "/proc/99/ns/uts"}, {"type": "network", "path": "/var/run/netns/x"}]"#,
        );
        let (guest, _) =
            to_guest(&spec(&json), "app", Path::new("/s"), Some(7), &none).expect("ok");
        let ns = guest
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().clone())
            .expect("namespaces");
        let path = |kind| {
            ns.iter()
                .find(|n| n.typ() == kind)
                .and_then(|n| n.path().clone())
        };
        assert_eq!(
            path(LinuxNamespaceType::Ipc),
            Some(PathBuf::from("/proc/7/ns/ipc"))
        );
        assert_eq!(
            path(LinuxNamespaceType::Uts),
            Some(PathBuf::from("/proc/7/ns/uts"))
        );
        assert_eq!(
            path(LinuxNamespaceType::Pid),
            None,
            "no path given: a new pid namespace"
        );
        assert_eq!(
            path(LinuxNamespaceType::Network),
            None,
            "the VM's network namespace"
        );
    }

    #[test]
    fn bad_env_is_refused() {
        for bad in ["=x", "NOVALUE", "A\u{0}B=c"] {
            let json = BASE.replace("\"PATH=/bin\"", &serde_json::to_string(bad).expect("json"));
            let err = to_guest(&spec(&json), "t1", Path::new("/s"), None, &none).expect_err(bad);
            assert!(matches!(err, SpecError::Env(_)), "{err}");
        }
    }

    #[test]
    fn shared_propagation_back_to_the_host_is_refused() {
        for option in ["rshared", "shared"] {
            let json = BASE.replace(r#"["rbind", "ro"]"#, &format!(r#"["rbind", "{option}"]"#));
            let err = to_guest(&spec(&json), "t1", Path::new("/s"), None, &none).expect_err(option);
            assert!(
                matches!(err, SpecError::SharedPropagation { .. }),
                "{option}: {err}"
            );
        }
        let json = BASE.replace(r#"["rbind", "ro"]"#, r#"["rbind", "rslave"]"#);
        assert!(to_guest(&spec(&json), "t1", Path::new("/s"), None, &none).is_ok());
    }

    #[test]
    fn the_last_propagation_option_says_whether_host_mounts_follow() {
        for (options, follows) in [
            (r#"["rbind", "rslave"]"#, true),
            (r#"["rbind", "slave"]"#, true),
            (r#"["rbind"]"#, true),
            (r#"["rbind", "rprivate"]"#, false),
            (r#"["rbind", "private", "ro"]"#, false),
            (r#"["rbind", "rslave", "rprivate"]"#, false),
            (r#"["rbind", "rprivate", "rslave"]"#, true),
            (r#"["rbind", "runbindable"]"#, false),
        ] {
            let json = BASE.replace(r#"["rbind", "ro"]"#, options);
            let (_, binds) =
                to_guest(&spec(&json), "t1", Path::new("/s"), None, &none).expect(options);
            assert_eq!(binds[0].follows_host, follows, "{options}");
        }
    }

    #[test]
    fn the_hosts_ipc_namespace_is_refused() {
        let json = BASE.replace(r#"{"type": "ipc"}, "#, "");
        let err = to_guest(&spec(&json), "t1", Path::new("/s"), None, &none).expect_err("host IPC");
        assert_eq!(err, SpecError::HostIpc);
        assert!(err.to_string().contains("hostIPC"), "{err}");
    }

    #[test]
    fn the_hosts_pid_and_uts_namespaces_are_refused() {
        let json = BASE.replace(r#"{"type": "pid"}, "#, "");
        let err = to_guest(&spec(&json), "t1", Path::new("/s"), None, &none).expect_err("host PID");
        assert_eq!(err, SpecError::HostPid);
        assert!(err.to_string().contains("--pid host"), "{err}");
        let json = BASE.replace(r#"{"type": "uts"}, "#, "");
        let err = to_guest(&spec(&json), "t1", Path::new("/s"), None, &none).expect_err("host UTS");
        assert_eq!(err, SpecError::HostUts);
        assert!(err.to_string().contains("--uts host"), "{err}");
        // With the host's network too (hostNetwork), the network's refusal speaks, later.
        let json = json.replace(r#", {"type": "network", "path": "/var/run/netns/x"}"#, "");
        assert!(to_guest(&spec(&json), "t1", Path::new("/s"), None, &none).is_ok());
    }

    #[test]
    fn sysctls_follow_runcs_rules_before_anything_is_made() {
        let with = |sysctls: &str| {
            BASE.replace(
                r#""cgroupsPath": "/default/t1""#,
                &format!(r#""cgroupsPath": "/default/t1", "sysctl": {sysctls}"#),
            )
        };
        // BASE has network, IPC and UTS namespaces of the container's own.
        let ok = with(r#"{"net.ipv4.ip_forward": "1", "kernel.domainname": "x"}"#);
        let (guest, _) = to_guest(&spec(&ok), "t1", Path::new("/s"), None, &none).expect("net.*");
        let sysctls = guest.linux().as_ref().and_then(|l| l.sysctl().clone());
        assert_eq!(
            sysctls.and_then(|s| s.get("net.ipv4.ip_forward").cloned()),
            Some("1".to_string()),
            "the guest gets them to apply"
        );
        for (sysctls, want) in [
            (
                r#"{"vm.swappiness": "1"}"#,
                "not in a separate kernel namespace",
            ),
            (r#"{"kernel.hostname": "x"}"#, "conflicts with the OCI"),
            (r#"{"../../etc/x": "1"}"#, "not a sysctl name"),
        ] {
            let err = to_guest(&spec(&with(sysctls)), "t1", Path::new("/s"), None, &none)
                .expect_err(sysctls);
            assert!(err.to_string().contains(want), "{sysctls}: {err}");
        }
    }

    #[test]
    fn relative_or_dotdot_destinations_are_refused() {
        for dest in ["relative", "/a/../../etc"] {
            let json = BASE.replace("\"/proc\"", &format!("\"{dest}\""));
            let err = to_guest(&spec(&json), "t1", Path::new("/s"), None, &none).expect_err(dest);
            assert!(matches!(err, SpecError::BadDestination(_)), "{err}");
        }
    }

    #[test]
    fn a_process_is_required() {
        let json = r#"{"ociVersion": "1.0.2", "root": {"path": "rootfs"}}"#;
        assert_eq!(
            to_guest(&spec(json), "t1", Path::new("/s"), None, &none).err(),
            Some(SpecError::NoProcess)
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn path() -> impl Strategy<Value = String> {
            prop::collection::vec(
                prop::sample::select(vec![
                    "/", "..", ".", "a", "b/", "\0", " ", "x/../", "//", "data", "etc/", "c", "d/",
                    "e", "/f",
                ]),
                0..6,
            )
            .prop_map(|parts| parts.concat())
        }

        /// Mostly absolute paths, so that most specs get past the first check.
        fn absolute_mostly() -> impl Strategy<Value = String> {
            prop_oneof![4 => path().prop_map(|p| format!("/{p}")), 1 => path()]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]

            /// Whatever mounts and environment a spec carries, the guest spec either is refused
            /// or keeps every path the host hands the guest inside the container's share dir.
            #[test]
            fn guest_specs_stay_inside_the_share(
                mounts in prop::collection::vec(
                    (absolute_mostly(), absolute_mostly(), any::<bool>(), any::<bool>()),
                    0..5,
                ),
                env in prop::collection::vec(
                    prop_oneof![4 => "[a-z]{1,4}=[a-z=]{0,4}", 1 => "[a-z=\0]{0,6}"],
                    0..4,
                ),
            ) {
                let mounts: Vec<serde_json::Value> = mounts
                    .iter()
                    .map(|(dest, source, bind, ro)| {
                        let mut options = vec![];
                        if *bind { options.push("rbind"); }
                        if *ro { options.push("ro"); }
                        serde_json::json!({"destination": dest, "source": source,
                                           "type": if *bind { "bind" } else { "tmpfs" },
                                           "options": options})
                    })
                    .collect();
                let json = serde_json::json!({
                    "ociVersion": "1.0.2",
                    "process": {"args": ["sh"], "cwd": "/", "env": env, "user": {"uid": 0, "gid": 0}},
                    "root": {"path": "rootfs"},
                    "mounts": mounts,
                    "hooks": {"prestart": [{"path": "/bin/true"}]},
                    "linux": {"cgroupsPath": "/x", "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "network", "path": "/run/netns/p"}]}
                });
                // Every generated spec is valid JSON for the schema: what is tested is what
                // to_guest does with it.
                let spec: Spec = serde_json::from_value(json).expect("a spec");
                let share = Path::new("/run/hako/shared");
                if let Ok((guest, binds)) = to_guest(&spec, "c1", share, None, &none) {
                    let dir = share.join("c1");
                    prop_assert_eq!(guest.root().as_ref().map(|r| r.path().clone()), Some(dir.join("rootfs")));
                    prop_assert!(guest.hooks().is_none());
                    prop_assert!(guest.linux().as_ref().and_then(|l| l.cgroups_path().clone()).is_none());
                    for m in guest.mounts().iter().flatten() {
                        let dest = m.destination();
                        prop_assert!(dest.is_absolute());
                        prop_assert!(!dest.components().any(|c| c.as_os_str() == ".."));
                    }
                    for b in &binds {
                        prop_assert!(!b.name.contains('/') && b.name != "." && b.name != "..", "{}", b.name);
                        prop_assert!(b.host_source.is_absolute());
                        prop_assert!(!b.host_source.components().any(|c| c.as_os_str() == ".."));
                    }
                    let sources: Vec<_> = guest.mounts().iter().flatten().filter(|m| is_bind(m)).filter_map(|m| m.source().clone()).collect();
                    for source in sources {
                        prop_assert!(source.starts_with(dir.join("mounts")), "{}", source.display());
                    }
                }
            }
        }
    }
}
