//! The guest's part of a snapshot: which containers to ask the agent about (the shim's own
//! book, never the guest's), and the checked answer (`agent_client::guest`) made into samples
//! of the guest's and containers' families. Every label value here is the shim's: the
//! containers' ids and names come from the book, the modes from this file, and the devices'
//! names passed the decoder's charset and length checks.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::families::{self as f, Family};
use super::snapshot::{valid_label_value, Sample, Value};
use crate::agent_client::guest::GuestFigures;

/// The whole guest fetch (dial, request, answer) takes at most this; the monitor's bound per
/// sandbox is above it, so a slow guest still leaves time for the host's part.
pub const GUEST_DEADLINE: Duration = Duration::from_millis(500);
/// The CRI's annotation naming a container within its pod.
pub const CONTAINER_NAME_ANNOTATION: &str = "io.kubernetes.cri.container-name";

/// One of the sandbox's app containers, as its series are labelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppContainer {
    pub id: String,
    /// The CRI name, or the id itself for a container without one (ctr, Docker): a label value
    /// is never empty.
    pub name: String,
}

/// Where a `Source` asks which containers the sandbox runs now.
pub trait ContainerList: Send + Sync + std::fmt::Debug {
    fn app_containers(&self) -> Vec<AppContainer>;
}

/// The sandbox's app containers by id, kept by the sandbox as it adds and removes them.
#[derive(Debug, Default)]
pub struct AppContainers(Mutex<BTreeMap<String, String>>);

