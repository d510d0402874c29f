//! `hako monitor`: the node's one Prometheus endpoint (issue 26, docs/metrics.md). Each scrape
//! lists the sandboxes under the sandbox roots (`discover`), fetches every shim's snapshot
//! at once within one deadline (`scrape`), and renders them through the families table with
//! each sandbox's labels added (`sandbox_id`, `containerd_namespace`, and a CRI pod's
//! `namespace`, `pod`, `pod_uid`). It keeps no values between scrapes but its failure
//! counters and the last pod labels seen per sandbox.

pub mod discover;
pub mod scrape;
pub mod serve;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::metrics::families;
use crate::metrics::snapshot::{PodLabels, Sample, Snapshot, Value};
use crate::metrics::text::{self, Part};
use discover::Target;
use scrape::{Failure, Outcome};

pub use serve::serve;

/// Where the monitor listens unless told otherwise: loopback only (the figures name every pod
/// on the node).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8095";
/// Each sandbox's deadline; Prometheus' own scrape timeout defaults to 10 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_CONCURRENCY: usize = 16;

#[derive(Debug)]
pub struct Monitor {
    roots: Vec<PathBuf>,
    timeout: Duration,
    fetches: Arc<Semaphore>,
    failures: Mutex<BTreeMap<Failure, u64>>,
    /// The pod labels of each sandbox's last good snapshot, so a pod whose scrape fails keeps
    /// its labels on `hako_sandbox_up 0`.
    pods: Mutex<BTreeMap<(String, String), PodLabels>>,
}

impl Monitor {
    pub fn new(roots: Vec<PathBuf>, timeout: Duration, concurrency: usize) -> Self {
        Self {
            roots,
            timeout,
            fetches: Arc::new(Semaphore::new(concurrency.max(1))),
            failures: Mutex::new(BTreeMap::new()),
            pods: Mutex::new(BTreeMap::new()),
        }
    }

    /// One scrape of the node, as Prometheus text.
    pub async fn scrape(&self) -> String {
        let targets = discover::targets(&self.roots);
        let fetches = targets.iter().map(|target| {
            let fetches = self.fetches.clone();
            let timeout = self.timeout;
            async move {
                // A slot first: each fetch's deadline runs only while it holds one, so a
                // stalled shim costs one deadline of one slot, not the next sandbox's chance.
                let _slot = fetches.acquire().await;
                let started = Instant::now();
                let outcome = scrape::fetch(&target.socket, timeout).await;
                (outcome, started.elapsed())
            }
        });
        let results = futures_util::future::join_all(fetches).await;
        let mut parts = Vec::with_capacity(targets.len() + 1);
        for (target, (outcome, took)) in targets.iter().zip(results) {
            if let Some(part) = self.part(target, outcome, took) {
                parts.push(part);
            }
        }
        self.forget_pods_not_in(&targets);
        parts.push(self.own_part(targets.len()));
        text::render_all(parts)
    }

    fn part(&self, target: &Target, outcome: Outcome, took: Duration) -> Option<Part> {
        let key = (target.namespace.clone(), target.sandbox_id.clone());
        let (mut snapshot, up) = match outcome {
            Outcome::Gone => return None,
            Outcome::Up(snapshot) => {
                if let Some(pod) = &snapshot.pod {
                    lock(&self.pods).insert(key.clone(), pod.clone());
                }
                (snapshot, 1.0)
            }
            Outcome::Failed(failure) => {
                *lock(&self.failures).entry(failure).or_insert(0) += 1;
                let mut snapshot = Snapshot::new(Vec::new());
                snapshot.pod = lock(&self.pods).get(&key).cloned();
                (snapshot, 0.0)
            }
        };
        snapshot
            .samples
            .push(number(&families::SANDBOX_UP, &[], up));
        snapshot.samples.push(number(
            &families::MONITOR_SANDBOX_SCRAPE_DURATION_SECONDS,
            &[],
            took.as_secs_f64(),
        ));
        Some(Part {
            labels: sandbox_labels(target, snapshot.pod.as_ref()),
            snapshot: Arc::new(snapshot),
        })
    }

    fn forget_pods_not_in(&self, targets: &[Target]) {
        lock(&self.pods).retain(|(ns, id), _| {
            targets
                .iter()
                .any(|t| &t.namespace == ns && &t.sandbox_id == id)
        });
    }

    /// The monitor's node-level series, with no sandbox labels.
    fn own_part(&self, sandboxes: usize) -> Part {
        let failures = lock(&self.failures);
        let mut samples = vec![number(&families::MONITOR_SANDBOXES, &[], sandboxes as f64)];
        // Every reason from the start, so `rate()` sees the first failure as an increase.
        samples.extend(Failure::ALL.iter().map(|f| {
            let n = failures.get(f).copied().unwrap_or(0);
            number(
                &families::MONITOR_SANDBOX_SCRAPE_FAILURES_TOTAL,
                &[f.as_str()],
                n as f64,
            )
        }));
        Part {
            labels: Vec::new(),
            snapshot: Arc::new(Snapshot::new(samples)),
        }
    }
}

/// The sandbox's labels, taken from its path; a CRI pod's from its (validated) snapshot.
fn sandbox_labels(target: &Target, pod: Option<&PodLabels>) -> Vec<(&'static str, String)> {
    let mut labels = vec![
        ("sandbox_id", target.sandbox_id.clone()),
        ("containerd_namespace", target.namespace.clone()),
    ];
    if let Some(pod) = pod {
        labels.push(("namespace", pod.namespace.clone()));
        labels.push(("pod", pod.name.clone()));
        labels.push(("pod_uid", pod.uid.clone()));
    }
    labels
}

fn number(family: &families::Family, labels: &[&str], value: f64) -> Sample {
    Sample {
        family: family.name.to_string(),
        labels: labels.iter().map(|s| s.to_string()).collect(),
        value: Value::Number(value),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Counts left by a panicking holder are still counts.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
