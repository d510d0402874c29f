//! The one table of metric families. The shim's `/metrics` renders through it, the monitor
//! (a later step) will too, and `Snapshot::validate` checks what crosses the socket against it,
//! so a name, a type or a label set lives in exactly one place. docs/metrics.md is written from
//! it (a test checks every family is there).

/// Start phases: hako's figures run from sub-ms under KVM to seconds under TCG, so 1-2.5-5 per
/// decade from 1 ms to 10 s keeps `histogram_quantile` within a decade; a stuck start lands in
/// `+Inf`.
pub const START_PHASE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Agent calls that do not wait on the guest's processes: ms under KVM, a few 100 ms under TCG.
pub const RPC_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One family: its full name as Prometheus shows it (with the unit, and `_total` for a
/// counter), and the label names every series of it carries, in order.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    /// The base unit the name ends with (`seconds`, `bytes`), or "" for a plain count.
    pub unit: &'static str,
    pub labels: &'static [&'static str],
    /// A histogram's upper bounds, without `+Inf`; empty for the others.
    pub buckets: &'static [f64],
}

impl Family {
    /// The name without `_total`: prometheus-client appends that itself to a counter's name.
    pub fn base_name(&self) -> &'static str {
        match self.kind {
            Kind::Counter => self.name.strip_suffix("_total").unwrap_or(self.name),
            _ => self.name,
        }
    }
}

pub const START_PHASE_SECONDS: Family = Family {
    name: "hako_start_phase_seconds",
    help: "Duration of each phase of a sandbox or container start, as the shim's start-phase log line names them.",
    kind: Kind::Histogram,
    unit: "seconds",
    labels: &["phase"],
    buckets: START_PHASE_BUCKETS,
};

pub const AGENT_RPC_DURATION_SECONDS: Family = Family {
    name: "hako_agent_rpc_duration_seconds",
    help: "Duration of the shim's calls into the guest agent, by method; calls that wait (WaitProcess, reads, OOM events) are not measured.",
    kind: Kind::Histogram,
    unit: "seconds",
    labels: &["method"],
    buckets: RPC_BUCKETS,
};

pub const AGENT_RPC_ERRORS_TOTAL: Family = Family {
    name: "hako_agent_rpc_errors_total",
    help: "Failed calls into the guest agent, by method and reason (timeout, unavailable, guest).",
    kind: Kind::Counter,
    unit: "",
    labels: &["method", "reason"],
    buckets: &[],
};

pub const HOTPLUG_TOTAL: Family = Family {
    name: "hako_hotplug_total",
    help: "Devices hot-plugged into or unplugged from the running VM, by device, operation and result.",
    kind: Kind::Counter,
    unit: "",
    labels: &["device", "op", "result"],
    buckets: &[],
};

pub const HOTPLUG_DURATION_SECONDS: Family = Family {
    name: "hako_hotplug_duration_seconds",
    help: "Duration of a hot-plug or unplug on the running VM, by device and operation.",
    kind: Kind::Histogram,
    unit: "seconds",
    labels: &["device", "op"],
    buckets: START_PHASE_BUCKETS,
};

pub const HOST_PROCESS_CPU_SECONDS_TOTAL: Family = Family {
    name: "hako_host_process_cpu_seconds_total",
    help: "CPU time (user and system, all threads) of the sandbox's host processes: vmm, virtiofsd, vsock, shim.",
    kind: Kind::Counter,
    unit: "seconds",
    labels: &["process"],
    buckets: &[],
};

pub const HOST_PROCESS_RSS_BYTES: Family = Family {
    name: "hako_host_process_rss_bytes",
    help: "Resident set size of the sandbox's host processes; guest RAM shared with vhost-user backends counts in each.",
    kind: Kind::Gauge,
    unit: "bytes",
    labels: &["process"],
    buckets: &[],
};

