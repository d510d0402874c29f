//! ListProcesses: a container's processes as the guest's /proc shows them, for `hako ps` on the
//! host. Every field is bounded here (`hako_protocol::MAX_*`), and the host bounds them again:
//! a process names itself and writes its own command line.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use hako_protocol as pb;

/// /proc/PID/stat and /proc/PID/status are a few hundred bytes; a longer read is cut.
const MAX_PROC_FILE: u64 = 8192;

#[derive(Debug, thiserror::Error)]
pub enum PsError {
    /// The process is gone (it exited since its cgroup was read) or its files cannot be read.
    #[error("{file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    /// A /proc file is not in the kernel's format.
    #[error("{file}: {reason}")]
    Format { file: String, reason: &'static str },
}

/// What /proc/PID/stat says of a process.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    comm: String,
    state: String,
    ppid: u32,
    /// utime + stime, in clock ticks.
    ticks: u64,
}

/// The container's processes `pids` (guest pids, from its cgroup) read under `proc` (/proc),
/// as the answer carries them.
pub fn list(proc: &Path, pids: &[u32]) -> pb::ListProcessesResponse {
    list_bounded(
        proc,
        pids,
        pb::MAX_LISTED_PROCESSES,
        pb::MAX_CMDLINES_TOTAL,
        clock_ticks(),
    )
}

fn list_bounded(
    proc: &Path,
    pids: &[u32],
    max_processes: usize,
    mut cmdline_budget: usize,
    ticks_per_second: u64,
) -> pb::ListProcessesResponse {
    let mut response = pb::ListProcessesResponse::default();
    for &pid in pids {
        if response.processes.len() == max_processes {
            response.truncated = true;
            break;
        }
        let cmdline_max = cmdline_budget.min(pb::MAX_CMDLINE);
        match read_process(proc, pid, cmdline_max, ticks_per_second) {
            Ok(process) => {
                cmdline_budget -= process.cmdline.len();
                response.processes.push(process);
            }
            // Exited since the cgroup was read, most likely: not one of its processes now.
            Err(e) => log::debug!("process {pid}: {e}"),
        }
    }
    response
}

fn read_process(
    proc: &Path,
    pid: u32,
    cmdline_max: usize,
    ticks_per_second: u64,
) -> Result<pb::GuestProcess, PsError> {
    let dir = proc.join(pid.to_string());
    let stat_file = dir.join("stat");
    let stat = parse_stat(&read_bounded(&stat_file, MAX_PROC_FILE)?).map_err(|reason| {
        PsError::Format {
            file: stat_file.display().to_string(),
            reason,
        }
    })?;
    let status_file = dir.join("status");
    let (uid, ns_pid) =
        parse_status(&read_bounded(&status_file, MAX_PROC_FILE)?).map_err(|reason| {
            PsError::Format {
                file: status_file.display().to_string(),
                reason,
            }
        })?;
    // A zombie's or a kernel thread's is empty: the host shows the name instead.
    let cmdline = read_bounded(&dir.join("cmdline"), cmdline_max as u64)?;
    Ok(pb::GuestProcess {
        pid,
        ppid: stat.ppid,
        ns_pid,
        uid,
        state: stat.state,
        cpu_ms: stat.ticks.saturating_mul(1000) / ticks_per_second.max(1),
        comm: stat.comm,
        cmdline,
        ..Default::default()
    })
}

/// At most `max` bytes of `path`.
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, PsError> {
    let read_err = |source| PsError::Read {
        file: path.display().to_string(),
        source,
    };
    let mut bytes = Vec::new();
    File::open(path)
        .map_err(read_err)?
        .take(max)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    Ok(bytes)
}

/// `pid (comm) state ppid ...`: the name may hold spaces and parentheses, so it ends at the
/// last `)`.
fn parse_stat(bytes: &[u8]) -> Result<Stat, &'static str> {
    let open = bytes.iter().position(|&b| b == b'(').ok_or("no name")?;
    let close = bytes.iter().rposition(|&b| b == b')').ok_or("no name")?;
    if close < open {
        return Err("no name");
    }
    let comm = &bytes[open + 1..close];
    let comm = String::from_utf8_lossy(&comm[..comm.len().min(pb::MAX_COMM)]).into_owned();
    let rest = std::str::from_utf8(&bytes[close + 1..]).map_err(|_| "not text")?;
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    // Fields 3 (state), 4 (ppid), 14 (utime) and 15 (stime) of proc(5), from 0 here.
    let number = |i: usize| -> Result<u64, &'static str> {
        fields
            .get(i)
            .ok_or("too few fields")?
            .parse()
            .map_err(|_| "a field is not a number")
    };
    let state = fields.first().ok_or("too few fields")?;
    if state.len() != 1 {
        return Err("the state is not one letter");
    }
    Ok(Stat {
        comm,
        state: state.to_string(),
        ppid: u32::try_from(number(1)?).map_err(|_| "ppid out of range")?,
        ticks: number(11)?.saturating_add(number(12)?),
    })
}

/// The effective uid (`Uid:`'s second value) and the pid in the innermost PID namespace
/// (`NSpid:`'s last value) from /proc/PID/status.
fn parse_status(bytes: &[u8]) -> Result<(u32, u32), &'static str> {
    let text = String::from_utf8_lossy(bytes);
    let values = |key: &str| -> Option<Vec<u32>> {
        let line = text.lines().find_map(|l| l.strip_prefix(key))?;
        line.split_ascii_whitespace()
            .map(|v| v.parse().ok())
            .collect()
    };
    let uid = values("Uid:")
        .and_then(|v| v.get(1).copied())
        .ok_or("no effective uid")?;
    let ns_pid = values("NSpid:")
        .and_then(|v| v.last().copied())
        .ok_or("no NSpid")?;
    Ok((uid, ns_pid))
}

