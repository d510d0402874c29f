//! The container's init process, run as `hako-agent container-init <config>`.
//!
//! The agent spawns this helper inside a fresh pid namespace (it unshares CLONE_NEWPID before the
//! exec), so the helper's one child is PID 1 there. The helper reports that child's pid (in the
//! agent's namespace) on fd 3 and exits; the child is reparented to the agent, which reaps it
//! and so sees its real exit status. The child builds the container (mount, uts and ipc
//! namespaces, mounts, pivot_root), says "created" on fd 3 and blocks on fd 4 until Start. A
//! failed exec is reported on fd 3; a successful one closes it (it is close-on-exec by then).
//!
//! An exec (`Mode::Exec`) takes the same path but joins the namespaces and cgroup of the
//! container's init process instead of making new ones.
//!
//! This process is single-threaded from start to finish, so fork() here is safe.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::{signal, SigHandler, Signal};
use nix::sys::statvfs::{statvfs, FsFlags};
use nix::unistd::{chdir, execve, fork, pivot_root, setgid, setgroups, sethostname, setuid};
use nix::unistd::{ForkResult, Gid, Uid};
use oci_spec::runtime::{LinuxNamespaceType, LinuxSeccomp, Mount, PosixRlimit, Process, Spec};
use serde::{Deserialize, Serialize};

use crate::mounts::{parse_options, resolve_in_root, MountError};

