//! The families of the guest's and its containers' figures, fetched from the agent on vsock
//! port 1028 (`agent_client::guest`) at each scrape: part of the one table, `FAMILIES`.

use super::{Family, Kind};
use Kind::{Counter, Gauge};

/// A gauge or counter of the guest's or its containers', in the table's shorter form.
const fn plain(
    name: &'static str,
    kind: Kind,
    unit: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
) -> Family {
    Family {
        name,
        help,
        kind,
        unit,
        labels,
        buckets: &[],
    }
}

const NONE: &[&str] = &[];
const MODE: &[&str] = &["mode"];
const DEVICE: &[&str] = &["device"];
/// A container's id, and its CRI name (the id itself when it has none: ctr, Docker).
const CONTAINER: &[&str] = &["container_id", "container"];

pub const GUEST_MEMORY_TOTAL_BYTES: Family = plain(
    "hako_guest_memory_total_bytes",
    Gauge,
    "bytes",
    NONE,
    "The guest's memory (MemTotal of its /proc/meminfo).",
);
pub const GUEST_MEMORY_AVAILABLE_BYTES: Family = plain(
    "hako_guest_memory_available_bytes",
    Gauge,
    "bytes",
    NONE,
    "Memory available to the guest's processes without swapping (MemAvailable).",
);
pub const GUEST_MEMORY_FREE_BYTES: Family = plain(
    "hako_guest_memory_free_bytes",
    Gauge,
    "bytes",
    NONE,
    "The guest's unused memory (MemFree).",
);
pub const GUEST_MEMORY_CACHED_BYTES: Family = plain(
    "hako_guest_memory_cached_bytes",
    Gauge,
    "bytes",
    NONE,
    "The guest's page cache (Cached).",
);
pub const GUEST_MEMORY_BUFFERS_BYTES: Family = plain(
    "hako_guest_memory_buffers_bytes",
    Gauge,
    "bytes",
    NONE,
    "The guest's block buffers (Buffers).",
);
pub const GUEST_MEMORY_SHMEM_BYTES: Family = plain(
    "hako_guest_memory_shmem_bytes",
    Gauge,
    "bytes",
    NONE,
    "The guest's shared memory and tmpfs (Shmem).",
);
pub const GUEST_MEMORY_SLAB_BYTES: Family = plain(
    "hako_guest_memory_slab_bytes",
    Gauge,
    "bytes",
    NONE,
    "The guest kernel's slab allocations (Slab).",
);
pub const GUEST_SWAP_TOTAL_BYTES: Family = plain(
    "hako_guest_swap_total_bytes",
    Gauge,
    "bytes",
    NONE,
    "The guest's swap (SwapTotal).",
);
pub const GUEST_SWAP_FREE_BYTES: Family = plain(
    "hako_guest_swap_free_bytes",
    Gauge,
    "bytes",
    NONE,
    "The guest's unused swap (SwapFree).",
);
pub const GUEST_CPU_SECONDS_TOTAL: Family = plain(
    "hako_guest_cpu_seconds_total",
    Counter,
    "seconds",
    MODE,
    "CPU time of all the guest's vCPUs by mode, from the cpu line of its /proc/stat.",
);
pub const GUEST_LOAD1: Family = plain(
    "hako_guest_load1",
    Gauge,
    "",
    NONE,
    "The guest's 1-minute load average.",
);
pub const GUEST_LOAD5: Family = plain(
    "hako_guest_load5",
    Gauge,
    "",
    NONE,
    "The guest's 5-minute load average.",
);
pub const GUEST_LOAD15: Family = plain(
    "hako_guest_load15",
    Gauge,
    "",
    NONE,
    "The guest's 15-minute load average.",
);
pub const GUEST_PROCS_RUNNING: Family = plain(
    "hako_guest_procs_running",
    Gauge,
    "",
    NONE,
    "Runnable processes in the guest (procs_running).",
);
pub const GUEST_PROCS_BLOCKED: Family = plain(
    "hako_guest_procs_blocked",
    Gauge,
    "",
    NONE,
    "Processes blocked on I/O in the guest (procs_blocked).",
);
pub const GUEST_NETWORK_RECEIVE_BYTES_TOTAL: Family = plain(
    "hako_guest_network_receive_bytes_total",
    Counter,
    "bytes",
    DEVICE,
    "Bytes received on a guest interface.",
);
pub const GUEST_NETWORK_RECEIVE_PACKETS_TOTAL: Family = plain(
    "hako_guest_network_receive_packets_total",
    Counter,
    "",
    DEVICE,
    "Packets received on a guest interface.",
);
pub const GUEST_NETWORK_RECEIVE_ERRORS_TOTAL: Family = plain(
    "hako_guest_network_receive_errors_total",
    Counter,
    "",
    DEVICE,
    "Receive errors on a guest interface.",
);
pub const GUEST_NETWORK_RECEIVE_DROPS_TOTAL: Family = plain(
    "hako_guest_network_receive_drops_total",
    Counter,
    "",
    DEVICE,
    "Received packets dropped on a guest interface.",
);
pub const GUEST_NETWORK_TRANSMIT_BYTES_TOTAL: Family = plain(
    "hako_guest_network_transmit_bytes_total",
    Counter,
    "bytes",
    DEVICE,
    "Bytes sent on a guest interface.",
);
pub const GUEST_NETWORK_TRANSMIT_PACKETS_TOTAL: Family = plain(
    "hako_guest_network_transmit_packets_total",
    Counter,
    "",
    DEVICE,
    "Packets sent on a guest interface.",
);
pub const GUEST_NETWORK_TRANSMIT_ERRORS_TOTAL: Family = plain(
    "hako_guest_network_transmit_errors_total",
    Counter,
    "",
    DEVICE,
    "Transmit errors on a guest interface.",
);
pub const GUEST_NETWORK_TRANSMIT_DROPS_TOTAL: Family = plain(
    "hako_guest_network_transmit_drops_total",
    Counter,
    "",
    DEVICE,
    "Packets dropped on sending on a guest interface.",
);
pub const GUEST_DISK_READ_BYTES_TOTAL: Family = plain(
    "hako_guest_disk_read_bytes_total",
    Counter,
    "bytes",
    DEVICE,
    "Bytes read from a guest block device.",
);
pub const GUEST_DISK_WRITTEN_BYTES_TOTAL: Family = plain(
    "hako_guest_disk_written_bytes_total",
    Counter,
    "bytes",
    DEVICE,
    "Bytes written to a guest block device.",
);
pub const GUEST_DISK_READS_COMPLETED_TOTAL: Family = plain(
    "hako_guest_disk_reads_completed_total",
    Counter,
    "",
    DEVICE,
    "Reads completed on a guest block device.",
);
pub const GUEST_DISK_WRITES_COMPLETED_TOTAL: Family = plain(
    "hako_guest_disk_writes_completed_total",
    Counter,
    "",
    DEVICE,
    "Writes completed on a guest block device.",
);
pub const GUEST_DISK_IO_TIME_SECONDS_TOTAL: Family = plain(
    "hako_guest_disk_io_time_seconds_total",
    Counter,
    "seconds",
    DEVICE,
    "Time a guest block device spent doing I/O.",
);
pub const CONTAINER_CPU_USAGE_SECONDS_TOTAL: Family = plain(
    "hako_container_cpu_usage_seconds_total",
    Counter,
    "seconds",
    CONTAINER,
    "CPU time of a container's processes (its guest cgroup's cpu.stat usage_usec).",
);
pub const CONTAINER_CPU_USER_SECONDS_TOTAL: Family = plain(
    "hako_container_cpu_user_seconds_total",
    Counter,
    "seconds",
    CONTAINER,
    "User CPU time of a container's processes.",
);
pub const CONTAINER_CPU_SYSTEM_SECONDS_TOTAL: Family = plain(
    "hako_container_cpu_system_seconds_total",
    Counter,
    "seconds",
    CONTAINER,
    "System CPU time of a container's processes.",
);
pub const CONTAINER_CPU_PERIODS_TOTAL: Family = plain(
    "hako_container_cpu_periods_total",
    Counter,
    "",
    CONTAINER,
    "CPU quota periods a container has run in.",
);
pub const CONTAINER_CPU_THROTTLED_PERIODS_TOTAL: Family = plain(
    "hako_container_cpu_throttled_periods_total",
    Counter,
    "",
    CONTAINER,
    "CPU quota periods in which a container was throttled.",
);
pub const CONTAINER_CPU_THROTTLED_SECONDS_TOTAL: Family = plain(
    "hako_container_cpu_throttled_seconds_total",
    Counter,
    "seconds",
    CONTAINER,
    "Time a container was throttled by its CPU quota.",
);
pub const CONTAINER_MEMORY_USAGE_BYTES: Family = plain(
    "hako_container_memory_usage_bytes",
    Gauge,
    "bytes",
    CONTAINER,
    "A container's memory, page cache included (memory.current).",
);
pub const CONTAINER_MEMORY_WORKING_SET_BYTES: Family = plain(
    "hako_container_memory_working_set_bytes",
    Gauge,
    "bytes",
    CONTAINER,
    "A container's working set: memory.current less inactive_file, as kubelet defines it.",
);
pub const CONTAINER_MEMORY_RSS_BYTES: Family = plain(
    "hako_container_memory_rss_bytes",
    Gauge,
    "bytes",
    CONTAINER,
    "A container's anonymous memory (memory.stat anon).",
);
pub const CONTAINER_MEMORY_CACHE_BYTES: Family = plain(
    "hako_container_memory_cache_bytes",
    Gauge,
    "bytes",
    CONTAINER,
    "A container's page cache (memory.stat file).",
);
pub const CONTAINER_MEMORY_SWAP_BYTES: Family = plain(
    "hako_container_memory_swap_bytes",
    Gauge,
    "bytes",
    CONTAINER,
    "A container's swap use (memory.swap.current).",
);
pub const CONTAINER_MEMORY_LIMIT_BYTES: Family = plain(
    "hako_container_memory_limit_bytes",
    Gauge,
    "bytes",
    CONTAINER,
    "A container's memory limit; the guest's memory when it has none.",
);
pub const CONTAINER_OOM_EVENTS_TOTAL: Family = plain(
    "hako_container_oom_events_total",
    Counter,
    "",
    CONTAINER,
    "Times a container reached its memory limit (memory.events oom).",
);
pub const CONTAINER_OOM_KILLS_TOTAL: Family = plain(
    "hako_container_oom_kills_total",
    Counter,
    "",
    CONTAINER,
    "A container's processes killed by the OOM killer (memory.events oom_kill).",
);
pub const CONTAINER_PIDS: Family = plain(
    "hako_container_pids",
    Gauge,
    "",
    CONTAINER,
    "Tasks in a container (pids.current).",
);
pub const CONTAINER_PIDS_LIMIT: Family = plain(
    "hako_container_pids_limit",
    Gauge,
    "",
    CONTAINER,
    "A container's task limit (pids.max); absent when it has none.",
);
pub const CONTAINER_FS_READ_BYTES_TOTAL: Family = plain(
    "hako_container_fs_read_bytes_total",
    Counter,
    "bytes",
    CONTAINER,
    "Bytes a container read from guest block devices (io.stat); virtio-fs I/O is not counted.",
);
pub const CONTAINER_FS_WRITTEN_BYTES_TOTAL: Family = plain(
    "hako_container_fs_written_bytes_total",
    Counter,
    "bytes",
    CONTAINER,
    "Bytes a container wrote to guest block devices (io.stat); virtio-fs I/O is not counted.",
);
pub const POD_OVERHEAD_MEMORY_BYTES: Family = plain("hako_pod_overhead_memory_bytes", Gauge, "bytes", NONE, "The sandbox's host memory (the sum of its processes' PSS) less its containers' memory in the guest.");
pub const GUEST_METRICS_REJECTED_TOTAL: Family = plain(
    "hako_guest_metrics_rejected_total",
    Counter,
    "",
    &["reason"],
    "Guest metrics answers refused, by reason (oversize, malformed, timeout, refused).",
);
