use super::*;
use hako_protocol as pb;
use proptest::prelude::*;
use protobuf::Message;

fn nic(name: &str, rx: u64) -> pb::GuestInterface {
    pb::GuestInterface {
        name: name.into(),
        rx_bytes: Some(rx),
        tx_drops: Some(4),
        ..Default::default()
    }
}

fn ctr(id: &str, usage: u64) -> pb::ContainerMetrics {
    pb::ContainerMetrics {
        id: id.into(),
        cpu_usage_usec: Some(usage),
        io_written_bytes: Some(19),
        ..Default::default()
    }
}

fn answer(m: &pb::GuestMetrics) -> Vec<u8> {
    m.write_to_bytes().expect("encodes")
}

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn an_honest_answer_decodes_field_by_field() {
    let m = pb::GuestMetrics {
        memory: Some(pb::GuestMemory {
            total: Some(512 << 20),
            available: Some(300 << 20),
            swap_free: Some(0),
            ..Default::default()
        })
        .into(),
        cpu: Some(pb::GuestCpu {
            user: Some(10),
            steal: Some(8),
            user_hz: Some(100),
            procs_blocked: Some(1),
            ..Default::default()
        })
        .into(),
        load: Some(pb::GuestLoad {
            load1: Some(0.5),
            load5: Some(f64::NAN),
            load15: Some(-1.0),
            ..Default::default()
        })
        .into(),
        interfaces: vec![nic("eth0", 5000)],
        disks: vec![pb::GuestDisk {
            name: "vda".into(),
            io_time_ms: Some(90),
            ..Default::default()
        }],
        containers: vec![ctr("c1", 2_500_000)],
        ..Default::default()
    };
    let g = decode(&answer(&m), &ids(&["c1"])).expect("decodes");
    assert_eq!(g.memory[0], Some(512 << 20));
    assert_eq!(g.memory[1], Some(300 << 20));
    assert_eq!(g.memory[8], Some(0), "a zero sent is a zero, not absent");
    assert_eq!(g.memory[2], None);
    assert_eq!(
        (g.cpu[0], g.cpu[7], g.cpu[8], g.cpu[10]),
        (Some(10), Some(8), Some(100), Some(1))
    );
    assert_eq!(
        g.load,
        [Some(0.5), None, None],
        "NaN and negative loads are dropped"
    );
    assert_eq!(g.interfaces.len(), 1);
    assert_eq!(g.interfaces[0].0, "eth0");
    assert_eq!(
        (g.interfaces[0].1[0], g.interfaces[0].1[7]),
        (Some(5000), Some(4))
    );
    assert_eq!(g.disks[0].1[4], Some(90));
    assert_eq!(g.containers.len(), 1);
    assert_eq!(g.containers[0].1[0], Some(2_500_000));
    assert_eq!(g.containers[0].1[17], Some(19));
    assert!(!g.truncated);
}

#[test]
fn containers_not_asked_for_or_twice_are_dropped() {
    let m = pb::GuestMetrics {
        containers: vec![
            ctr("mine", 1),
            ctr("other-pods", 2),
            ctr("mine", 3),
            ctr("x\"}\n", 4),
        ],
        ..Default::default()
    };
    let g = decode(&answer(&m), &ids(&["mine", "absent"])).expect("decodes");
    assert_eq!(
        g.containers,
        vec![("mine".to_string(), {
            let mut f = [None; 18];
            f[0] = Some(1);
            f[17] = Some(19);
            f
        })]
    );
}

#[test]
fn names_are_checked_and_lists_capped() {
    let mut interfaces = vec![
        nic("a b", 1),
        nic("evil\"}\n", 1),
        nic(&"n".repeat(MAX_NIC_NAME + 1), 1),
        nic("", 1),
        nic("eth0", 1),
        nic("eth0", 2),
    ];
    interfaces.extend((1..40).map(|n| nic(&format!("eth{n}"), n)));
    let m = pb::GuestMetrics {
        interfaces,
        ..Default::default()
    };
    let g = decode(&answer(&m), &[]).expect("decodes");
    assert_eq!(g.interfaces.len(), MAX_GUEST_NICS);
    assert_eq!(
        g.interfaces[0],
        ("eth0".to_string(), {
            let mut f = [None; 8];
            f[0] = Some(1);
            f[7] = Some(4);
            f
        })
    );
    assert!(
        g.truncated,
        "the entries past the cap are said to be left out"
    );
}

