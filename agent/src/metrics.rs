//! The guest's metrics on vsock port `METRICS_VSOCK_PORT` (issue 26, docs/metrics.md): the
//! shim connects per scrape, writes one request frame naming the pod's containers, and gets
//! one answer frame (`hako_protocol::metrics`). Everything is read per request from /proc and
//! the containers' cgroups; nothing runs in between.
//!
//! One blocking thread accepts and serves each connection itself, so at most one request is
//! in flight whatever the host does, and a stalled host costs the socket timeouts at most.
//! Parsing is tolerant: a file or a line the kernel does not have leaves its field absent.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use hako_protocol::metrics::{
    answer_frame, parse_header, parse_request, HEADER, MAX_DISK_NAME, MAX_GUEST_DISKS,
    MAX_GUEST_NICS, MAX_METRICS_CONTAINERS, MAX_METRICS_REQUEST, MAX_NIC_NAME,
};
use hako_protocol::{
    ContainerMetrics, GuestCpu, GuestDisk, GuestInterface, GuestLoad, GuestMemory, GuestMetrics,
};
use nix::sys::socket::{accept, setsockopt, sockopt};
use nix::sys::time::{TimeVal, TimeValLike};

/// A host that stops reading or writing is cut after this; it asks again next scrape.
const IO_TIMEOUT: Duration = Duration::from_secs(1);
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Listens on the metrics port and answers each connection in turn on one thread.
pub fn serve() -> io::Result<()> {
    let listener = crate::vsock::listen_on(hako_protocol::METRICS_VSOCK_PORT, 4)?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || loop {
            let fd = match accept(listener.as_raw_fd()) {
                // SAFETY: accept(2) returned a new descriptor that nothing else owns.
                Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
                Err(e) => {
                    log::warn!("metrics: accept: {e}");
                    std::thread::sleep(ACCEPT_BACKOFF);
                    continue;
                }
            };
            if let Err(e) = answer(fd) {
                log::debug!("metrics: {e}");
            }
        })?;
    Ok(())
}

fn answer(fd: OwnedFd) -> io::Result<()> {
    let timeout = TimeVal::milliseconds(IO_TIMEOUT.as_millis() as i64);
    setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)?;
    setsockopt(&fd, sockopt::SendTimeout, &timeout)?;
    let mut stream = File::from(fd);
    let mut header = [0u8; HEADER];
    stream.read_exact(&mut header)?;
    let len = parse_header(header, MAX_METRICS_REQUEST).map_err(io::Error::other)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    #[cfg(feature = "hostile")]
    if let Some(mode) = crate::hostile::metrics_mode() {
        return crate::hostile::metrics_answer(mode, &mut stream);
    }
    let request = parse_request(&body).map_err(io::Error::other)?;
    let frame = answer_frame(&collect(&request.container_ids)).map_err(io::Error::other)?;
    stream.write_all(&frame)
}

/// Everything the answer holds, read now.
fn collect(container_ids: &[String]) -> GuestMetrics {
    let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
    let memory = meminfo(&read("/proc/meminfo"));
    let mut cpu = cpu(&read("/proc/stat"));
    cpu.user_hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|hz| u64::try_from(hz).ok());
    let (interfaces, nics_cut) = net_dev(&read("/proc/net/dev"));
    let (disks, disks_cut) = diskstats(&read("/proc/diskstats"));
    let mut wanted = BTreeSet::new();
    let containers = container_ids
        .iter()
        .filter(|id| hako_protocol::valid_id(id) && wanted.insert(id.as_str()))
        .take(MAX_METRICS_CONTAINERS)
        .filter_map(|id| container(&Path::new(crate::cgroup::PARENT).join(id), id, memory.total))
        .collect();
    GuestMetrics {
        memory: Some(memory).into(),
        cpu: Some(cpu).into(),
        load: Some(loadavg(&read("/proc/loadavg"))).into(),
        interfaces,
        disks,
        containers,
        truncated: nics_cut || disks_cut,
        ..Default::default()
    }
}

