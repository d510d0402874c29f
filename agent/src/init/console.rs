//! A process's terminal, made as runc makes it: the container's init (or an exec, in the
//! container's mount namespace) opens `/dev/ptmx` inside the container, so the terminal is one
//! of the container's own devpts (`tty` names it, `/dev/pts` lists it) and a container's
//! terminal is also its `/dev/console`. The process keeps the slave as its stdio and controlling
//! terminal; the master goes back to the agent over a unix socket, passed to the helper as fd 5,
//! with SCM_RIGHTS, before "created". Both ends of that are here.

use std::fs::{self, File};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{mount, MsFlags};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use nix::sys::stat::{fstat, Mode};
use nix::unistd::{dup2_stderr, dup2_stdin, dup2_stdout, fchown, setsid, Uid};

use super::error::{io, sys, InitError};

/// The helper's end of the socket the master goes back on (after SYNC_FD and START_FD).
pub const CONSOLE_FD: RawFd = 5;

/// The container's ptmx, as the spec's devpts (`newinstance`) and populate_dev's link make it.
const PTMX: &str = "/dev/ptmx";
const CONSOLE: &str = "/dev/console";

/// A new terminal: its master, its slave and the slave's number in its devpts.
#[derive(Debug)]
pub struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
    index: u32,
}

/// Opens a new terminal through `/dev/ptmx` as this process's root and mount namespace show it.
pub fn open() -> Result<Pty, InitError> {
    open_at(Path::new(PTMX))
}

fn open_at(ptmx: &Path) -> Result<Pty, InitError> {
    let fail = |source: Errno| InitError::Terminal {
        ptmx: ptmx.display().to_string(),
        source,
    };
    let master = nix::fcntl::open(
        ptmx,
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(fail)?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from the pointer, which lives across the call. Only a pty
    // master answers it, so it also proves the file is one.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } < 0 {
        return Err(fail(Errno::last()));
    }
    let mut index: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes one unsigned int through the pointer, which lives across the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut index) } < 0 {
        return Err(fail(Errno::last()));
    }
    // The slave straight from the master: no path that could name another devpts's.
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes the open flags by value and returns a new fd or -1.
    let slave = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if slave < 0 {
        return Err(fail(Errno::last()));
    }
    // SAFETY: the kernel just made this fd for us; nothing else owns it.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    Ok(Pty {
        master,
        slave,
        index,
    })
}

impl Pty {
    /// Where the slave is in the container: `/dev/pts/N`.
    fn slave_path(&self) -> String {
        format!("/dev/pts/{}", self.index)
    }

    /// Sets the terminal's size to the spec's `consoleSize`, as runc does before the process
    /// runs: the host's first resize may come after the process has looked.
    pub fn set_size(&self, size: Option<oci_spec::runtime::Box>) -> Result<(), InitError> {
        let Some(size) = size else {
            return Ok(());
        };
        let (Ok(rows), Ok(cols)) = (u16::try_from(size.height()), u16::try_from(size.width()))
        else {
            return Ok(());
        };
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which lives across the call.
        if unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) } < 0 {
            return Err(sys("setting the terminal's size")(Errno::last()));
        }
        Ok(())
    }

    /// Makes the terminal the container's `/dev/console`, as runc does for a container's init:
    /// the slave bound onto an empty file made for it.
    pub fn bind_console(&self) -> Result<(), InitError> {
        let source = self.slave_path();
        // The bind goes by path: it must name this slave, not one of another devpts that an
        // image without a /dev of its own might link /dev/ptmx to.
        let named = fs::metadata(&source).map_err(io(format!("stat {source}")))?;
        let slave = fstat(&self.slave).map_err(sys("fstat of the terminal"))?;
        if (named.dev(), named.ino()) != (slave.st_dev, slave.st_ino) {
            return Err(InitError::Console(format!(
                "{source} is not the terminal {PTMX} made"
            )));
        }
        match fs::symlink_metadata(CONSOLE) {
            // A bind follows a link: it could land anywhere in the container.
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(InitError::Console(format!("{CONSOLE} is a symbolic link")))
            }
            Ok(_) => {}
            Err(_) => {
                File::create(CONSOLE).map_err(io(format!("creating {CONSOLE}")))?;
            }
        }
        mount(
            Some(source.as_str()),
            CONSOLE,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(sys(format!("binding {source} on {CONSOLE}")))
    }

    /// Makes the terminal this process's stdin, stdout, stderr and controlling terminal, owned by
    /// the process's user (as runc leaves it, so the user can open `/dev/tty`), and sends the
    /// master to the agent over `socket`. Only the slave is left in this process.
    pub fn attach(self, uid: u32, socket: OwnedFd) -> Result<(), InitError> {
        setsid().map_err(sys("setsid"))?;
        dup2_stdin(&self.slave).map_err(sys("making the terminal stdin"))?;
        dup2_stdout(&self.slave).map_err(sys("making the terminal stdout"))?;
        dup2_stderr(&self.slave).map_err(sys("making the terminal stderr"))?;
        drop(self.slave);
        // SAFETY: TIOCSCTTY on our own stdin (the slave) with arg 0; no memory is passed.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
            return Err(sys("making the terminal the controlling tty")(Errno::last()));
        }
        // SAFETY: fd 0 is the slave, open for the life of this process; the borrow ends here.
        let stdin = unsafe { BorrowedFd::borrow_raw(0) };
        fchown(stdin, Some(Uid::from_raw(uid)), None).map_err(sys("chown of the terminal"))?;
        send_fd(&socket, &self.master).map_err(sys("sending the terminal to the agent"))
    }
}

