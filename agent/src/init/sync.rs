//! Both ends of the pipe protocol between the agent and a container's init helper. The agent
//! passes the write end of a "sync" pipe as fd 3 and the read end of a "start" pipe as fd 4.
//! The helper writes `pid N` (its child, PID 1 of the container) and the child `created` once
//! the container is built, or `error <reason>`; the child then blocks reading fd 4 until the
//! agent writes the start byte. A failed exec is reported on fd 3; a successful one closes it
//! (close-on-exec), which the agent reads as end of file. So does a container's init whose exec
//! the kernel refused as too long (E2BIG): under runc that is the process's failure, not
//! Start's (`process::too_long`). With a terminal, the terminal's master comes before "created",
//! on the socket `console` speaks.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::RawFd;

use super::error::{sys, InitError};

pub const SYNC_FD: RawFd = 3;
pub const START_FD: RawFd = 4;

/// One line on the sync pipe in a single write: the helper and its child both write to it, and
/// `writeln!` may split a line into several writes that the other's could interleave with.
pub fn report(sync: &mut File, line: &str) -> std::io::Result<()> {
    sync.write_all(format!("{line}\n").as_bytes())
}

pub fn report_and_exit(sync: &mut File, e: &InitError) -> ! {
    let message = e.to_string().replace('\n', " ");
    let _ = report(sync, &format!("error {message}"));
    std::process::exit(127);
}

pub fn set_cloexec(fd: RawFd) -> Result<(), InitError> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    // SAFETY: fd is open for the life of this process; the borrow does not outlive the call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(sys("setting close-on-exec"))?;
    Ok(())
}

/// Reads the helper's report: "pid N" and then "created", or "error ...".
pub fn read_until_created(sync: &mut BufReader<File>) -> Result<i32, String> {
    let mut pid = None;
    let mut created = false;
    let mut line = String::new();
    while pid.is_none() || !created {
        line.clear();
        match sync.read_line(&mut line) {
            Ok(0) => return Err("the init helper exited without reporting".to_string()),
            Ok(_) => {}
            Err(e) => return Err(format!("reading the init helper's report: {e}")),
        }
        let line = line.trim_end();
        if let Some(p) = line.strip_prefix("pid ") {
            pid = p.parse::<i32>().ok();
        } else if line == "created" {
            created = true;
        } else if let Some(e) = line.strip_prefix("error ") {
            return Err(e.to_string());
        }
    }
    pid.ok_or_else(|| "the init helper reported no pid".to_string())
}

/// After the start byte: EOF means the exec succeeded (fd 3 is close-on-exec).
pub fn read_exec_result(sync: &mut BufReader<File>) -> Result<(), String> {
    let mut line = String::new();
    match sync.read_line(&mut line) {
        Ok(0) => Ok(()),
        Ok(_) => Err(line
            .trim_end()
            .strip_prefix("error ")
            .unwrap_or(line.trim_end())
            .to_string()),
        Err(e) => Err(format!("reading the exec result: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::pipe2;

    #[test]
    fn helper_report_is_parsed() {
        let (r, w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let mut w = File::from(w);
        w.write_all(b"created\npid 42\n").expect("write");
        drop(w);
        let mut reader = BufReader::new(File::from(r));
        assert_eq!(read_until_created(&mut reader), Ok(42));
        assert_eq!(read_exec_result(&mut reader), Ok(()));
    }

    #[test]
    fn helper_errors_are_passed_on() {
        let (r, w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let mut w = File::from(w);
        w.write_all(b"pid 42\nerror mounting proc on /proc: EPERM\n")
            .expect("write");
        drop(w);
        let mut reader = BufReader::new(File::from(r));
        assert_eq!(
            read_until_created(&mut reader),
            Err("mounting proc on /proc: EPERM".to_string())
        );
    }
}