/// `Key: value kB` lines, in bytes.
pub fn meminfo(text: &str) -> GuestMemory {
    let kb: HashMap<&str, u64> = text
        .lines()
        .filter_map(|l| {
            let (key, rest) = l.split_once(':')?;
            let value: u64 = rest.split_whitespace().next()?.parse().ok()?;
            Some((key, value.checked_mul(1024)?))
        })
        .collect();
    let get = |key: &str| kb.get(key).copied();
    GuestMemory {
        total: get("MemTotal"),
        available: get("MemAvailable"),
        free: get("MemFree"),
        cached: get("Cached"),
        buffers: get("Buffers"),
        shmem: get("Shmem"),
        slab: get("Slab"),
        swap_total: get("SwapTotal"),
        swap_free: get("SwapFree"),
        ..Default::default()
    }
}

/// The aggregate `cpu` line (ticks) and the runnable and blocked counts of /proc/stat.
pub fn cpu(text: &str) -> GuestCpu {
    let mut cpu = GuestCpu::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("cpu") => {
                let mut next = || words.next().and_then(|w| w.parse::<u64>().ok());
                cpu.user = next();
                cpu.nice = next();
                cpu.system = next();
                cpu.idle = next();
                cpu.iowait = next();
                cpu.irq = next();
                cpu.softirq = next();
                cpu.steal = next();
            }
            Some("procs_running") => cpu.procs_running = words.next().and_then(|w| w.parse().ok()),
            Some("procs_blocked") => cpu.procs_blocked = words.next().and_then(|w| w.parse().ok()),
            _ => {}
        }
    }
    cpu
}

pub fn loadavg(text: &str) -> GuestLoad {
    let mut words = text.split_whitespace();
    let mut next = || words.next().and_then(|w| w.parse::<f64>().ok());
    GuestLoad {
        load1: next(),
        load5: next(),
        load15: next(),
        ..Default::default()
    }
}

/// `name: rx_bytes rx_packets rx_errs rx_drop 4×… tx_bytes tx_packets tx_errs tx_drop …`,
/// `lo` left out, at most `MAX_GUEST_NICS`; whether some were cut.
pub fn net_dev(text: &str) -> (Vec<GuestInterface>, bool) {
    let mut out = Vec::new();
    let mut cut = false;
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name == "lo" || name.is_empty() || name.len() > MAX_NIC_NAME {
            continue;
        }
        if out.len() == MAX_GUEST_NICS {
            cut = true;
            break;
        }
        let n: Vec<Option<u64>> = rest.split_whitespace().map(|w| w.parse().ok()).collect();
        let at = |i: usize| n.get(i).copied().flatten();
        out.push(GuestInterface {
            name: name.to_string(),
            rx_bytes: at(0),
            rx_packets: at(1),
            rx_errors: at(2),
            rx_drops: at(3),
            tx_bytes: at(8),
            tx_packets: at(9),
            tx_errors: at(10),
            tx_drops: at(11),
            ..Default::default()
        });
    }
    (out, cut)
}

/// `major minor name reads merged sectors ms writes merged sectors ms in_flight io_ms …`,
/// `ram*` and `loop*` left out, at most `MAX_GUEST_DISKS`; whether some were cut.
pub fn diskstats(text: &str) -> (Vec<GuestDisk>, bool) {
    let mut out = Vec::new();
    let mut cut = false;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(name) = words.get(2).copied() else {
            continue;
        };
        if name.starts_with("ram") || name.starts_with("loop") || name.len() > MAX_DISK_NAME {
            continue;
        }
        if out.len() == MAX_GUEST_DISKS {
            cut = true;
            break;
        }
        let at = |i: usize| words.get(i).and_then(|w| w.parse::<u64>().ok());
        let bytes = |i: usize| at(i).and_then(|sectors| sectors.checked_mul(512));
        out.push(GuestDisk {
            name: name.to_string(),
            reads_completed: at(3),
            read_bytes: bytes(5),
            writes_completed: at(7),
            written_bytes: bytes(9),
            io_time_ms: at(12),
            ..Default::default()
        });
    }
    (out, cut)
}

/// One container's cgroup files; `None` when it has no cgroup (not created, or gone).
fn container(dir: &Path, id: &str, guest_memory: Option<u64>) -> Option<ContainerMetrics> {
    if !dir.is_dir() {
        return None;
    }
    let read = |file: &str| fs::read_to_string(dir.join(file)).ok();
    let mut m = cgroup_files(&|file| read(file), guest_memory.unwrap_or(u64::MAX));
    m.id = id.to_string();
    Some(m)
}

