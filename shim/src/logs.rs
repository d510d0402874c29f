//! Files the host writes from what the guest controls (the serial console, where the guest
//! kernel and the agent log; the helpers' output, which the guest can provoke): every one is
//! capped. A log that reaches its cap is renamed to `<name>.1` (replacing the one before) and
//! starts again, so a sandbox keeps at most twice the cap per log, however much the guest
//! writes. And what is shown of them on a terminal is escaped.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt};

/// One capped log file.
pub struct CappedLog {
    path: PathBuf,
    max: u64,
    file: Option<File>,
    written: u64,
    counts: Option<Arc<LogCounts>>,
}

/// What a capped log took and what its rotations threw away, in bytes: for the console's
/// metrics (`hako_console_log_bytes_total`), read while the log is written.
#[derive(Debug, Default)]
pub struct LogCounts {
    kept: AtomicU64,
    dropped: AtomicU64,
}

impl LogCounts {
    /// Bytes written to the log, and bytes of it since discarded by rotation.
    pub fn get(&self) -> (u64, u64) {
        (
            self.kept.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }
}

impl CappedLog {
    /// Opens (creating, mode 0600) `path` for appending; what it holds already counts.
    pub fn open(path: &Path, max: u64) -> std::io::Result<CappedLog> {
        let file = Self::open_file(path)?;
        let written = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(CappedLog {
            path: path.to_path_buf(),
            max: max.max(1),
            file: Some(file),
            written,
            counts: None,
        })
    }

    /// Counts what is written and what rotation discards in `counts`.
    pub fn counted(mut self, counts: Arc<LogCounts>) -> Self {
        self.counts = Some(counts);
        self
    }

    fn open_file(path: &Path) -> std::io::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
    }

    /// The rotated copy of `path`.
    pub fn rotated(path: &Path) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(".1");
        PathBuf::from(name)
    }

    /// Appends `bytes`, rotating whenever the file reaches its cap. A failure to write is
    /// dropped: the log is the guest's, and losing some of it must not stop the sandbox.
    pub fn write(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.written >= self.max {
                self.rotate();
            }
            let room = (self.max - self.written).min(bytes.len() as u64) as usize;
            let (now, later) = bytes.split_at(room);
            if let Some(file) = self.file.as_mut() {
                let _ = file.write_all(now);
            }
            if let Some(counts) = &self.counts {
                counts.kept.fetch_add(now.len() as u64, Ordering::Relaxed);
            }
            self.written += now.len() as u64;
            bytes = later;
        }
    }

    fn rotate(&mut self) {
        self.file = None;
        let rotated = Self::rotated(&self.path);
        if let Some(counts) = &self.counts {
            // The rotated copy the rename replaces is gone for good.
            let lost = fs::metadata(&rotated).map(|m| m.len()).unwrap_or(0);
            counts.dropped.fetch_add(lost, Ordering::Relaxed);
        }
        let _ = fs::rename(&self.path, rotated);
        self.file = Self::open_file(&self.path).ok();
        self.written = 0;
    }
}

/// Copies what `reader` yields into `log` until the end of the stream.
pub async fn pump(mut reader: impl AsyncRead + Unpin, mut log: CappedLog) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => log.write(&buffer[..n]),
        }
    }
}

/// What a log says, made safe for a terminal: control characters (escape sequences among
/// them) and bytes that are not UTF-8 are shown as `\xNN`, as journalctl does; newlines and
/// tabs stay.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' | '\t' => out.push(c),
                c if c.is_control() => {
                    let mut buffer = [0u8; 4];
                    for b in c.encode_utf8(&mut buffer).bytes() {
                        out.push_str(&format!("\\x{b:02x}"));
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_controls_and_bad_bytes_are_escaped() {
        let hostile = b"boot ok\n\x1b]0;pwned\x07\x1b[2Jtab\there\xff\xfe\xc2\x9b end\n";
        assert_eq!(
            escape(hostile),
            "boot ok\n\\x1b]0;pwned\\x07\\x1b[2Jtab\there\\xff\\xfe\\xc2\\x9b end\n"
        );
        assert_eq!(escape("grüße\n".as_bytes()), "grüße\n");
    }

    #[test]
    fn a_log_keeps_at_most_twice_its_cap() {
        let dir = std::env::temp_dir().join(format!("hako-log-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("console.log");
        let counts = Arc::new(LogCounts::default());
        let mut log = CappedLog::open(&path, 1000)
            .expect("open")
            .counted(counts.clone());
        for _ in 0..100 {
            log.write(&[b'x'; 333]);
        }
        let size = |p: &Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(size(&path) <= 1000, "{}", size(&path));
        assert_eq!(size(&CappedLog::rotated(&path)), 1000);
        // 33,300 bytes in all: the newest are kept, and the counts say what was lost.
        assert_eq!(size(&path), 33_300 % 1000);
        let (kept, dropped) = counts.get();
        assert_eq!(kept, 33_300);
        assert_eq!(dropped, 33_300 - 1000 - 300);
        // Reopening counts what is there.
        drop(log);
        let mut again = CappedLog::open(&path, 1000).expect("reopen");
        again.write(&[b'y'; 900]);
        assert!(size(&path) <= 1000);
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
