//! cgroup v2 in the guest: one cgroup per container under /sys/fs/cgroup/hako, its limits, its
//! freezer, its figures and its OOM count.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use oci_spec::runtime::LinuxResources;

pub const ROOT: &str = "/sys/fs/cgroup";
pub const PARENT: &str = "/sys/fs/cgroup/hako";
const CONTROLLERS: [&str; 5] = ["cpu", "cpuset", "memory", "pids", "io"];
/// Default cpu.max period when a quota comes without one.
const DEFAULT_PERIOD: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup file could not be read or written.
    #[error("cgroup {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// The freezer did not settle.
    #[error("cgroup {0}: the freezer did not settle in time")]
    Freeze(PathBuf),
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Enables the controllers for the containers' cgroups (at boot).
pub fn enable_controllers() {
    for dir in [ROOT, PARENT] {
        let _ = fs::create_dir_all(dir);
        let available =
            fs::read_to_string(Path::new(dir).join("cgroup.controllers")).unwrap_or_default();
        for c in CONTROLLERS {
            if available.split_whitespace().any(|a| a == c) {
                if let Err(e) = fs::write(
                    Path::new(dir).join("cgroup.subtree_control"),
                    format!("+{c}"),
                ) {
                    log::warn!("enabling the {c} controller in {dir}: {e}");
                }
            }
        }
    }
}

/// The cgroup of one container.
#[derive(Debug, Clone)]
pub struct Cgroup {
    pub dir: PathBuf,
}

impl Cgroup {
    pub fn create(container_id: &str) -> Result<Self, CgroupError> {
        let dir = Path::new(PARENT).join(container_id);
        fs::create_dir_all(&dir).map_err(|source| CgroupError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir })
    }

    pub fn remove(&self) {
        // rmdir succeeds once the cgroup has no processes; a frozen empty cgroup is fine too.
        let _ = fs::remove_dir(&self.dir);
    }

    pub fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    pub fn apply(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        for (file, value) in resource_files(resources) {
            write(&self.dir.join(file), &value)?;
        }
        Ok(())
    }

    pub async fn set_frozen(&self, frozen: bool) -> Result<(), CgroupError> {
        write(
            &self.dir.join("cgroup.freeze"),
            if frozen { "1" } else { "0" },
        )?;
        let want = if frozen { "frozen 1" } else { "frozen 0" };
        // cgroup.events reports when every task has stopped; it settles within milliseconds.
        for _ in 0..500 {
            if read(&self.dir.join("cgroup.events"))?
                .lines()
                .any(|l| l == want)
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Err(CgroupError::Freeze(self.dir.clone()))
    }

    pub fn oom_kills(&self) -> u64 {
        keyed(&fs::read_to_string(self.dir.join("memory.events")).unwrap_or_default())
            .get("oom_kill")
            .copied()
            .unwrap_or(0)
    }

    pub fn stats(&self) -> Stats {
        let one = |file: &str| {
            fs::read_to_string(self.dir.join(file))
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let limit = |file: &str| match fs::read_to_string(self.dir.join(file)) {
            Ok(v) if v.trim() == "max" => u64::MAX,
            Ok(v) => v.trim().parse().unwrap_or(u64::MAX),
            Err(_) => u64::MAX,
        };
        let cpu = keyed(&fs::read_to_string(self.dir.join("cpu.stat")).unwrap_or_default());
        let events = keyed(&fs::read_to_string(self.dir.join("memory.events")).unwrap_or_default());
        Stats {
            memory_usage: one("memory.current").unwrap_or(0),
            // No limit, or one above the VM, is the VM's memory (Docker shows the host's
            // when the cgroup has none).
            memory_limit: limit("memory.max").min(guest_memory()),
            memory_swap_usage: one("memory.swap.current").unwrap_or(0),
            memory_stat: keyed(
                &fs::read_to_string(self.dir.join("memory.stat")).unwrap_or_default(),
            ),
            oom_events: events.get("oom").copied().unwrap_or(0),
            oom_kill_events: events.get("oom_kill").copied().unwrap_or(0),
            cpu_usage_usec: cpu.get("usage_usec").copied().unwrap_or(0),
            cpu_user_usec: cpu.get("user_usec").copied().unwrap_or(0),
            cpu_system_usec: cpu.get("system_usec").copied().unwrap_or(0),
            cpu_nr_periods: cpu.get("nr_periods").copied().unwrap_or(0),
            cpu_nr_throttled: cpu.get("nr_throttled").copied().unwrap_or(0),
            cpu_throttled_usec: cpu.get("throttled_usec").copied().unwrap_or(0),
            pids_current: one("pids.current").unwrap_or(0),
            pids_limit: limit("pids.max"),
        }
    }
}

/// The guest's memory in bytes (`MemTotal`), or no bound if /proc/meminfo cannot say.
fn guest_memory() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_total(&text))
        .unwrap_or(u64::MAX)
}

fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub memory_usage: u64,
    pub memory_limit: u64,
    pub memory_swap_usage: u64,
    pub memory_stat: HashMap<String, u64>,
    pub oom_events: u64,
    pub oom_kill_events: u64,
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub cpu_nr_periods: u64,
    pub cpu_nr_throttled: u64,
    pub cpu_throttled_usec: u64,
    pub pids_current: u64,
    pub pids_limit: u64,
}

/// Parses "key value" lines (memory.stat, cpu.stat, memory.events).
fn keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_string(), parts.next()?.parse().ok()?))
        })
        .collect()
}

/// cgroup v1 shares (2..262144) to v2 weight (1..10000), as runc and crun convert them.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 100;
    }
    1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142
}

/// The cgroup v2 files and values an OCI resources block sets.
pub fn resource_files(r: &LinuxResources) -> Vec<(&'static str, String)> {
    let mut files = Vec::new();
    if let Some(memory) = r.memory() {
        if let Some(limit) = memory.limit() {
            files.push((
                "memory.max",
                if limit < 0 {
                    "max".to_string()
                } else {
                    limit.to_string()
                },
            ));
        }
        if let Some(reservation) = memory.reservation() {
            if reservation >= 0 {
                files.push(("memory.low", reservation.to_string()));
            }
        }
        if let (Some(swap), Some(limit)) = (memory.swap(), memory.limit()) {
            // OCI swap is memory+swap; v2 swap.max is swap alone.
            if swap < 0 {
                files.push(("memory.swap.max", "max".to_string()));
            } else if swap >= limit && limit >= 0 {
                files.push(("memory.swap.max", (swap - limit).to_string()));
            }
        }
    }
    if let Some(cpu) = r.cpu() {
        if let Some(shares) = cpu.shares() {
            files.push(("cpu.weight", shares_to_weight(shares).to_string()));
        }
        if cpu.quota().is_some() || cpu.period().is_some() {
            let quota = match cpu.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".to_string(),
            };
            let period = cpu.period().unwrap_or(DEFAULT_PERIOD);
            files.push(("cpu.max", format!("{quota} {period}")));
        }
        // The shim has checked that they name the VM's own vCPUs and node.
        for (file, list) in [("cpuset.cpus", cpu.cpus()), ("cpuset.mems", cpu.mems())] {
            if let Some(list) = list.as_deref().filter(|l| !l.trim().is_empty()) {
                files.push((file, list.to_string()));
            }
        }
    }
    if let Some(pids) = r.pids() {
        let limit = pids.limit();
        files.push((
            "pids.max",
            if limit <= 0 {
                "max".to_string()
            } else {
                limit.to_string()
            },
        ));
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(json: &str) -> LinuxResources {
        serde_json::from_str(json).expect("valid resources")
    }

    #[test]
    fn memory_cpu_and_pids_map_to_v2_files() {
        let r = resources(
            r#"{"memory": {"limit": 67108864, "swap": 134217728},
                "cpu": {"shares": 1024, "quota": 50000, "period": 100000},
                "pids": {"limit": 64}}"#,
        );
        let files = resource_files(&r);
        assert!(files.contains(&("memory.max", "67108864".to_string())));
        assert!(files.contains(&("memory.swap.max", "67108864".to_string())));
        assert!(files.contains(&("cpu.max", "50000 100000".to_string())));
        assert!(files.contains(&("cpu.weight", "39".to_string())));
        assert!(files.contains(&("pids.max", "64".to_string())));
    }

    #[test]
    fn cpusets_go_to_their_files() {
        let files = resource_files(&resources(r#"{"cpu": {"cpus": "1", "mems": "0"}}"#));
        assert!(
            files.contains(&("cpuset.cpus", "1".to_string())),
            "{files:?}"
        );
        assert!(
            files.contains(&("cpuset.mems", "0".to_string())),
            "{files:?}"
        );
        assert!(!files.iter().any(|(f, _)| *f == "cpu.max"), "{files:?}");
    }

    #[test]
    fn mem_total_is_read_in_bytes() {
        let meminfo = "MemTotal:         482472 kB\nMemFree:          400000 kB\n";
        assert_eq!(mem_total(meminfo), Some(482_472 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn unlimited_values_become_max() {
        let r =
            resources(r#"{"memory": {"limit": -1}, "cpu": {"quota": -1}, "pids": {"limit": 0}}"#);
        let files = resource_files(&r);
        assert!(files.contains(&("memory.max", "max".to_string())));
        assert!(files.contains(&("cpu.max", "max 100000".to_string())));
        assert!(files.contains(&("pids.max", "max".to_string())));
    }

    #[test]
    fn shares_convert_like_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1024), 39);
    }

    #[test]
    fn keyed_files_parse() {
        let k = keyed("usage_usec 12\nuser_usec 5\nbroken\n");
        assert_eq!(k.get("usage_usec"), Some(&12));
        assert_eq!(k.len(), 2);
    }
}
