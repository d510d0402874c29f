//! Host paths the guest could have changed, resolved without trusting what it planted there.
//!
//! The guest writes, through virtiofsd, into read-write volumes and container root filesystems
//! on the host. A symlink it plants there must never lead the host elsewhere: `open_source`
//! walks a bind source one component at a time (`O_PATH|O_NOFOLLOW`), follows symlinks only in
//! directories the guest cannot write, and hands back a descriptor that is then bound through
//! `/proc/self/fd`, so nothing can be swapped between the check and the mount.
//! `make_targets` creates mount points inside a container's root filesystem with `openat2`'s
//! `RESOLVE_IN_ROOT`, so a symlink in the image resolves inside the root, as it will for the
//! container.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, Mode, SFlag};

/// A directory's identity: device and inode.
pub type Identity = (u64, u64);

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// A symlink sits where the guest could have put it.
    #[error("bind source {path}: {link} is a symlink in a directory the guest can write; hako does not follow it")]
    PlantedSymlink { path: PathBuf, link: PathBuf },
    #[error("bind source {path}: too many levels of symlinks")]
    Loop { path: PathBuf },
    #[error("{what} {path}: {source}")]
    Sys {
        what: &'static str,
        path: PathBuf,
        source: Errno,
    },
}

fn sys(what: &'static str, path: &Path) -> impl FnOnce(Errno) -> ResolveError {
    let path = path.to_path_buf();
    move |source| ResolveError::Sys { what, path, source }
}

