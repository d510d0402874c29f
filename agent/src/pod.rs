//! The pod init: what a pod without a pause container (containerd's Sandbox API) gets in its
//! place. A process named `/pause` is PID 1 of the pod's PID namespace, in IPC and UTS
//! namespaces of its own; the pod's containers join them as they would join pause's. The
//! pod's /etc/hostname, /etc/hosts, /etc/resolv.conf and /dev/shm are kept in the guest
//! (`GUEST_POD_DIR`), so nothing a container writes there reaches the host.
//!
//! The agent clones the pod init straight into its namespaces and execs itself there as
//! `/pause` (`spawn`).

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use hako_protocol::{sysctl, GUEST_POD_DIR, MAX_POD_FILE, POD_INIT_NAME};
use nix::mount::{mount, MsFlags};
use nix::sched::{clone, CloneFlags};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Most sysctls a pod may set.
const MAX_SYSCTLS: usize = 128;
/// The pod's /dev/shm when the host asks for none: CRI's default.
const DEFAULT_SHM: u64 = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("pod init: {0}")]
    Invalid(String),
    #[error("pod init: {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PodError {
    let what = what.into();
    move |source| PodError::Io { what, source }
}

/// Writes the pod's files, mounts its /dev/shm and starts its init. Returns the init's pid.
pub fn start(hostname: &str, pod: &hako_protocol::PodInit) -> Result<u32, PodError> {
    check(hostname, pod)?;
    let dir = Path::new(GUEST_POD_DIR);
    fs::create_dir_all(dir).map_err(io(GUEST_POD_DIR))?;
    let hostname_line = format!("{hostname}\n");
    let files: [(&str, &[u8]); 3] = [
        ("hostname", hostname_line.as_bytes()),
        ("hosts", &pod.hosts),
        ("resolv.conf", &pod.resolv_conf),
    ];
    for (name, bytes) in files {
        let path = dir.join(name);
        fs::write(&path, bytes).map_err(io(path.display().to_string()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
            .map_err(io(path.display().to_string()))?;
    }
    let shm = dir.join("shm");
    fs::create_dir_all(&shm).map_err(io(shm.display().to_string()))?;
    let size = if pod.shm_size == 0 {
        DEFAULT_SHM
    } else {
        pod.shm_size
    };
    mount(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(format!("mode=1777,size={size}").as_str()),
    )
    .map_err(|e| PodError::Io {
        what: format!("mount {}", shm.display()),
        source: e.into(),
    })?;
    spawn(hostname, pod)
}

fn check(hostname: &str, pod: &hako_protocol::PodInit) -> Result<(), PodError> {
    if hostname.len() > 64 || hostname.bytes().any(|b| b == 0 || b == b'\n') {
        return Err(PodError::Invalid(format!("hostname {hostname:?}")));
    }
    if pod.hosts.len() > MAX_POD_FILE || pod.resolv_conf.len() > MAX_POD_FILE {
        return Err(PodError::Invalid(format!(
            "a pod file is larger than {MAX_POD_FILE} bytes"
        )));
    }
    if pod.sysctls.len() > MAX_SYSCTLS {
        return Err(PodError::Invalid(format!(
            "more than {MAX_SYSCTLS} sysctls"
        )));
    }
    let all = sysctl::Namespaces {
        ipc: true,
        uts: true,
        net: true,
    };
    for (name, value) in &pod.sysctls {
        sysctl::check(name, value, all).map_err(|e| PodError::Invalid(e.to_string()))?;
    }
    Ok(())
}

/// Starts the pod init with one `clone` and one exec: the child is made in new PID, IPC and UTS
/// namespaces (PID 1 of its own), sets the hostname and sysctls there and execs the agent as
/// `/pause`. Under emulation every exec of the agent costs tens of milliseconds, so there is no
/// helper in between. A failure before the exec comes back through a close-on-exec pipe (the
/// step and its errno); a successful exec closes the pipe with nothing written.
fn spawn(hostname: &str, pod: &hako_protocol::PodInit) -> Result<u32, PodError> {
    let cstr =
        |s: &str| CString::new(s).map_err(|_| PodError::Invalid(format!("{s:?} holds a NUL")));
    // Everything the child needs is made here: between clone and exec it only makes system
    // calls (the agent has other threads; the child must not allocate or take a lock).
    let exe = cstr("/proc/self/exe")?;
    let name = cstr(POD_INIT_NAME)?;
    let devnull = cstr("/dev/null")?;
    let argv = [name.as_ptr(), std::ptr::null()];
    let host = hostname.as_bytes().to_vec();
    let mut sysctls = Vec::with_capacity(pod.sysctls.len());
    for (key, value) in &pod.sysctls {
        let path = cstr(&sysctl::proc_path(key).to_string_lossy())?;
        sysctls.push((path, value.as_bytes().to_vec()));
    }
    let (report_r, report_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| PodError::Io {
            what: "pipe".into(),
            source: e.into(),
        })?;
    let report = report_w.as_raw_fd();
    let mut stack = vec![0u8; 64 * 1024];
    let child = Box::new(|| -> isize {
        // SAFETY: system calls on memory prepared before clone; nothing allocates.
        unsafe {
            let fail = |step: u8| -> isize {
                let errno = *libc::__errno_location();
                let msg = [step, (errno & 0xff) as u8, ((errno >> 8) & 0xff) as u8];
                libc::write(report, msg.as_ptr().cast(), msg.len());
                libc::_exit(127)
            };
            if !host.is_empty() && libc::sethostname(host.as_ptr().cast(), host.len()) != 0 {
                return fail(0);
            }
            for (path, value) in &sysctls {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, value.as_ptr().cast(), value.len()) < 0 {
                    return fail(1);
                }
                libc::close(fd);
            }
            // The pod init holds no descriptor of the agent's (the others are close-on-exec).
            let null = libc::open(devnull.as_ptr(), libc::O_RDWR);
            if null >= 0 {
                for fd in 0..3 {
                    libc::dup2(null, fd);
                }
            }
            libc::execv(exe.as_ptr(), argv.as_ptr());
            fail(2)
        }
    });
    let flags = CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
    // SAFETY: the child runs only the closure above, which makes system calls and execs.
    let pid = unsafe { clone(child, &mut stack, flags, Some(libc::SIGCHLD)) }.map_err(|e| {
        PodError::Io {
            what: "clone".into(),
            source: e.into(),
        }
    })?;
    drop(report_w);
    let mut msg = Vec::new();
    let _ = std::fs::File::from(report_r).read_to_end(&mut msg);
    if let [step, lo, hi] = msg[..] {
        let source = std::io::Error::from_raw_os_error(i32::from(lo) | (i32::from(hi) << 8));
        let what = match step {
            0 => "sethostname",
            1 => "writing a sysctl",
            _ => "exec",
        };
        return Err(PodError::Io {
            what: what.into(),
            source,
        });
    }
    u32::try_from(pid.as_raw()).map_err(|_| PodError::Invalid(format!("clone gave pid {pid}")))
}

/// Whether this process is the pod init: PID 1 of its namespace, run as `/pause` alone.
pub fn is_pod_init(args: &[String]) -> bool {
    args.len() == 1 && args[0] == POD_INIT_NAME && std::process::id() == 1
}

extern "C" fn on_child(_: libc::c_int) {}

/// The pod init: reaps what is reparented to it, as pause does; never returns.
pub fn pause_main() -> ! {
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    let handler = SigAction::new(
        SigHandler::Handler(on_child),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler does nothing; it only makes SIGCHLD interrupt sigsuspend.
    let _ = unsafe { sigaction(Signal::SIGCHLD, &handler) };
    let _ = chld.thread_block();
    loop {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        let _ = SigSet::empty().suspend();
    }
}
