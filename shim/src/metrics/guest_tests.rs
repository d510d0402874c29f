use super::*;
use crate::metrics::snapshot::Snapshot;
use crate::metrics::test_dir::TempDir;
use crate::metrics::{ShimMetrics, Source};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn value(samples: &[Sample], family: &str, labels: &[&str]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.family == family && s.labels == labels)
        .and_then(|s| match s.value {
            Value::Number(v) => Some(v),
            _ => None,
        })
}

#[test]
fn the_book_names_containers_and_leaves_the_pause_out() {
    let book = AppContainers::default();
    book.add(
        "pause1",
        Some(&annotations(&[(
            "io.kubernetes.cri.container-type",
            "sandbox",
        )])),
    );
    book.add(
        "c1",
        Some(&annotations(&[
            ("io.kubernetes.cri.container-type", "container"),
            (CONTAINER_NAME_ANNOTATION, "burn"),
        ])),
    );
    book.add("plain", None);
    book.add(
        "odd",
        Some(&annotations(&[(CONTAINER_NAME_ANNOTATION, "a name\n")])),
    );
    let names: Vec<(String, String)> = book
        .app_containers()
        .into_iter()
        .map(|c| (c.id, c.name))
        .collect();
    let pairs: Vec<(&str, &str)> = names
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [("c1", "burn"), ("odd", "odd"), ("plain", "plain")],
        "no CRI name (or a bad one) is the id"
    );
    book.remove("c1");
    assert_eq!(book.app_containers().len(), 2);
}

fn figures() -> GuestFigures {
    let mut c = [None; 18];
    c[0] = Some(2_500_000);
    c[6] = Some(10 << 20);
    c[11] = Some(2 << 20);
    c[15] = None;
    let mut nic = [Some(1); 8];
    nic[0] = Some(5000);
    GuestFigures {
        memory: [
            Some(512 << 20),
            Some(300 << 20),
            None,
            None,
            None,
            None,
            None,
            Some(0),
            Some(0),
        ],
        cpu: [
            Some(100),
            None,
            Some(50),
            Some(1000),
            None,
            None,
            None,
            None,
            Some(100),
            Some(2),
            Some(0),
        ],
        load: [Some(0.5), Some(0.25), None],
        interfaces: vec![("eth0".into(), nic)],
        disks: vec![(
            "vda".into(),
            [Some(1), Some(512), Some(2), Some(1024), Some(1500)],
        )],
        containers: vec![("c1".into(), c), ("gone".into(), [Some(1); 18])],
        truncated: false,
    }
}

#[test]
fn an_answer_becomes_valid_samples_of_the_guest_families() {
    let containers = [AppContainer {
        id: "c1".into(),
        name: "burn".into(),
    }];
    let samples = samples(&figures(), &containers);
    Snapshot::new(samples.clone()).validate().expect("valid");
    let v = |family: &str, labels: &[&str]| value(&samples, family, labels);
    assert_eq!(
        v("hako_guest_memory_available_bytes", &[]),
        Some((300u64 << 20) as f64)
    );
    assert_eq!(
        v("hako_guest_memory_free_bytes", &[]),
        None,
        "absent stays absent"
    );
    assert_eq!(v("hako_guest_cpu_seconds_total", &["user"]), Some(1.0));
    assert_eq!(v("hako_guest_cpu_seconds_total", &["idle"]), Some(10.0));
    assert_eq!(v("hako_guest_load5", &[]), Some(0.25));
    assert_eq!(
        v("hako_guest_network_receive_bytes_total", &["eth0"]),
        Some(5000.0)
    );
    assert_eq!(
        v("hako_guest_disk_io_time_seconds_total", &["vda"]),
        Some(1.5)
    );
    let c1 = ["c1", "burn"];
    assert_eq!(v("hako_container_cpu_usage_seconds_total", &c1), Some(2.5));
    assert_eq!(
        v("hako_container_memory_working_set_bytes", &c1),
        Some((8u64 << 20) as f64)
    );
    assert_eq!(v("hako_container_pids_limit", &c1), None);
    assert!(
        !samples
            .iter()
            .any(|s| s.labels.first().is_some_and(|l| l == "gone")),
        "an id the book does not hold has no series"
    );
    // A guest claiming a tick rate out of reason gets no CPU seconds.
    let mut odd = figures();
    odd.cpu[8] = Some(0);
    let samples = super::samples(&odd, &containers);
    assert_eq!(
        value(&samples, "hako_guest_cpu_seconds_total", &["user"]),
        None
    );
}