pub const SYNC_FD: RawFd = 3;
pub const START_FD: RawFd = 4;
pub const HELPER_ARG: &str = "container-init";

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const DEFAULT_DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// What the agent hands the helper: written to a file the helper reads.
#[derive(Debug, Serialize, Deserialize)]
pub struct InitConfig {
    pub container_id: String,
    pub mode: Mode,
    /// cgroup v2 directory the process joins before anything else.
    pub cgroup_dir: Option<PathBuf>,
    /// stdin/stdout/stderr are a terminal: become a session leader with it as controlling tty.
    pub terminal: bool,
    /// The container's seccomp profile (execs get their container's).
    pub seccomp: Option<LinuxSeccomp>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Mode {
    /// Build a new container from the spec. Namespaces with a path are joined, not created.
    Init { spec: Box<Spec> },
    /// Run another process in the container whose init has this (agent-namespace) pid.
    Exec {
        init_pid: i32,
        process: Box<Process>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The config file could not be read.
    #[error("reading the init config {path}: {reason}")]
    Config { path: String, reason: String },
    /// The spec has no process.
    #[error("the OCI spec has no process")]
    NoProcess,
    /// The spec's process has no arguments.
    #[error("the OCI spec's process has no args")]
    NoArgs,
    /// The spec has no root.
    #[error("the OCI spec has no root")]
    NoRoot,
    /// A mount destination was refused.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// An env entry is not KEY=VALUE with a valid key.
    #[error(
        "invalid environment entry {0:?}: it must be KEY=VALUE with a non-empty key and no NUL"
    )]
    Env(String),
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        what: String,
        source: nix::errno::Errno,
    },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// The seccomp profile could not be compiled or installed.
    #[error("seccomp: {0}")]
    Seccomp(String),
    /// Capabilities could not be set.
    #[error("capabilities: {0}")]
    Caps(String),
    /// The command's path is not an executable file.
    #[error("{0}: no such executable file in the container")]
    NotExecutable(String),
    /// The command was not found in the container.
    #[error("executable {0:?} not found in $PATH")]
    NotFound(String),
    /// A bind mount carries options hako does not know.
    #[error("bind mount {destination}: unknown mount options {option:?}")]
    MountOption { destination: String, option: String },
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> InitError {
    let what = what.into();
    move |source| InitError::Sys { what, source }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> InitError {
    let what = what.into();
    move |source| InitError::Io { what, source }
}

/// Entry point of the helper. Never returns.
pub fn helper_main(config_path: &str) -> ! {
    // SAFETY: the agent passes the write end of the sync pipe as fd 3; nothing else owns it.
    let mut sync = unsafe { File::from_raw_fd(SYNC_FD) };
    let config = match read_config(config_path) {
        Ok(config) => config,
        Err(e) => report_and_exit(&mut sync, &e),
    };
    if let Err(e) = prepare_before_fork(&config) {
        report_and_exit(&mut sync, &e);
    }
    // SAFETY: this process has a single thread (it was just exec'd and started none).
    match unsafe { fork() } {
        Ok(ForkResult::Parent { child }) => {
            let _ = report(&mut sync, &format!("pid {child}"));
            std::process::exit(0);
        }
        Ok(ForkResult::Child) => {
            let result = match &config.mode {
                Mode::Init { spec } => build_and_exec(&config, spec, &mut sync),
                Mode::Exec { process, .. } => exec_in_container(&config, process, &mut sync),
            };
            let e = match result {
                Ok(never) => match never {},
                Err(e) => e,
            };
            report_and_exit(&mut sync, &e)
        }
        Err(e) => report_and_exit(&mut sync, &sys("fork")(e)),
    }
}

/// One line on the sync pipe in a single write: the helper and its child both write to it, and
/// `writeln!` may split a line into several writes that the other's could interleave with.
fn report(sync: &mut File, line: &str) -> std::io::Result<()> {
    sync.write_all(format!("{line}\n").as_bytes())
}

fn report_and_exit(sync: &mut File, e: &InitError) -> ! {
    let message = e.to_string().replace('\n', " ");
    let _ = report(sync, &format!("error {message}"));
    std::process::exit(127);
}

fn read_config(path: &str) -> Result<InitConfig, InitError> {
    let err = |reason: String| InitError::Config {
        path: path.to_string(),
        reason,
    };
    let bytes = fs::read(path).map_err(|e| err(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))
}

/// Before the fork: join the cgroup (the child inherits it) and, for an exec or a namespace
/// given by path, the pid namespace (setns on a pid namespace only applies to children).
fn prepare_before_fork(config: &InitConfig) -> Result<(), InitError> {
    if let Some(dir) = &config.cgroup_dir {
        // "0" moves the writer itself.
        fs::write(dir.join("cgroup.procs"), "0")
            .map_err(io(format!("joining cgroup {}", dir.display())))?;
    }
    match &config.mode {
        Mode::Exec { init_pid, .. } => {
            let kinds = ["ipc", "uts", "cgroup", "pid", "mnt"];
            let ns = |kind: &str| PathBuf::from(format!("/proc/{init_pid}/ns/{kind}"));
            // Open all first: once in the container's mount namespace, /proc is its own.
            let files = kinds
                .iter()
                .map(|kind| {
                    File::open(ns(kind)).map_err(io(format!("opening {}", ns(kind).display())))
                })
                .collect::<Result<Vec<_>, _>>()?;
            for (file, kind) in files.iter().zip(kinds) {
                setns(file, CloneFlags::empty())
                    .map_err(sys(format!("joining the {kind} namespace")))?;
            }
        }
        Mode::Init { spec } => {
            if let Some(path) = namespace_path(spec, LinuxNamespaceType::Pid) {
                let file = File::open(&path).map_err(io(format!("opening {}", path.display())))?;
                setns(&file, CloneFlags::CLONE_NEWPID).map_err(sys("joining the pid namespace"))?;
            }
        }
    }
    Ok(())
}

fn namespace_path(spec: &Spec, kind: LinuxNamespaceType) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == kind)?
        .path()
        .clone()
}

