//! `ShimMetrics`: one sandbox's in-process instruments, updated inline where the work happens
//! (a start's phases, an agent call, a hot-plug) and read only when someone asks. Every label
//! value is a `&'static str` from the shim's own code, so the number of series is bounded by
//! the code, whatever the guest does.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::families::{self, Family};
use super::snapshot::{PodLabels, Sample, Value};
use crate::logs::LogCounts;
use crate::timing::Timings;

/// Fixed buckets, not cumulated; `count` covers those above the last bound too.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: vec![0; bounds.len()],
            count: 0,
            sum: 0.0,
        }
    }

    fn observe(&mut self, d: Duration) {
        let v = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += v;
    }

    fn value(&self) -> Value {
        Value::Histogram {
            buckets: self.buckets.clone(),
            count: self.count,
            sum: self.sum,
        }
    }
}

type Key = Vec<&'static str>;

#[derive(Debug, Default)]
struct Instruments {
    histograms: BTreeMap<(&'static str, Key), Histogram>,
    counters: BTreeMap<(&'static str, Key), u64>,
    pod: Option<PodLabels>,
    vm: Option<VmInfo>,
}

/// What the sandbox's VM is, once it runs: `hako_sandbox_info` and `hako_vm_*`.
#[derive(Debug, Clone, PartialEq)]
pub struct VmInfo {
    pub hypervisor: &'static str,
    pub accel: &'static str,
    pub from_template: bool,
    pub vcpus: u32,
    pub memory_bytes: u64,
}

/// Why an agent call failed, as the `reason` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcFailure {
    Timeout,
    /// The connection broke or the answer was malformed.
    Unavailable,
    /// The agent answered with an error.
    Guest,
}

impl RpcFailure {
    fn as_str(self) -> &'static str {
        match self {
            RpcFailure::Timeout => "timeout",
            RpcFailure::Unavailable => "unavailable",
            RpcFailure::Guest => "guest",
        }
    }
}

#[derive(Debug, Default)]
pub struct ShimMetrics {
    // A std mutex held for a map update, never across an await: cheaper than a lock-free
    // family for the handful of updates a start makes.
    inner: Mutex<Instruments>,
    /// The console log's own counts, updated as the guest writes (atomics, no lock).
    console: Arc<LogCounts>,
}

impl ShimMetrics {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Instruments> {
        // A panic elsewhere while holding it leaves counts that are still counts.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn observe(&self, family: &Family, labels: Key, d: Duration) {
        self.lock()
            .histograms
            .entry((family.name, labels))
            .or_insert_with(|| Histogram::new(family.buckets))
            .observe(d);
    }

    /// One more of a counter `family`'s series `labels`: for the guards (DNS relay, port
    /// forwarding, refused guest events), whose label values are the callers' constants.
    pub fn count(&self, family: &Family, labels: &[&'static str]) {
        self.inc(family, labels.to_vec());
    }

    fn inc(&self, family: &Family, labels: Key) {
        *self
            .lock()
            .counters
            .entry((family.name, labels))
            .or_insert(0) += 1;
    }

    /// A start whose phases are all marked: each phase and detail, and the total.
    pub fn observe_start(&self, timings: &Timings) {
        for (phase, d) in timings.entries() {
            self.observe(&families::START_PHASE_SECONDS, vec![phase], d);
        }
        self.observe(
            &families::START_PHASE_SECONDS,
            vec!["total"],
            timings.total(),
        );
    }

    /// One agent call that is not a wait: its duration, and its failure if it failed.
    pub fn observe_rpc(&self, method: &'static str, d: Duration, failure: Option<RpcFailure>) {
        self.observe(&families::AGENT_RPC_DURATION_SECONDS, vec![method], d);
        if let Some(f) = failure {
            self.inc(&families::AGENT_RPC_ERRORS_TOTAL, vec![method, f.as_str()]);
        }
    }

    /// One hot-plug (`op` "add") or unplug ("remove") of a `device` ("nic", ...).
    pub fn observe_hotplug(&self, device: &'static str, op: &'static str, d: Duration, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.inc(&families::HOTPLUG_TOTAL, vec![device, op, result]);
        self.observe(&families::HOTPLUG_DURATION_SECONDS, vec![device, op], d);
    }

    /// A guest metrics answer refused: `reason` is oversize, malformed, timeout or refused.
    pub fn guest_metrics_rejected(&self, reason: &'static str) {
        self.inc(&families::GUEST_METRICS_REJECTED_TOTAL, vec![reason]);
    }

    /// The first container that names its CRI pod in valid annotations sets the sandbox's pod
    /// labels; a later container cannot change them.
    pub fn note_pod(&self, annotations: &std::collections::HashMap<String, String>) {
        let mut inner = self.lock();
        if inner.pod.is_none() {
            inner.pod = PodLabels::from_annotations(annotations);
        }
    }

    pub fn pod(&self) -> Option<PodLabels> {
        self.lock().pod.clone()
    }

    /// Where the console log counts what it keeps and drops.
    pub fn console_counts(&self) -> Arc<LogCounts> {
        self.console.clone()
    }

    /// The VM now runs as `vm` says.
    pub fn note_vm(&self, vm: VmInfo) {
        self.lock().vm = Some(vm);
    }

    /// Every series so far, for a snapshot.
    pub fn samples(&self) -> Vec<Sample> {
        let inner = self.lock();
        let labels = |key: &Key| key.iter().map(|s| s.to_string()).collect();
        let histograms = inner.histograms.iter().map(|((family, key), h)| Sample {
            family: family.to_string(),
            labels: labels(key),
            value: h.value(),
        });
        let counters = inner.counters.iter().map(|((family, key), n)| Sample {
            family: family.to_string(),
            labels: labels(key),
            value: Value::Number(*n as f64),
        });
        let mut samples: Vec<Sample> = histograms.chain(counters).collect();
        let (kept, dropped) = self.console.get();
        if kept > 0 {
            for (outcome, bytes) in [("kept", kept), ("dropped", dropped)] {
                samples.push(Sample {
                    family: families::CONSOLE_LOG_BYTES_TOTAL.name.to_string(),
                    labels: vec![outcome.to_string()],
                    value: Value::Number(bytes as f64),
                });
            }
        }
        if let Some(vm) = &inner.vm {
            let number = |family: &Family, labels: Vec<String>, v: f64| Sample {
                family: family.name.to_string(),
                labels,
                value: Value::Number(v),
            };
            let info = [
                vm.hypervisor,
                vm.accel,
                if vm.from_template { "true" } else { "false" },
                env!("CARGO_PKG_VERSION"),
            ];
            let info = info.iter().map(|s| s.to_string()).collect();
            samples.push(number(&families::SANDBOX_INFO, info, 1.0));
            samples.push(number(&families::VM_VCPUS, vec![], f64::from(vm.vcpus)));
            samples.push(number(
                &families::VM_MEMORY_BYTES,
                vec![],
                vm.memory_bytes as f64,
            ));
        }
        samples
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::snapshot::Snapshot;

    fn find<'a>(samples: &'a [Sample], family: &str, labels: &[&str]) -> Option<&'a Value> {
        samples
            .iter()
            .find(|s| s.family == family && s.labels == labels)
            .map(|s| &s.value)
    }

