//! The container's root: its mount, uts, ipc and cgroup namespaces, its mounts (destinations
//! resolved inside the root, `crate::mounts`), /dev, masked and read-only paths, hostname, and
//! `pivot_root` into it.

use std::fs::{self, File};
use std::os::unix::fs::symlink;
use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::statvfs::{statvfs, FsFlags};
use nix::unistd::{chdir, pivot_root, sethostname};
use oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};

use super::devnodes;
use super::error::{io, sys, InitError};
use crate::mounts::{parse_options, resolve_in_root};
use hako_protocol::sysctl;

const DEFAULT_DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Builds the container from `spec`: its namespaces (the network namespace is the VM's), its
/// mounts, masked and read-only paths and hostname, then `pivot_root`s into its root (`finish`
/// makes it read-only).
pub fn enter(spec: &Spec) -> Result<(), InitError> {
    let root = spec.root().as_ref().ok_or(InitError::NoRoot)?;
    let root_path = root.path().clone();

    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    // The network namespace is the VM's own: the pod's interfaces live there, so it is shared.
    // uts and ipc are new, or joined when the spec names one (a pod's sandbox container).
    // A cgroup namespace rooted at the container's own cgroup (joined before the fork), so its
    // /sys/fs/cgroup shows its own limits, as with runc on a cgroup v2 host.
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWCGROUP;
    for (kind, flag) in [
        (LinuxNamespaceType::Uts, CloneFlags::CLONE_NEWUTS),
        (LinuxNamespaceType::Ipc, CloneFlags::CLONE_NEWIPC),
    ] {
        let Some(ns) = namespaces.iter().find(|n| n.typ() == kind) else {
            continue;
        };
        match ns.path() {
            Some(path) => {
                let file = File::open(path).map_err(io(format!("opening {}", path.display())))?;
                setns(&file, flag).map_err(sys(format!("joining {}", path.display())))?;
            }
            None => flags |= flag,
        }
    }
    unshare(flags).map_err(sys("unshare"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("making / private"))?;
    mount(
        Some(&root_path),
        &root_path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys(format!(
        "bind-mounting the root {}",
        root_path.display()
    )))?;

    let mounts = spec.mounts().as_deref().unwrap_or_default();
    for m in mounts {
        mount_one(&root_path, m)?;
    }
    // The guest's devices go only into a /dev the spec mounts afresh, never into an image's.
    let fresh_dev = mounts.iter().any(|m| m.destination() == Path::new("/dev"));
    if fresh_dev {
        populate_dev(&root_path)?;
    }
    if let Some(linux) = spec.linux() {
        devnodes::create(&root_path, linux.devices().as_deref().unwrap_or_default())?;
        if fresh_dev && allows_every_device(linux) {
            devnodes::add_guest_devices(&root_path)?;
        }
        // Before the read-only paths: /proc/sys is one of them.
        let namespaces = sysctl::Namespaces {
            ipc: namespaces
                .iter()
                .any(|n| n.typ() == LinuxNamespaceType::Ipc),
            uts: flags.contains(CloneFlags::CLONE_NEWUTS),
            // The VM's: the pod's own network namespace.
            net: true,
        };
        write_sysctls(&root_path, linux.sysctl().iter().flatten(), namespaces)?;
        for path in linux.masked_paths().as_deref().unwrap_or_default() {
            mask_path(&root_path, path)?;
        }
        for path in linux.readonly_paths().as_deref().unwrap_or_default() {
            readonly_path(&root_path, path)?;
        }
    }
    if flags.contains(CloneFlags::CLONE_NEWUTS) {
        if let Some(hostname) = spec.hostname().as_deref().filter(|h| !h.is_empty()) {
            sethostname(hostname).map_err(sys("sethostname"))?;
        }
    }

    chdir(&root_path).map_err(sys("chdir to root"))?;
    pivot_root(".", ".").map_err(sys("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detaching the old root"))?;
    chdir("/").map_err(sys("chdir /"))?;
    Ok(())
}

/// What is left once the process's terminal is made (`super::console`): the root read-only if
/// the spec wants it.
pub fn finish(spec: &Spec) -> Result<(), InitError> {
    if spec
        .root()
        .as_ref()
        .is_some_and(|r| r.readonly() == Some(true))
    {
        remount_readonly(Path::new("/"))?;
    }
    Ok(())
}

/// A privileged container: its device rules allow every device.
fn allows_every_device(linux: &oci_spec::runtime::Linux) -> bool {
    let rules = linux
        .resources()
        .as_ref()
        .and_then(|r| r.devices().as_deref())
        .unwrap_or_default();
    crate::devices::Rules::from_spec(rules).is_ok_and(|r| r.allows_every_device())
}

/// Sets the spec's sysctls, as runc does, through the container's own /proc: the writes act on
/// the namespaces this process is in now, which are the container's. The /proc mount is found
/// the way it was mounted (`resolve_in_root`) and must be procfs, so an image cannot point the
/// writes anywhere else.
fn write_sysctls<'a>(
    root: &Path,
    sysctls: impl Iterator<Item = (&'a String, &'a String)>,
    namespaces: sysctl::Namespaces,
) -> Result<(), InitError> {
    let mut sysctls = sysctls.peekable();
    if sysctls.peek().is_none() {
        return Ok(());
    }
    let proc = resolve_in_root(root, "/proc")?;
    let is_proc = nix::sys::statfs::statfs(&proc)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::PROC_SUPER_MAGIC);
    if !is_proc {
        return Err(InitError::Sysctl(
            "the container has no /proc mount to set its sysctls through".to_string(),
        ));
    }
    for (name, value) in sysctls {
        sysctl::check(name, value, namespaces).map_err(|e| InitError::Sysctl(e.to_string()))?;
        let file = sysctl::proc_path(name);
        let path = proc.join(file.strip_prefix("/proc").unwrap_or(&file));
        fs::write(&path, value).map_err(io(format!("setting sysctl {name:?}")))?;
    }
    Ok(())
}

