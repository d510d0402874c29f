//! End-to-end: issue 26's node monitor under a real Prometheus (Debian 12's and the newest).
//! A CRI pod per runtime handler and a `ctr` container run on one containerd; `hako monitor`
//! serves them all, Prometheus scrapes it every second, and its HTTP API must show each pod's
//! VM memory and start phases with the right labels; `promtool check metrics` must take the
//! text. Then a shim is stopped (SIGSTOP: the scrape stays bounded and says so) and killed (its
//! sandbox disappears from the output).
//!
//! Needs root and the installed runtime: `#[ignore]`d in a plain `cargo test`;
//! `scripts/test.sh` runs them.

#![allow(clippy::unwrap_used)] // Test code: a failed step should fail the test loudly.

use std::collections::BTreeMap;
use std::time::Duration;

use hako_tests::cri::*;
use hako_tests::prometheus::*;
use hako_tests::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const CTR_ID: &str = "metrics-ctr";
/// The monitor's per-sandbox deadline in these tests.
const TIMEOUT: Duration = Duration::from_secs(1);

/// The series of a query keyed by their `sandbox_id`.
fn by_sandbox(
    found: Vec<(BTreeMap<String, String>, f64)>,
) -> BTreeMap<String, (BTreeMap<String, String>, f64)> {
    found
        .into_iter()
        .map(|(labels, v)| (labels["sandbox_id"].clone(), (labels, v)))
        .collect()
}

#[test]
#[ignore = "needs root and the installed runtime: run through scripts/test.sh"]
fn prometheus_sees_every_pod_through_the_monitor_and_a_stalled_shim_stays_bounded() {
    for_each_cri_containerd(|c| {
        let cri = &c.client;
        let image = cri
            .image_status(IMAGE)
            .unwrap()
            .expect("busybox is imported");
        // One pod per handler (the Sandbox API's too on containerd 2.x), each with a container.
        let mut pods = BTreeMap::new();
        for (n, handler) in c.handlers().iter().enumerate() {
            let name = format!("metrics-web-{n}");
            let uid = format!("5a1e0c4b-0000-4000-8000-00000000000{n}");
            let log_dir = c.pod_log_directory(&name, &uid, &["app"]);
            let pod_config = pod_sandbox_config(&name, &uid, &log_dir);
            let pod = cri.run_pod_sandbox(&pod_config, handler).unwrap();
            let app = container_config(&pod_config, "app", &image.id, &["sleep", "inf"], 0);
            let id = cri.create_container(&pod, &app, &pod_config).unwrap();
            cri.start_container(&id).unwrap();
            // The first pod also burns CPU, for a counter that must grow.
            if n == 0 {
                let burn = ["sh", "-c", "while :; do :; done"];
                let burn = container_config(&pod_config, "burn", &image.id, &burn, 0);
                let id = cri.create_container(&pod, &burn, &pod_config).unwrap();
                cri.start_container(&id).unwrap();
            }
            pods.insert(pod, (name, uid));
        }
        // A ctr container beside them, in containerd's `default` namespace: no pod labels.
        let archive = busybox_archive().display().to_string();
        let r = c.ctr(&["-n", "default", "image", "import", &archive]);
        assert_eq!(r.code, 0, "{r:?}");
        let r = c.ctr(&[
            "-n",
            "default",
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            IMAGE,
            CTR_ID,
            "sleep",
            "600",
        ]);
        assert_eq!(r.code, 0, "{r:?}");

        let monitor = HakoMonitor::start("1s");
        for install in prometheus_versions() {
            let prometheus = Prometheus::start(&install, monitor.port);
            eprintln!("--- Prometheus {}", prometheus.version);
            scraped_by_prometheus(&prometheus, &monitor, &pods);
        }

        stalled_and_dead_shims(&monitor, &pods);
        // containerd cleans up after a shim that disconnects (the shim's `delete` reaps the
        // VM); then its container record goes.
        eventually(
            "containerd forgets the dead task",
            Duration::from_secs(30),
            || {
                let r = c.ctr(&["-n", "default", "task", "ls", "-q"]);
                match r.stdout.lines().any(|l| l == CTR_ID) {
                    false => Ok(()),
                    true => Err(format!("{r:?}")),
                }
            },
        );
        let r = c.ctr(&["-n", "default", "container", "delete", CTR_ID]);
        assert_eq!(r.code, 0, "{r:?}");
    });
}