/// The kernel's clock ticks per second, in which /proc/PID/stat counts CPU time.
fn clock_ticks() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(ticks)) if ticks > 0 => ticks as u64,
        _ => 100,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::PathBuf;

    const STAT: &str =
        "39 (sleep) S 1 39 39 0 -1 4194560 98 0 0 0 250 50 0 0 20 0 1 0 312 1556480 \
                        60 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n";
    const STATUS: &str = "Name:\tsleep\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t39\n\
                          Ngid:\t0\nPid:\t39\nPPid:\t1\nUid:\t1000\t1001\t1000\t1000\n\
                          Gid:\t0\t0\t0\t0\nNSpid:\t39\t1\n";

    /// A /proc of made-up processes: `(pid, stat, status, cmdline)`.
    fn fake_proc(name: &str, processes: &[(u32, &str, &str, &[u8])]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("hako-ps-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for (pid, stat, status, cmdline) in processes {
            let dir = root.join(pid.to_string());
            fs::create_dir_all(&dir).expect("mkdir");
            fs::write(dir.join("stat"), stat).expect("stat");
            fs::write(dir.join("status"), status).expect("status");
            fs::write(dir.join("cmdline"), cmdline).expect("cmdline");
        }
        root
    }

    #[test]
    fn a_process_is_read_from_its_proc_files() {
        let proc = fake_proc("one", &[(39, STAT, STATUS, b"sleep\x00600\x00")]);
        let response = list_bounded(&proc, &[39], 10, 1000, 100);
        let expected = pb::GuestProcess {
            pid: 39,
            ppid: 1,
            ns_pid: 1,
            uid: 1001,
            state: "S".into(),
            cpu_ms: 3000,
            comm: "sleep".into(),
            cmdline: b"sleep\x00600\x00".to_vec(),
            ..Default::default()
        };
        assert_eq!(response.processes, vec![expected]);
        assert!(!response.truncated);
        fs::remove_dir_all(&proc).expect("cleanup");
    }

    #[test]
    fn a_name_with_parentheses_and_spaces_ends_at_the_last_one() {
        let stat = STAT.replace("(sleep)", "(a) S 7 (b)");
        let parsed = parse_stat(stat.as_bytes()).expect("parses");
        assert_eq!((parsed.comm.as_str(), parsed.ppid), ("a) S 7 (b", 1));
        let long = STAT.replace("sleep", &"x".repeat(1000));
        assert_eq!(
            parse_stat(long.as_bytes()).expect("parses").comm.len(),
            pb::MAX_COMM
        );
    }

    #[test]
    fn garbage_proc_files_are_refused() {
        for bad in [
            "",
            "39 sleep S 1",
            "39 )sleep( S 1 0 0 0 0 0 0 0 1 1",
            "39 (sleep) S 1 39",
            "39 (sleep) SS 1 39 39 0 -1 0 0 0 0 0 1 1",
            "39 (sleep) S -1 39 39 0 -1 0 0 0 0 0 1 1",
            "39 (sleep) S 99999999999 39 39 0 -1 0 0 0 0 0 1 1",
        ] {
            assert!(parse_stat(bad.as_bytes()).is_err(), "{bad:?}");
        }
        for bad in ["", "Uid:\t0\n", "Uid:\tx\t0\nNSpid:\t1\n", "Uid:\t0\t0\n"] {
            assert!(parse_status(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_list_is_bounded_in_processes_and_command_line_bytes() {
        let long = vec![b'a'; pb::MAX_CMDLINE * 3];
        let proc = fake_proc(
            "bounded",
            &[
                (10, STAT, STATUS, &long),
                (11, "garbage", STATUS, b"x\x00"),
                (12, STAT, STATUS, &long),
                (13, STAT, STATUS, &long),
            ],
        );
        // 14 does not exist (it exited): skipped, as the garbage 11 is.
        let r = list_bounded(&proc, &[10, 11, 14, 12], 10, pb::MAX_CMDLINE + 5, 100);
        let pids: Vec<u32> = r.processes.iter().map(|p| p.pid).collect();
        assert_eq!(pids, [10, 12]);
        assert_eq!(r.processes[0].cmdline.len(), pb::MAX_CMDLINE, "cut");
        assert_eq!(r.processes[1].cmdline.len(), 5, "the rest of the budget");
        assert!(!r.truncated);
        let r = list_bounded(&proc, &[10, 12, 13], 2, pb::MAX_CMDLINES_TOTAL, 100);
        assert_eq!(r.processes.len(), 2);
        assert!(r.truncated, "more processes than listed");
        fs::remove_dir_all(&proc).expect("cleanup");
    }

    #[test]
    fn this_process_is_read_from_the_real_proc() {
        let me = std::process::id();
        let r = list(Path::new("/proc"), &[me]);
        let p = &r.processes[0];
        assert_eq!(p.pid, me);
        assert_eq!(p.ppid, nix::unistd::getppid().as_raw() as u32);
        assert_eq!(p.uid, nix::unistd::geteuid().as_raw());
        assert!(!p.cmdline.is_empty() && p.cmdline.ends_with(b"\0"));
    }
}
