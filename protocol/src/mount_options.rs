//! The OCI mount options hako understands, for both sides: the shim refuses a spec whose bind
//! mounts carry an option it does not know (an option that promises protection is honoured or
//! refused, never ignored), and the agent applies them. Recursive options (`rro`, `rnosuid`,
//! ...) are mount attributes set with `mount_setattr(2)` on the whole tree of a bind.

/// What one option does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountOption {
    /// Mount flags (`MS_*`) to set and to clear on the mount itself.
    Flags { set: u64, clear: u64 },
    /// Mount attributes (`MOUNT_ATTR_*`) to set and to clear on the mount and everything
    /// mounted below it.
    Recursive { set: u64, clear: u64 },
    /// A propagation type (`MS_PRIVATE`, ... with `MS_REC` for the `r` forms).
    Propagation(u64),
    /// A bind mount, recursive or not.
    Bind { recursive: bool },
    /// An option that changes nothing for a bind (`defaults`).
    Nothing,
}

pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
pub const MOUNT_ATTR_NOEXEC: u64 = 0x8;
/// The atime bits: one of RELATIME (0), NOATIME, STRICTATIME.
pub const MOUNT_ATTR_ATIME: u64 = 0x70;
pub const MOUNT_ATTR_NOATIME: u64 = 0x10;
pub const MOUNT_ATTR_STRICTATIME: u64 = 0x20;
pub const MOUNT_ATTR_NODIRATIME: u64 = 0x80;
pub const MOUNT_ATTR_NOSYMFOLLOW: u64 = 0x20_0000;

const MS_RDONLY: u64 = 1;
const MS_NOSUID: u64 = 2;
const MS_NODEV: u64 = 4;
const MS_NOEXEC: u64 = 8;
const MS_SYNCHRONOUS: u64 = 16;
const MS_DIRSYNC: u64 = 128;
const MS_NOSYMFOLLOW: u64 = 256;
const MS_NOATIME: u64 = 1024;
const MS_NODIRATIME: u64 = 2048;
const MS_REC: u64 = 16384;
const MS_UNBINDABLE: u64 = 1 << 17;
const MS_PRIVATE: u64 = 1 << 18;
const MS_SLAVE: u64 = 1 << 19;
const MS_SHARED: u64 = 1 << 20;
const MS_RELATIME: u64 = 1 << 21;
const MS_STRICTATIME: u64 = 1 << 24;

use MountOption::*;

const fn flag(set: u64, clear: u64) -> MountOption {
    Flags { set, clear }
}

const fn recursive(set: u64, clear: u64) -> MountOption {
    Recursive { set, clear }
}

/// Every option hako knows, and what it does.
const OPTIONS: &[(&str, MountOption)] = &[
    ("ro", flag(MS_RDONLY, 0)),
    ("rw", flag(0, MS_RDONLY)),
    ("nosuid", flag(MS_NOSUID, 0)),
    ("suid", flag(0, MS_NOSUID)),
    ("nodev", flag(MS_NODEV, 0)),
    ("dev", flag(0, MS_NODEV)),
    ("noexec", flag(MS_NOEXEC, 0)),
    ("exec", flag(0, MS_NOEXEC)),
    ("sync", flag(MS_SYNCHRONOUS, 0)),
    ("async", flag(0, MS_SYNCHRONOUS)),
    ("dirsync", flag(MS_DIRSYNC, 0)),
    ("nosymfollow", flag(MS_NOSYMFOLLOW, 0)),
    ("symfollow", flag(0, MS_NOSYMFOLLOW)),
    ("noatime", flag(MS_NOATIME, 0)),
    ("atime", flag(0, MS_NOATIME)),
    ("nodiratime", flag(MS_NODIRATIME, 0)),
    ("diratime", flag(0, MS_NODIRATIME)),
    ("relatime", flag(MS_RELATIME, 0)),
    ("norelatime", flag(0, MS_RELATIME)),
    ("strictatime", flag(MS_STRICTATIME, 0)),
    ("nostrictatime", flag(0, MS_STRICTATIME)),
    ("rro", recursive(MOUNT_ATTR_RDONLY, 0)),
    ("rrw", recursive(0, MOUNT_ATTR_RDONLY)),
    ("rnosuid", recursive(MOUNT_ATTR_NOSUID, 0)),
    ("rsuid", recursive(0, MOUNT_ATTR_NOSUID)),
    ("rnodev", recursive(MOUNT_ATTR_NODEV, 0)),
    ("rdev", recursive(0, MOUNT_ATTR_NODEV)),
    ("rnoexec", recursive(MOUNT_ATTR_NOEXEC, 0)),
    ("rexec", recursive(0, MOUNT_ATTR_NOEXEC)),
    ("rnodiratime", recursive(MOUNT_ATTR_NODIRATIME, 0)),
    ("rdiratime", recursive(0, MOUNT_ATTR_NODIRATIME)),
    ("rnosymfollow", recursive(MOUNT_ATTR_NOSYMFOLLOW, 0)),
    ("rsymfollow", recursive(0, MOUNT_ATTR_NOSYMFOLLOW)),
    ("rnoatime", recursive(MOUNT_ATTR_NOATIME, MOUNT_ATTR_ATIME)),
    ("ratime", recursive(0, MOUNT_ATTR_ATIME)),
    ("rrelatime", recursive(0, MOUNT_ATTR_ATIME)),
    (
        "rstrictatime",
        recursive(MOUNT_ATTR_STRICTATIME, MOUNT_ATTR_ATIME),
    ),
    ("private", Propagation(MS_PRIVATE)),
    ("rprivate", Propagation(MS_PRIVATE | MS_REC)),
    ("slave", Propagation(MS_SLAVE)),
    ("rslave", Propagation(MS_SLAVE | MS_REC)),
    ("shared", Propagation(MS_SHARED)),
    ("rshared", Propagation(MS_SHARED | MS_REC)),
    ("unbindable", Propagation(MS_UNBINDABLE)),
    ("runbindable", Propagation(MS_UNBINDABLE | MS_REC)),
    ("bind", Bind { recursive: false }),
    ("rbind", Bind { recursive: true }),
    ("defaults", Nothing),
];

