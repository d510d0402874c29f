//! Turning a bare kernel + initramfs into a place where containers can run: read the command
//! line, load the modules (Debian kernels only), leave the initramfs, mount the kernel
//! filesystems and the sandbox share.

use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::unistd::{chdir, chroot};

/// Written by the guest-image build: one module path per line, in load order.
const MODULE_LIST: &str = "/etc/hako/modules";
/// Likewise, the modules a 9p share needs; loaded only for one (and absent from kernels
/// without 9p, such as Debian's cloud kernel).
const MODULE_LIST_9P: &str = "/etc/hako/modules-9p";
const MODULE_DIR: &str = "/lib/modules";

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Moving the root off the initramfs failed.
    #[error("cannot move the root filesystem off the initramfs: {0}")]
    Relocate(String),
    /// A kernel filesystem could not be mounted.
    #[error("cannot mount {what} on {target}: {source}")]
    Mount {
        what: String,
        target: String,
        source: Errno,
    },
    /// A kernel module could not be loaded.
    #[error("cannot load kernel module {module}: {source}")]
    Module { module: String, source: io::Error },
    /// The share did not appear.
    #[error("cannot mount the {kind} share {tag} on {target} after {waited:?}: {source}")]
    Share {
        kind: &'static str,
        tag: String,
        target: String,
        waited: Duration,
        source: Errno,
    },
}

/// The kernel command line, read while still on the initramfs (through a /proc mounted for
/// the moment: the kernel filesystems are mounted for good once the root has moved).
pub fn read_cmdline() -> Result<String, BootError> {
    let proc = Path::new("/proc");
    let _ = fs::create_dir_all(proc);
    mount(
        Some("proc"),
        proc,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|source| BootError::Mount {
        what: "proc".to_string(),
        target: "/proc".to_string(),
        source,
    })?;
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let _ = umount2(proc, MntFlags::MNT_DETACH);
    Ok(cmdline)
}

