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
    rx: Mutex<mpsc::Receiver<Vec<u8>>>,
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

    /// Next chunk of stdout (or stderr); `None` at end of stream.
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
        let mut rx = output.rx.lock().await;
        Ok(rx.recv().await.map(|mut chunk| {
            chunk.truncate(max.max(1));
            chunk
        }))
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

pub(super) fn spawn_output_reader(fd: OwnedFd) -> Arc<Output> {
    let (tx, rx) = mpsc::channel(64);
    let output = Arc::new(Output { rx: Mutex::new(rx) });
    tokio::spawn(async move {
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
