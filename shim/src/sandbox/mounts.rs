//! Host mount operations for the sandbox dir. Unmounts never follow symlinks, removal never
//! crosses a mount, and everything under a sandbox dir can be found again from
//! /proc/self/mountinfo when the shim that made it is gone.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A mount system call failed.
    #[error("mount {what} on {target}: {source}")]
    Mount {
        what: String,
        target: PathBuf,
        source: Errno,
    },
    /// An unmount failed.
    #[error("unmount {target}: {source}")]
    Unmount { target: PathBuf, source: Errno },
    /// A directory could not be made or removed.
    #[error("{what} {path}: {source}")]
    Dir {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// Something is still mounted below a directory we were asked to remove.
    #[error("refusing to remove {0}: something is still mounted below it")]
    StillMounted(PathBuf),
}

/// One entry of containerd's rootfs mounts (its `Mount` message), as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsMount {
    pub fstype: String,
    pub source: String,
    pub options: Vec<String>,
}

fn mount_err(what: impl Into<String>, target: &Path) -> impl FnOnce(Errno) -> MountError {
    let what = what.into();
    let target = target.to_path_buf();
    move |source| MountError::Mount {
        what,
        target,
        source,
    }
}

/// Splits mount options into flags and filesystem data.
pub fn split_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        match option.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "relatime" | "defaults" => {}
            other => data.push(other.to_string()),
        }
    }
    (flags, data.join(","))
}

/// Mounts containerd's rootfs mounts, in order, on `target`.
pub fn mount_rootfs(mounts: &[RootfsMount], target: &Path) -> Result<(), MountError> {
    for m in mounts {
        let (flags, data) = split_options(&m.options);
        let fstype = (!m.fstype.is_empty() && m.fstype != "bind").then_some(m.fstype.as_str());
        let flags = if m.fstype == "bind" {
            flags | MsFlags::MS_BIND
        } else {
            flags
        };
        let data = (!data.is_empty()).then_some(data.as_str());
        mount(
            Some(m.source.as_str()),
            target,
            fstype,
            flags & !MsFlags::MS_RDONLY,
            data,
        )
        .map_err(mount_err(format!("{} rootfs", m.fstype), target))?;
        if flags.contains(MsFlags::MS_BIND) && flags.contains(MsFlags::MS_RDONLY) {
            remount_readonly(target)?;
        } else if flags.contains(MsFlags::MS_RDONLY) {
            mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                data,
            )
            .map_err(mount_err("read-only rootfs", target))?;
        }
    }
    Ok(())
}

pub fn bind(source: &Path, target: &Path, readonly: bool) -> Result<(), MountError> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(mount_err(format!("bind of {}", source.display()), target))?;
    if readonly {
        remount_readonly(target)?;
    }
    Ok(())
}

pub fn remount_readonly(target: &Path) -> Result<(), MountError> {
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(mount_err("read-only remount", target))
}

/// How a bind into the share is restricted on the host, beyond nosuid and nodev.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restrict {
    /// The mount itself read-only (`ro`).
    pub readonly: bool,
    /// Every level read-only (`rro`).
    pub recursive_readonly: bool,
    /// A slave of the source's peer group (`rslave`): mounts the host makes or removes below
    /// the source later reach every copy, and nothing flows back. Otherwise private.
    pub follows_host: bool,
}

/// A detached copy of the mount tree at `source` (what is mounted below it included), made in
/// the calling thread's mount namespace: the host's, where the source is. It keeps the source's
/// peer group, so `bind_restricted` can still make it a slave of it.
pub fn clone_tree(source: &Path) -> Result<OwnedFd, MountError> {
    let path = c_path(source, "clone")?;
    // SAFETY: open_tree(2) reads the NUL-terminated path; the descriptor it returns is ours.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_RECURSIVE as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(MountError::Mount {
            what: "clone".to_string(),
            target: source.to_path_buf(),
            source: Errno::last(),
        });
    }
    // SAFETY: a new descriptor, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `path` for a system call; a path with a NUL in it is refused as `what` on it.
fn c_path(path: &Path, what: &str) -> Result<std::ffi::CString, MountError> {
    std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| MountError::Mount {
        what: format!("{what} of a path with a NUL"),
        target: path.to_path_buf(),
        source: Errno::EINVAL,
    })
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// Attaches a detached tree (`clone_tree`) at `target`, in the calling thread's namespace.
fn attach_tree(tree: &OwnedFd, target: &Path) -> Result<(), MountError> {
    let to = c_path(target, "attach")?;
    // SAFETY: move_mount(2) reads the two NUL-terminated paths; it takes no ownership.
    let done = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if done < 0 {
        return Err(MountError::Mount {
            what: "attach of a cloned tree".to_string(),
            target: target.to_path_buf(),
            source: Errno::last(),
        });
    }
    Ok(())
}