pub const HOST_PROCESS_PSS_BYTES: Family = Family {
    name: "hako_host_process_pss_bytes",
    help: "Proportional set size of the sandbox's host processes (shared pages divided among sharers); up to 15 s old.",
    kind: Kind::Gauge,
    unit: "bytes",
    labels: &["process"],
    buckets: &[],
};

pub const DNS_RELAY_QUERIES_TOTAL: Family = Family {
    name: "hako_dns_relay_queries_total",
    help: "DNS queries the guest sent to the relay to Docker's server, by result: relayed, dropped (TCP queries over the cap, answers the guest did not read), malformed (a bad frame, which ends the relay).",
    kind: Kind::Counter,
    unit: "",
    labels: &["result"],
    buckets: &[],
};

pub const DNS_RELAY_THROTTLED_TOTAL: Family = Family {
    name: "hako_dns_relay_throttled_total",
    help: "DNS queries the relay held back to keep the guest within its rate.",
    kind: Kind::Counter,
    unit: "",
    labels: &[],
    buckets: &[],
};

pub const PORT_FORWARD_CONNECTIONS_TOTAL: Family = Family {
    name: "hako_port_forward_connections_total",
    help: "Connections to the pod's loopback carried into the guest, counted when they end, by result: carried, refused (nothing listens on the port in the guest), failed.",
    kind: Kind::Counter,
    unit: "",
    labels: &["result"],
    buckets: &[],
};

pub const CONSOLE_LOG_BYTES_TOTAL: Family = Family {
    name: "hako_console_log_bytes_total",
    help: "Bytes of the guest's serial console the shim wrote to console.log (kept) and, of those, bytes its rotations have since discarded (dropped).",
    kind: Kind::Counter,
    unit: "bytes",
    labels: &["outcome"],
    buckets: &[],
};

pub const GUEST_EVENTS_REFUSED_TOTAL: Family = Family {
    name: "hako_guest_events_refused_total",
    help: "Events the guest reported and the shim refused, by event and reason (an OOM kill of a container not in the sandbox: foreign).",
    kind: Kind::Counter,
    unit: "",
    labels: &["event", "reason"],
    buckets: &[],
};

pub const SANDBOX_INFO: Family = Family {
    name: "hako_sandbox_info",
    help: "1 for each running sandbox, labelled with its hypervisor (qemu, cloud-hypervisor), accelerator (kvm, tcg), whether it was restored from a template, and hako's version.",
    kind: Kind::Gauge,
    unit: "",
    labels: &["hypervisor", "accel", "from_template", "version"],
    buckets: &[],
};

pub const VM_VCPUS: Family = Family {
    name: "hako_vm_vcpus",
    help: "vCPUs the sandbox's VM was started with, after the pod's sizing.",
    kind: Kind::Gauge,
    unit: "",
    labels: &[],
    buckets: &[],
};

pub const VM_MEMORY_BYTES: Family = Family {
    name: "hako_vm_memory_bytes",
    help: "Guest RAM the sandbox's VM was started with, after the pod's sizing.",
    kind: Kind::Gauge,
    unit: "bytes",
    labels: &[],
    buckets: &[],
};

// The guest's and its containers' families (issue 26 step 3), in a file of their own.
#[path = "guest_families.rs"]
mod guest;
pub use guest::*;