fn build_and_exec(
    config: &InitConfig,
    spec: &Spec,
    sync: &mut File,
) -> Result<std::convert::Infallible, InitError> {
    let process = spec.process().as_ref().ok_or(InitError::NoProcess)?;
    let root = spec.root().as_ref().ok_or(InitError::NoRoot)?;
    let root_path = root.path().clone();

    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    // The network namespace is the VM's own: the pod's interfaces live there, so it is shared.
    // uts and ipc are new, or joined when the spec names one (a pod's sandbox container).
    // A cgroup namespace rooted at the container's own cgroup (joined before the fork), so its
    // /sys/fs/cgroup shows its own limits, as with runc on a cgroup v2 host.
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWCGROUP;
    for (kind, flag) in [
        (LinuxNamespaceType::Uts, CloneFlags::CLONE_NEWUTS),
        (LinuxNamespaceType::Ipc, CloneFlags::CLONE_NEWIPC),
    ] {
        let Some(ns) = namespaces.iter().find(|n| n.typ() == kind) else {
            continue;
        };
        match ns.path() {
            Some(path) => {
                let file = File::open(path).map_err(io(format!("opening {}", path.display())))?;
                setns(&file, flag).map_err(sys(format!("joining {}", path.display())))?;
            }
            None => flags |= flag,
        }
    }
    unshare(flags).map_err(sys("unshare"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("making / private"))?;
    mount(
        Some(&root_path),
        &root_path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys(format!(
        "bind-mounting the root {}",
        root_path.display()
    )))?;

    let mounts = spec.mounts().as_deref().unwrap_or_default();
    for m in mounts {
        mount_one(&root_path, m)?;
    }
    if mounts.iter().any(|m| m.destination() == Path::new("/dev")) {
        populate_dev(&root_path)?;
    }
    if let Some(linux) = spec.linux() {
        for path in linux.masked_paths().as_deref().unwrap_or_default() {
            mask_path(&root_path, path)?;
        }
        for path in linux.readonly_paths().as_deref().unwrap_or_default() {
            readonly_path(&root_path, path)?;
        }
    }
    if flags.contains(CloneFlags::CLONE_NEWUTS) {
        if let Some(hostname) = spec.hostname().as_deref().filter(|h| !h.is_empty()) {
            sethostname(hostname).map_err(sys("sethostname"))?;
        }
    }

    chdir(&root_path).map_err(sys("chdir to root"))?;
    pivot_root(".", ".").map_err(sys("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detaching the old root"))?;
    chdir("/").map_err(sys("chdir /"))?;
    if root.readonly().unwrap_or(false) {
        remount_readonly(Path::new("/"))?;
    }

    run_process(config, process, sync)
}

/// An exec: the namespaces and cgroup were joined before the fork; run the process.
fn exec_in_container(
    config: &InitConfig,
    process: &Process,
    sync: &mut File,
) -> Result<std::convert::Infallible, InitError> {
    run_process(config, process, sync)
}

/// The part init and exec share: terminal, "created", wait for start, then credentials,
/// limits, capabilities and exec.
fn run_process(
    config: &InitConfig,
    process: &Process,
    sync: &mut File,
) -> Result<std::convert::Infallible, InitError> {
    let args = process
        .args()
        .as_ref()
        .filter(|a| !a.is_empty())
        .ok_or(InitError::NoArgs)?;
    let env = env_entries(process.env().as_deref().unwrap_or_default())?;
    if config.terminal {
        nix::unistd::setsid().map_err(sys("setsid"))?;
        // SAFETY: TIOCSCTTY on our own stdin (the pty slave) with arg 0; no memory is passed.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
            return Err(sys("making the terminal the controlling tty")(
                nix::errno::Errno::last(),
            ));
        }
    }
    // Resolve the command and compile the filter now, so mistakes fail Create, not Start.
    let program = find_program(&args[0], &env)?;
    let filters = match &config.seccomp {
        Some(profile) => crate::seccomp::compile(profile)?,
        None => Vec::new(),
    };
    let no_new_privs = process.no_new_privileges().unwrap_or(false);

    report(sync, "created").map_err(io("reporting created"))?;
    // SAFETY: fd 4 is the read end of the start pipe the agent passed; only we own it here.
    let mut start = unsafe { File::from_raw_fd(START_FD) };
    let mut go = [0u8; 1];
    if start.read(&mut go).map_err(io("waiting for start"))? == 0 {
        // The agent dropped the process before starting it.
        std::process::exit(0);
    }
    drop(start);

    for rlimit in process.rlimits().as_deref().unwrap_or_default() {
        set_rlimit(rlimit)?;
    }
    let caps = process.capabilities().as_ref();
    if let Some(caps) = caps {
        crate::caps::drop_bounding(caps)?;
    }
    if !no_new_privs {
        // Without no_new_privs the kernel wants CAP_SYS_ADMIN for a filter: install it now,
        // before the user switch drops it (as runc does).
        crate::seccomp::install(&filters)?;
    }
    // Keep capabilities across the switch to a non-root user; the sets are applied after it.
    nix::sys::prctl::set_keepcaps(true).map_err(sys("PR_SET_KEEPCAPS"))?;
    let user = process.user();
    let groups: Vec<Gid> = user
        .additional_gids()
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    setgroups(&groups).map_err(sys("setgroups"))?;
    setgid(Gid::from_raw(user.gid())).map_err(sys("setgid"))?;
    setuid(Uid::from_raw(user.uid())).map_err(sys("setuid"))?;
    nix::sys::prctl::set_keepcaps(false).map_err(sys("PR_SET_KEEPCAPS"))?;
    if let Some(caps) = caps {
        crate::caps::apply(caps)?;
    }
    if no_new_privs {
        nix::sys::prctl::set_no_new_privs().map_err(sys("PR_SET_NO_NEW_PRIVS"))?;
    }

    let cwd = process.cwd();
    if !cwd.as_os_str().is_empty() {
        let _ = fs::create_dir_all(cwd);
        chdir(cwd.as_path()).map_err(sys(format!("chdir to {}", cwd.display())))?;
    }

    let c_program = cstring(program.as_os_str().as_encoded_bytes(), &args[0])?;
    let c_args = args
        .iter()
        .map(|a| cstring(a.as_bytes(), a))
        .collect::<Result<Vec<_>, _>>()?;
    let c_env = env
        .iter()
        .map(|e| cstring(e.as_bytes(), e))
        .collect::<Result<Vec<_>, _>>()?;

    // Rust programs ignore SIGPIPE; the container's program must start with the default.
    // SAFETY: setting a signal to its default disposition has no handler to be unsafe about.
    unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) }.map_err(sys("resetting SIGPIPE"))?;
    set_cloexec(sync.as_raw_fd())?;
    if no_new_privs {
        // As late as possible, so the filter only has to allow execve itself.
        crate::seccomp::install(&filters)?;
    }
    let e = execve(&c_program, &c_args, &c_env).map_err(sys(format!("exec {}", args[0])));
    match e {
        Ok(never) => match never {},
        Err(e) => Err(e),
    }
}