/// The option `name`, or `None` when hako does not know it.
pub fn lookup(name: &str) -> Option<MountOption> {
    OPTIONS.iter().find(|(n, _)| *n == name).map(|(_, o)| *o)
}

/// The name of every option hako knows (what it tells containerd it supports).
pub fn names() -> impl Iterator<Item = &'static str> {
    OPTIONS.iter().map(|(n, _)| *n)
}

/// Whether a bind mount's options make it read-only on every level (`rro`, and no `rrw`
/// after it).
pub fn recursively_readonly<S: AsRef<str>>(options: &[S]) -> bool {
    options
        .iter()
        .fold(false, |ro, o| match lookup(o.as_ref()) {
            Some(MountOption::Recursive { set, clear }) => {
                (ro || set & MOUNT_ATTR_RDONLY != 0) && clear & MOUNT_ATTR_RDONLY == 0
            }
            _ => ro,
        })
}

/// The first option of a bind mount hako does not know: such a bind is refused, since the
/// option may promise a protection hako would not give.
pub fn unknown_bind_option<S: AsRef<str>>(options: &[S]) -> Option<&str> {
    options
        .iter()
        .map(AsRef::as_ref)
        .find(|o| lookup(o).is_none())
}

/// `mount_setattr(2)` on `path` (and, with `recursive`, on everything mounted below it).
pub fn mount_setattr(
    path: &std::path::Path,
    recursive: bool,
    set: u64,
    clear: u64,
) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    /// `struct mount_attr`, MOUNT_ATTR_SIZE_VER0.
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    let attr = MountAttr {
        attr_set: set,
        attr_clr: clear,
        propagation: 0,
        userns_fd: 0,
    };
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut flags = libc::AT_SYMLINK_NOFOLLOW as libc::c_uint;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: the path is a live NUL-terminated string and `attr` a live struct of the size
    // passed; the kernel only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c_path.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_known_or_refused() {
        assert_eq!(
            lookup("ro"),
            Some(MountOption::Flags {
                set: MS_RDONLY,
                clear: 0
            })
        );
        assert_eq!(
            lookup("rro"),
            Some(MountOption::Recursive {
                set: MOUNT_ATTR_RDONLY,
                clear: 0
            })
        );
        assert_eq!(
            unknown_bind_option(&["rbind", "rro", "nosuid"]),
            None,
            "known options pass"
        );
        assert_eq!(
            unknown_bind_option(&["rbind", "idmap", "ro"]),
            Some("idmap")
        );
        assert_eq!(unknown_bind_option(&["bind", "size=10m"]), Some("size=10m"));
        assert!(recursively_readonly(&["rbind", "rro"]));
        assert!(!recursively_readonly(&["rbind", "ro"]));
        assert!(!recursively_readonly(&["rro", "rrw"]));
    }
}
