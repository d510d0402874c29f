//! The pod's network namespace on the host: which one it is (never the host's own), and a
//! thread of the shim parked in it for hooks that need a pid there.

use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use super::NetError;

/// A namespace's identity: the device and inode of its nsfs file.
pub fn identity(path: &Path) -> std::io::Result<(u64, u64)> {
    let meta = fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

/// Refuses a network namespace path that names the host's namespace (init's) or the shim's
/// own: the VM would take over the host's interfaces, and the host's network would be the
/// pod's to change.
pub fn refuse_host(path: &Path) -> Result<(), NetError> {
    let given = identity(path).map_err(|e| NetError::Namespace {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    for own in ["/proc/1/ns/net", "/proc/self/ns/net"] {
        if identity(Path::new(own)).is_ok_and(|id| id == given) {
            return Err(NetError::HostNamespace {
                path: path.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Runs `work` on a thread of its own that entered the namespace at `netns`, and waits for it.
/// Namespaces are per thread: the shim's other threads stay where they are, and this one ends
/// with the work, so nothing else ever runs in the pod's namespace by accident. What it makes
/// there stays there: a socket (netlink or IP) or a tap belongs to the namespace it was made in.
/// `what` names the work in errors.
pub fn on_thread_in<T: Send + 'static>(
    netns: &Path,
    what: &str,
    work: impl FnOnce() -> Result<T, NetError> + Send + 'static,
) -> Result<T, NetError> {
    let path = netns.to_path_buf();
    let fail = |reason: String| NetError::Namespace {
        path: netns.to_path_buf(),
        reason: format!("{what}: {reason}"),
    };
    let thread = std::thread::Builder::new()
        .name("netns-work".to_string())
        .spawn(move || -> Result<Result<T, NetError>, String> {
            let ns = fs::File::open(&path).map_err(|e| e.to_string())?;
            setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns: {e}"))?;
            Ok(work())
        })
        .map_err(|e| fail(format!("starting a thread: {e}")))?;
    thread
        .join()
        .map_err(|_| fail("the namespace thread panicked".to_string()))?
        .map_err(fail)?
}

/// A non-blocking IPv4 socket that belongs to the namespace at `netns`.
pub fn socket_in(netns: &Path, kind: SockType) -> Result<OwnedFd, NetError> {
    let path = netns.to_path_buf();
    on_thread_in(netns, "making a socket there", move || {
        socket(
            AddressFamily::Inet,
            kind,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| NetError::Namespace {
            path,
            reason: format!("making a socket there: {e}"),
        })
    })
}

/// A thread of the shim parked in a network namespace. Hooks get its id as the container's
/// pid: Docker's `libnetwork-setkey` and CNI hooks find the namespace as `/proc/<pid>/ns/net`,
/// which names a thread's namespace as well as a process's. No extra process is needed, and the
/// thread never runs anything else.
pub struct NetnsHolder {
    tid: u32,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum HolderTarget {
    /// A new, empty namespace, kept alive by a bind mount on this file.
    New(PathBuf),
    Existing(PathBuf),
}

impl NetnsHolder {
    /// Makes a new network namespace and bind-mounts it at `bind_at` (a file that must not
    /// exist yet; unmounting it and removing it is the caller's cleanup).
    pub fn create(bind_at: &Path) -> Result<Self, NetError> {
        Self::spawn(HolderTarget::New(bind_at.to_path_buf()))
    }

    /// Parks a thread in the namespace at `path`.
    pub fn enter(path: &Path) -> Result<Self, NetError> {
        Self::spawn(HolderTarget::Existing(path.to_path_buf()))
    }

    pub fn pid(&self) -> u32 {
        self.tid
    }

    fn spawn(target: HolderTarget) -> Result<Self, NetError> {
        let path = match &target {
            HolderTarget::New(p) | HolderTarget::Existing(p) => p.clone(),
        };
        let ns_err = |reason: String| NetError::Namespace {
            path: path.clone(),
            reason,
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<u32, String>>();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("netns-holder".to_string())
            .spawn(move || {
                let entered = enter_on_this_thread(&target);
                let tid = nix::unistd::gettid().as_raw() as u32;
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered.map(|()| tid));
                if ok {
                    // Parked until the holder is dropped (the sender goes away).
                    let _ = stop_rx.recv();
                }
            })
            .map_err(|e| ns_err(format!("starting a thread: {e}")))?;
        let mut holder = Self {
            tid: 0,
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(tid)) => {
                holder.tid = tid;
                Ok(holder)
            }
            Ok(Err(reason)) => Err(ns_err(reason)),
            Err(_) => Err(ns_err("the namespace thread died".to_string())),
        }
    }
}

fn enter_on_this_thread(target: &HolderTarget) -> Result<(), String> {
    match target {
        HolderTarget::Existing(path) => {
            let ns = fs::File::open(path).map_err(|e| e.to_string())?;
            setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns: {e}"))
        }
        HolderTarget::New(bind_at) => {
            // Only this thread moves: network namespaces are per task.
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("unshare: {e}"))?;
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(bind_at)
                .map_err(|e| format!("creating the mount point: {e}"))?;
            let bound = nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                bind_at,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            );
            if let Err(e) = bound {
                let _ = fs::remove_file(bind_at);
                return Err(format!("bind-mounting the namespace: {e}"));
            }
            Ok(())
        }
    }
}

impl Drop for NetnsHolder {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Where a test binds a new namespace: unmounted and removed when dropped, so a failing test
/// leaves no mount in the temporary directory.
#[cfg(test)]
pub(crate) struct TestBindPoint(pub PathBuf);

#[cfg(test)]
impl TestBindPoint {
    pub fn new(name: &str) -> Self {
        Self(std::env::temp_dir().join(format!("hako-{name}-{}", std::process::id())))
    }

    /// Detached, as the shim's own cleanup unmounts: a parallel test forking meanwhile holds
    /// copies of this process's fds until its exec, and a plain unmount would fail with EBUSY.
    pub fn release(&self) -> Result<(), String> {
        crate::sandbox::mounts::unmount(&self.0).map_err(|e| e.to_string())?;
        fs::remove_file(&self.0).map_err(|e| format!("removing {}: {e}", self.0.display()))
    }
}

#[cfg(test)]
impl Drop for TestBindPoint {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = self.release();
        }
    }
}

/// Runs `program args` inside the namespace at `netns`, for tests that make or inspect
/// fixtures with `ip`, `tc` or `nft` (the shim itself never spawns these).
#[cfg(test)]
pub(crate) fn command_in(netns: &Path, program: &str, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The kernel's index of the link `name` in the namespace at `netns`, as `ip` shows it.
#[cfg(test)]
pub(crate) fn link_index(netns: &Path, name: &str) -> u32 {
    command_in(netns, "ip", &["-o", "link", "show", name])
        .expect("ip link show")
        .split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .expect("index")
}