/// The figures from a cgroup's files as `read` gives them (a missing file is `None`).
pub fn cgroup_files(read: &dyn Fn(&str) -> Option<String>, guest_memory: u64) -> ContainerMetrics {
    let keyed = |file: &str| -> HashMap<String, u64> {
        read(file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut parts = l.split_whitespace();
                Some((parts.next()?.to_string(), parts.next()?.parse().ok()?))
            })
            .collect()
    };
    let one = |file: &str| read(file).and_then(|v| v.trim().parse::<u64>().ok());
    // "max" is no limit: absent for pids; the VM's memory for memory, as Docker shows it.
    let limit = |file: &str| read(file).map(|v| v.trim().parse::<u64>().unwrap_or(u64::MAX));
    let cpu = keyed("cpu.stat");
    let stat = keyed("memory.stat");
    let events = keyed("memory.events");
    let (read_bytes, written_bytes) = io_stat(&read("io.stat").unwrap_or_default());
    ContainerMetrics {
        cpu_usage_usec: cpu.get("usage_usec").copied(),
        cpu_user_usec: cpu.get("user_usec").copied(),
        cpu_system_usec: cpu.get("system_usec").copied(),
        cpu_periods: cpu.get("nr_periods").copied(),
        cpu_throttled_periods: cpu.get("nr_throttled").copied(),
        cpu_throttled_usec: cpu.get("throttled_usec").copied(),
        memory_current: one("memory.current"),
        memory_limit: limit("memory.max").map(|l| l.min(guest_memory)),
        memory_swap: one("memory.swap.current"),
        memory_anon: stat.get("anon").copied(),
        memory_file: stat.get("file").copied(),
        memory_inactive_file: stat.get("inactive_file").copied(),
        oom: events.get("oom").copied(),
        oom_kill: events.get("oom_kill").copied(),
        pids_current: one("pids.current"),
        pids_limit: limit("pids.max").filter(|l| *l != u64::MAX),
        io_read_bytes: read_bytes,
        io_written_bytes: written_bytes,
        ..Default::default()
    }
}