fn scraped_by_prometheus(
    prometheus: &Prometheus,
    monitor: &HakoMonitor,
    pods: &BTreeMap<String, (String, String)>,
) {
    let wanted = pods.len() + 1;
    let of_sandboxes = |expr: &str, wanted: usize| {
        let mut found = BTreeMap::new();
        eventually(expr, Duration::from_secs(30), || {
            found = by_sandbox(prometheus.query_until_present(expr));
            if found.len() == wanted {
                Ok(())
            } else {
                Err(format!("{} of {wanted} sandboxes: {found:?}", found.len()))
            }
        });
        found
    };
    let complete = |expr: &str| of_sandboxes(expr, wanted);
    // The VM's memory on the host, for each sandbox, with the sandbox's and the pod's labels.
    let pss = complete(r#"hako_host_process_pss_bytes{job="hako",process="vmm"}"#);
    for (pod, (name, uid)) in pods {
        let (labels, bytes) = &pss[pod];
        assert!(*bytes > 16e6, "{labels:?} {bytes}");
        assert_eq!(labels["containerd_namespace"], "k8s.io", "{labels:?}");
        assert_eq!(labels["pod"], *name, "{labels:?}");
        assert_eq!(labels["namespace"], POD_NAMESPACE, "{labels:?}");
        assert_eq!(labels["pod_uid"], *uid, "{labels:?}");
    }
    let (labels, bytes) = &pss[CTR_ID];
    assert!(*bytes > 16e6, "{labels:?} {bytes}");
    assert_eq!(labels["containerd_namespace"], "default", "{labels:?}");
    assert!(
        !labels.contains_key("pod") && !labels.contains_key("pod_uid"),
        "a ctr container is no pod: {labels:?}"
    );
    complete(r#"hako_host_process_rss_bytes{process="vmm"} > 16e6"#);
    // The guest's own figures, and each container's, named as kubelet names them.
    complete("hako_guest_memory_available_bytes > 0");
    let apps = of_sandboxes(
        r#"hako_container_memory_usage_bytes{container="app"} > 0"#,
        pods.len(),
    );
    for (pod, (name, _)) in pods {
        assert_eq!(apps[pod].0["pod"], *name, "{apps:?}");
    }
    // A ctr container has no CRI name: its id stands in.
    let ctr = of_sandboxes(
        &format!(
            r#"hako_container_memory_usage_bytes{{container="{CTR_ID}",container_id="{CTR_ID}"}} > 0"#
        ),
        1,
    );
    assert!(ctr.contains_key(CTR_ID), "{ctr:?}");
    let burning = r#"rate(hako_container_cpu_usage_seconds_total{container="burn"}[10s]) > 0.2"#;
    let burned = prometheus.query_until_present(burning);
    assert_eq!(burned.len(), 1, "{burned:?}");
    assert_eq!(burned[0].0["pod"], "metrics-web-0", "{burned:?}");
    // Each sandbox's boot is in the start-phase histogram, buckets and all.
    complete(r#"hako_start_phase_seconds_count{phase="agent_ready"} >= 1"#);
    let buckets = prometheus.query(r#"hako_start_phase_seconds_bucket{phase="total",le="+Inf"}"#);
    assert_eq!(buckets.len(), wanted, "{buckets:?}");
    let up = complete("hako_sandbox_up == 1");
    assert_eq!(up.len(), wanted);
    // Prometheus' own view of the target: up, and no error.
    let target = prometheus.query(r#"up{job="hako"}"#);
    assert_eq!(target.len(), 1, "{}", prometheus.targets());
    assert_eq!(target[0].1, 1.0, "{}", prometheus.targets());
    assert!(
        prometheus.targets().contains(r#""lastError":"""#),
        "{}",
        prometheus.targets()
    );

    // promtool's lint takes the node's text and one sandbox's own.
    let (text, _) = monitor.scrape();
    let check = prometheus.check_metrics(&text);
    assert_eq!(
        (check.code, check.stdout.as_str(), check.stderr.as_str()),
        (0, "", ""),
        "{text}"
    );
    let one = sandbox_metrics("default", CTR_ID);
    assert!(one.contains("hako_host_process_pss_bytes"), "{one}");
    let check = prometheus.check_metrics(&one);
    assert_eq!(
        (check.code, check.stdout.as_str(), check.stderr.as_str()),
        (0, "", ""),
        "{one}"
    );
}

fn stalled_and_dead_shims(monitor: &HakoMonitor, pods: &BTreeMap<String, (String, String)>) {
    let up = |text: &str, id: &str, ns: &str| {
        sample(
            text,
            &format!(r#"hako_sandbox_up{{sandbox_id="{id}",containerd_namespace="{ns}"}}"#),
        )
    };
    let timeouts = |text: &str| {
        sample(
            text,
            r#"hako_monitor_sandbox_scrape_failures_total{reason="timeout"}"#,
        )
        .unwrap()
    };
    let (before, _) = monitor.scrape();
    assert_eq!(up(&before, CTR_ID, "default"), Some(1.0), "{before}");
    let shim = Pid::from_raw(shim_pid_for(CTR_ID).expect("the ctr container's shim") as i32);

    // A stopped shim: the kernel still queues the connection, nobody answers.
    kill(shim, Signal::SIGSTOP).unwrap();
    let (stalled, took) = monitor.scrape();
    kill(shim, Signal::SIGCONT).unwrap();
    assert!(took < TIMEOUT + Duration::from_millis(1500), "{took:?}");
    assert_eq!(up(&stalled, CTR_ID, "default"), Some(0.0), "{stalled}");
    assert!(timeouts(&stalled) > timeouts(&before), "{stalled}");
    for (pod, (name, _)) in pods {
        let vmm = stalled.lines().any(|l| {
            l.starts_with("hako_host_process_pss_bytes{")
                && l.contains(&format!(r#"sandbox_id="{pod}""#))
                && l.contains(&format!(r#"pod="{name}""#))
                && l.contains(r#"process="vmm""#)
        });
        assert!(vmm, "the other pods are complete: {stalled}");
    }
    let (resumed, _) = monitor.scrape();
    assert_eq!(up(&resumed, CTR_ID, "default"), Some(1.0), "{resumed}");

    // A dead shim: its socket is left until containerd deletes the task; no series at all.
    kill(shim, Signal::SIGKILL).unwrap();
    eventually(
        "the killed shim is gone",
        Duration::from_secs(10),
        || match shim_pid_for(CTR_ID) {
            None => Ok(()),
            Some(pid) => Err(format!("pid {pid}")),
        },
    );
    // containerd's clean-up of the dead shim removes the sandbox dir at a time of its own: the
    // series are gone either way, and while the socket is left the monitor still finds it.
    let (dead, _) = monitor.scrape();
    let socket_left = std::path::Path::new(SANDBOX_ROOT)
        .join("default")
        .join(CTR_ID)
        .join("metrics.sock")
        .exists();
    assert!(!dead.contains(CTR_ID), "{dead}");
    let found = sample(&dead, "hako_monitor_sandboxes").unwrap();
    let wanted = pods.len() + usize::from(socket_left);
    assert!(
        found >= wanted as f64,
        "{found} found, {wanted} wanted: {dead}"
    );
}
