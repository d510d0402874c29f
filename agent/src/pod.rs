//! The pod init: what a pod without a pause container (containerd's Sandbox API) gets in its
//! place. A process named `/pause` is PID 1 of the pod's PID namespace, in IPC and UTS
//! namespaces of its own; the pod's containers join them as they would join pause's. The
//! pod's /etc/hostname, /etc/hosts, /etc/resolv.conf and /dev/shm are kept in the guest
//! (`GUEST_POD_DIR`), so nothing a container writes there reaches the host.
//!
//! The agent execs itself as `pod-init <hostname> [name=value...]` in the new IPC and UTS
//! namespaces with new children's PID namespace; that helper sets the hostname and sysctls,
//! forks the pod init (re-exec'd as `/pause`), prints its pid and exits.

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use hako_protocol::{sysctl, GUEST_POD_DIR, MAX_POD_FILE, POD_INIT_NAME};
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

/// The agent's argument that runs the helper.
pub const POD_INIT_ARG: &str = "pod-init";
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

fn spawn(hostname: &str, pod: &hako_protocol::PodInit) -> Result<u32, PodError> {
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(POD_INIT_ARG).arg(hostname);
    for (name, value) in &pod.sysctls {
        cmd.arg(format!("{name}={value}"));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: unshare is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            unshare(CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS)
                .map_err(std::io::Error::from)
        });
    }
    // The helper is never waited on through Child: the agent's reaper collects it.
    let mut child = cmd.spawn().map_err(io("starting the pod init"))?;
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        stdout
            .read_to_string(&mut out)
            .map_err(io("reading the pod init's pid"))?;
    }
    if let Some(stderr) = child.stderr.take() {
        let _ = stderr.take(4096).read_to_string(&mut err);
    }
    out.trim()
        .parse::<u32>()
        .ok()
        .filter(|pid| *pid > 1)
        .ok_or_else(|| PodError::Invalid(format!("the helper failed: {}", err.trim())))
}

/// The helper, in the pod's IPC and UTS namespaces: never returns.
pub fn helper_main(args: &[String]) -> ! {
    match helper(args) {
        Ok(pid) => {
            println!("{pid}");
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}

fn helper(args: &[String]) -> Result<i32, String> {
    let hostname = args.first().ok_or("no hostname")?;
    if !hostname.is_empty() {
        nix::unistd::sethostname(hostname).map_err(|e| format!("sethostname: {e}"))?;
    }
    for pair in &args[1..] {
        let (name, value) = pair.split_once('=').ok_or("a sysctl without '='")?;
        fs::write(sysctl::proc_path(name), value).map_err(|e| format!("sysctl {name}: {e}"))?;
    }
    let exe = CString::new("/proc/self/exe").map_err(|e| e.to_string())?;
    let name = CString::new(POD_INIT_NAME).map_err(|e| e.to_string())?;
    // SAFETY: this process is single-threaded (just exec'd); the child only execs.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { child }) => Ok(child.as_raw()),
        Ok(ForkResult::Child) => {
            // The pod init must not hold the pipes the agent reads to their end.
            // SAFETY: open and dup2 on this process's own descriptors.
            unsafe {
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if null >= 0 {
                    for fd in 0..3 {
                        libc::dup2(null, fd);
                    }
                }
            }
            let _ = nix::unistd::execv(&exe, &[name]);
            // SAFETY: leaving the failed child without running the parent's exit handlers.
            unsafe { libc::_exit(127) }
        }
        Err(e) => Err(format!("fork: {e}")),
    }
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