    #[test]
    fn a_start_is_observed_phase_by_phase() {
        let m = ShimMetrics::new();
        let mut t = Timings::new();
        t.mark("sandbox_prepare");
        t.detail("agent_ready.kernel", Duration::from_millis(300));
        m.observe_start(&t);
        m.observe_start(&t);
        let samples = m.samples();
        let family = "hako_start_phase_seconds";
        let Some(Value::Histogram { buckets, count, .. }) =
            find(&samples, family, &["agent_ready.kernel"])
        else {
            panic!("no kernel phase: {samples:?}");
        };
        assert_eq!(*count, 2);
        // 0.3 s falls in (0.25, 0.5].
        assert_eq!(buckets[8], 2, "{buckets:?}");
        assert!(find(&samples, family, &["sandbox_prepare"]).is_some());
        assert!(find(&samples, family, &["total"]).is_some());
        Snapshot::new(samples).validate().expect("valid");
    }

    #[test]
    fn the_vm_is_described_once_it_runs() {
        let m = ShimMetrics::new();
        assert!(Snapshot::new(m.samples()).samples.is_empty());
        m.note_vm(VmInfo {
            hypervisor: "qemu",
            accel: "tcg",
            from_template: true,
            vcpus: 2,
            memory_bytes: 512 << 20,
        });
        let samples = m.samples();
        Snapshot::new(samples.clone()).validate().expect("valid");
        let info = find(
            &samples,
            "hako_sandbox_info",
            &["qemu", "tcg", "true", env!("CARGO_PKG_VERSION")],
        );
        assert_eq!(info, Some(&Value::Number(1.0)));
        assert_eq!(
            find(&samples, "hako_vm_vcpus", &[]),
            Some(&Value::Number(2.0))
        );
        assert_eq!(
            find(&samples, "hako_vm_memory_bytes", &[]),
            Some(&Value::Number(536870912.0))
        );
    }

    #[test]
    fn rpc_failures_and_slow_calls_are_counted() {
        let m = ShimMetrics::new();
        m.observe_rpc("CreateContainer", Duration::from_millis(2), None);
        m.observe_rpc(
            "CreateContainer",
            Duration::from_secs(60),
            Some(RpcFailure::Timeout),
        );
        m.observe_hotplug("nic", "add", Duration::from_millis(80), true);
        let samples = m.samples();
        let Some(Value::Histogram {
            buckets,
            count,
            sum,
        }) = find(
            &samples,
            "hako_agent_rpc_duration_seconds",
            &["CreateContainer"],
        )
        else {
            panic!("{samples:?}");
        };
        // The 60 s call is only in `count`: it is above every bound.
        assert_eq!((buckets.iter().sum::<u64>(), *count), (1, 2));
        assert!((sum - 60.002).abs() < 1e-9);
        assert_eq!(
            find(
                &samples,
                "hako_agent_rpc_errors_total",
                &["CreateContainer", "timeout"]
            ),
            Some(&Value::Number(1.0))
        );
        assert_eq!(
            find(&samples, "hako_hotplug_total", &["nic", "add", "ok"]),
            Some(&Value::Number(1.0))
        );
        Snapshot::new(samples).validate().expect("valid");
    }
}
