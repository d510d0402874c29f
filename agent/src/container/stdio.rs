//! A process's stdio as the host sees it: stdin written on request, stdout and stderr drained
//! into bounded channels the host reads from (a slow host holds the container back instead of
//! growing memory), and a terminal's window size.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, Mutex};

use super::{io_err, not_found, ContainerError, Containers};

const READ_CHUNK: usize = 32 * 1024;

/// One output stream of a process, drained by a reader task into a bounded channel so a slow
/// host applies back-pressure to the container instead of growing memory.
pub(super) struct Output {
    /// The channel, and what the last read could not take of a chunk.
    rx: Mutex<(mpsc::Receiver<Vec<u8>>, Vec<u8>)>,
}

impl Output {
    /// What the stream has ready, at most `max` bytes and at least one (waiting for it); `None`
    /// at end of stream.
    async fn read(&self, max: usize) -> Option<Vec<u8>> {
        let max = max.max(1);
        let mut guard = self.rx.lock().await;
        let (rx, rest) = &mut *guard;

        let mut data = if rest.is_empty() {
            match rx.recv().await {
                Some(chunk) => chunk,
                None => return None,
            }
        } else {
            std::mem::take(rest)
        };
        while data.len() < max {
            match rx.try_recv() {
                Ok(chunk) => data.extend_from_slice(&chunk),
                Err(_) => break,
            }
        }
        if data.len() > max {
            *rest = data.split_off(max);
        }
        Some(data)
    }
}

pub(super) fn set_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}

/// Which streams the host attaches, and whether they are one terminal.
#[derive(Debug, Clone, Copy)]
pub struct StdioPlan {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub terminal: bool,
}

impl Containers {
    async fn stdin_of(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<Option<Arc<Mutex<Option<pipe::Sender>>>>, ContainerError> {
        let table = self.table.lock().await;
        let c = table.get(id).ok_or_else(|| not_found(id, exec_id))?;
        Ok(c.proc(id, exec_id)?.stdin.clone())
    }

    pub async fn write_stdin(
        &self,
        id: &str,
        exec_id: &str,
        data: &[u8],
    ) -> Result<usize, ContainerError> {
        let state = |reason: &str| ContainerError::State {
            id: id.to_string(),
            reason: reason.to_string(),
        };
        let stdin = self
            .stdin_of(id, exec_id)
            .await?
            .ok_or_else(|| state("has no stdin"))?;
        let mut guard = stdin.lock().await;
        let pipe = guard.as_mut().ok_or_else(|| state("stdin is closed"))?;
        pipe.write_all(data)
            .await
            .map_err(io_err(id, "writing stdin"))?;
        Ok(data.len())
    }

    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), ContainerError> {
        if let Some(stdin) = self.stdin_of(id, exec_id).await? {
            stdin.lock().await.take();
        }
        Ok(())
    }

    /// What stdout (or stderr) has ready, at most `max` bytes and at least one (waiting for it);
    /// `None` at end of stream. Chunks already queued go out together, so a fast writer costs
    /// the host fewer round trips.
    pub async fn read_output(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
        max: usize,
    ) -> Result<Option<Vec<u8>>, ContainerError> {
        let output = {
            let table = self.table.lock().await;
            let c = table.get(id).ok_or_else(|| not_found(id, exec_id))?;
            let p = c.proc(id, exec_id)?;
            if stderr {
                p.stderr.clone()
            } else {
                p.stdout.clone()
            }
        };
        let Some(output) = output else {
            return Ok(None);
        };
        Ok(output.read(max).await)
    }

    pub async fn resize(
        &self,
        id: &str,
        exec_id: &str,
        width: u16,
        height: u16,
    ) -> Result<(), ContainerError> {
        let pty = {
            let table = self.table.lock().await;
            let c = table.get(id).ok_or_else(|| not_found(id, exec_id))?;
            c.proc(id, exec_id)?.pty.clone()
        };
        let pty = pty.ok_or_else(|| ContainerError::State {
            id: id.to_string(),
            reason: "the process has no terminal".to_string(),
        })?;
        let size = libc::winsize {
            ws_row: height,
            ws_col: width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer; the fd is a pty master we own.
        if unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &size) } < 0 {
            return Err(io_err(id, "resizing the terminal")(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

/// Starts draining `fd` (a pipe's read end or a pty master) into a new `Output`.
pub(super) fn spawn_output_reader(fd: OwnedFd) -> Arc<Output> {
    let (tx, rx) = mpsc::channel(64);
    let output = Arc::new(Output {
        rx: Mutex::new((rx, Vec::new())),
    });
    // Non-blocking, or a read with nothing to read would block a runtime thread: with both
    // streams waiting at once, the agent's two threads, and with them every call (issue 21).
    let nonblocking = set_nonblocking(&fd);
    tokio::spawn(async move {
        if let Err(e) = nonblocking {
            log::error!("output stream: cannot make it non-blocking: {e}");
            return;
        }
        // A pty master is not a FIFO; both poll the same way.
        let Ok(mut reader) = pipe::Receiver::from_owned_fd_unchecked(fd) else {
            return;
        };
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            // A pty master reads EIO once the last slave is closed: that is its end of stream.
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    output
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A pipe as the init helper's are made: blocking.
    fn pipe_pair() -> (OwnedFd, std::fs::File) {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        (r, std::fs::File::from(w))
    }

    #[tokio::test]
    async fn a_stream_is_read_without_blocking_a_runtime_thread() {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let (r, _w) = pipe_pair();
        let probe = r.try_clone().expect("dup");
        let _output = spawn_output_reader(r);
        let flags = OFlag::from_bits_truncate(fcntl(&probe, FcntlArg::F_GETFL).expect("flags"));
        assert!(flags.contains(OFlag::O_NONBLOCK), "{flags:?}");
    }

    #[tokio::test]
    async fn output_arrives_whole_and_in_order_whatever_the_readers_size() {
        let (r, mut w) = pipe_pair();
        let output = spawn_output_reader(r);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let expected = data.clone();
        let writer = std::thread::spawn(move || w.write_all(&data));
        let mut got = Vec::new();
        // Reads smaller than a chunk keep the rest for the next read.
        while let Some(part) = output.read(1000).await {
            assert!(!part.is_empty() && part.len() <= 1000);
            got.extend(part);
        }
        writer.join().expect("writer").expect("written");
        assert_eq!(got.len(), expected.len());
        assert!(got == expected);
    }

    #[tokio::test]
    async fn queued_chunks_go_out_together() {
        let (tx, rx) = mpsc::channel(64);
        for i in 0..3u8 {
            tx.send(vec![i; READ_CHUNK]).await.expect("queued");
        }
        drop(tx);
        let output = Output {
            rx: Mutex::new((rx, Vec::new())),
        };
        let all = output.read(8 * READ_CHUNK).await.expect("data");
        assert_eq!(all.len(), 3 * READ_CHUNK);
        assert_eq!((all[0], all[READ_CHUNK], all[2 * READ_CHUNK]), (0, 1, 2));
        assert_eq!(output.read(8 * READ_CHUNK).await, None);
    }
}
