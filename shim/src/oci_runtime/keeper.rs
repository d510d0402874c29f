//! The keeper: the host process that stands for one guest process (a container's init or one
//! exec) towards conmon. `create`/`exec` fork it and leave it behind, so conmon, a subreaper,
//! adopts it and waits on it. It copies its stdio (conmon's pipes, or the pty replica) to and
//! from the FIFOs the sandbox server reads and writes, forwards the signals conmon and podman
//! send it, and exits with the guest process's status (128+N for signal N) once the output is
//! drained.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use containerd_shim::api;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio::signal::unix::{signal, SignalKind};

use super::{console, server};
use crate::task::UNKNOWN_EXIT_STATUS;

/// The descriptor on which `create`/`exec` tell the keeper that the process exists (one
/// byte); end of file means it failed and the keeper must just go.
pub const GO_FD: i32 = 3;

/// The descriptor on which the keeper reports the pid conmon is to wait on.
pub const PID_FD: i32 = 4;

/// First thing in `hako-runtime __keep`, while the process has one thread: reports the pid
/// conmon is to wait on. An init keeper was given a PID namespace for its children: it forks
/// into it, and the child, PID 1 there with a mount namespace and /proc of its own, carries
/// on as the keeper while the parent reports it and exits. Returns in the keeper only, which
/// then takes a terminal on its stdin as its controlling terminal (so SIGWINCH reaches it).
pub fn prepare() {
    enter_own_pid_namespace();
    if nix::unistd::isatty(std::io::stdin()).unwrap_or(false) {
        // The intermediate, if any, never held the terminal, so its exit sent no SIGHUP.
        if nix::unistd::getsid(None).ok() != Some(nix::unistd::getpid()) {
            let _ = nix::unistd::setsid();
        }
        // SAFETY: TIOCSCTTY on the process's own stdin.
        unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
    }
}

fn enter_own_pid_namespace() {
    // SAFETY: PID_FD is the pipe `create`/`exec` gave; nothing else owns it.
    let report = unsafe { File::from_raw_fd(PID_FD) };
    let same = |a: &str, b: &str| {
        let id = |p: &str| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        matches!((id(a), id(b)), (Ok(x), Ok(y)) if x == y)
    };
    if same("/proc/self/ns/pid", "/proc/self/ns/pid_for_children") {
        let _ = (&report).write_all(std::process::id().to_string().as_bytes());
        return;
    }
    // SAFETY: the process has a single thread (no runtime has started), so the child may
    // carry on as an ordinary process.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            let _ = (&report).write_all(child.to_string().as_bytes());
            std::process::exit(0);
        }
        Ok(nix::unistd::ForkResult::Child) => {
            drop(report);
            use nix::mount::{mount, MsFlags};
            let private = mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            );
            // Without its own /proc the keeper still works; `podman top` then sees the host's.
            let _ = private.and_then(|()| {
                mount(
                    Some("proc"),
                    "/proc",
                    Some("proc"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                    None::<&str>,
                )
            });
        }
        Err(_) => std::process::exit(1),
    }
}

/// The FIFO names in a process's directory.
pub const STDIN: &str = "stdin";
pub const STDOUT: &str = "stdout";
pub const STDERR: &str = "stderr";

/// The largest piece copied at once.
const CHUNK: usize = 64 * 1024;
/// Signals conmon relays to the container's process, and podman sends to an exec's.
const FORWARDED: [SignalKind; 6] = [
    SignalKind::terminate(),
    SignalKind::interrupt(),
    SignalKind::quit(),
    SignalKind::hangup(),
    SignalKind::user_defined1(),
    SignalKind::user_defined2(),
];

/// Whether the keeper's stdin is /dev/null (conmon without `-i`): then the process gets none.
pub fn stdin_is_null() -> bool {
    match nix::sys::stat::fstat(std::io::stdin().as_fd()) {
        Ok(st) => {
            (st.st_mode & libc::S_IFMT) == libc::S_IFCHR
                && libc::major(st.st_rdev) == 1
                && libc::minor(st.st_rdev) == 3
        }
        Err(_) => true,
    }
}

/// Runs the keeper to the end; returns the status to exit with.
pub async fn run(socket: &Path, id: &str, exec_id: &str, dir: &Path) -> i32 {
    // The output FIFOs are open before the process exists, so the server's writers find
    // their reader at once.
    let opened: Vec<(File, i32)> = [(STDOUT, 1), (STDERR, 2)]
        .into_iter()
        .filter_map(|(name, fd)| open_output(&dir.join(name)).map(|f| (f, fd)))
        .collect();
    // SAFETY: GO_FD is the pipe `create`/`exec` gave; nothing else owns it.
    let mut go = unsafe { File::from_raw_fd(GO_FD) };
    let mut byte = [0u8; 1];
    if !matches!(go.read(&mut byte), Ok(1)) {
        return 1;
    }
    drop(go);
    let terminal = nix::unistd::isatty(std::io::stdin()).unwrap_or(false);
    let (done_read, done_write) = match nix::unistd::pipe() {
        Ok(pair) => pair,
        Err(_) => return UNKNOWN_EXIT_STATUS as i32,
    };
    let mut outputs = Vec::new();
    for (input, fd) in opened {
        let done = done_read.try_clone().ok();
        outputs.push(std::thread::spawn(move || {
            copy_out(&input, fd, done.as_ref(), terminal)
        }));
    }
    let stdin_fifo = dir.join(STDIN);
    if is_fifo(&stdin_fifo) {
        std::thread::spawn(move || copy_in(&stdin_fifo));
    }

    let status = match server::connect(socket).await {
        Ok(client) => supervise(&client, id, exec_id, terminal).await,
        Err(_) => UNKNOWN_EXIT_STATUS,
    };
    // Output written before the exit is in the FIFOs now: drain it, then go.
    drop(done_write);
    finish(outputs);
    if !exec_id.is_empty() {
        if let Ok(client) = server::connect(socket).await {
            let _ = client
                .delete(
                    super::commands::ctx(),
                    &api::DeleteRequest {
                        id: id.to_string(),
                        exec_id: exec_id.to_string(),
                        ..Default::default()
                    },
                )
                .await;
        }
        let _ = std::fs::remove_dir_all(dir);
    }
    status.min(255) as i32
}

