use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UnixListener;

use super::*;
use crate::metrics::test_dir::TempDir;
use crate::metrics::{MetricsServer, ShimMetrics, Source};

/// A sandbox dir `<root>/<ns>/<id>` whose socket a real shim-side server answers.
fn live_sandbox(root: &std::path::Path, ns: &str, id: &str, pod: bool) -> MetricsServer {
    let dir = root.join(ns).join(id);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let metrics = Arc::new(ShimMetrics::new());
    metrics.observe_rpc("CreateSandbox", Duration::from_millis(30), None);
    if pod {
        let annotations = [
            ("io.kubernetes.cri.sandbox-name", "web-0"),
            ("io.kubernetes.cri.sandbox-namespace", "shop"),
            ("io.kubernetes.cri.sandbox-uid", "0123-abcd"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        metrics.note_pod(&annotations);
    }
    let source = Arc::new(Source::new(metrics, &dir));
    MetricsServer::bind(&dir.join("metrics.sock"), source).expect("bind")
}

fn lines_of<'a>(text: &'a str, family: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| l.starts_with(family) && !l.starts_with('#'))
        .collect()
}

#[tokio::test]
async fn a_node_scrape_labels_each_sandbox_and_bounds_a_stalled_one() {
    let root = TempDir::new("monitor");
    let r = root.path();
    let _pod = live_sandbox(r, "k8s.io", "podsandbox1", true);
    let _ctr = live_sandbox(r, "default", "ctr1", false);
    // A stalled shim: its socket accepts and never answers.
    std::fs::create_dir_all(r.join("default/stalled")).expect("mkdir");
    let _stalled = UnixListener::bind(r.join("default/stalled/metrics.sock")).expect("bind");
    // A dead shim: its socket is left, nobody listens.
    std::fs::create_dir_all(r.join("default/dead")).expect("mkdir");
    drop(UnixListener::bind(r.join("default/dead/metrics.sock")).expect("bind"));

    let monitor = Monitor::new(vec![r.to_path_buf()], Duration::from_millis(400), 1);
    let started = Instant::now();
    let text = monitor.scrape().await;
    // A stalled shim costs its one slot one deadline, and the sandboxes after it still answer.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    let up = lines_of(&text, "hako_sandbox_up");
    assert_eq!(
        up,
        vec![
            "hako_sandbox_up{sandbox_id=\"ctr1\",containerd_namespace=\"default\"} 1.0",
            "hako_sandbox_up{sandbox_id=\"stalled\",containerd_namespace=\"default\"} 0.0",
            "hako_sandbox_up{sandbox_id=\"podsandbox1\",containerd_namespace=\"k8s.io\",namespace=\"shop\",pod=\"web-0\",pod_uid=\"0123-abcd\"} 1.0",
        ],
        "{text}"
    );
    assert!(
        !text.contains("\"dead\""),
        "a dead sandbox has no series: {text}"
    );
    let rpc = lines_of(&text, "hako_agent_rpc_duration_seconds_count");
    assert_eq!(rpc.len(), 2, "{text}");
    assert!(rpc[1].contains("pod=\"web-0\"") && rpc[1].contains("method=\"CreateSandbox\""));
    assert!(text.contains("hako_monitor_sandboxes 4.0\n"), "{text}");
    assert!(
        text.contains("hako_monitor_sandbox_scrape_failures_total{reason=\"timeout\"} 1.0\n"),
        "{text}"
    );
    assert_eq!(text.matches("# TYPE hako_sandbox_up ").count(), 1);
    assert_eq!(
        text.matches("# TYPE hako_agent_rpc_duration_seconds ")
            .count(),
        1
    );

    // The failures add up across scrapes; the dead sandbox is never counted.
    let text = monitor.scrape().await;
    assert!(
        text.contains("hako_monitor_sandbox_scrape_failures_total{reason=\"timeout\"} 2.0\n"),
        "{text}"
    );
}

#[tokio::test]
async fn a_pod_keeps_its_labels_while_its_scrape_fails() {
    let root = TempDir::new("monitor-labels");
    let r = root.path();
    let server = live_sandbox(r, "k8s.io", "p1", true);
    let monitor = Monitor::new(vec![r.to_path_buf()], Duration::from_millis(300), 4);
    assert!(monitor
        .scrape()
        .await
        .contains("pod=\"web-0\",pod_uid=\"0123-abcd\"} 1.0\n"));
    // The shim stalls: same socket path, a listener that never answers.
    drop(server);
    let _stalled = UnixListener::bind(r.join("k8s.io/p1/metrics.sock")).expect("bind");
    let text = monitor.scrape().await;
    assert!(
        text.contains("hako_sandbox_up{sandbox_id=\"p1\",containerd_namespace=\"k8s.io\",namespace=\"shop\",pod=\"web-0\",pod_uid=\"0123-abcd\"} 0.0\n"),
        "{text}"
    );
}