#[test]
fn the_overhead_is_host_pss_less_the_containers() {
    let pss = |process: &str, v: f64| Sample {
        family: "hako_host_process_pss_bytes".into(),
        labels: vec![process.into()],
        value: Value::Number(v),
    };
    let host = [pss("vmm", 100e6), pss("virtiofsd", 5e6)];
    let o = overhead(&host, &figures()).expect("both known");
    assert_eq!(o.value, Value::Number(105e6 - (10u64 << 20) as f64 - 1.0));
    assert!(overhead(&[], &figures()).is_none());
    let mut big = figures();
    big.containers[0].1[6] = Some(1 << 40);
    assert_eq!(
        overhead(&host, &big).expect("known").value,
        Value::Number(0.0)
    );
}

/// A guest behind a stand-in vsock backend at `socket` that answers each connection with
/// `reply` once it has the request.
fn serve_guest(socket: &std::path::Path, reply: Vec<u8>) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::UnixListener::bind(socket).expect("bind");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let reply = reply.clone();
            tokio::spawn(async move {
                let _ = crate::agent_client::read_line(&mut s, 64).await;
                s.write_all(b"OK 1028\n").await.expect("handshake");
                let mut header = [0u8; 4];
                s.read_exact(&mut header).await.expect("header");
                let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
                s.read_exact(&mut body).await.expect("body");
                let _ = s.write_all(&reply).await;
                let _ = s.read_to_end(&mut Vec::new()).await;
            });
        }
    })
}

#[tokio::test]
async fn a_snapshot_has_the_guest_when_it_answers_and_the_host_when_it_does_not() {
    use hako_protocol as pb;
    let dir = TempDir::new("guest-source");
    let socket = dir.path().join("agent.sock");
    let book = Arc::new(AppContainers::default());
    book.add("c1", None);
    let source = |metrics: Arc<ShimMetrics>| {
        Arc::new(Source::new(metrics, dir.path()).with_guest(GuestSource {
            agent_socket: socket.clone(),
            containers: book.clone(),
        }))
    };
    let answer = pb::GuestMetrics {
        memory: Some(pb::GuestMemory {
            available: Some(1 << 30),
            ..Default::default()
        })
        .into(),
        containers: vec![pb::ContainerMetrics {
            id: "c1".into(),
            cpu_usage_usec: Some(3_000_000),
            ..Default::default()
        }],
        ..Default::default()
    };
    let guest = serve_guest(&socket, pb::metrics::answer_frame(&answer).expect("frame"));
    let metrics = Arc::new(ShimMetrics::new());
    let snapshot = source(metrics.clone()).snapshot().await;
    snapshot.validate().expect("valid");
    let s = &snapshot.samples;
    assert_eq!(
        value(s, "hako_guest_memory_available_bytes", &[]),
        Some(1073741824.0)
    );
    assert_eq!(
        value(s, "hako_container_cpu_usage_seconds_total", &["c1", "c1"]),
        Some(3.0)
    );
    guest.abort();
    let _ = std::fs::remove_file(&socket);

    // A flooding guest: refused, counted, and the rest of the snapshot is there.
    let guest = serve_guest(&socket, (100u32 << 20).to_be_bytes().to_vec());
    metrics.observe_rpc("CreateContainer", Duration::from_millis(3), None);
    let snapshot = source(metrics.clone()).snapshot().await;
    snapshot.validate().expect("valid");
    let s = &snapshot.samples;
    assert_eq!(
        value(s, "hako_guest_metrics_rejected_total", &["oversize"]),
        Some(1.0)
    );
    assert_eq!(value(s, "hako_guest_memory_available_bytes", &[]), None);
    assert!(s
        .iter()
        .any(|x| x.family == "hako_agent_rpc_duration_seconds"));
    guest.abort();
}
