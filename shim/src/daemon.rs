//! Host helper processes (virtiofsd, the vsock backend, the VMM): spawning with logs in the
//! sandbox dir, readiness by socket, exit watching, stopping, and pid files that the `delete`
//! subcommand can act on after the shim is gone.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::RawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::sync::watch;

use crate::logs::CappedLog;

/// How long an exited helper's last output may take to reach its log.
const LOG_DRAIN: Duration = Duration::from_secs(1);

/// Directories searched after $PATH for helper binaries.
const EXTRA_BIN_DIRS: [&str; 5] = [
    "/usr/local/bin",
    "/usr/bin",
    "/usr/libexec",
    "/usr/lib/qemu",
    "/usr/local/libexec",
];

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The binary is not installed where the configuration says.
    #[error("{name} not found (looked for {wanted:?} in $PATH and {EXTRA_BIN_DIRS:?}); install it or set its path in the hako configuration")]
    NotFound { name: String, wanted: String },
    /// The process could not be started.
    #[error("cannot start {name} ({path}): {source}")]
    Spawn {
        name: String,
        path: String,
        source: std::io::Error,
    },
    /// The process exited while we waited for it to get ready.
    #[error("{name} exited with {status} before it was ready; its log says: {log}")]
    ExitedEarly {
        name: String,
        status: String,
        log: String,
    },
    /// The process did not get ready in time.
    #[error("{name} did not create {socket} within {timeout:?}; its log says: {log}")]
    NotReady {
        name: String,
        socket: String,
        timeout: Duration,
        log: String,
    },
    /// A log file could not be created.
    #[error("cannot create log file {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How a helper is confined before it runs: set in the forked child, before exec.
#[derive(Debug, Default)]
pub struct Confinement {
    /// `cgroup.procs` files (open for writing) of the cgroups it joins: the pod's, so the pod's
    /// limits and accounting cover it.
    pub cgroups: Vec<RawFd>,
    /// A network namespace (an open nsfs file) it enters: the pod's, for the VMM.
    pub netns: Option<RawFd>,
    /// A mount namespace (an open nsfs file) it enters: the share's, for what serves it.
    pub mountns: Option<RawFd>,
    /// A new, empty network namespace of its own: for helpers that need no network (the vsock
    /// device), so that one taken over reaches nothing, not even the host's loopback.
    pub empty_netns: bool,
    /// Drop every capability (empty bounding set) and set no_new_privs: for helpers that only
    /// use the files and descriptors the shim gives them (QEMU, the vsock backend), so a guest
    /// that took one of them over gets no privilege. Root's capabilities come back at exec
    /// unless the bounding set is empty, so that is what is cleared.
    pub drop_privileges: bool,
    /// Run as this user and group, with these supplementary groups (none: as the shim).
    pub user: Option<(u32, u32, Vec<u32>)>,
}

/// Applies `how` to `cmd`. The descriptors in it must stay open until `cmd` is spawned.
pub fn confine(cmd: &mut Command, how: Confinement) {
    // SAFETY: runs in the forked child before exec and only makes system calls that are
    // async-signal-safe (write, setns, unshare, prctl, setgroups, setgid, setuid); it allocates
    // nothing.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            // The cgroup first, while the child still has the right to write cgroup.procs
            // ("0" moves the writer itself).
            for fd in &how.cgroups {
                if libc::write(*fd, b"0".as_ptr().cast(), 1) < 0 {
                    return fail();
                }
            }
            if let Some(fd) = how.mountns {
                if libc::setns(fd, libc::CLONE_NEWNS) < 0 {
                    return fail();
                }
            }
            if let Some(fd) = how.netns {
                if libc::setns(fd, libc::CLONE_NEWNET) < 0 {
                    return fail();
                }
            }
            if how.empty_netns && libc::unshare(libc::CLONE_NEWNET) < 0 {
                return fail();
            }
            if how.drop_privileges {
                for cap in 0..=LAST_CAPABILITY {
                    // EINVAL for capabilities this kernel does not have: nothing to drop.
                    if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0
                        && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
                    {
                        return fail();
                    }
                }
            }
            if let Some((uid, gid, groups)) = &how.user {
                if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(*gid) < 0
                    || libc::setuid(*uid) < 0
                {
                    return fail();
                }
            }
            if how.drop_privileges && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
                return fail();
            }
            Ok(())
        });
    }
}