/// Sends `fd` over the unix socket `socket` (one byte of data carries it).
fn send_fd(socket: &OwnedFd, fd: &OwnedFd) -> nix::Result<()> {
    let fds = [fd.as_raw_fd()];
    let sent = sendmsg::<()>(
        socket.as_raw_fd(),
        &[IoSlice::new(b"t")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    if sent == 0 {
        return Err(Errno::EPIPE);
    }
    Ok(())
}

/// The agent's end: the master the helper sent, close-on-exec. The helper sends it before it
/// reports "created", so once that is read it is waiting: this never blocks.
pub fn receive_master(socket: &OwnedFd) -> Result<OwnedFd, String> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        socket.as_fd().as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| format!("receiving the terminal from the init helper: {e}"))?;
    let mut received = Vec::new();
    for cmsg in msg
        .cmsgs()
        .map_err(|e| format!("reading the init helper's message: {e}"))?
    {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            // SAFETY: the kernel installed these fds in our table for this message; nothing
            // else owns them. Owning every one closes any beyond the first.
            received.extend(
                fds.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err("the init helper sent more than the terminal".to_string());
    }
    received
        .into_iter()
        .next()
        .ok_or_else(|| "the init helper sent no terminal".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::io::{Read, Write};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair")
    }

    #[test]
    fn a_sent_fd_arrives_working_and_close_on_exec() {
        let (agent, helper) = pair();
        let (r, w) = nix::unistd::pipe().expect("pipe");
        send_fd(&helper, &w).expect("send");
        drop(w);
        let got = receive_master(&agent).expect("receive");
        let flags = nix::fcntl::fcntl(&got, nix::fcntl::FcntlArg::F_GETFD).expect("flags");
        assert!(
            nix::fcntl::FdFlag::from_bits_truncate(flags).contains(nix::fcntl::FdFlag::FD_CLOEXEC)
        );
        File::from(got).write_all(b"through").expect("write");
        let mut read = String::new();
        File::from(r).read_to_string(&mut read).expect("read");
        assert_eq!(read, "through");
    }

    #[test]
    fn nothing_sent_is_an_error_not_a_wait() {
        let (agent, helper) = pair();
        let err = receive_master(&agent).expect_err("nothing there yet");
        assert!(err.contains("receiving the terminal"), "{err}");
        // Data without an fd, as a confused helper might send.
        File::from(helper).write_all(b"t").expect("write");
        let err = receive_master(&agent).expect_err("no fd");
        assert_eq!(err, "the init helper sent no terminal");
    }

    #[test]
    fn a_terminal_is_a_pair_and_its_slave_is_named_by_its_number() {
        let pty = match open_at(Path::new("/dev/ptmx")) {
            Ok(pty) => pty,
            // A build sandbox without ptys has nothing to test.
            Err(e) => return eprintln!("skipped: {e}"),
        };
        assert!(nix::unistd::isatty(&pty.slave).expect("isatty"));
        let named = fs::metadata(pty.slave_path()).expect("the slave's path");
        let slave = fstat(&pty.slave).expect("fstat");
        assert_eq!((named.dev(), named.ino()), (slave.st_dev, slave.st_ino));
        let mut master = File::from(pty.master);
        let mut slave = File::from(pty.slave);
        master.write_all(b"hi\n").expect("write");
        let mut line = [0u8; 3];
        slave.read_exact(&mut line).expect("read");
        assert_eq!(&line, b"hi\n");
    }

    #[test]
    fn no_ptmx_is_named_in_the_error() {
        let err = open_at(Path::new("/nonexistent/ptmx")).expect_err("no ptmx");
        assert!(err.to_string().contains("/nonexistent/ptmx"), "{err}");
        // A file that is not a terminal is refused as firmly.
        let err = open_at(Path::new("/dev/null")).expect_err("not a pty");
        assert!(err.to_string().contains("/dev/null"), "{err}");
    }
}
