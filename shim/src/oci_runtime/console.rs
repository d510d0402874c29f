//! A terminal for `-t`: a pty on the host whose master goes to the caller over
//! `--console-socket` (as runc sends it: one message, the name as data and the master as the
//! one SCM_RIGHTS descriptor) and whose replica the keeper holds as its controlling terminal.
//! The guest's own pty does the line discipline, so the host's pair stays raw.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::termios::{self, OutputFlags, SetArg};

use super::RuntimeError;

/// A new pty pair, raw. The replica stays with the keeper; the master goes to the caller.
pub struct Pty {
    pub master: OwnedFd,
    pub replica: OwnedFd,
}

pub fn open() -> Result<Pty, RuntimeError> {
    let fail = |e: nix::Error| RuntimeError::Terminal(format!("openpty: {e}"));
    let pty = nix::pty::openpty(None, None).map_err(fail)?;
    let mut attrs = termios::tcgetattr(&pty.slave).map_err(fail)?;
    termios::cfmakeraw(&mut attrs);
    termios::tcsetattr(&pty.slave, SetArg::TCSANOW, &attrs).map_err(fail)?;
    Ok(Pty {
        master: pty.master,
        replica: pty.slave,
    })
}

/// Sends the master to the listener at `socket`.
pub fn send_master(socket: &Path, master: &OwnedFd) -> Result<(), RuntimeError> {
    let fail = |e: String| RuntimeError::Terminal(format!("{}: {e}", socket.display()));
    let stream = UnixStream::connect(socket).map_err(|e| fail(e.to_string()))?;
    let fds = [master.as_raw_fd()];
    let name = b"/dev/ptmx";
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(name)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| fail(format!("sendmsg: {e}")))?;
    Ok(())
}

/// Clears output processing on the terminal if someone set it: conmon turns ONLCR on when it
/// takes the master, and the guest's terminal has already turned each newline into CR LF.
pub fn keep_output_raw(tty: &impl std::os::fd::AsFd) {
    if let Ok(mut attrs) = termios::tcgetattr(tty) {
        if attrs.output_flags.contains(OutputFlags::OPOST) {
            attrs.output_flags.remove(OutputFlags::OPOST);
            let _ = termios::tcsetattr(tty, SetArg::TCSANOW, &attrs);
        }
    }
}

/// The terminal's size (rows, columns), if it has one.
pub fn size(tty: &impl AsRawFd) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ fills the winsize the pointer names.
    let rc = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{recvmsg, ControlMessageOwned};

    #[test]
    fn the_master_arrives_as_the_one_descriptor_and_the_pair_is_raw() {
        let dir = std::env::temp_dir().join(format!("hako-rt-console-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("console.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let pty = open().expect("pty");
        send_master(&path, &pty.master).expect("send");
        let (conn, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 64];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 2]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .expect("recvmsg");
        let fds: Vec<_> = msg
            .cmsgs()
            .expect("cmsgs")
            .flat_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => fds,
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(fds.len(), 1, "exactly one descriptor");
        let attrs = termios::tcgetattr(&pty.replica).expect("attrs");
        assert!(!attrs
            .local_flags
            .contains(termios::LocalFlags::ECHO | termios::LocalFlags::ICANON));
        // SAFETY: the descriptor just received is ours to close.
        unsafe { libc::close(fds[0]) };
        let _ = std::fs::remove_dir_all(&dir);
    }
}