/// Every family this step produces, in the order they are rendered.
pub const FAMILIES: &[Family] = &[
    SANDBOX_INFO,
    VM_VCPUS,
    VM_MEMORY_BYTES,
    START_PHASE_SECONDS,
    AGENT_RPC_DURATION_SECONDS,
    AGENT_RPC_ERRORS_TOTAL,
    HOTPLUG_TOTAL,
    HOTPLUG_DURATION_SECONDS,
    HOST_PROCESS_CPU_SECONDS_TOTAL,
    HOST_PROCESS_RSS_BYTES,
    HOST_PROCESS_PSS_BYTES,
    DNS_RELAY_QUERIES_TOTAL,
    DNS_RELAY_THROTTLED_TOTAL,
    PORT_FORWARD_CONNECTIONS_TOTAL,
    CONSOLE_LOG_BYTES_TOTAL,
    GUEST_EVENTS_REFUSED_TOTAL,
    GUEST_MEMORY_TOTAL_BYTES,
    GUEST_MEMORY_AVAILABLE_BYTES,
    GUEST_MEMORY_FREE_BYTES,
    GUEST_MEMORY_CACHED_BYTES,
    GUEST_MEMORY_BUFFERS_BYTES,
    GUEST_MEMORY_SHMEM_BYTES,
    GUEST_MEMORY_SLAB_BYTES,
    GUEST_SWAP_TOTAL_BYTES,
    GUEST_SWAP_FREE_BYTES,
    GUEST_CPU_SECONDS_TOTAL,
    GUEST_LOAD1,
    GUEST_LOAD5,
    GUEST_LOAD15,
    GUEST_PROCS_RUNNING,
    GUEST_PROCS_BLOCKED,
    GUEST_NETWORK_RECEIVE_BYTES_TOTAL,
    GUEST_NETWORK_RECEIVE_PACKETS_TOTAL,
    GUEST_NETWORK_RECEIVE_ERRORS_TOTAL,
    GUEST_NETWORK_RECEIVE_DROPS_TOTAL,
    GUEST_NETWORK_TRANSMIT_BYTES_TOTAL,
    GUEST_NETWORK_TRANSMIT_PACKETS_TOTAL,
    GUEST_NETWORK_TRANSMIT_ERRORS_TOTAL,
    GUEST_NETWORK_TRANSMIT_DROPS_TOTAL,
    GUEST_DISK_READ_BYTES_TOTAL,
    GUEST_DISK_WRITTEN_BYTES_TOTAL,
    GUEST_DISK_READS_COMPLETED_TOTAL,
    GUEST_DISK_WRITES_COMPLETED_TOTAL,
    GUEST_DISK_IO_TIME_SECONDS_TOTAL,
    CONTAINER_CPU_USAGE_SECONDS_TOTAL,
    CONTAINER_CPU_USER_SECONDS_TOTAL,
    CONTAINER_CPU_SYSTEM_SECONDS_TOTAL,
    CONTAINER_CPU_PERIODS_TOTAL,
    CONTAINER_CPU_THROTTLED_PERIODS_TOTAL,
    CONTAINER_CPU_THROTTLED_SECONDS_TOTAL,
    CONTAINER_MEMORY_USAGE_BYTES,
    CONTAINER_MEMORY_WORKING_SET_BYTES,
    CONTAINER_MEMORY_RSS_BYTES,
    CONTAINER_MEMORY_CACHE_BYTES,
    CONTAINER_MEMORY_SWAP_BYTES,
    CONTAINER_MEMORY_LIMIT_BYTES,
    CONTAINER_OOM_EVENTS_TOTAL,
    CONTAINER_OOM_KILLS_TOTAL,
    CONTAINER_PIDS,
    CONTAINER_PIDS_LIMIT,
    CONTAINER_FS_READ_BYTES_TOTAL,
    CONTAINER_FS_WRITTEN_BYTES_TOTAL,
    POD_OVERHEAD_MEMORY_BYTES,
    GUEST_METRICS_REJECTED_TOTAL,
];

/// A shim's family by name; the monitor's own are not among them, so a shim cannot forge
/// them.
pub fn find(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.name == name)
}

pub const SANDBOX_UP: Family = Family {
    name: "hako_sandbox_up",
    help: "1 if the monitor's last scrape of the sandbox's metrics socket answered in time with a valid snapshot, else 0; a sandbox whose shim is gone has no series at all.",
    kind: Kind::Gauge,
    unit: "",
    labels: &[],
    buckets: &[],
};

pub const MONITOR_SANDBOX_SCRAPE_DURATION_SECONDS: Family = Family {
    name: "hako_monitor_sandbox_scrape_duration_seconds",
    help: "How long the monitor's last scrape of the sandbox took, up to its deadline.",
    kind: Kind::Gauge,
    unit: "seconds",
    labels: &[],
    buckets: &[],
};