/// pivot_root(2) refuses to leave the initramfs (the "rootfs" mount), and every container needs
/// pivot_root. So PID 1 moves an empty tmpfs onto `/` and chroots into it, as switch_root does,
/// but copies nothing: the agent keeps running from its file in the initramfs (a container's
/// init re-executes it through /proc/self/exe, which reaches that file from any root), and
/// nothing else in the initramfs is needed once the modules are loaded.
pub fn leave_initramfs() -> Result<(), BootError> {
    let err = |what: &str, e: &dyn std::fmt::Display| BootError::Relocate(format!("{what}: {e}"));
    let new_root = Path::new("/newroot");
    fs::create_dir_all(new_root).map_err(|e| err("mkdir /newroot", &e))?;
    mount(
        Some("tmpfs"),
        new_root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )
    .map_err(|e| err("mount tmpfs", &e))?;
    chdir(new_root).map_err(|e| err("chdir", &e))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| err("move mount", &e))?;
    chroot(".").map_err(|e| err("chroot", &e))?;
    chdir("/").map_err(|e| err("chdir /", &e))?;
    Ok(())
}

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /run and the cgroup2 hierarchy.
pub fn mount_kernel_filesystems() -> Result<(), BootError> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let table: [(&str, &str, &str, MsFlags, Option<&str>); 7] = [
        ("proc", "/proc", "proc", nosuid_nodev_noexec, None),
        ("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("gid=5,mode=0620,ptmxmode=0666"),
        ),
        (
            "shm",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nosuid_nodev_noexec,
            None,
        ),
    ];
    for (source, target, fstype, flags, data) in table {
        let _ = fs::create_dir_all(target);
        match mount(Some(source), target, Some(fstype), flags, data) {
            // The kernel mounts devtmpfs itself when CONFIG_DEVTMPFS_MOUNT is set.
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(source) => {
                return Err(BootError::Mount {
                    what: fstype.to_string(),
                    target: target.to_string(),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// The device carrying the sandbox share, from the kernel command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareKind {
    VirtioFs,
    Virtio9p,
}

impl ShareKind {
    pub fn from_cmdline(cmdline: &str) -> Self {
        match hako_protocol::cmdline_value(cmdline, hako_protocol::CMDLINE_SHARE) {
            Some("9p") => ShareKind::Virtio9p,
            _ => ShareKind::VirtioFs,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            ShareKind::VirtioFs => "virtio-fs",
            ShareKind::Virtio9p => "virtio-9p",
        }
    }
}

/// Loads the modules named in the image's module list, in order, and those of a 9p share when
/// the share is one. Modules that are built in or already loaded are fine.
pub fn load_modules(share: ShareKind) -> Result<usize, BootError> {
    let mut loaded = load_module_list(MODULE_LIST, false)?;
    if share == ShareKind::Virtio9p {
        loaded += load_module_list(MODULE_LIST_9P, true)?;
    }
    // The files are the initramfs's memory, and nothing loads them again.
    let _ = fs::remove_dir_all(MODULE_DIR);
    Ok(loaded)
}

fn load_module_list(list_path: &str, required: bool) -> Result<usize, BootError> {
    let list = match fs::read_to_string(list_path) {
        Ok(list) => list,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !required => return Ok(0),
        Err(source) => {
            let source = if source.kind() == io::ErrorKind::NotFound {
                io::Error::new(
                    source.kind(),
                    "this guest image has no 9p modules; build it from a kernel with 9p (HAKO_KERNEL_META=linux-image-amd64 guest-image/build.sh)",
                )
            } else {
                source
            };
            return Err(BootError::Module {
                module: list_path.to_string(),
                source,
            });
        }
    };
    let mut loaded = 0;
    for line in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = Path::new(MODULE_DIR).join(line);
        let module_err = |source: io::Error| BootError::Module {
            module: line.to_string(),
            source,
        };
        let file = fs::File::open(&path).map_err(module_err)?;
        match finit_module(&file, c"", ModuleInitFlags::empty()) {
            Ok(()) => loaded += 1,
            Err(Errno::EEXIST) => {}
            Err(e) => return Err(module_err(e.into())),
        }
    }
    Ok(loaded)
}

/// Mounts the sandbox share. The device is probed while its module loads, but give it a short,
/// bounded time in case the probe is still running.
pub fn mount_share(kind: ShareKind, tag: &str, target: &str) -> Result<(), BootError> {
    fs::create_dir_all(target).map_err(|e| BootError::Share {
        kind: kind.describe(),
        tag: tag.to_string(),
        target: target.to_string(),
        waited: Duration::ZERO,
        source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    })?;
    let started = Instant::now();
    let budget = Duration::from_secs(5);
    // 9p: the Linux client's 9P2000.L dialect, a large message size, and `cache=mmap` so that
    // programs can be mapped (executables, shared libraries) while data is not cached.
    let (fstype, data) = match kind {
        ShareKind::VirtioFs => ("virtiofs", None),
        ShareKind::Virtio9p => (
            "9p",
            Some(format!(
                "trans=virtio,version=9p2000.L,msize={},cache=mmap",
                hako_protocol::NINEP_MSIZE
            )),
        ),
    };
    loop {
        // nodev: device nodes in the share must never work in the guest. The share keeps suid
        // bits working (images rely on them); the host side is read-only for the top level.
        match mount(
            Some(tag),
            target,
            Some(fstype),
            MsFlags::MS_NODEV,
            data.as_deref(),
        ) {
            Ok(()) => return Ok(()),
            Err(e @ (Errno::ENOENT | Errno::ENODEV | Errno::EINVAL))
                if started.elapsed() < budget =>
            {
                log::debug!("share {tag} not ready yet ({e}), retrying");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) => {
                return Err(BootError::Share {
                    kind: kind.describe(),
                    tag: tag.to_string(),
                    target: target.to_string(),
                    waited: started.elapsed(),
                    source,
                })
            }
        }
    }
}

/// Sets the guest's wall clock to the host's (`now_unix_ns`, 0 for none) and credits `entropy`
/// to the kernel's pool: a VM restored from a template resumes with the template's clock and
/// the same pool as every other clone (the kernel reseeds on its own too, through vmgenid).
pub fn take_host_clock_and_entropy(now_unix_ns: i64, entropy: &[u8]) -> Result<(), String> {
    if entropy.len() > hako_protocol::MAX_ENTROPY {
        return Err(format!(
            "{} bytes of entropy, above {}",
            entropy.len(),
            hako_protocol::MAX_ENTROPY
        ));
    }
    if now_unix_ns > 0 {
        let now =
            nix::sys::time::TimeSpec::new(now_unix_ns / 1_000_000_000, now_unix_ns % 1_000_000_000);
        nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, now)
            .map_err(|e| format!("setting the clock: {e}"))?;
    }
    if !entropy.is_empty() {
        add_entropy(entropy).map_err(|e| format!("adding entropy: {e}"))?;
    }
    Ok(())
}

/// RNDADDENTROPY: mixes `bytes` into the pool and credits them (the host's getrandom output);
/// then RNDRESEEDCRNG.
fn add_entropy(bytes: &[u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut request = Vec::with_capacity(8 + bytes.len());
    request.extend(((bytes.len() * 8) as i32).to_ne_bytes());
    request.extend((bytes.len() as i32).to_ne_bytes());
    request.extend(bytes);
    // Whole words for the kernel's buf[].
    request.resize(8 + bytes.len().div_ceil(4) * 4, 0);
    let random = fs::OpenOptions::new().write(true).open("/dev/random")?;
    // _IOW('R', 0x03, int[2])
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    // SAFETY: the request is a rand_pool_info whose buf_size bytes follow its header, in a
    // buffer we own that outlives the call.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, request.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // A ready generator takes credited bytes in at its next scheduled reseed, seconds away: a
    // VM restored without a generation id (Cloud Hypervisor) would hand out its template's
    // stream until then. RNDRESEEDCRNG reseeds it from the pool now, before any container.
    // _IO('R', 0x07)
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    // SAFETY: an ioctl without an argument on a descriptor we own.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Milliseconds since the kernel booted (CLOCK_BOOTTIME), for the start-phase log.
pub fn ms_since_boot() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|ts| ts.tv_sec() as u64 * 1000 + ts.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_kind_comes_from_the_cmdline() {
        assert_eq!(
            ShareKind::from_cmdline("quiet hako.share=9p hako.log=info"),
            ShareKind::Virtio9p
        );
        assert_eq!(ShareKind::from_cmdline("quiet"), ShareKind::VirtioFs);
        assert_eq!(
            ShareKind::from_cmdline("hako.share=virtiofs"),
            ShareKind::VirtioFs
        );
    }
}