impl AppContainers {
    /// Notes a container the pod created, from its spec's annotations; a CRI pod's sandbox
    /// (pause) container is left out: its cost is in the guest's totals.
    pub fn add(&self, id: &str, annotations: Option<&HashMap<String, String>>) {
        let get = |key: &str| annotations.and_then(|a| a.get(key));
        if get(crate::sandbox::pod::CONTAINER_TYPE_ANNOTATION).is_some_and(|t| t == "sandbox") {
            return;
        }
        let name = get(CONTAINER_NAME_ANNOTATION)
            .filter(|n| valid_label_value(n))
            .cloned()
            .unwrap_or_else(|| id.to_string());
        self.lock().insert(id.to_string(), name);
    }

    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ContainerList for AppContainers {
    fn app_containers(&self) -> Vec<AppContainer> {
        self.lock()
            .iter()
            .filter(|(id, _)| valid_label_value(id))
            .map(|(id, name)| AppContainer {
                id: id.clone(),
                name: name.clone(),
            })
            .collect()
    }
}

/// What a `Source` needs to ask the guest: the agent's hybrid-vsock socket and the book.
#[derive(Debug, Clone)]
pub struct GuestSource {
    pub agent_socket: PathBuf,
    pub containers: Arc<dyn ContainerList>,
}

const CPU_MODES: [&str; 8] = [
    "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
];

/// The samples of a checked answer; `containers` names the ids asked for.
pub fn samples(g: &GuestFigures, containers: &[AppContainer]) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut push = |family: &Family, labels: &[&str], v: Option<f64>| {
        if let Some(v) = v.filter(|v| v.is_finite() && *v >= 0.0) {
            out.push(Sample {
                family: family.name.to_string(),
                labels: labels.iter().map(|s| s.to_string()).collect(),
                value: Value::Number(v),
            });
        }
    };
    let n = |v: Option<u64>| v.map(|v| v as f64);
    let memory = [
        &f::GUEST_MEMORY_TOTAL_BYTES,
        &f::GUEST_MEMORY_AVAILABLE_BYTES,
        &f::GUEST_MEMORY_FREE_BYTES,
        &f::GUEST_MEMORY_CACHED_BYTES,
        &f::GUEST_MEMORY_BUFFERS_BYTES,
        &f::GUEST_MEMORY_SHMEM_BYTES,
        &f::GUEST_MEMORY_SLAB_BYTES,
        &f::GUEST_SWAP_TOTAL_BYTES,
        &f::GUEST_SWAP_FREE_BYTES,
    ];
    for (family, v) in memory.into_iter().zip(g.memory) {
        push(family, &[], n(v));
    }
    // Ticks are USER_HZ (100 on every Linux this runs); a guest saying otherwise is believed
    // only within reason.
    let hz = g.cpu[8].filter(|hz| (1..=100_000).contains(hz));
    if let Some(hz) = hz {
        for (mode, ticks) in CPU_MODES.into_iter().zip(g.cpu) {
            push(
                &f::GUEST_CPU_SECONDS_TOTAL,
                &[mode],
                ticks.map(|t| t as f64 / hz as f64),
            );
        }
    }
    push(&f::GUEST_PROCS_RUNNING, &[], n(g.cpu[9]));
    push(&f::GUEST_PROCS_BLOCKED, &[], n(g.cpu[10]));
    for (family, v) in [&f::GUEST_LOAD1, &f::GUEST_LOAD5, &f::GUEST_LOAD15]
        .into_iter()
        .zip(g.load)
    {
        push(family, &[], v);
    }
    let nic = [
        &f::GUEST_NETWORK_RECEIVE_BYTES_TOTAL,
        &f::GUEST_NETWORK_RECEIVE_PACKETS_TOTAL,
        &f::GUEST_NETWORK_RECEIVE_ERRORS_TOTAL,
        &f::GUEST_NETWORK_RECEIVE_DROPS_TOTAL,
        &f::GUEST_NETWORK_TRANSMIT_BYTES_TOTAL,
        &f::GUEST_NETWORK_TRANSMIT_PACKETS_TOTAL,
        &f::GUEST_NETWORK_TRANSMIT_ERRORS_TOTAL,
        &f::GUEST_NETWORK_TRANSMIT_DROPS_TOTAL,
    ];
    for (name, fields) in &g.interfaces {
        for (family, v) in nic.into_iter().zip(fields) {
            push(family, &[name], n(*v));
        }
    }
    for (name, d) in &g.disks {
        push(&f::GUEST_DISK_READS_COMPLETED_TOTAL, &[name], n(d[0]));
        push(&f::GUEST_DISK_READ_BYTES_TOTAL, &[name], n(d[1]));
        push(&f::GUEST_DISK_WRITES_COMPLETED_TOTAL, &[name], n(d[2]));
        push(&f::GUEST_DISK_WRITTEN_BYTES_TOTAL, &[name], n(d[3]));
        let seconds = d[4].map(|ms| ms as f64 / 1e3);
        push(&f::GUEST_DISK_IO_TIME_SECONDS_TOTAL, &[name], seconds);
    }
    let names: HashMap<&str, &str> = containers
        .iter()
        .map(|c| (c.id.as_str(), c.name.as_str()))
        .collect();
    for (id, c) in &g.containers {
        // The decoder kept only ids asked for; the name is the book's.
        let Some(name) = names.get(id.as_str()) else {
            continue;
        };
        let labels = [id.as_str(), name];
        let seconds = |usec: Option<u64>| usec.map(|u| u as f64 / 1e6);
        push(
            &f::CONTAINER_CPU_USAGE_SECONDS_TOTAL,
            &labels,
            seconds(c[0]),
        );
        push(&f::CONTAINER_CPU_USER_SECONDS_TOTAL, &labels, seconds(c[1]));
        push(
            &f::CONTAINER_CPU_SYSTEM_SECONDS_TOTAL,
            &labels,
            seconds(c[2]),
        );
        push(&f::CONTAINER_CPU_PERIODS_TOTAL, &labels, n(c[3]));
        push(&f::CONTAINER_CPU_THROTTLED_PERIODS_TOTAL, &labels, n(c[4]));
        push(
            &f::CONTAINER_CPU_THROTTLED_SECONDS_TOTAL,
            &labels,
            seconds(c[5]),
        );
        push(&f::CONTAINER_MEMORY_USAGE_BYTES, &labels, n(c[6]));
        // kubelet's working set: usage less the inactive page cache, never below zero.
        let working_set = c[6].map(|u| u.saturating_sub(c[11].unwrap_or(0)));
        push(
            &f::CONTAINER_MEMORY_WORKING_SET_BYTES,
            &labels,
            n(working_set),
        );
        push(&f::CONTAINER_MEMORY_LIMIT_BYTES, &labels, n(c[7]));
        push(&f::CONTAINER_MEMORY_SWAP_BYTES, &labels, n(c[8]));
        push(&f::CONTAINER_MEMORY_RSS_BYTES, &labels, n(c[9]));
        push(&f::CONTAINER_MEMORY_CACHE_BYTES, &labels, n(c[10]));
        push(&f::CONTAINER_OOM_EVENTS_TOTAL, &labels, n(c[12]));
        push(&f::CONTAINER_OOM_KILLS_TOTAL, &labels, n(c[13]));
        push(&f::CONTAINER_PIDS, &labels, n(c[14]));
        push(&f::CONTAINER_PIDS_LIMIT, &labels, n(c[15]));
        push(&f::CONTAINER_FS_READ_BYTES_TOTAL, &labels, n(c[16]));
        push(&f::CONTAINER_FS_WRITTEN_BYTES_TOTAL, &labels, n(c[17]));
    }
    out
}

/// `hako_pod_overhead_memory_bytes`: the host processes' PSS, summed, less the containers'
/// memory in the guest; only when both are known, and never below zero.
pub fn overhead(host: &[Sample], g: &GuestFigures) -> Option<Sample> {
    let pss: Vec<f64> = host
        .iter()
        .filter(|s| s.family == f::HOST_PROCESS_PSS_BYTES.name)
        .filter_map(|s| match s.value {
            Value::Number(v) => Some(v),
            _ => None,
        })
        .collect();
    if pss.is_empty() {
        return None;
    }
    let containers: f64 = g
        .containers
        .iter()
        .filter_map(|(_, c)| c[6])
        .map(|u| u as f64)
        .sum();
    Some(Sample {
        family: f::POD_OVERHEAD_MEMORY_BYTES.name.to_string(),
        labels: Vec::new(),
        value: Value::Number((pss.iter().sum::<f64>() - containers).max(0.0)),
    })
}

#[cfg(test)]
#[path = "guest_tests.rs"]
mod tests;