fn set_rlimit(rlimit: &PosixRlimit) -> Result<(), InitError> {
    use oci_spec::runtime::PosixRlimitType as T;
    let resource = match rlimit.typ() {
        T::RlimitCpu => libc::RLIMIT_CPU,
        T::RlimitFsize => libc::RLIMIT_FSIZE,
        T::RlimitData => libc::RLIMIT_DATA,
        T::RlimitStack => libc::RLIMIT_STACK,
        T::RlimitCore => libc::RLIMIT_CORE,
        T::RlimitRss => libc::RLIMIT_RSS,
        T::RlimitNproc => libc::RLIMIT_NPROC,
        T::RlimitNofile => libc::RLIMIT_NOFILE,
        T::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        T::RlimitAs => libc::RLIMIT_AS,
        T::RlimitLocks => libc::RLIMIT_LOCKS,
        T::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        T::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        T::RlimitNice => libc::RLIMIT_NICE,
        T::RlimitRtprio => libc::RLIMIT_RTPRIO,
        T::RlimitRttime => libc::RLIMIT_RTTIME,
    };
    let limit = libc::rlimit {
        rlim_cur: rlimit.soft(),
        rlim_max: rlimit.hard(),
    };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    if unsafe { libc::setrlimit(resource as _, &limit) } < 0 {
        return Err(sys(format!("setrlimit {:?}", rlimit.typ()))(
            nix::errno::Errno::last(),
        ));
    }
    Ok(())
}

