//! OCI mount entries: option strings to mount flags, and destinations resolved inside the
//! container's root without letting symlinks in the image lead outside it.

use std::path::{Component, Path, PathBuf};

use nix::mount::MsFlags;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MountError {
    /// The destination is not an absolute path made of plain components.
    #[error("mount destination {0:?} must be absolute and must not contain '..'")]
    BadDestination(String),
    /// A symlink in the image points outside the container root.
    #[error("mount destination {dest:?} resolves outside the container root through {link:?}")]
    Escapes { dest: String, link: String },
    /// The destination path has too many symlinks.
    #[error("mount destination {0:?} has too many levels of symlinks")]
    SymlinkLoop(String),
}

/// Flags and filesystem data parsed from OCI mount options (the vocabulary both sides share,
/// `hako_protocol::mount_options`).
#[derive(Debug, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: MsFlags,
    /// Options the kernel reads as filesystem data (`mode=`, `size=`, ...), comma-joined. A bind
    /// must have none: an option hako does not know is refused (see `init::mount_one`).
    pub data: String,
    /// `MS_PRIVATE`/`MS_SLAVE`/... to apply after the mount.
    pub propagation: Option<MsFlags>,
    pub bind: bool,
    /// Mount attributes (`MOUNT_ATTR_*`) to set and clear on the whole tree (`rro`, ...).
    pub recursive_set: u64,
    pub recursive_clear: u64,
}

pub fn parse_options<S: AsRef<str>>(options: &[S]) -> MountOptions {
    use hako_protocol::mount_options::{lookup, MountOption};
    let mut out = MountOptions {
        flags: MsFlags::empty(),
        data: String::new(),
        propagation: None,
        bind: false,
        recursive_set: 0,
        recursive_clear: 0,
    };
    let mut data = Vec::new();
    for option in options {
        let option = option.as_ref();
        match lookup(option) {
            Some(MountOption::Flags { set, clear }) => {
                out.flags.remove(MsFlags::from_bits_truncate(clear));
                out.flags.insert(MsFlags::from_bits_truncate(set));
            }
            Some(MountOption::Recursive { set, clear }) => {
                out.recursive_set = (out.recursive_set & !clear) | set;
                out.recursive_clear = (out.recursive_clear & !set) | clear;
            }
            Some(MountOption::Propagation(flags)) => {
                out.propagation = Some(MsFlags::from_bits_truncate(flags));
            }
            Some(MountOption::Bind { recursive }) => {
                out.bind = true;
                out.flags.insert(MsFlags::MS_BIND);
                if recursive {
                    out.flags.insert(MsFlags::MS_REC);
                }
            }
            Some(MountOption::Nothing) => {}
            None => data.push(option),
        }
    }
    out.data = data.join(",");
    out
}

