//! The share: what the guest sees of the host. The sandbox dir's `rw/` (the host writes there)
//! and its read-only mirror `ro/` (the only tree the guest is served), each container's root
//! filesystem and volumes bound into `rw/` with the protections their spec asks for, and the
//! daemon that serves `ro/` (`virtiofsd`).

pub mod namespace;
pub mod virtiofsd;

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

use super::mounts::{self, MountError, RootfsMount};
use super::spec::SharedBind;
use super::{io_err, resolve, Sandbox, SandboxError};
use crate::ids::validate;

/// A container's root filesystem as containerd or Docker hands it over.
pub struct ContainerRootfs<'a> {
    /// Where it is (or is mounted) on the host: `<bundle>/rootfs` or the spec's `root.path`.
    pub dir: &'a Path,
    /// containerd's rootfs mounts; none when the caller mounted it itself.
    pub mounts: &'a [RootfsMount],
    /// The spec's `root.readonly`.
    pub readonly: bool,
}

impl Sandbox {
    pub(super) fn make_share(&mut self) -> Result<(), SandboxError> {
        let p = &self.paths;
        if let Some(parent) = p.dir.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(parent)
                .map_err(io_err("creating", parent))?;
        }
        // Others may pass through (the VMM's user reaches vmm/ and fs.sock), not list.
        fs::DirBuilder::new()
            .mode(0o711)
            .create(&p.dir)
            .map_err(io_err("creating", &p.dir))?;
        // staging/ holds each bind for a moment before it reaches rw/: closed to other users
        // like rw/ and ro/, or any of them could open a volume through it (a Secret under a
        // kubelet directory closed to them, say) while it is staged.
        for dir in [&p.rw, &p.ro, &p.staging] {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(io_err("creating", dir))?;
        }
        // rw/ gets a peer group of its own (private first, so nothing leaks to the host's
        // groups), ro/ is a read-only slave copy of it: mounts added under rw/ later show up in
        // ro/ and in virtiofsd's namespace, but nothing propagates back.
        let (ns, made) = namespace::ShareNamespace::new_with(|| -> Result<(), MountError> {
            mounts::bind(&p.rw, &p.rw, false)?;
            mounts::set_propagation(&p.rw, MsFlags::MS_PRIVATE)?;
            mounts::set_propagation(&p.rw, MsFlags::MS_SHARED)?;
            mounts::bind(&p.rw, &p.ro, true)?;
            mounts::set_propagation(&p.ro, MsFlags::MS_SLAVE)
        })?;
        // Kept even if the binds failed: the teardown unmounts what was made in it.
        self.share_ns = Some(ns);
        made?;
        Ok(())
    }

    fn share_ns(&self) -> Result<&namespace::ShareNamespace, SandboxError> {
        self.share_ns.as_ref().ok_or_else(|| {
            SandboxError::ShareNamespace(namespace::NamespaceError::Enter(std::io::Error::other(
                "the share has no namespace yet",
            )))
        })
    }

    /// Unmounts everything of the share, in its namespace.
    pub(super) fn unmount_share(&self) -> Result<(), SandboxError> {
        let Some(ns) = &self.share_ns else {
            return Ok(());
        };
        ns.run(|| mounts::unmount_all_under(&self.paths.dir))??;
        Ok(())
    }

    /// The share's namespace, for the daemons that serve it.
    pub fn share_ns_fd(&self) -> Option<std::os::fd::RawFd> {
        self.share_ns
            .as_ref()
            .map(namespace::ShareNamespace::raw_fd)
    }

    /// Mounts a container's rootfs (containerd's `rootfs` mounts on `bundle_rootfs`, or nothing
    /// when the caller mounted it there itself, as Docker does) and binds it and the container's
    /// volumes into the share, every bind nosuid and nodev on the host. A read-only root is
    /// read-only on the host too; the mount points the container needs (`targets`: destination
    /// and whether it is a directory) are made in it first. Bind sources are opened without
    /// following what the guest may have planted in the pod's writable volumes and root
    /// filesystems (`resolve`). On error nothing is left.
    pub fn attach_container(
        &mut self,
        container_id: &str,
        rootfs: &ContainerRootfs<'_>,
        binds: &[SharedBind],
        targets: &[(PathBuf, bool)],
    ) -> Result<(), SandboxError> {
        validate("container id", container_id)?;
        if self.containers.contains(container_id) {
            return Err(SandboxError::Exists(container_id.to_string()));
        }
        self.containers.insert(container_id.to_string());
        let result = self.try_attach(container_id, rootfs, binds, targets);
        if result.is_err() {
            self.detach_container(container_id, rootfs.dir, !rootfs.mounts.is_empty());
        }
        result
    }

    fn try_attach(
        &mut self,
        container_id: &str,
        rootfs: &ContainerRootfs<'_>,
        binds: &[SharedBind],
        targets: &[(PathBuf, bool)],
    ) -> Result<(), SandboxError> {
        let bundle_rootfs = rootfs.dir;
        if !rootfs.mounts.is_empty() {
            fs::create_dir_all(bundle_rootfs).map_err(io_err("creating", bundle_rootfs))?;
            mounts::mount_rootfs(rootfs.mounts, bundle_rootfs)?;
        }
        let dir = self.paths.container_dir(container_id);
        // Open every source first: their types say what mount points a read-only root needs.
        let mut sources = Vec::with_capacity(binds.len());
        for b in binds {
            let fd = resolve::open_source(&b.host_source, &self.guest_writable)?;
            let is_dir = fs::metadata(proc_fd(&fd))
                .map_err(io_err("bind source", &b.host_source))?
                .is_dir();
            sources.push((fd, is_dir));
        }
        if rootfs.readonly {
            let mut needed: Vec<(PathBuf, bool)> = targets.to_vec();
            needed.extend(
                binds
                    .iter()
                    .zip(&sources)
                    .map(|(b, (_, is_dir))| (b.destination.clone(), *is_dir)),
            );
            resolve::make_targets(bundle_rootfs, &needed)?;
        } else {
            let root = fs::File::open(bundle_rootfs).map_err(io_err("opening", bundle_rootfs))?;
            self.note_guest_writable(&root);
        }
        // Each source is cloned here, in the host's namespace where it is, and the clones
        // attached in the share's.
        let mut attach = Vec::with_capacity(1 + binds.len());
        attach.push(Attach {
            tree: mounts::clone_tree(bundle_rootfs)?,
            target: dir.join("rootfs"),
            is_dir: true,
            staging: self.paths.staging.join(format!("{container_id}-rootfs")),
            restrict: mounts::Restrict {
                readonly: rootfs.readonly,
                recursive_readonly: false,
                follows_host: false,
            },
        });
        let mounts_dir = dir.join("mounts");
        for (b, (fd, is_dir)) in binds.iter().zip(&sources) {
            if !b.readonly && !b.recursive_readonly && *is_dir {
                self.note_guest_writable(fd);
            }
            attach.push(Attach {
                tree: mounts::clone_tree(&proc_fd(fd))?,
                target: mounts_dir.join(&b.name),
                is_dir: *is_dir,
                staging: self
                    .paths
                    .staging
                    .join(format!("{container_id}-{}", b.name)),
                restrict: mounts::Restrict {
                    readonly: b.readonly,
                    recursive_readonly: b.recursive_readonly,
                    follows_host: b.follows_host,
                },
            });
        }
        self.share_ns()?.run(|| -> Result<(), SandboxError> {
            for a in &attach {
                if let Some(parent) = a.target.parent() {
                    fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
                }
                if a.is_dir {
                    fs::create_dir(&a.target).map_err(io_err("creating", &a.target))?;
                } else {
                    fs::File::create(&a.target).map_err(io_err("creating", &a.target))?;
                }
                mounts::bind_restricted(&a.tree, &a.target, &a.staging, a.restrict)?;
            }
            Ok(())
        })??;
        Ok(())
    }

    /// Remembers a directory the guest can write into, for `resolve::open_source`.
    fn note_guest_writable(&mut self, dir: impl std::os::fd::AsFd) {
        if let Ok(id) = resolve::identity(dir) {
            if !self.guest_writable.contains(&id) {
                self.guest_writable.push(id);
            }
        }
    }

    /// Undoes `attach_container`. Best effort: every step runs, failures are logged.
    pub fn detach_container(
        &mut self,
        container_id: &str,
        bundle_rootfs: &Path,
        rootfs_mounted: bool,
    ) {
        self.containers.remove(container_id);
        self.app_containers.remove(container_id);
        let dir = self.paths.container_dir(container_id);
        let in_share = |f: &(dyn Fn() -> Result<(), MountError> + Sync)| match &self.share_ns {
            Some(ns) => ns.run(f).map_err(SandboxError::from).and_then(|r| Ok(r?)),
            None => Ok(f()?),
        };
        if let Err(e) = in_share(&|| mounts::unmount_all_under(&dir)) {
            log::error!("container {container_id}: {e}");
        }
        if let Err(e) = in_share(&|| mounts::remove_tree(&dir)) {
            log::error!("container {container_id}: {e}");
        }
        if rootfs_mounted {
            if let Err(e) = mounts::unmount_all_under(bundle_rootfs) {
                log::error!("container {container_id}: {e}");
            }
        }
    }
}

/// One bind into the share: a source cloned in the host's namespace, attached at `target` in
/// the share's through `staging` (`mounts::bind_restricted`).
struct Attach {
    tree: std::os::fd::OwnedFd,
    target: PathBuf,
    is_dir: bool,
    staging: PathBuf,
    restrict: mounts::Restrict,
}

/// The path that names an open descriptor: mounting it mounts exactly what was opened.
fn proc_fd(fd: &std::os::fd::OwnedFd) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}
