//! Copying between containerd's stdio FIFOs and the agent's streams.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

use super::fifo::OutputFifo;
use crate::agent_client::{AgentClient, GuestStdio};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioPaths {
    /// The streams the guest opens for these FIFOs: none where containerd gave none, and no
    /// separate stderr behind a terminal.
    pub fn guest(&self) -> GuestStdio {
        GuestStdio {
            stdin: !self.stdin.is_empty(),
            stdout: !self.stdout.is_empty(),
            stderr: !self.stderr.is_empty() && !self.terminal,
            terminal: self.terminal,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// A FIFO could not be opened.
    #[error("cannot open {which} fifo {path}: {source}")]
    Open {
        which: &'static str,
        path: String,
        source: std::io::Error,
    },
}

/// The copies of one process's streams.
pub struct Copies {
    /// stdout and stderr: finished when both have reached end of stream.
    pub outputs: JoinSet<()>,
    /// Bytes the output copies have written so far: whether they are still moving.
    pub progress: Arc<AtomicU64>,
    /// stdin: it ends at the FIFO's end or containerd's CloseIO, and must be ended at the
    /// process's exit (as runc's shim does), or a client that never closes its end (ctr, `docker
    /// exec -i` set their closer only after Exec returns) would hold the FIFO and a task in the
    /// shim for the shim's lifetime.
    pub stdin: Option<JoinHandle<()>>,
}

impl Copies {
    /// Stops the stdin copy, closing its FIFO.
    pub fn end_stdin(&mut self) {
        if let Some(copy) = self.stdin.take() {
            copy.abort();
        }
    }
}

/// Opens the FIFOs and starts the copies. Notifying `stdin_done` (containerd's CloseIO) makes
/// the stdin copy forward what is already in the FIFO and then close the process's stdin.
pub fn attach(
    agent: Arc<dyn AgentClient>,
    container_id: &str,
    exec_id: &str,
    paths: &StdioPaths,
    stdin_done: Arc<Notify>,
) -> Result<Copies, StdioError> {
    let open_err = |which: &'static str, path: &str| {
        let path = path.to_string();
        move |source| StdioError::Open {
            which,
            path,
            source,
        }
    };
    // Open everything first so a bad path fails before any copy starts.
    let stdin = if paths.stdin.is_empty() {
        None
    } else {
        Some(
            pipe::OpenOptions::new()
                .open_receiver(&paths.stdin)
                .map_err(open_err("stdin", &paths.stdin))?,
        )
    };
    let mut outputs = Vec::new();
    for (which, path, is_stderr) in [
        ("stdout", &paths.stdout, false),
        ("stderr", &paths.stderr, true),
    ] {
        if path.is_empty() {
            continue;
        }
        let fifo = OutputFifo::at(path).map_err(open_err(which, path))?;
        outputs.push((fifo, is_stderr));
    }

    let stdin = stdin.map(|stdin| {
        tokio::spawn(copy_stdin(
            agent.clone(),
            container_id.to_string(),
            exec_id.to_string(),
            stdin,
            stdin_done,
        ))
    });
    let mut set = JoinSet::new();
    let progress = Arc::new(AtomicU64::new(0));
    for (fifo, is_stderr) in outputs {
        set.spawn(copy_output(
            agent.clone(),
            container_id.to_string(),
            exec_id.to_string(),
            fifo,
            is_stderr,
            progress.clone(),
        ));
    }
    Ok(Copies {
        outputs: set,
        progress,
        stdin,
    })
}

async fn copy_stdin(
    agent: Arc<dyn AgentClient>,
    cid: String,
    exec_id: String,
    fifo: pipe::Receiver,
    done: Arc<Notify>,
) {
    let mut fifo = fifo;
    let mut buf = vec![0u8; 32 * 1024];
    let forward = async |data: &[u8]| match agent.write_stdin(&cid, &exec_id, data.to_vec()).await {
        Ok(()) => true,
        Err(e) => {
            log::debug!("{cid}: stdin copy stopped: {e}");
            false
        }
    };
    loop {
        tokio::select! {
            read = fifo.read(&mut buf) => match read {
                Ok(0) => break,
                Ok(n) => {
                    if !forward(&buf[..n]).await {
                        return;
                    }
                }
                Err(e) => {
                    log::debug!("{cid}: reading the stdin fifo: {e}");
                    break;
                }
            },
            () = done.notified() => {
                // The client has written everything it will write: forward what is still
                // buffered in the FIFO, then close.
                loop {
                    match fifo.try_read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if !forward(&buf[..n]).await {
                                return;
                            }
                        }
                    }
                }
                break;
            }
        }
    }
    if let Err(e) = agent.close_stdin(&cid, &exec_id).await {
        log::debug!("{cid}: closing stdin: {e}");
    }
}

async fn copy_output(
    agent: Arc<dyn AgentClient>,
    cid: String,
    exec_id: String,
    fifo: OutputFifo,
    is_stderr: bool,
    progress: Arc<AtomicU64>,
) {
    let which = if is_stderr { "stderr" } else { "stdout" };
    let mut fifo = match fifo.writer().await {
        Ok(fifo) => fifo,
        Err(e) => {
            log::warn!("{cid} {exec_id:?}: cannot open the {which} fifo for writing: {e}");
            return;
        }
    };
    loop {
        match agent.read_output(&cid, &exec_id, is_stderr).await {
            Ok(Some(data)) => {
                if let Err(e) = fifo.write_all(&data).await {
                    log::warn!("{cid} {exec_id:?}: writing the output fifo: {e}");
                    return;
                }
                progress.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            Ok(None) => return,
            Err(e) => {
                // Whatever the guest still had for this stream is lost: say so.
                log::warn!("{cid} {exec_id:?}: the {which} copy stopped: {e}");
                return;
            }
        }
    }
}
