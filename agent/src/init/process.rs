//! The process: its terminal, then (after the start byte) rlimits, capabilities, the user, the
//! seccomp profile, the working directory, and exec. The same for a container's init and an
//! exec.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sys::signal::{signal, SigHandler, Signal};
use nix::unistd::{chdir, execve, setgid, setgroups, setuid, Gid, Uid};
use oci_spec::runtime::{PosixRlimit, Process};

use super::console::Pty;
use super::error::{io, sys, InitError};
use super::sync::{report, set_cloexec, START_FD};
use super::{caps, seccomp, InitConfig, Mode};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The part init and exec share: terminal (`pty`, made by the caller, sent to the agent here),
/// "created", wait for start, then credentials, limits, capabilities and exec.
pub fn run(
    config: &InitConfig,
    process: &Process,
    pty: Option<(Pty, OwnedFd)>,
    sync: &mut File,
) -> Result<std::convert::Infallible, InitError> {
    let args = process
        .args()
        .as_ref()
        .filter(|a| !a.is_empty())
        .ok_or(InitError::NoArgs)?;
    let env = env_entries(process.env().as_deref().unwrap_or_default())?;
    let env = with_home(env, process.user().uid(), read_passwd);
    if let Some((pty, socket)) = pty {
        pty.attach(process.user().uid(), socket)?;
    }
    // Resolve the command and compile the filter now, so mistakes fail Create, not Start.
    let program = find_program(&args[0], &env)?;
    let filters = match &config.seccomp {
        Some(profile) => seccomp::compile(profile)?,
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
        caps::drop_bounding(caps)?;
    }
    if !no_new_privs {
        // Without no_new_privs the kernel wants CAP_SYS_ADMIN for a filter: install it now,
        // before the user switch drops it (as runc does).
        seccomp::install(&filters)?;
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
        caps::apply(caps)?;
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
        seccomp::install(&filters)?;
    }
    // Worded as runc words them, for Docker's exit codes (see InitError::Missing).
    let Err(errno) = execve(&c_program, &c_args, &c_env);
    if errno == nix::errno::Errno::E2BIG && matches!(config.mode, Mode::Init { .. }) {
        too_long(&program)
    }
    Err(match errno {
        nix::errno::Errno::ENOENT => InitError::Missing(args[0].clone()),
        nix::errno::Errno::EACCES => InitError::NotExecutable(args[0].clone()),
        other => sys(format!("exec {}", args[0]))(other),
    })
}

/// A container's init whose arguments and environment the kernel refused (E2BIG), as under
/// runc: runc's init finds that out after `runc start` has returned, so Start succeeds and the
/// process fails, its stderr saying so in runc's words, with runc's exit status. Leaving without
/// a word on the sync pipe is what tells the agent the process started.
fn too_long(program: &Path) -> ! {
    let _ = std::io::stderr().write_all(too_long_message(program).as_bytes());
    std::process::exit(RUNC_INIT_FAILED)
}

/// What runc's init exits with when it fails after Start.
const RUNC_INIT_FAILED: i32 = 1;

fn too_long_message(program: &Path) -> String {
    format!("exec {}: argument list too long\n", program.display())
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

/// Checks env entries: `KEY=VALUE`, key non-empty, no NUL anywhere.
pub fn env_entries(env: &[String]) -> Result<Vec<String>, InitError> {
    env.iter()
        .map(|entry| match entry.split_once('=') {
            Some((key, _)) if !key.is_empty() && !entry.contains('\0') => Ok(entry.clone()),
            _ => Err(InitError::Env(entry.clone())),
        })
        .collect()
}

/// The most of the container's /etc/passwd read for `with_home`.
const MAX_PASSWD: u64 = 1 << 20;

/// The container's /etc/passwd (the root is the container's by now), if it has one.
fn read_passwd() -> Option<String> {
    let mut text = String::new();
    File::open("/etc/passwd")
        .ok()?
        .take(MAX_PASSWD)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// runc's rule: a process whose environment has no HOME gets the home directory of its uid in
/// the container's /etc/passwd, or `/` when the uid has no entry there.
/// `passwd` is only read when HOME is missing: most specs (Docker's, CRI's) carry one, and every
/// read is a round trip through the share at container start.
fn with_home(
    mut env: Vec<String>,
    uid: u32,
    passwd: impl FnOnce() -> Option<String>,
) -> Vec<String> {
    if env.iter().any(|e| e.starts_with("HOME=")) {
        return env;
    }
    let passwd = passwd();
    let home = passwd
        .as_deref()
        .into_iter()
        .flat_map(str::lines)
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.len() >= 6 && fields[2].parse() == Ok(uid))
        .map(|fields| fields[5])
        .filter(|home| !home.is_empty())
        .unwrap_or("/");
    env.push(format!("HOME={home}"));
    env
}

fn is_executable(path: &Path) -> bool {
    nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_ok() && path.is_file()
}

fn find_program(arg0: &str, env: &[String]) -> Result<PathBuf, InitError> {
    if arg0.starts_with('/') {
        return if is_executable(Path::new(arg0)) {
            Ok(PathBuf::from(arg0))
        } else {
            Err(if Path::new(arg0).exists() {
                InitError::NotExecutable(arg0.to_string())
            } else {
                InitError::Missing(arg0.to_string())
            })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_comes_from_the_containers_passwd_as_runc_sets_it() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\nbad line\n";
        let home = |env: &[&str], uid| {
            let env = env.iter().map(|e| e.to_string()).collect();
            with_home(env, uid, || Some(passwd.to_string()))
                .into_iter()
                .find(|e| e.starts_with("HOME="))
        };
        assert_eq!(home(&[], 0).as_deref(), Some("HOME=/root"));
        assert_eq!(home(&[], 65534).as_deref(), Some("HOME=/home"));
        assert_eq!(home(&[], 1000).as_deref(), Some("HOME=/"), "no entry");
        assert_eq!(
            home(&["HOME=/mine"], 0).as_deref(),
            Some("HOME=/mine"),
            "kept"
        );
        let kept = with_home(vec!["HOME=/x".into()], 0, || panic!("passwd read"));
        assert_eq!(kept, ["HOME=/x"], "no read when HOME is given");
        let env = with_home(Vec::new(), 0, || None);
        assert_eq!(env, ["HOME=/"], "no passwd at all");
    }

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
            "exec: \"/no/such/binary\": stat /no/such/binary: no such file or directory"
        );
        let plain = std::env::temp_dir().join(format!("hako-plain-{}", std::process::id()));
        fs::write(&plain, "not a program").expect("write");
        let shown = plain.display().to_string();
        let err = find_program(&shown, &[]).expect_err("not executable");
        fs::remove_file(&plain).expect("cleanup");
        assert_eq!(
            err.to_string(),
            format!("exec: {shown:?}: permission denied")
        );
    }

    #[test]
    fn a_refused_exec_is_worded_as_runcs() {
        // What runc 1.1's init printed for `docker run --env-file <2 MiB> busybox true`.
        assert_eq!(
            too_long_message(Path::new("/bin/true")),
            "exec /bin/true: argument list too long\n"
        );
    }

    #[test]
    fn missing_program_is_a_clear_error() {
        let err = find_program("no-such-program-hako", &["PATH=/nonexistent".into()])
            .expect_err("must not be found");
        assert_eq!(
            err.to_string(),
            "exec: \"no-such-program-hako\": executable file not found in $PATH"
        );
    }
}
