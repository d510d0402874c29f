//! The share's own mount namespace: where `rw/`, `ro/` and every bind into them live, and what
//! virtiofsd serves from. None of them is in the host's mount namespace, so they never get in
//! the host's way: an unmount or rmdir on the host of a volume's source behaves as under runc,
//! whose copies live in the container's namespace (issue 23). The namespace lives while the
//! shim's descriptor of it does (and QEMU, when it serves 9p from it); virtiofsd sandboxes
//! itself in a copy of it, whose mounts follow the share's. After a shim crash, killing the
//! helpers (`cleanup_on_disk`) takes every mount with them.
//!
//! The shim is multi-threaded and a mount namespace is per thread: each operation runs on a
//! short-lived thread of its own that enters the namespace, so no thread of the runtime ever
//! changes namespace. A mount the host made after the namespace was created is not in it (the
//! host's mounts are mostly private): what the share binds from the host is cloned there first
//! (`mounts::clone_tree`) and attached here.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::mount::MsFlags;
use nix::sched::{setns, unshare, CloneFlags};

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("cannot make the share's mount namespace: {what}: {source}")]
    Make {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot enter the share's mount namespace: {0}")]
    Enter(std::io::Error),
}

/// The share's mount namespace, held by an open descriptor.
pub struct ShareNamespace {
    ns: OwnedFd,
}

impl ShareNamespace {
    /// A new mount namespace, a copy of the shim's in which every mount is a slave: mounts the
    /// host shares reach it, nothing made in it reaches the host.
    #[cfg(test)]
    pub fn new() -> Result<Self, NamespaceError> {
        Self::new_with(|| ()).map(|(ns, ())| ns)
    }

    /// `new`, with `first` run in the namespace by the thread that made it (a thread spawn
    /// fewer on every pod's start than `new` then `run`).
    pub fn new_with<T: Send>(
        first: impl FnOnce() -> T + Send,
    ) -> Result<(Self, T), NamespaceError> {
        let made = std::thread::scope(|s| {
            s.spawn(|| -> Result<(OwnedFd, T), NamespaceError> {
                let make = |what| {
                    move |e: nix::Error| NamespaceError::Make {
                        what,
                        source: e.into(),
                    }
                };
                // A mount namespace is a thread's own only once its filesystem context is.
                unshare(CloneFlags::CLONE_FS | CloneFlags::CLONE_NEWNS).map_err(make("unshare"))?;
                nix::mount::mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    MsFlags::MS_SLAVE | MsFlags::MS_REC,
                    None::<&str>,
                )
                .map_err(make("making / a slave"))?;
                let ns = File::open("/proc/thread-self/ns/mnt")
                    .map(OwnedFd::from)
                    .map_err(|source| NamespaceError::Make {
                        what: "opening /proc/thread-self/ns/mnt",
                        source,
                    })?;
                Ok((ns, first()))
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        });
        let (ns, first) = made?;
        Ok((Self { ns }, first))
    }

    /// Runs `f` in the namespace, on a thread of its own, and returns what it returns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NamespaceError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                unshare(CloneFlags::CLONE_FS).map_err(|e| NamespaceError::Enter(e.into()))?;
                setns(&self.ns, CloneFlags::CLONE_NEWNS)
                    .map_err(|e| NamespaceError::Enter(e.into()))?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// The descriptor a child enters the namespace with (`daemon::Confinement::mountns`).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.ns.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mountinfo() -> String {
        std::fs::read_to_string("/proc/thread-self/mountinfo").expect("mountinfo")
    }

    #[test]
    fn mounts_made_in_it_are_not_the_hosts() {
        let dir = std::env::temp_dir().join(format!("hako-sharens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let ns = ShareNamespace::new().expect("namespace");
        let target = dir.display().to_string();
        let inside = ns
            .run(|| {
                nix::mount::mount(
                    Some("tmpfs"),
                    &dir,
                    Some("tmpfs"),
                    MsFlags::empty(),
                    None::<&str>,
                )
                .expect("tmpfs");
                let seen = mountinfo().contains(&format!(" {target} "));
                std::fs::write(dir.join("f"), "x").expect("write");
                seen
            })
            .expect("run");
        assert!(inside, "the mount is there inside");
        assert!(
            !mountinfo().contains(&format!(" {target} ")),
            "and not on the host"
        );
        assert!(!dir.join("f").exists(), "nor what was written on it");
        drop(ns);
        std::fs::remove_dir(&dir).expect("the host removes the mount point as its own");
    }
}
