//! The sandbox's host processes read from `/proc` when someone asks: CPU time from `stat`, RSS
//! from `status`, PSS from `smaps_rollup` (cached, as it walks every page table). Readers are
//! bounded and tolerant: a file that is missing, too long or garbled makes its value absent,
//! never an error, and a pid whose start time is not the pid file's is never reported.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::families;
use super::snapshot::{Sample, Value};
use crate::daemon::{parse_pid_file, parse_stat};

/// `/proc/PID/{stat,status,smaps_rollup}` are 1-2 KiB; anything longer is not what we parse.
const MAX_PROC_FILE: u64 = 16 * 1024;
/// PSS costs the kernel a walk of every page table and a hold of the mm's lock the VMM's page
/// faults need, so it is read at most this often per process.
pub const PSS_INTERVAL: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostProcess {
    Vmm,
    Virtiofsd,
    Vsock,
    Shim,
}

impl HostProcess {
    pub const ALL: [HostProcess; 4] = [Self::Vmm, Self::Virtiofsd, Self::Vsock, Self::Shim];

    pub fn label(self) -> &'static str {
        match self {
            Self::Vmm => "vmm",
            Self::Virtiofsd => "virtiofsd",
            Self::Vsock => "vsock",
            Self::Shim => "shim",
        }
    }

    /// The pid file in the sandbox dir (`sandbox::paths`); the shim is this process.
    fn pid_file(self) -> Option<&'static str> {
        match self {
            Self::Vmm => Some("vmm.pid"),
            Self::Virtiofsd => Some("virtiofsd.pid"),
            Self::Vsock => Some("vsock.pid"),
            Self::Shim => None,
        }
    }
}

/// A `Key:   123 kB` line of `status` or `smaps_rollup`, in bytes.
pub fn parse_kb_line(text: &str, key: &str) -> Option<u64> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?;
    let mut parts = line.split_whitespace();
    let kb = parts.next()?.parse::<u64>().ok()?;
    (parts.next() == Some("kB"))
        .then_some(kb)?
        .checked_mul(1024)
}

fn read_bounded(path: &Path) -> Option<String> {
    let mut bytes = Vec::new();
    File::open(path)
        .ok()?
        .take(MAX_PROC_FILE + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    if bytes.len() as u64 > MAX_PROC_FILE {
        return None;
    }
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub process: HostProcess,
    pub cpu_seconds: f64,
    pub rss_bytes: Option<u64>,
    pub pss_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct CachedPss {
    pid: u32,
    start_time: u64,
    at: Instant,
    bytes: u64,
}

/// Reads one sandbox's host processes; holds only the PSS cache between requests.
#[derive(Debug)]
pub struct HostReader {
    dir: PathBuf,
    proc_root: PathBuf,
    clk_tck: f64,
    pss: Mutex<HashMap<HostProcess, CachedPss>>,
}

impl HostReader {
    pub fn new(sandbox_dir: &Path) -> Self {
        Self::with_proc(sandbox_dir, Path::new("/proc"))
    }

    fn with_proc(sandbox_dir: &Path, proc_root: &Path) -> Self {
        let clk_tck = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .filter(|t| *t > 0)
            .unwrap_or(100);
        Self {
            dir: sandbox_dir.to_path_buf(),
            proc_root: proc_root.to_path_buf(),
            clk_tck: clk_tck as f64,
            pss: Mutex::new(HashMap::new()),
        }
    }

    /// The pid and start time of `process`, if it has one now.
    fn locate(&self, process: HostProcess) -> Option<(u32, Option<u64>)> {
        match process.pid_file() {
            Some(name) => {
                let (pid, start) = parse_pid_file(&read_bounded(&self.dir.join(name))?)?;
                Some((pid, Some(start)))
            }
            None => Some((std::process::id(), None)),
        }
    }

    fn read_one(&self, process: HostProcess, now: Instant) -> Option<Reading> {
        let (pid, expected) = self.locate(process)?;
        let proc_dir = self.proc_root.join(pid.to_string());
        let stat = parse_stat(&read_bounded(&proc_dir.join("stat"))?)?;
        if expected.is_some_and(|s| s != stat.start_time) {
            return None;
        }
        let rss_bytes =
            read_bounded(&proc_dir.join("status")).and_then(|t| parse_kb_line(&t, "VmRSS"));
        let pss_bytes = self.pss(process, pid, stat.start_time, &proc_dir, now);
        Some(Reading {
            process,
            cpu_seconds: stat.cpu_ticks as f64 / self.clk_tck,
            rss_bytes,
            pss_bytes,
        })
    }

    fn pss(
        &self,
        process: HostProcess,
        pid: u32,
        start_time: u64,
        proc_dir: &Path,
        now: Instant,
    ) -> Option<u64> {
        let mut cache = self.pss.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.get(&process) {
            let fresh = now.saturating_duration_since(c.at) < PSS_INTERVAL;
            if fresh && c.pid == pid && c.start_time == start_time {
                return Some(c.bytes);
            }
        }
        let bytes =
            read_bounded(&proc_dir.join("smaps_rollup")).and_then(|t| parse_kb_line(&t, "Pss"));
        match bytes {
            Some(bytes) => {
                let entry = CachedPss {
                    pid,
                    start_time,
                    at: now,
                    bytes,
                };
                cache.insert(process, entry);
            }
            None => {
                cache.remove(&process);
            }
        }
        bytes
    }

    /// Every host process that runs now. Blocking (a few small reads, and `smaps_rollup` when
    /// due): call it off the async threads.
    pub fn read(&self) -> Vec<Reading> {
        let now = Instant::now();
        HostProcess::ALL
            .into_iter()
            .filter_map(|p| self.read_one(p, now))
            .collect()
    }

    pub fn samples(&self) -> Vec<Sample> {
        let mut out = Vec::new();
        for r in self.read() {
            let label = vec![r.process.label().to_string()];
            let mut push = |family: &families::Family, v: f64| {
                out.push(Sample {
                    family: family.name.to_string(),
                    labels: label.clone(),
                    value: Value::Number(v),
                })
            };
            push(&families::HOST_PROCESS_CPU_SECONDS_TOTAL, r.cpu_seconds);
            if let Some(rss) = r.rss_bytes {
                push(&families::HOST_PROCESS_RSS_BYTES, rss as f64);
            }
            if let Some(pss) = r.pss_bytes {
                push(&families::HOST_PROCESS_PSS_BYTES, pss as f64);
            }
        }
        out
    }
}

#[cfg(test)]
#[path = "host_tests.rs"]
mod tests;