/// Resolves `dest` inside `root` the way the container will see it: each symlink met on the
/// way is followed relative to `root`, and `..` never climbs above it. Returns the host path
/// (in the agent's view) to mount on.
pub fn resolve_in_root(root: &Path, dest: &str) -> Result<PathBuf, MountError> {
    let dest_path = Path::new(dest);
    if !dest_path.is_absolute()
        || dest_path
            .components()
            .any(|c| matches!(c, Component::ParentDir))
    {
        return Err(MountError::BadDestination(dest.to_string()));
    }
    let mut resolved = PathBuf::from("/");
    let mut pending: Vec<std::ffi::OsString> = dest_path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_os_string()),
            _ => None,
        })
        .collect();
    let mut links = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        if name == "." {
            continue;
        }
        let candidate = resolved.join(&name);
        let on_host = root.join(candidate.strip_prefix("/").unwrap_or(&candidate));
        match std::fs::read_link(&on_host) {
            Ok(target) => {
                links += 1;
                if links > 40 {
                    return Err(MountError::SymlinkLoop(dest.to_string()));
                }
                if target.is_absolute() {
                    resolved = PathBuf::from("/");
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => pending.push(n.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            Err(_) => resolved = candidate,
        }
    }
    let host = root.join(resolved.strip_prefix("/").unwrap_or(&resolved));
    if !host.starts_with(root) {
        return Err(MountError::Escapes {
            dest: dest.to_string(),
            link: host.display().to_string(),
        });
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn options_split_into_flags_and_data() {
        let o = parse_options(&["nosuid", "strictatime", "mode=755", "size=65536k"]);
        assert_eq!(o.flags, MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME);
        assert_eq!(o.data, "mode=755,size=65536k");
        assert!(!o.bind);
    }

    #[test]
    fn rbind_ro_is_a_recursive_readonly_bind() {
        let o = parse_options(&["rbind", "ro", "rprivate"]);
        assert!(o.bind);
        assert!(o
            .flags
            .contains(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY));
        assert_eq!(o.propagation, Some(MsFlags::MS_PRIVATE | MsFlags::MS_REC));
    }

    #[test]
    fn recursive_options_are_mount_attributes() {
        use hako_protocol::mount_options::{MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};
        let o = parse_options(&["rbind", "rro", "rnosuid", "size=1m"]);
        assert_eq!(o.recursive_set, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID);
        assert!(!o.flags.contains(MsFlags::MS_RDONLY), "rro is not the flag");
        assert_eq!(o.data, "size=1m", "left for the caller to refuse on a bind");
        let o = parse_options(&["rro", "rrw"]);
        assert_eq!(o.recursive_set & MOUNT_ATTR_RDONLY, 0);
        assert_eq!(o.recursive_clear, MOUNT_ATTR_RDONLY);
    }

    #[test]
    fn later_option_wins() {
        assert!(!parse_options(&["ro", "rw"])
            .flags
            .contains(MsFlags::MS_RDONLY));
    }

    #[test]
    fn destinations_must_be_absolute_and_plain() {
        let root = Path::new("/nonexistent-root");
        assert!(resolve_in_root(root, "relative").is_err());
        assert!(resolve_in_root(root, "/etc/../..").is_err());
        assert_eq!(
            resolve_in_root(root, "/etc/hosts").ok(),
            Some(PathBuf::from("/nonexistent-root/etc/hosts"))
        );
    }

    #[test]
    fn symlinks_stay_inside_the_root() {
        let dir = std::env::temp_dir().join(format!("hako-mounts-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("real")).expect("mkdir");
        symlink("/", dir.join("to-root")).expect("symlink");
        symlink("../../..", dir.join("up")).expect("symlink");
        symlink("real", dir.join("rel")).expect("symlink");
        assert_eq!(
            resolve_in_root(&dir, "/to-root/etc").ok(),
            Some(dir.join("etc"))
        );
        assert_eq!(resolve_in_root(&dir, "/up/etc").ok(), Some(dir.join("etc")));
        assert_eq!(
            resolve_in_root(&dir, "/rel/x").ok(),
            Some(dir.join("real/x"))
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A root whose entries lead everywhere a hostile image could point them; removed on
        /// drop.
        struct HostileRoot(PathBuf);

        impl HostileRoot {
            fn new() -> Self {
                static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let dir = std::env::temp_dir()
                    .join(format!("hako-mounts-prop-{}-{n}", std::process::id()));
                std::fs::create_dir_all(dir.join("real/deeper")).expect("mkdir");
                for (name, target) in [
                    ("to-root", "/"),
                    ("up", "../../.."),
                    ("rel", "real"),
                    ("loop", "loop"),
                    ("dotdot", ".."),
                    ("abs-etc", "/etc/../.."),
                    ("real/deeper/back", "../../up"),
                ] {
                    symlink(target, dir.join(name)).expect("symlink");
                }
                Self(dir)
            }
        }

        impl Drop for HostileRoot {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }

        proptest! {
            /// Whatever path an image's symlinks and a spec's destination make up, the result
            /// stays inside the root (or is refused).
            #[test]
            fn destinations_never_leave_the_root(
                parts in prop::collection::vec(
                    prop::sample::select(vec![
                        "to-root", "up", "rel", "loop", "dotdot", "abs-etc", "real", "deeper",
                        "back", "etc", "..", ".", "x",
                    ]),
                    0..8,
                ),
            ) {
                let root = HostileRoot::new();
                let dest = format!("/{}", parts.join("/"));
                if let Ok(resolved) = resolve_in_root(&root.0, &dest) {
                    prop_assert!(resolved.starts_with(&root.0), "{dest} -> {}", resolved.display());
                }
            }
        }
    }
}