/// Above the highest capability any kernel defines today (CAP_CHECKPOINT_RESTORE is 40).
const LAST_CAPABILITY: libc::c_ulong = 63;

/// Finds a helper binary: an absolute path is taken as it is; a name is looked up in $PATH and
/// then in the usual install directories.
pub fn resolve_binary(name: &str, wanted: &str) -> Result<PathBuf, DaemonError> {
    let not_found = || DaemonError::NotFound {
        name: name.to_string(),
        wanted: wanted.to_string(),
    };
    let wanted_path = Path::new(wanted);
    if wanted_path.is_absolute() {
        return if wanted_path.is_file() {
            Ok(wanted_path.to_path_buf())
        } else {
            Err(not_found())
        };
    }
    if wanted.is_empty() || wanted.contains('/') {
        return Err(not_found());
    }
    let path_var = std::env::var("PATH").unwrap_or_default();
    let found = path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .chain(EXTRA_BIN_DIRS)
        .map(|dir| Path::new(dir).join(wanted))
        .find(|candidate| {
            candidate.is_file()
                && nix::unistd::access(candidate.as_path(), nix::unistd::AccessFlags::X_OK).is_ok()
        })
        .ok_or_else(not_found);
    found
}

/// Exit of a helper: its code, or 128 + the signal that killed it.
pub type ExitCode = i32;

pub struct Daemon {
    name: String,
    pid: u32,
    log: PathBuf,
    exit: watch::Receiver<Option<ExitCode>>,
    /// Becomes true once everything the process wrote is in its log.
    drained: watch::Receiver<bool>,
}