fn cstring(bytes: &[u8], shown: &str) -> Result<CString, InitError> {
    CString::new(bytes).map_err(|_| InitError::Env(shown.to_string()))
}

fn set_cloexec(fd: RawFd) -> Result<(), InitError> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    // SAFETY: fd is open for the life of this process; the borrow does not outlive the call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(sys("setting close-on-exec"))?;
    Ok(())
}

/// Checks env entries: `KEY=VALUE`, key non-empty, no NUL anywhere.
pub fn env_entries(env: &[String]) -> Result<Vec<String>, InitError> {
    env.iter()
        .map(|entry| match entry.split_once('=') {
            Some((key, _)) if !key.is_empty() && !entry.contains('\0') => Ok(entry.clone()),
            _ => Err(InitError::Env(entry.clone())),
        })
        .collect()
}

fn is_executable(path: &Path) -> bool {
    nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_ok() && path.is_file()
}

fn find_program(arg0: &str, env: &[String]) -> Result<PathBuf, InitError> {
    if arg0.starts_with('/') {
        return if is_executable(Path::new(arg0)) {
            Ok(PathBuf::from(arg0))
        } else {
            Err(InitError::NotExecutable(arg0.to_string()))
        };
    }
    if arg0.contains('/') {
        // Relative to the working directory, which is only entered at exec.
        return Ok(PathBuf::from(arg0));
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(arg0))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| InitError::NotFound(arg0.to_string()))
}

fn mount_one(root: &Path, m: &Mount) -> Result<(), InitError> {
    let dest_str = m.destination().to_string_lossy().into_owned();
    let dest = resolve_in_root(root, &dest_str)?;
    let options = parse_options(m.options().as_deref().unwrap_or_default());
    let mut fstype = m.typ().clone().unwrap_or_else(|| "none".to_string());
    let mut source = m
        .source()
        .as_ref()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| fstype.clone());
    let mut data = options.data.clone();

    if options.bind || fstype == "bind" {
        // An option hako does not know may promise a protection it would not give.
        if !data.is_empty() {
            return Err(InitError::MountOption {
                destination: dest_str,
                option: data,
            });
        }
        let source_path = Path::new(&source);
        let is_dir = fs::metadata(source_path)
            .map_err(io(format!("bind source {source} for {dest_str}")))?
            .is_dir();
        make_target(&dest, is_dir)?;
        let bind_flags = MsFlags::MS_BIND | (options.flags & MsFlags::MS_REC);
        mount(
            Some(source_path),
            &dest,
            None::<&str>,
            bind_flags,
            None::<&str>,
        )
        .map_err(sys(format!("bind-mounting {source} on {dest_str}")))?;
        let extra = options.flags - (MsFlags::MS_BIND | MsFlags::MS_REC);
        if !extra.is_empty() {
            mount(
                None::<&str>,
                &dest,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_BIND | extra,
                None::<&str>,
            )
            .map_err(sys(format!("remounting {dest_str}")))?;
        }
        if options.recursive_set != 0 || options.recursive_clear != 0 {
            hako_protocol::mount_options::mount_setattr(
                &dest,
                true,
                options.recursive_set,
                options.recursive_clear,
            )
            .map_err(io(format!("setting recursive attributes on {dest_str}")))?;
        }
    } else {
        if fstype == "cgroup" {
            // The guest runs cgroup v2 only.
            fstype = "cgroup2".to_string();
            source = "cgroup2".to_string();
            data.clear();
        }
        make_target(&dest, true)?;
        let data = (!data.is_empty()).then_some(data.as_str());
        mount(
            Some(source.as_str()),
            &dest,
            Some(fstype.as_str()),
            options.flags,
            data,
        )
        .map_err(sys(format!("mounting {fstype} on {dest_str}")))?;
        // A fresh filesystem has nothing below it: its recursive attributes are its own.
        if options.recursive_set != 0 {
            hako_protocol::mount_options::mount_setattr(&dest, true, options.recursive_set, 0)
                .map_err(io(format!("setting attributes on {dest_str}")))?;
        }
    }
    if let Some(propagation) = options.propagation {
        mount(None::<&str>, &dest, None::<&str>, propagation, None::<&str>)
            .map_err(sys(format!("setting propagation of {dest_str}")))?;
    }
    Ok(())
}