fn finish(outputs: Vec<JoinHandle<()>>) {
    for copy in outputs {
        let _ = copy.join();
    }
}

/// Waits for the guest process's exit, forwarding signals and terminal sizes meanwhile.
async fn supervise(
    client: &containerd_shim::protos::shim_async::TaskClient,
    id: &str,
    exec_id: &str,
    terminal: bool,
) -> u32 {
    let mut signals = Vec::new();
    for kind in FORWARDED {
        if let Ok(s) = signal(kind) {
            signals.push((kind.as_raw_value(), s));
        }
    }
    let mut winch = signal(SignalKind::window_change()).ok();
    if terminal {
        resize(client, id, exec_id).await;
    }
    let request = api::WaitRequest {
        id: id.to_string(),
        exec_id: exec_id.to_string(),
        ..Default::default()
    };
    let wait = client.wait(ttrpc::context::Context::default(), &request);
    tokio::pin!(wait);
    loop {
        let next_signal = async {
            let futures = signals
                .iter_mut()
                .map(|(n, s)| Box::pin(async move { s.recv().await.map(|_| *n) }));
            futures_util::future::select_all(futures).await.0
        };
        let next_winch = async {
            match winch.as_mut() {
                Some(w) => w.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            done = &mut wait => {
                return match done {
                    Ok(resp) => resp.exit_status,
                    Err(_) => UNKNOWN_EXIT_STATUS,
                };
            }
            Some(signo) = next_signal => {
                let _ = client
                    .kill(
                        super::commands::ctx(),
                        &api::KillRequest {
                            id: id.to_string(),
                            exec_id: exec_id.to_string(),
                            signal: signo as u32,
                            ..Default::default()
                        },
                    )
                    .await;
            }
            Some(()) = next_winch, if terminal => resize(client, id, exec_id).await,
        }
    }
}

/// Gives the guest's terminal the host terminal's size.
async fn resize(client: &containerd_shim::protos::shim_async::TaskClient, id: &str, exec_id: &str) {
    let Some((rows, cols)) = console::size(&std::io::stdin()) else {
        return;
    };
    let _ = client
        .resize_pty(
            super::commands::ctx(),
            &api::ResizePtyRequest {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
                width: u32::from(cols),
                height: u32::from(rows),
                ..Default::default()
            },
        )
        .await;
}

fn is_fifo(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

/// Copies the keeper's stdin into the process's stdin FIFO until end of file, then closes it,
/// which ends the process's stdin.
fn copy_in(fifo: &PathBuf) {
    let Ok(mut out) = OpenOptions::new().write(true).open(fifo) else {
        return;
    };
    let mut buf = vec![0u8; CHUNK];
    let mut input = std::io::stdin().lock();
    loop {
        match input.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if out.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// An output FIFO, open for reading, and for writing too, so it never reads as ended while
/// the server opens and closes its end: `copy_out` learns the end from `done` instead.
fn open_output(fifo: &Path) -> Option<File> {
    if !is_fifo(fifo) {
        return None;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(fifo)
        .ok()
}

/// Copies an output FIFO to the keeper's descriptor `fd` until `done` becomes readable (the
/// process has exited and the server has written everything), then drains what is left.
fn copy_out(input: &File, fd: i32, done: Option<&OwnedFd>, terminal: bool) {
    // SAFETY: fd 1 or 2 stays open for the keeper's life; ManuallyDrop never closes it.
    let out = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
    let mut buf = vec![0u8; CHUNK];
    let mut finishing = false;
    loop {
        if !finishing {
            let mut fds = vec![PollFd::new(input.as_fd(), PollFlags::POLLIN)];
            if let Some(done) = done {
                fds.push(PollFd::new(done.as_fd(), PollFlags::POLLIN));
            }
            if poll(&mut fds, PollTimeout::NONE).is_err() {
                continue;
            }
            finishing = fds
                .get(1)
                .and_then(|f| f.revents())
                .is_some_and(|r| !r.is_empty());
        }
        match (&*input).read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if terminal {
                    console::keep_output_raw(&*out);
                }
                if (&*out).write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if finishing {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}