/// rbytes and wbytes of io.stat (`MAJ:MIN rbytes=N wbytes=N rios=N …` per device), summed;
/// absent when no device has them (io.stat is empty until a device is used).
pub fn io_stat(text: &str) -> (Option<u64>, Option<u64>) {
    let mut sums = (None::<u64>, None::<u64>);
    for word in text.split_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        let Ok(value) = value.parse::<u64>() else {
            continue;
        };
        let slot = match key {
            "rbytes" => &mut sums.0,
            "wbytes" => &mut sums.1,
            _ => continue,
        };
        *slot = Some(slot.unwrap_or(0).saturating_add(value));
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_read_in_bytes_and_missing_lines_are_absent() {
        let m = meminfo(
            "MemTotal:         482472 kB\nMemFree:  400000 kB\nMemAvailable: 420000 kB\n\
             Buffers: 10 kB\nCached: 20 kB\nSwapTotal: 0 kB\nbroken line\nSlab: x kB\n",
        );
        assert_eq!(m.total, Some(482_472 * 1024));
        assert_eq!(m.available, Some(420_000 * 1024));
        assert_eq!(m.buffers, Some(10 * 1024));
        assert_eq!(m.swap_total, Some(0));
        assert_eq!((m.shmem, m.slab, m.swap_free), (None, None, None));
        assert_eq!(meminfo(""), GuestMemory::default());
    }

    #[test]
    fn stat_gives_the_cpu_line_and_the_process_counts() {
        let c = cpu(
            "cpu  10 1 20 300 4 0 2 0 0 0\ncpu0 10 1 20 300 4 0 2 0 0 0\n\
             intr 1 2 3\nprocs_running 3\nprocs_blocked 0\n",
        );
        assert_eq!(
            (c.user, c.nice, c.system, c.idle, c.iowait, c.irq, c.softirq, c.steal),
            (
                Some(10),
                Some(1),
                Some(20),
                Some(300),
                Some(4),
                Some(0),
                Some(2),
                Some(0)
            )
        );
        assert_eq!((c.procs_running, c.procs_blocked), (Some(3), Some(0)));
        // An old kernel's short line: what it has, the rest absent.
        let c = cpu("cpu 1 2 3 4\n");
        assert_eq!((c.idle, c.iowait, c.procs_running), (Some(4), None, None));
    }

    #[test]
    fn loadavg_reads_three_numbers() {
        let l = loadavg("0.52 0.20 0.07 2/81 1234\n");
        assert_eq!(
            (l.load1, l.load5, l.load15),
            (Some(0.52), Some(0.2), Some(0.07))
        );
        assert_eq!(loadavg("").load1, None);
    }

    #[test]
    fn net_dev_skips_lo_and_stops_at_the_cap() {
        let head = "Inter-|   Receive                            |  Transmit\n \
             face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n";
        let text = format!(
            "{head}    lo: 100 1 0 0 0 0 0 0 100 1 0 0 0 0 0 0\n  eth0: 5000 40 1 2 0 0 0 0 7000 50 3 4 0 0 0 0\n"
        );
        let (nics, cut) = net_dev(&text);
        assert!(!cut);
        assert_eq!(nics.len(), 1);
        let e = &nics[0];
        assert_eq!(e.name, "eth0");
        assert_eq!(
            (e.rx_bytes, e.rx_packets, e.rx_errors, e.rx_drops),
            (Some(5000), Some(40), Some(1), Some(2))
        );
        assert_eq!(
            (e.tx_bytes, e.tx_packets, e.tx_errors, e.tx_drops),
            (Some(7000), Some(50), Some(3), Some(4))
        );
        let many: String = (0..20)
            .map(|n| format!("eth{n}: 1 1 0 0 0 0 0 0 1 1 0 0 0 0 0 0\n"))
            .collect();
        let (nics, cut) = net_dev(&many);
        assert_eq!((nics.len(), cut), (MAX_GUEST_NICS, true));
    }

    #[test]
    fn diskstats_skips_ram_and_loop_and_counts_bytes() {
        let text =
            "   1       0 ram0 0 0 0 0 0 0 0 0 0 0 0\n   7       0 loop0 1 0 2 0 0 0 0 0 0 0 0\n \
             254       0 vda 120 3 4000 50 30 7 800 20 0 90 70\n";
        let (disks, cut) = diskstats(text);
        assert!(!cut);
        assert_eq!(disks.len(), 1);
        let d = &disks[0];
        assert_eq!(d.name, "vda");
        assert_eq!(
            (
                d.reads_completed,
                d.read_bytes,
                d.writes_completed,
                d.written_bytes,
                d.io_time_ms
            ),
            (
                Some(120),
                Some(4000 * 512),
                Some(30),
                Some(800 * 512),
                Some(90)
            )
        );
        assert_eq!(diskstats("garbage\n\n").0.len(), 0);
    }

    #[test]
    fn a_cgroups_files_make_its_figures() {
        let files: HashMap<&str, &str> = [
            ("cpu.stat", "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nnr_periods 7\nnr_throttled 2\nthrottled_usec 900\n"),
            ("memory.current", "1048576\n"),
            ("memory.max", "max\n"),
            ("memory.stat", "anon 4096\nfile 8192\ninactive_file 1024\n"),
            ("memory.events", "low 0\nhigh 0\nmax 0\noom 1\noom_kill 1\n"),
            ("pids.current", "3\n"),
            ("pids.max", "max\n"),
            ("io.stat", "254:0 rbytes=100 wbytes=200 rios=1 wios=2 dbytes=0 dios=0\n8:0 rbytes=5 wbytes=6\n"),
        ]
        .into_iter()
        .collect();
        let read = |f: &str| files.get(f).map(|s| s.to_string());
        let m = cgroup_files(&read, 512 << 20);
        assert_eq!(m.cpu_usage_usec, Some(2_500_000));
        assert_eq!(
            (m.cpu_periods, m.cpu_throttled_periods, m.cpu_throttled_usec),
            (Some(7), Some(2), Some(900))
        );
        assert_eq!(m.memory_current, Some(1 << 20));
        assert_eq!(
            m.memory_limit,
            Some(512 << 20),
            "no limit is the VM's memory"
        );
        assert_eq!(
            (m.memory_anon, m.memory_file, m.memory_inactive_file),
            (Some(4096), Some(8192), Some(1024))
        );
        assert_eq!((m.oom, m.oom_kill), (Some(1), Some(1)));
        assert_eq!((m.pids_current, m.pids_limit), (Some(3), None));
        assert_eq!(
            (m.io_read_bytes, m.io_written_bytes),
            (Some(105), Some(206))
        );
        assert_eq!(m.memory_swap, None, "no swap file, no figure");
        let none = cgroup_files(&|_| None, 1);
        assert_eq!(none, ContainerMetrics::default());
    }
}