fn make_target(dest: &Path, is_dir: bool) -> Result<(), InitError> {
    if is_dir {
        fs::create_dir_all(dest).map_err(io(format!("mkdir {}", dest.display())))
    } else {
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io(format!("mkdir {}", parent.display())))?;
        }
        if !dest.exists() {
            File::create(dest).map_err(io(format!("creating {}", dest.display())))?;
        }
        Ok(())
    }
}

/// The container's /dev is a fresh tmpfs: give it the usual nodes (bound from the guest's
/// devtmpfs, so no mknod is needed) and the usual links.
fn populate_dev(root: &Path) -> Result<(), InitError> {
    let dev = root.join("dev");
    for name in DEFAULT_DEVICES {
        let target = dev.join(name);
        make_target(&target, false)?;
        let source = Path::new("/dev").join(name);
        mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(sys(format!("binding {}", source.display())))?;
    }
    let links = [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ];
    for (name, target) in links {
        let link = dev.join(name);
        if fs::symlink_metadata(&link).is_err() {
            symlink(target, &link).map_err(io(format!("linking /dev/{name}")))?;
        }
    }
    Ok(())
}

fn mask_path(root: &Path, path: &str) -> Result<(), InitError> {
    let target = resolve_in_root(root, path)?;
    let Ok(meta) = fs::metadata(&target) else {
        return Ok(());
    };
    let result = if meta.is_dir() {
        mount(
            Some("tmpfs"),
            &target,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
    } else {
        mount(
            Some("/dev/null"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    };
    result.map_err(sys(format!("masking {path}")))
}

fn readonly_path(root: &Path, path: &str) -> Result<(), InitError> {
    let target = resolve_in_root(root, path)?;
    if fs::symlink_metadata(&target).is_err() {
        return Ok(());
    }
    mount(
        Some(&target),
        &target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys(format!("binding {path} read-only")))?;
    remount_readonly(&target)
}

fn remount_readonly(target: &Path) -> Result<(), InitError> {
    // A bind remount must repeat the flags the mount already has or it would clear them.
    let current = statvfs(target).map_err(sys(format!("statvfs {}", target.display())))?;
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
    for (st, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
    ] {
        if current.flags().contains(st) {
            flags |= ms;
        }
    }
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
        .map_err(sys(format!("remounting {} read-only", target.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_entries_reject_bad_keys() {
        let ok = vec![
            "PATH=/bin".to_string(),
            "EMPTY=".to_string(),
            "A=b=c".to_string(),
        ];
        assert_eq!(env_entries(&ok).ok(), Some(ok.clone()));
        for bad in ["=value", "NOEQUALS", "NUL\0=x", "K=v\0"] {
            let err = env_entries(&[bad.to_string()]).expect_err(bad);
            assert!(
                err.to_string().contains("invalid environment entry"),
                "{err}"
            );
        }
    }

    #[test]
    fn absolute_programs_must_exist() {
        assert_eq!(
            find_program("/bin/sh", &[]).ok(),
            Some(PathBuf::from("/bin/sh"))
        );
        let err = find_program("/no/such/binary", &[]).expect_err("missing");
        assert_eq!(
            err.to_string(),
            "/no/such/binary: no such executable file in the container"
        );
    }

    #[test]
    fn missing_program_is_a_clear_error() {
        let err = find_program("no-such-program-hako", &["PATH=/nonexistent".into()])
            .expect_err("must not be found");
        assert_eq!(
            err.to_string(),
            "executable \"no-such-program-hako\" not found in $PATH"
        );
    }
}