/// Attaches `tree` (a `clone_tree` of a bind's source) at `target` with nosuid and nodev on
/// every level, so nothing the guest plants works on the host, and read-only as `how` says. A
/// bind copies a mount's flags but a remount does not propagate, so the flags are set on the
/// tree attached in `staging` first, cut off from the source's peer group (private, or a slave
/// that only receives); the bind under `rw/` then carries flags and propagation into every copy
/// (`ro/`, virtiofsd's namespace). A mount the host adds below a followed source later has the
/// host's own flags, in the copies as at the source: the host made it. Runs in the share's
/// namespace.
pub fn bind_restricted(
    tree: &OwnedFd,
    target: &Path,
    staging: &Path,
    how: Restrict,
) -> Result<(), MountError> {
    let is_dir = nix::sys::stat::fstat(tree)
        .map_err(|e| MountError::Dir {
            what: "bind source",
            path: target.to_path_buf(),
            source: e.into(),
        })
        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)?;
    let made = if is_dir {
        fs::create_dir_all(staging)
    } else {
        fs::File::create(staging).map(drop)
    };
    made.map_err(|e| MountError::Dir {
        what: "creating",
        path: staging.to_path_buf(),
        source: e,
    })?;
    let result = (|| {
        attach_tree(tree, staging)?;
        let cut_off = if how.follows_host {
            MsFlags::MS_SLAVE
        } else {
            MsFlags::MS_PRIVATE
        };
        set_propagation(staging, cut_off | MsFlags::MS_REC)?;
        use hako_protocol::mount_options as mo;
        let mut every_level = mo::MOUNT_ATTR_NOSUID | mo::MOUNT_ATTR_NODEV;
        if how.recursive_readonly {
            every_level |= mo::MOUNT_ATTR_RDONLY;
        }
        let attr_err = |what: &str| {
            let what = what.to_string();
            move |e: io::Error| MountError::Mount {
                what,
                target: staging.to_path_buf(),
                source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            }
        };
        mo::mount_setattr(staging, true, every_level, 0).map_err(attr_err("nosuid, nodev"))?;
        if how.readonly {
            mo::mount_setattr(staging, false, mo::MOUNT_ATTR_RDONLY, 0)
                .map_err(attr_err("read-only"))?;
        }
        bind(staging, target, false)
    })();
    let cleanup = unmount(staging);
    if is_dir {
        let _ = fs::remove_dir(staging);
    } else {
        let _ = fs::remove_file(staging);
    }
    result?;
    cleanup
}

pub fn set_propagation(target: &Path, flags: MsFlags) -> Result<(), MountError> {
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
        .map_err(mount_err(format!("propagation {flags:?}"), target))
}

/// Unmounts `target` without following a symlink in its last component; a target that is not
/// mounted (or is gone) is fine.
pub fn unmount(target: &Path) -> Result<(), MountError> {
    match umount2(target, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
        Err(source) => Err(MountError::Unmount {
            target: target.to_path_buf(),
            source,
        }),
    }
}

/// Decodes the octal escapes mountinfo uses for space, tab, newline and backslash.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every mount point of the calling thread's mount namespace (the host's, or the share's), in
/// the order they were mounted.
pub fn mount_points() -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/thread-self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| line.split(' ').nth(4).map(unescape))
        .map(PathBuf::from)
        .collect()
}

/// Mount points at or below `dir`, deepest (most recently mounted) first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|p| p.starts_with(dir))
        .collect();
    // mountinfo lists in mount order; undo in reverse, and deeper paths before their parents.
    found.reverse();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// Unmounts everything at or below `dir`.
pub fn unmount_all_under(dir: &Path) -> Result<(), MountError> {
    // A path may be mounted more than once (stacked); repeat until mountinfo shows none.
    for _ in 0..16 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return Ok(());
        }
        for m in mounts {
            unmount(&m)?;
        }
    }
    if mounts_under(dir).is_empty() {
        Ok(())
    } else {
        Err(MountError::StillMounted(dir.to_path_buf()))
    }
}

/// Removes `dir` and everything in it, refusing to descend into anything on another
/// filesystem (a mount that is still there), so a forgotten mount never loses its contents.
pub fn remove_tree(dir: &Path) -> Result<(), MountError> {
    let meta = match fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(MountError::Dir {
                what: "stat",
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    if !mounts_under(dir).is_empty() {
        return Err(MountError::StillMounted(dir.to_path_buf()));
    }
    remove_same_device(dir, meta.dev())
}

fn remove_same_device(path: &Path, dev: u64) -> Result<(), MountError> {
    let err = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| MountError::Dir { what, path, source }
    };
    let meta = fs::symlink_metadata(path).map_err(err("stat", path))?;
    if meta.dev() != dev {
        return Err(MountError::StillMounted(path.to_path_buf()));
    }
    if meta.is_dir() {
        for entry in fs::read_dir(path).map_err(err("read", path))? {
            let entry = entry.map_err(err("read", path))?;
            remove_same_device(&entry.path(), dev)?;
        }
        fs::remove_dir(path).map_err(err("remove", path))
    } else {
        fs::remove_file(path).map_err(err("remove", path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_become_flags_and_data() {
        let (flags, data) = split_options(&[
            "ro".into(),
            "index=off".into(),
            "lowerdir=/a:/b".into(),
            "nodev".into(),
        ]);
        assert_eq!(flags, MsFlags::MS_RDONLY | MsFlags::MS_NODEV);
        assert_eq!(data, "index=off,lowerdir=/a:/b");
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape("/run/a\\040b"), "/run/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/tail\\"), "/tail\\");
    }

    #[test]
    fn remove_tree_removes_the_link_not_its_target() {
        let dir = std::env::temp_dir().join(format!("hako-rm-{}", std::process::id()));
        let outside = std::env::temp_dir().join(format!("hako-rm-outside-{}", std::process::id()));
        fs::create_dir_all(dir.join("a/b")).expect("mkdir");
        fs::create_dir_all(&outside).expect("mkdir");
        fs::write(dir.join("a/b/f"), "x").expect("write");
        fs::write(outside.join("marker"), "keep").expect("write");
        std::os::unix::fs::symlink(&outside, dir.join("a/link")).expect("symlink");
        remove_tree(&dir).expect("remove");
        assert!(!dir.exists());
        assert_eq!(
            fs::read_to_string(outside.join("marker")).expect("marker kept"),
            "keep"
        );
        fs::remove_dir_all(&outside).expect("cleanup");
    }
}
