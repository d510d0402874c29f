//! The server's watch on keepers: a keeper that dies before its guest process (SIGKILLed by
//! podman's exec stop or conmon's timeout, or by the host's OOM killer) takes the guest
//! process with it, so that a keeper lives exactly as long as the process it stands for, both
//! ways. `create` and `exec` register each keeper on a socket beside the server's; the server
//! holds a pidfd for it.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::io::AsyncBufReadExt;

use super::state::Keeper;
use super::RuntimeError;
use crate::ids::validate;
use crate::task::TaskService;

/// The longest registration line: two numbers and two ids.
const MAX_LINE: u64 = 400;
const SIGKILL: u32 = 9;

/// One keeper to watch: the guest process it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub keeper: Keeper,
    pub id: String,
    pub exec_id: String,
}

impl Registration {
    fn line(&self) -> String {
        format!(
            "{} {} {} {}\n",
            self.keeper.pid,
            self.keeper.started,
            self.id,
            if self.exec_id.is_empty() {
                "-"
            } else {
                &self.exec_id
            }
        )
    }

    fn parse(line: &str) -> Option<Registration> {
        let mut parts = line.split_whitespace();
        let pid = parts.next()?.parse().ok()?;
        let started = parts.next()?.parse().ok()?;
        let id = parts.next()?.to_string();
        let exec_id = match parts.next()? {
            "-" => String::new(),
            other => other.to_string(),
        };
        if parts.next().is_some() || validate("container id", &id).is_err() {
            return None;
        }
        if !exec_id.is_empty() && validate("exec id", &exec_id).is_err() {
            return None;
        }
        Some(Registration {
            keeper: Keeper { pid, started },
            id,
            exec_id,
        })
    }
}

/// Registers a keeper with the server listening at `socket`, and waits for its answer.
pub fn register(socket: &Path, registration: &Registration) -> Result<(), RuntimeError> {
    let fail = |e: std::io::Error| RuntimeError::io(socket, e);
    let mut stream = UnixStream::connect(socket).map_err(fail)?;
    stream
        .write_all(registration.line().as_bytes())
        .map_err(fail)?;
    let mut answer = String::new();
    BufReader::new(std::io::Read::take(&stream, 16))
        .read_line(&mut answer)
        .map_err(fail)?;
    if answer.trim() != "ok" {
        return Err(RuntimeError::Invalid(format!(
            "the server did not take keeper {}: {answer:?}",
            registration.keeper.pid
        )));
    }
    Ok(())
}

/// Serves registrations on `listener` for the server's lifetime.
pub fn serve(listener: tokio::net::UnixListener, service: Arc<TaskService>) {
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = service.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                let mut reader =
                    tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_LINE));
                if reader.read_line(&mut line).await.is_err() {
                    return;
                }
                let answer = match Registration::parse(&line) {
                    Some(registration) => match watch_pid(&registration) {
                        Ok(pidfd) => {
                            tokio::spawn(kill_when_gone(pidfd, registration, service));
                            "ok\n"
                        }
                        Err(_) => "refused\n",
                    },
                    None => "refused\n",
                };
                let _ = tokio::io::AsyncWriteExt::write_all(&mut write, answer.as_bytes()).await;
            });
        }
    });
}

/// A pidfd for the registered keeper, if it is still the process registered.
fn watch_pid(registration: &Registration) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, registration.keeper.pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just returned to us.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // Checked after the pidfd is held: a pid recycled before the open is not the keeper.
    if !registration.keeper.alive() {
        return Err(std::io::Error::from(std::io::ErrorKind::NotFound));
    }
    Ok(pidfd)
}

async fn kill_when_gone(pidfd: OwnedFd, registration: Registration, service: Arc<TaskService>) {
    // SAFETY: the pidfd is an OwnedFd the AsyncFd owns from here on, open until it is dropped.
    let Ok(fd) = (unsafe { AsyncFd::register(pidfd) }) else {
        return;
    };
    // A pidfd becomes readable when its process exits.
    if fd.readable().await.is_err() {
        return;
    }
    // Finished or deleted already in the usual case, which is the answer ignored here.
    if service
        .kill_process(&registration.id, &registration.exec_id, SIGKILL)
        .await
        .is_ok()
    {
        log::warn!(
            "{} {}: its keeper (pid {}) died first; the guest process was killed",
            registration.id,
            registration.exec_id,
            registration.keeper.pid
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_round_trip_and_garbage_is_refused() {
        let r = Registration {
            keeper: Keeper {
                pid: 42,
                started: 7,
            },
            id: "c1".into(),
            exec_id: String::new(),
        };
        assert_eq!(Registration::parse(&r.line()), Some(r.clone()));
        let e = Registration {
            exec_id: "e1".into(),
            ..r
        };
        assert_eq!(Registration::parse(&e.line()), Some(e));
        for bad in [
            "",
            "42 7 c1",
            "x 7 c1 -",
            "42 7 ../c -",
            "42 7 c1 ../e",
            "42 7 c1 - extra",
            "-1 7 c1 -",
        ] {
            assert_eq!(Registration::parse(bad), None, "{bad:?}");
        }
    }
}
