//! containerd's output FIFOs, opened for writing only once their reader is there.
//!
//! A client (ctr, dockerd, containerd's CRI) makes the FIFOs and opens its reading end before it
//! asks for the process, but Go's fifo package does that open in the background: it may still be
//! on its way when the process has already written, exited and had its stream closed. A pipe
//! whose last open end closes takes its unread bytes with it, so output written and closed before
//! the reader's open arrives is lost (an exec's output vanished that way under load: issue 27).
//! runc's shim avoids it by opening for writing in blocking mode, which waits for a reader; so
//! does this.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::sync::{Arc, Mutex};

use tokio::net::unix::pipe;

/// One output FIFO, open for writing at attach if its reader already is (almost always), else
/// held by an `O_PATH` handle until the copy sees the reader arrive.
pub enum OutputFifo {
    Open(pipe::Sender),
    AwaitingReader(OwnedFd),
}

impl OutputFifo {
    /// Takes hold of the FIFO at `path`, which must be one, and opens it for writing if its
    /// reader is there.
    pub fn at(path: &str) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(path)?;
        if !file.metadata()?.file_type().is_fifo() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a FIFO",
            ));
        }
        let handle = OwnedFd::from(file);
        // A non-blocking open for writing succeeds exactly when a reader is there.
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(reopen_path(&handle))
        {
            Ok(first) => Ok(Self::Open(open_sender(&handle, first)?)),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(Self::AwaitingReader(handle)),
            Err(e) => Err(e),
        }
    }

    /// The FIFO open for writing, once its reader has it open.
    pub async fn writer(self) -> std::io::Result<pipe::Sender> {
        let handle = match self {
            Self::Open(sender) => return Ok(sender),
            Self::AwaitingReader(handle) => handle,
        };
        // A blocking open waits for the reader, on a thread of its own. Should this copy be
        // dropped first (the process deleted, the shim ending), the guard opens the reading end
        // itself and leaves it with the thread, so that the open returns, however late the
        // thread gets to it, and the thread ends.
        let release: Release = Arc::default();
        let mut guard = ReleaseOnDrop {
            handle: Some(handle.try_clone()?),
            release: release.clone(),
        };
        let path = reopen_path(&handle);
        let opened = tokio::task::spawn_blocking(move || {
            let opened = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(path);
            release.lock().unwrap_or_else(|p| p.into_inner()).take();
            opened
        })
        .await
        .map_err(std::io::Error::other);
        guard.handle = None;
        open_sender(&handle, opened??)
    }
}

fn reopen_path(handle: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", handle.as_raw_fd())
}

/// The writer the copy uses, opened while `first` (a writer opened once the reader was there)
/// still is: a moment with no writer at all would read as the end of the stream to the reader.
/// Read-write, so that a reader that goes away holds the copy back (the buffer fills) instead of
/// breaking it.
fn open_sender(handle: &OwnedFd, first: std::fs::File) -> std::io::Result<pipe::Sender> {
    let sender = pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(reopen_path(handle));
    drop(first);
    sender
}

/// Where a reader opened to release a blocked open waits for the thread to close it.
type Release = Arc<Mutex<Option<std::fs::File>>>;

/// Releases a blocking open for writing that nobody waits for any more.
struct ReleaseOnDrop {
    handle: Option<OwnedFd>,
    release: Release,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        let Some(handle) = &self.handle else {
            return;
        };
        // Opening for reading without blocking always succeeds on a FIFO.
        let reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(reopen_path(handle));
        if let Ok(reader) = reader {
            *self.release.lock().unwrap_or_else(|p| p.into_inner()) = Some(reader);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A directory of the test's own, removed with it.
    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("hako-fifo-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("mkdir");
            Self(dir)
        }

        fn fifo(&self) -> std::path::PathBuf {
            let path = self.0.join("out");
            nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .expect("mkfifo");
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[tokio::test]
    async fn a_path_that_is_not_a_fifo_is_refused_at_once() {
        let dir = Scratch::new("not");
        let file = dir.0.join("file");
        std::fs::write(&file, b"").expect("file");
        let err = OutputFifo::at(file.to_str().expect("utf-8"))
            .err()
            .expect("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        assert!(OutputFifo::at(dir.0.join("none").to_str().expect("utf-8")).is_err());
    }

    #[tokio::test]
    async fn the_writer_opens_only_once_the_reader_has() {
        let dir = Scratch::new("reader");
        let path = dir.fifo();
        let fifo = OutputFifo::at(path.to_str().expect("utf-8")).expect("fifo");
        let writer = tokio::spawn(fifo.writer());
        tokio::task::yield_now().await;
        assert!(!writer.is_finished(), "opened with no reader");
        let mut reader = std::fs::File::open(&path).expect("reader");
        let mut sender = writer.await.expect("task").expect("opened");
        use tokio::io::AsyncWriteExt;
        sender.write_all(b"bytes").await.expect("write");
        drop(sender);
        let mut got = String::new();
        reader.read_to_string(&mut got).expect("read");
        assert_eq!(got, "bytes");
    }

    #[tokio::test]
    async fn a_wait_given_up_leaves_no_thread_blocked() {
        let dir = Scratch::new("given-up");
        let fifo = OutputFifo::at(dir.fifo().to_str().expect("utf-8")).expect("fifo");
        let waiting = tokio::spawn(fifo.writer());
        tokio::task::yield_now().await;
        waiting.abort();
        assert!(waiting.await.expect_err("aborted").is_cancelled());
        // The runtime's drop at the end of this test waits for its blocking threads: a thread
        // still in open(2) would hang it, and the test with it.
    }
}