impl Daemon {
    /// Starts `cmd` with stdin closed and stdout and stderr going, through a pipe the shim
    /// reads, to `log` (capped at `log_max` bytes, `logs::CappedLog`), and records its pid in
    /// `pid_file`.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        log: &Path,
        log_max: u64,
        pid_file: &Path,
    ) -> Result<Daemon, DaemonError> {
        let log_err = |source| DaemonError::Log {
            path: log.to_path_buf(),
            source,
        };
        let capped = CappedLog::open(log, log_max).map_err(log_err)?;
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| log_err(e.into()))?;
        let write_too = write.try_clone().map_err(log_err)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(write))
            .stderr(Stdio::from(write_too))
            // Own process group: a signal to the shim's group must not take the VM down.
            .process_group(0)
            .kill_on_drop(false);
        let program = format!("{:?}", cmd.as_std().get_program());
        let mut child = cmd.spawn().map_err(|source| DaemonError::Spawn {
            name: name.to_string(),
            path: program,
            source,
        })?;
        // The shim's copies of the pipe's write end go with `cmd`: the log ends with the child.
        drop(cmd);
        let pid = child.id().unwrap_or(0);
        write_pid_file(pid_file, pid);
        let (drained_tx, drained) = watch::channel(false);
        match tokio::net::unix::pipe::Receiver::from_owned_fd(read) {
            Ok(reader) => {
                tokio::spawn(async move {
                    crate::logs::pump(reader, capped).await;
                    let _ = drained_tx.send(true);
                });
            }
            Err(e) => {
                log::warn!("{name}: its output is lost: {e}");
                let _ = drained_tx.send(true);
            }
        }
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let code = match child.wait().await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    status
                        .code()
                        .or_else(|| status.signal().map(|s| 128 + s))
                        .unwrap_or(255)
                }
                Err(_) => 255,
            };
            let _ = tx.send(Some(code));
        });
        log::debug!("started {name} pid {pid}");
        Ok(Daemon {
            name: name.to_string(),
            pid,
            log: log.to_path_buf(),
            exit: rx,
            drained,
        })
    }

    /// Waits (briefly) until what the exited process wrote has reached its log.
    async fn drained(&self) {
        let mut drained = self.drained.clone();
        let _ = tokio::time::timeout(LOG_DRAIN, drained.wait_for(|d| *d)).await;
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Changes to `Some(code)` when the process exits.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitCode>> {
        self.exit.clone()
    }

    pub fn exit_code(&self) -> Option<ExitCode> {
        *self.exit.borrow()
    }

    /// The last lines of the process's log, for error messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 2048)
    }

    /// Waits until `socket` exists as a unix socket, the process exits, or `timeout` passes.
    pub async fn wait_for_socket(
        &self,
        socket: &Path,
        timeout: Duration,
    ) -> Result<(), DaemonError> {
        let started = Instant::now();
        let mut exit = self.exit.clone();
        loop {
            if fs::metadata(socket)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false)
            {
                return Ok(());
            }
            let exited = *exit.borrow();
            if let Some(code) = exited {
                self.drained().await;
                return Err(DaemonError::ExitedEarly {
                    name: self.name.clone(),
                    status: format!("status {code}"),
                    log: self.log_tail(),
                });
            }
            if started.elapsed() >= timeout {
                return Err(DaemonError::NotReady {
                    name: self.name.clone(),
                    socket: socket.display().to_string(),
                    timeout,
                    log: self.log_tail(),
                });
            }
            // The daemons give no readiness signal besides the socket; look again soon, or as
            // soon as the process exits.
            let _ = tokio::time::timeout(Duration::from_millis(2), exit.changed()).await;
        }
    }

    /// Resolves when the process has exited.
    pub async fn wait(&self) -> ExitCode {
        let mut exit = self.exit.clone();
        loop {
            if let Some(code) = *exit.borrow_and_update() {
                return code;
            }
            if exit.changed().await.is_err() {
                return 255;
            }
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns once the process is gone.
    pub async fn stop(&self, grace: Duration) -> ExitCode {
        if let Some(code) = self.exit_code() {
            return code;
        }
        let pid = Pid::from_raw(self.pid as i32);
        let _ = kill(pid, Signal::SIGTERM);
        match tokio::time::timeout(grace, self.wait()).await {
            Ok(code) => code,
            Err(_) => {
                log::warn!(
                    "{} (pid {}) ignored SIGTERM for {grace:?}; killing it",
                    self.name,
                    self.pid
                );
                self.kill().await
            }
        }
    }

    /// SIGKILL; returns once the process is gone.
    pub async fn kill(&self) -> ExitCode {
        if let Some(code) = self.exit_code() {
            return code;
        }
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        self.wait().await
    }
}

/// Reads the end of a log file, escaped, on one line.
pub fn tail(path: &Path, max: u64) -> String {
    let Ok(mut file) = fs::File::open(path) else {
        return "(no log)".to_string();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    // It ends up in messages containerd's clients print: escaped like any guest output.
    let text = crate::logs::escape(&bytes);
    let text = text.trim();
    if text.is_empty() {
        "(empty log)".to_string()
    } else {
        text.lines().collect::<Vec<_>>().join(" | ")
    }
}

/// Pid files hold "<pid> <start time>", so a later `delete` never signals a recycled pid.
fn write_pid_file(path: &Path, pid: u32) {
    let line = format!("{pid} {}\n", start_time(pid).unwrap_or(0));
    if let Err(e) = fs::write(path, line) {
        log::warn!("cannot write pid file {}: {e}", path.display());
    }
}

/// What `/proc/PID/stat` gives: CPU ticks (user + system, all threads) and the start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub cpu_ticks: u64,
    pub start_time: u64,
}

/// Fields 14, 15 and 22. The command name (field 2) may hold spaces and parentheses, so the
/// fields are counted after the last ')'.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().take(20).collect();
    let num = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some(Stat {
        cpu_ticks: num(11)?.checked_add(num(12)?)?,
        start_time: num(19)?,
    })
}

/// Field 22 of /proc/<pid>/stat: when the process started, in clock ticks since boot.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|s| s.start_time)
}

/// A pid file's "<pid> <start time>" (`write_pid_file`).
pub fn parse_pid_file(text: &str) -> Option<(u32, u64)> {
    let mut parts = text.split_whitespace();
    let pid = parts.next()?.parse::<u32>().ok()?;
    let start = parts.next()?.parse::<u64>().ok()?;
    (pid > 1).then_some((pid, start))
}

/// The pid a pid file names, if that process still runs and is the same process (its start
/// time matches).
pub fn live_pid(path: &Path) -> Option<u32> {
    let (pid, started) = parse_pid_file(&fs::read_to_string(path).ok()?)?;
    (start_time(pid) == Some(started)).then_some(pid)
}