/// The identity of an open file.
pub fn identity(fd: impl AsFd) -> Result<Identity, Errno> {
    let st = fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

fn open_in(dir: &OwnedFd, name: &OsStr, path: &Path) -> Result<OwnedFd, ResolveError> {
    let c_name = CString::new(name.as_bytes()).map_err(|_| ResolveError::Sys {
        what: "opening",
        path: path.to_path_buf(),
        source: Errno::EINVAL,
    })?;
    // SAFETY: openat on a live directory fd with a NUL-terminated name; the result is checked
    // and owned below.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c_name.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(sys("opening", path)(Errno::last()));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens `path` (absolute, no `..`) as an `O_PATH` descriptor, refusing to follow a symlink
/// inside any of the `guest_writable` directories (read-write volumes, root filesystems).
pub fn open_source(path: &Path, guest_writable: &[Identity]) -> Result<OwnedFd, ResolveError> {
    let root = nix::fcntl::open(
        "/",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(sys("opening", Path::new("/")))?;
    let root_id = identity(&root).map_err(sys("stat", Path::new("/")))?;
    // The directories walked so far, from `/`: the current one is the last.
    let mut chain: Vec<(OwnedFd, Identity)> = vec![(root, root_id)];
    let mut pending: Vec<OsString> = components(path).into_iter().rev().collect();
    let mut walked = PathBuf::from("/");
    let mut links = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            if chain.len() > 1 {
                chain.pop();
                walked.pop();
            }
            continue;
        }
        let inside = chain.iter().any(|(_, id)| guest_writable.contains(id));
        let (dir, _) = chain.last().ok_or_else(|| ResolveError::Loop {
            path: path.to_path_buf(),
        })?;
        let next = open_in(dir, &name, &walked.join(&name))?;
        let st = fstat(&next).map_err(sys("stat", &walked.join(&name)))?;
        if SFlag::from_bits_truncate(st.st_mode & libc::S_IFMT) == SFlag::S_IFLNK {
            if inside {
                return Err(ResolveError::PlantedSymlink {
                    path: path.to_path_buf(),
                    link: walked.join(&name),
                });
            }
            links += 1;
            if links > 40 {
                return Err(ResolveError::Loop {
                    path: path.to_path_buf(),
                });
            }
            let target = nix::fcntl::readlinkat(dir, name.as_os_str())
                .map_err(sys("reading the link", &walked.join(&name)))?;
            let target = PathBuf::from(target);
            if target.is_absolute() {
                chain.truncate(1);
                walked = PathBuf::from("/");
            }
            pending.extend(components(&target).into_iter().rev());
            continue;
        }
        walked.push(&name);
        if pending.is_empty() {
            return Ok(next);
        }
        chain.push((next, (st.st_dev, st.st_ino)));
    }
    // `path` was `/` (or only `..` and `.`): the root itself.
    let (root, _) = chain.swap_remove(0);
    Ok(root)
}

/// The normal components of a path, `..` kept as itself.
fn components(path: &Path) -> Vec<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// The path a descriptor refers to, as the kernel names it.
pub fn fd_path(fd: &OwnedFd) -> PathBuf {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// Makes each mount point `(destination, is_dir)` inside the root filesystem `root` as the
/// container will see it (symlinks resolve inside `root`), the missing parents included. What
/// exists is left alone.
pub fn make_targets(root: &Path, targets: &[(PathBuf, bool)]) -> Result<(), ResolveError> {
    let root_fd = nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(sys("opening", root))?;
    for (destination, is_dir) in targets {
        let parts = components(destination);
        if parts.iter().any(|p| p == "..") {
            continue;
        }
        let mut sofar = PathBuf::new();
        for (i, part) in parts.iter().enumerate() {
            let parent = sofar.clone();
            sofar.push(part);
            let last = i + 1 == parts.len();
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
            match openat2(&root_fd, sofar.as_path(), how) {
                Ok(_) => continue,
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(sys("opening", &root.join(&sofar))(e)),
            }
            let parent_how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
            let parent_path = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent.as_path()
            };
            let dir = openat2(&root_fd, parent_path, parent_how)
                .map_err(sys("opening", &root.join(&parent)))?;
            // O_PATH descriptors cannot be written through: reopen the directory.
            let dir = nix::fcntl::openat(
                &dir,
                ".",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(sys("opening", &root.join(&parent)))?;
            let created = if last && !is_dir {
                nix::fcntl::openat(
                    &dir,
                    part.as_os_str(),
                    OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_WRONLY
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o644),
                )
                .map(drop)
            } else {
                nix::sys::stat::mkdirat(&dir, part.as_os_str(), Mode::from_bits_truncate(0o755))
            };
            match created {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(sys("creating", &root.join(&sofar))(e)),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hako-resolve-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn symlinks_the_guest_could_plant_are_not_followed() {
        let dir = scratch("planted");
        let volume = dir.join("app");
        fs::create_dir_all(volume.join("real")).expect("mkdir");
        fs::create_dir_all(dir.join("secret")).expect("mkdir");
        fs::write(dir.join("secret/key"), "k").expect("write");
        // The guest replaced config with a link to a host directory.
        symlink(dir.join("secret"), volume.join("config")).expect("symlink");
        // An operator's own link, outside any volume.
        symlink(&volume, dir.join("app-link")).expect("symlink");

        let app = fs::File::open(&volume).expect("open");
        let writable = [identity(&app).expect("id")];
        let err = open_source(&volume.join("config"), &writable).expect_err("planted");
        assert!(matches!(err, ResolveError::PlantedSymlink { .. }), "{err}");
        let err = open_source(&volume.join("config/key"), &writable).expect_err("planted");
        assert!(matches!(err, ResolveError::PlantedSymlink { .. }), "{err}");
        // Through the operator's link the same volume is found, and its plain directory is
        // fine; outside any volume, links are followed as usual.
        let real = open_source(&dir.join("app-link/real"), &writable).expect("real");
        assert_eq!(fd_path(&real), volume.join("real"));
        let followed = open_source(&volume.join("config/key"), &[]).expect("not a volume");
        assert_eq!(fd_path(&followed), dir.join("secret/key"));
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn mount_targets_stay_inside_the_root() {
        let dir = scratch("targets");
        let root = dir.join("rootfs");
        fs::create_dir_all(root.join("etc")).expect("mkdir");
        // Links in the image that point out of it resolve inside it.
        symlink("/", root.join("escape")).expect("symlink");
        symlink("../../../..", root.join("up")).expect("symlink");
        make_targets(
            &root,
            &[
                (PathBuf::from("/data/deep"), true),
                (PathBuf::from("/etc/hostname"), false),
                (PathBuf::from("/escape/outside"), true),
                (PathBuf::from("/up/also-outside"), false),
            ],
        )
        .expect("made");
        assert!(root.join("data/deep").is_dir());
        assert!(root.join("etc/hostname").is_file());
        assert!(root.join("outside").is_dir(), "resolved inside the root");
        assert!(root.join("also-outside").is_file());
        assert!(!dir.join("outside").exists() && !Path::new("/outside").exists());
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