#[test]
fn garbage_is_refused_and_unknown_fields_skipped() {
    for bad in [
        &b"\x0a\x05\x08"[..],    // memory longer than the answer
        b"\x0a\x7f",             // the same, its length alone
        b"\x0d\x00\x00\x00\x00", // memory as a fixed32
        b"\x1a\x02\x08\x01",     // a load as a varint
        b"\x0a\x02\x09\x01",     // a memory figure as a fixed64
        b"\x22\x02\x08\x01",     // an interface's name as a varint
        b"\x22\x03\x0a\x7f\x00", // a name longer than its entry
        b"\x00",                 // field 0
        b"\x0f",                 // wire type 7
    ] {
        assert!(decode(bad, &[]).is_err(), "{bad:?}");
    }
    let mut bytes = answer(&pb::GuestMetrics {
        interfaces: vec![nic("eth0", 1)],
        ..Default::default()
    });
    bytes.extend_from_slice(b"\x48\x01\x22\x05\x0a\x01x\x78\x05");
    let g = decode(&bytes, &[]).expect("unknown fields are skipped");
    assert_eq!(g.interfaces.len(), 2);
    assert_eq!(g.interfaces[1].0, "x");
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_and_the_caps_hold(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let asked = ids(&["a", "b"]);
        if let Ok(g) = decode(&bytes, &asked) {
            prop_assert!(g.interfaces.len() <= MAX_GUEST_NICS);
            prop_assert!(g.disks.len() <= MAX_GUEST_DISKS);
            prop_assert!(g.containers.len() <= asked.len());
            prop_assert!(g.containers.iter().all(|(id, _)| asked.contains(id)));
            prop_assert!(g.load.iter().flatten().all(|v| bounded(*v)));
        }
    }

    #[test]
    fn whatever_the_guest_claims_the_checks_hold(
        names in proptest::collection::vec("[ -~]{0,20}", 0..40),
        loads in proptest::collection::vec(any::<f64>(), 3),
        ctrs in proptest::collection::vec("[a-d]{1,2}", 0..40),
    ) {
        let m = pb::GuestMetrics {
            interfaces: names.iter().map(|n| nic(n, 1)).collect(),
            disks: names.iter().map(|n| pb::GuestDisk { name: n.clone(), ..Default::default() }).collect(),
            load: Some(pb::GuestLoad {
                load1: Some(loads[0]),
                load5: Some(loads[1]),
                load15: Some(loads[2]),
                ..Default::default()
            }).into(),
            containers: ctrs.iter().map(|id| ctr(id, 1)).collect(),
            ..Default::default()
        };
        let asked = ids(&["a", "b", "cc"]);
        let g = decode(&answer(&m), &asked).expect("an encoded message decodes");
        let valid = |n: &String| crate::metrics::snapshot::valid_label_value(n);
        prop_assert!(g.interfaces.len() <= MAX_GUEST_NICS);
        prop_assert!(g.interfaces.iter().all(|(n, _)| valid(n) && n.len() <= MAX_NIC_NAME));
        prop_assert!(g.disks.iter().all(|(n, _)| valid(n) && n.len() <= MAX_DISK_NAME));
        prop_assert!(g.load.iter().flatten().all(|v| v.is_finite() && *v >= 0.0 && *v < 1e6));
        let kept: BTreeSet<&String> = g.containers.iter().map(|(id, _)| id).collect();
        prop_assert_eq!(kept.len(), g.containers.len(), "no id twice");
        prop_assert!(kept.iter().all(|id| asked.contains(id)));
    }
}

/// A stand-in for the vsock backend and the guest: answers the handshake, reads the request,
/// then writes `reply` (a flood's header goes on with bytes) until the host closes.
async fn fake_guest(
    name: &str,
    reply: Vec<u8>,
) -> (std::path::PathBuf, tokio::task::JoinHandle<usize>) {
    let path = std::env::temp_dir().join(format!("hako-gm-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    let file = path.clone();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let _ = std::fs::remove_file(&file);
        let line = super::super::read_line(&mut s, 64).await.expect("CONNECT");
        assert_eq!(line, b"CONNECT 1028");
        s.write_all(b"OK 1028\n").await.expect("handshake");
        let mut header = [0u8; 4];
        s.read_exact(&mut header).await.expect("request header");
        let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
        s.read_exact(&mut body).await.expect("request body");
        let _ = s.write_all(&reply).await;
        // Keep writing what a flood would, counting what the host took.
        let mut sent = reply.len();
        let chunk = vec![0u8; 64 * 1024];
        while reply.starts_with(&(100u32 << 20).to_be_bytes()) {
            match s.write(&chunk).await {
                Ok(n) if n > 0 => sent += n,
                _ => break,
            }
        }
        // Then wait for the host to close.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        sent
    });
    (path, task)
}

#[tokio::test]
async fn fetch_refuses_a_flood_unread_and_garbage_and_silence() {
    let deadline = Duration::from_millis(500);
    let asked = ids(&["c1"]);

    let good = pb::GuestMetrics {
        containers: vec![ctr("c1", 7)],
        ..Default::default()
    };
    let frame = pb::metrics::answer_frame(&good).expect("frame");
    let (path, guest) = fake_guest("good", frame).await;
    let g = fetch(&path, &asked, deadline)
        .await
        .expect("an honest answer");
    assert_eq!(g.containers[0].1[0], Some(7));
    guest.await.expect("guest");

    let (path, guest) = fake_guest("flood", (100u32 << 20).to_be_bytes().to_vec()).await;
    assert_eq!(
        fetch(&path, &asked, deadline).await,
        Err(Rejection::Oversize)
    );
    let sent = guest.await.expect("guest");
    assert!(sent < 8 << 20, "the flood ran on: {sent} bytes went out");

    let mut garbage = 1000u32.to_be_bytes().to_vec();
    garbage.extend((0..1000u32).map(|n| (n * 7919 % 251) as u8));
    garbage[4] = 0;
    let (path, guest) = fake_guest("garbage", garbage).await;
    assert_eq!(
        fetch(&path, &asked, deadline).await,
        Err(Rejection::Malformed)
    );
    guest.await.expect("guest");

    let short = [&1000u32.to_be_bytes()[..], b"abc"].concat();
    let (path, guest) = fake_guest("short", short).await;
    let started = std::time::Instant::now();
    // A body that never comes while the connection stays open: the deadline ends it.
    assert_eq!(
        fetch(&path, &asked, deadline).await,
        Err(Rejection::Timeout)
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    guest.await.expect("guest");

    let (path, guest) = fake_guest("silent", Vec::new()).await;
    let started = std::time::Instant::now();
    assert_eq!(
        fetch(&path, &asked, deadline).await,
        Err(Rejection::Timeout)
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    guest.await.expect("guest");

    let nobody = std::env::temp_dir().join(format!("hako-gm-none-{}.sock", std::process::id()));
    assert_eq!(
        fetch(&nobody, &asked, deadline).await,
        Err(Rejection::Refused)
    );
}
