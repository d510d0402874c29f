//! Between containerd's messages and hako's own values: timestamps, runtime options, stdio,
//! metrics and the events containerd is sent.

use std::path::PathBuf;
use std::time::SystemTime;

use containerd_shim::api;
use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::events::task::{TaskCreate, TaskIO};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{CodedInputStream, MessageField};
use hako_protocol as pb;

use super::stdio::StdioPaths;

pub const METRICS_V2_TYPE: &str = "io.containerd.cgroups.v2.Metrics";

pub fn timestamp(at: SystemTime) -> Timestamp {
    let d = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

pub fn stdio_of(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> StdioPaths {
    StdioPaths {
        stdin: stdin.to_string(),
        stdout: stdout.to_string(),
        stderr: stderr.to_string(),
        terminal,
    }
}

/// `/tasks/create` for a created container, whose task pid is `pid`.
pub fn create_event(req: &api::CreateTaskRequest, pid: u32) -> TaskCreate {
    TaskCreate {
        container_id: req.id.clone(),
        bundle: req.bundle.clone(),
        rootfs: req.rootfs.clone(),
        io: MessageField::some(TaskIO {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            ..Default::default()
        }),
        checkpoint: req.checkpoint.clone(),
        pid,
        ..Default::default()
    }
}

/// The configuration file named in containerd's `runtimeoptions.v1.Options` (`config_path`,
/// field 2), the options type a runtime entry's `ConfigPath` arrives in.
pub fn config_path_option(req: &api::CreateTaskRequest) -> Option<PathBuf> {
    let any = req.options.as_ref()?;
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    decode_string_field(&any.value, 2)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// One string field of an encoded protobuf message, without its schema.
fn decode_string_field(bytes: &[u8], wanted: u64) -> Option<String> {
    let mut input = CodedInputStream::from_bytes(bytes);
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        let (field, wire) = (u64::from(tag >> 3), tag & 7);
        match wire {
            0 => {
                input.read_raw_varint64().ok()?;
            }
            1 => {
                input.read_raw_little_endian64().ok()?;
            }
            2 => {
                let value = input.read_bytes().ok()?;
                if field == wanted {
                    return String::from_utf8(value).ok();
                }
            }
            5 => {
                input.read_raw_little_endian32().ok()?;
            }
            _ => return None,
        }
    }
    None
}

/// The agent's cgroup v2 figures as containerd's `io.containerd.cgroups.v2.Metrics`.
pub fn v2_metrics(s: &pb::StatsContainerResponse) -> v2::Metrics {
    let stat = |key: &str| s.memory_stat.get(key).copied().unwrap_or(0);
    v2::Metrics {
        pids: MessageField::some(v2::PidsStat {
            current: s.pids_current,
            limit: s.pids_limit,
            ..Default::default()
        }),
        cpu: MessageField::some(v2::CPUStat {
            usage_usec: s.cpu_usage_usec,
            user_usec: s.cpu_user_usec,
            system_usec: s.cpu_system_usec,
            nr_periods: s.cpu_nr_periods,
            nr_throttled: s.cpu_nr_throttled,
            throttled_usec: s.cpu_throttled_usec,
            ..Default::default()
        }),
        memory: MessageField::some(v2::MemoryStat {
            anon: stat("anon"),
            file: stat("file"),
            kernel_stack: stat("kernel_stack"),
            slab: stat("slab"),
            sock: stat("sock"),
            shmem: stat("shmem"),
            file_mapped: stat("file_mapped"),
            file_dirty: stat("file_dirty"),
            file_writeback: stat("file_writeback"),
            inactive_anon: stat("inactive_anon"),
            active_anon: stat("active_anon"),
            inactive_file: stat("inactive_file"),
            active_file: stat("active_file"),
            unevictable: stat("unevictable"),
            pgfault: stat("pgfault"),
            pgmajfault: stat("pgmajfault"),
            usage: s.memory_usage,
            usage_limit: s.memory_limit,
            swap_usage: s.memory_swap_usage,
            ..Default::default()
        }),
        memory_events: MessageField::some(v2::MemoryEvents {
            oom: s.oom_events,
            oom_kill: s.oom_kill_events,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::well_known_types::any::Any;

    #[test]
    fn config_path_is_read_from_runtime_options() {
        // runtimeoptions.v1.Options { type_url = "x", config_path = "/etc/hako/c.toml" }
        let mut value = vec![0x0a, 1, b'x', 0x12, 16];
        value.extend_from_slice(b"/etc/hako/c.toml");
        let req = api::CreateTaskRequest {
            options: MessageField::some(Any {
                type_url: "runtimeoptions.v1.Options".to_string(),
                value,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            config_path_option(&req),
            Some(PathBuf::from("/etc/hako/c.toml"))
        );
    }

    #[test]
    fn other_option_types_are_ignored() {
        let req = api::CreateTaskRequest {
            options: MessageField::some(Any {
                type_url: "containerd.runc.v1.Options".to_string(),
                value: vec![0x12, 1, b'x'],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(config_path_option(&req), None);
    }
}