pub const MONITOR_SANDBOXES: Family = Family {
    name: "hako_monitor_sandboxes",
    help: "Sandboxes with a metrics socket the monitor found in its last scrape.",
    kind: Kind::Gauge,
    unit: "",
    labels: &[],
    buckets: &[],
};

pub const MONITOR_SANDBOX_SCRAPE_FAILURES_TOTAL: Family = Family {
    name: "hako_monitor_sandbox_scrape_failures_total",
    help: "Scrapes of a sandbox that failed since the monitor started, by reason (timeout, oversize, malformed, http, io).",
    kind: Kind::Counter,
    unit: "",
    labels: &["reason"],
    buckets: &[],
};

/// The node monitor's own families: `hako_sandbox_up` and its scrape's duration carry the
/// sandbox's labels, the others none.
pub const MONITOR_FAMILIES: &[Family] = &[
    SANDBOX_UP,
    MONITOR_SANDBOX_SCRAPE_DURATION_SECONDS,
    MONITOR_SANDBOXES,
    MONITOR_SANDBOX_SCRAPE_FAILURES_TOTAL,
];

/// Every family, the shims' and the monitor's, in the order they are rendered.
pub fn all() -> impl Iterator<Item = &'static Family> {
    FAMILIES.iter().chain(MONITOR_FAMILIES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_name(s: &str) -> bool {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    }

    #[test]
    fn names_carry_prefix_unit_and_counter_suffix() {
        for f in all() {
            assert!(
                f.name.starts_with("hako_") && valid_name(f.name),
                "{}",
                f.name
            );
            let base = match f.kind {
                Kind::Counter => f.name.strip_suffix("_total").expect("counter ends _total"),
                _ => {
                    assert!(!f.name.ends_with("_total"), "{} is not a counter", f.name);
                    f.name
                }
            };
            if !f.unit.is_empty() {
                assert!(base.ends_with(&format!("_{}", f.unit)), "{}", f.name);
                assert!(["seconds", "bytes"].contains(&f.unit), "{}", f.name);
            }
            assert!(!f.help.is_empty() && !f.help.contains('\n'), "{}", f.name);
        }
    }

    #[test]
    fn label_names_are_valid_and_distinct() {
        for f in all() {
            for (i, label) in f.labels.iter().enumerate() {
                assert!(valid_name(label) && !label.starts_with("__"), "{label}");
                // `le` is the histogram's own; the sandbox's labels are the monitor's.
                assert!(
                    ![
                        "le",
                        "sandbox_id",
                        "containerd_namespace",
                        "namespace",
                        "pod",
                        "pod_uid"
                    ]
                    .contains(label),
                    "{label}"
                );
                assert!(!f.labels[..i].contains(label), "{} repeats {label}", f.name);
            }
        }
    }

    #[test]
    fn names_are_unique_and_buckets_only_on_histograms() {
        for (i, f) in all().enumerate() {
            assert!(all().take(i).all(|g| g.name != f.name), "{}", f.name);
            assert_eq!(
                f.kind == Kind::Histogram,
                !f.buckets.is_empty(),
                "{}",
                f.name
            );
            assert!(f.buckets.windows(2).all(|w| w[0] < w[1]), "{}", f.name);
            assert!(f.buckets.iter().all(|b| b.is_finite() && *b > 0.0));
        }
        assert!(MONITOR_FAMILIES.iter().all(|f| find(f.name).is_none()));
        assert_eq!(START_PHASE_BUCKETS.len(), 13);
        assert_eq!(RPC_BUCKETS.len(), 9);
    }

    #[test]
    fn every_family_is_documented() {
        let doc = include_str!("../../../docs/metrics.md");
        for f in all() {
            assert!(
                doc.contains(&format!("`{}`", f.name)),
                "{} not in docs",
                f.name
            );
        }
    }
}