fn mount_one(root: &Path, m: &Mount) -> Result<(), InitError> {
    let dest_str = m.destination().to_string_lossy().into_owned();
    let dest = resolve_in_root(root, &dest_str)?;
    let options = parse_options(m.options().as_deref().unwrap_or_default());
    let mut fstype = m.typ().clone().unwrap_or_else(|| "none".to_string());
    let mut source = m
        .source()
        .as_ref()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| fstype.clone());
    let mut data = options.data.clone();

    if options.bind || fstype == "bind" {
        // An option hako does not know may promise a protection it would not give.
        if !data.is_empty() {
            return Err(InitError::MountOption {
                destination: dest_str,
                option: data,
            });
        }
        let source_path = Path::new(&source);
        let is_dir = fs::metadata(source_path)
            .map_err(io(format!("bind source {source} for {dest_str}")))?
            .is_dir();
        make_target(&dest, is_dir)?;
        let bind_flags = MsFlags::MS_BIND | (options.flags & MsFlags::MS_REC);
        mount(
            Some(source_path),
            &dest,
            None::<&str>,
            bind_flags,
            None::<&str>,
        )
        .map_err(sys(format!("bind-mounting {source} on {dest_str}")))?;
        let extra = options.flags - (MsFlags::MS_BIND | MsFlags::MS_REC);
        if !extra.is_empty() {
            mount(
                None::<&str>,
                &dest,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_BIND | extra,
                None::<&str>,
            )
            .map_err(sys(format!("remounting {dest_str}")))?;
        }
        if options.recursive_set != 0 || options.recursive_clear != 0 {
            hako_protocol::mount_options::mount_setattr(
                &dest,
                true,
                options.recursive_set,
                options.recursive_clear,
            )
            .map_err(io(format!("setting recursive attributes on {dest_str}")))?;
        }
    } else {
        if fstype == "cgroup" {
            // The guest runs cgroup v2 only.
            fstype = "cgroup2".to_string();
            source = "cgroup2".to_string();
            data.clear();
        }
        make_target(&dest, true)?;
        let data = (!data.is_empty()).then_some(data.as_str());
        mount(
            Some(source.as_str()),
            &dest,
            Some(fstype.as_str()),
            options.flags,
            data,
        )
        .map_err(sys(format!("mounting {fstype} on {dest_str}")))?;
        // A fresh filesystem has nothing below it: its recursive attributes are its own.
        if options.recursive_set != 0 {
            hako_protocol::mount_options::mount_setattr(&dest, true, options.recursive_set, 0)
                .map_err(io(format!("setting attributes on {dest_str}")))?;
        }
    }
    if let Some(propagation) = options.propagation {
        mount(None::<&str>, &dest, None::<&str>, propagation, None::<&str>)
            .map_err(sys(format!("setting propagation of {dest_str}")))?;
    }
    Ok(())
}

fn make_target(dest: &Path, is_dir: bool) -> Result<(), InitError> {
    if is_dir {
        fs::create_dir_all(dest).map_err(io(format!("mkdir {}", dest.display())))
    } else {
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io(format!("mkdir {}", parent.display())))?;
        }
        if !dest.exists() {
            File::create(dest).map_err(io(format!("creating {}", dest.display())))?;
        }
        Ok(())
    }
}

/// The container's /dev is a fresh tmpfs: give it the usual nodes (bound from the guest's
/// devtmpfs, so no mknod is needed) and the usual links.
fn populate_dev(root: &Path) -> Result<(), InitError> {
    let dev = root.join("dev");
    for name in DEFAULT_DEVICES {
        let target = dev.join(name);
        make_target(&target, false)?;
        let source = Path::new("/dev").join(name);
        mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(sys(format!("binding {}", source.display())))?;
    }
    let links = [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ];
    for (name, target) in links {
        let link = dev.join(name);
        if fs::symlink_metadata(&link).is_err() {
            symlink(target, &link).map_err(io(format!("linking /dev/{name}")))?;
        }
    }
    Ok(())
}

fn mask_path(root: &Path, path: &str) -> Result<(), InitError> {
    let target = resolve_in_root(root, path)?;
    let Ok(meta) = fs::metadata(&target) else {
        return Ok(());
    };
    let result = if meta.is_dir() {
        mount(
            Some("tmpfs"),
            &target,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
    } else {
        mount(
            Some("/dev/null"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    };
    result.map_err(sys(format!("masking {path}")))
}

fn readonly_path(root: &Path, path: &str) -> Result<(), InitError> {
    let target = resolve_in_root(root, path)?;
    if fs::symlink_metadata(&target).is_err() {
        return Ok(());
    }
    mount(
        Some(&target),
        &target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys(format!("binding {path} read-only")))?;
    remount_readonly(&target)
}

fn remount_readonly(target: &Path) -> Result<(), InitError> {
    // A bind remount must repeat the flags the mount already has or it would clear them.
    let current = statvfs(target).map_err(sys(format!("statvfs {}", target.display())))?;
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
    for (st, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
    ] {
        if current.flags().contains(st) {
            flags |= ms;
        }
    }
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
        .map_err(sys(format!("remounting {} read-only", target.display())))
}