/// Kills the process a pid file names, if it is still the same process. Returns whether a
/// process was signalled.
pub fn kill_from_pid_file(path: &Path) -> bool {
    match live_pid(path) {
        Some(pid) => kill(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok(),
        None => false,
    }
}

/// Waits (bounded) until the process a pid file names is gone.
pub async fn wait_gone(path: &Path, timeout: Duration) {
    let Ok(text) = fs::read_to_string(path) else {
        return;
    };
    let Some(Ok(pid)) = text.split_whitespace().next().map(str::parse::<u32>) else {
        return;
    };
    let started = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && started.elapsed() < timeout {
        // The process is not our child here (its parent shim is gone), so there is no exit to
        // wait on; poll its /proc entry.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {

    #[tokio::test]
    async fn confined_helpers_have_no_capabilities_and_no_new_privileges() {
        // Never a silent pass: hako's tests run as root (scripts/test.sh).
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: run the unit tests as root, as scripts/test.sh does"
        );
        let mut cmd = Command::new("/bin/cat");
        cmd.arg("/proc/self/status").stdout(Stdio::piped());
        confine(
            &mut cmd,
            Confinement {
                drop_privileges: true,
                user: Some((65534, 65534, vec![65534])),
                ..Confinement::default()
            },
        );
        let out = cmd.output().await.expect("cat runs");
        let status = String::from_utf8_lossy(&out.stdout);
        for line in [
            "CapEff:\t0000000000000000",
            "CapPrm:\t0000000000000000",
            "CapBnd:\t0000000000000000",
            "NoNewPrivs:\t1",
            "Uid:\t65534\t65534\t65534\t65534",
            "Gid:\t65534\t65534\t65534\t65534",
            "Groups:\t65534",
        ] {
            assert!(status.contains(line), "{line}: {status}");
        }
    }
    use super::*;

    #[test]
    fn resolves_names_in_path_and_refuses_missing() {
        assert!(resolve_binary("shell", "sh").is_ok());
        assert!(resolve_binary("shell", "/bin/sh").is_ok());
        let err = resolve_binary("virtiofsd", "no-such-binary-hako").expect_err("missing");
        assert!(
            err.to_string().contains("install it or set its path"),
            "{err}"
        );
        assert!(resolve_binary("x", "../bin/sh").is_err());
    }

    #[test]
    fn start_time_reads_our_own_stat() {
        assert!(start_time(std::process::id()).is_some());
    }

    #[tokio::test]
    async fn pid_files_kill_only_the_same_process() {
        let dir = std::env::temp_dir().join(format!("hako-daemon-test-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let d = Daemon::spawn(
            "sleep",
            cmd,
            &dir.join("sleep.log"),
            1 << 20,
            &dir.join("sleep.pid"),
        )
        .expect("spawn");
        // A pid file with a wrong start time must not be honoured.
        fs::write(dir.join("stale.pid"), format!("{} 1\n", d.pid())).expect("write");
        assert!(!kill_from_pid_file(&dir.join("stale.pid")));
        assert!(d.exit_code().is_none());
        assert!(kill_from_pid_file(&dir.join("sleep.pid")));
        assert_eq!(d.wait().await, 128 + 9);
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[tokio::test]
    async fn a_chatty_helper_fills_no_more_than_its_cap() {
        let dir = std::env::temp_dir().join(format!("hako-daemon-cap-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        // 4 MiB of output, on stdout and stderr, against a 64 KiB cap.
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "head -c 2097152 /dev/zero; head -c 2097152 /dev/zero >&2; echo last words >&2",
        ]);
        let log = dir.join("chatty.log");
        let d =
            Daemon::spawn("chatty", cmd, &log, 64 * 1024, &dir.join("chatty.pid")).expect("spawn");
        assert_eq!(d.wait().await, 0);
        d.drained().await;
        let size = |p: &Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(size(&log) <= 64 * 1024, "{}", size(&log));
        assert!(size(&CappedLog::rotated(&log)) <= 64 * 1024);
        assert!(d.log_tail().ends_with("last words"), "{}", d.log_tail());
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[tokio::test]
    async fn early_exit_is_reported_with_the_log() {
        let dir = std::env::temp_dir().join(format!("hako-daemon-early-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo boom >&2; exit 3"]);
        let d = Daemon::spawn("sh", cmd, &dir.join("sh.log"), 1 << 20, &dir.join("sh.pid"))
            .expect("spawn");
        let err = d
            .wait_for_socket(&dir.join("never.sock"), Duration::from_secs(10))
            .await
            .expect_err("exits early");
        let text = err.to_string();
        assert!(text.contains("status 3") && text.contains("boom"), "{text}");
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
