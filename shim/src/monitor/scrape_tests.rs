use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;

use super::*;
use crate::metrics::test_dir::TempDir;
use crate::metrics::{ShimMetrics, Source};

fn reply(status: &str, length: Option<usize>, body: &[u8]) -> Vec<u8> {
    let mut r = format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\n");
    if let Some(n) = length {
        r.push_str(&format!("Content-Length: {n}\r\n"));
    }
    r.push_str("\r\n");
    let mut r = r.into_bytes();
    r.extend_from_slice(body);
    r
}

#[test]
fn replies_are_taken_only_whole_and_well_formed() {
    let good = br#"{"version":1,"samples":[{"family":"hako_host_process_rss_bytes","labels":["vmm"],"value":{"number":5.0}}]}"#;
    let Outcome::Up(snapshot) = parse_reply(&reply("200 OK", Some(good.len()), good)) else {
        panic!("a good reply is up");
    };
    assert_eq!(snapshot.samples.len(), 1);
    let cases: [(Vec<u8>, Failure); 7] = [
        (
            reply("404 Not Found", Some(good.len()), good),
            Failure::Http,
        ),
        (reply("200 OK", None, good), Failure::Http),
        (reply("200 OK", Some(good.len() + 1), good), Failure::Http),
        (
            reply("200 OK", Some(3), b"{\"v")[..20].to_vec(),
            Failure::Http,
        ),
        (b"garbage".to_vec(), Failure::Http),
        (reply("200 OK", Some(4), b"null"), Failure::Malformed),
        (vec![b'x'; MAX_REPLY + 1], Failure::Oversize),
    ];
    for (bytes, want) in cases {
        assert_eq!(
            parse_reply(&bytes),
            Outcome::Failed(want),
            "{:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(80)])
        );
    }
    // A shim cannot forge the monitor's own families.
    let forged = br#"{"version":1,"samples":[{"family":"hako_sandbox_up","labels":[],"value":{"number":1.0}}]}"#;
    assert_eq!(
        parse_reply(&reply("200 OK", Some(forged.len()), forged)),
        Outcome::Failed(Failure::Malformed)
    );
    let big = vec![b' '; MAX_SNAPSHOT_BYTES + 1];
    assert_eq!(
        parse_reply(&reply("200 OK", Some(big.len()), &big)),
        Outcome::Failed(Failure::Oversize)
    );
}

#[tokio::test]
async fn a_live_shim_is_up_a_silent_one_times_out_and_a_dead_one_is_gone() {
    let dir = TempDir::new("scrape");
    let live = dir.path().join("live.sock");
    let source = Arc::new(Source::new(Arc::new(ShimMetrics::new()), dir.path()));
    let _server = crate::metrics::MetricsServer::bind(&live, source).expect("bind");
    assert!(matches!(
        fetch(&live, Duration::from_secs(5)).await,
        Outcome::Up(_)
    ));

    // A SIGSTOPped shim: the kernel accepts into the backlog and nobody answers.
    let silent = dir.path().join("silent.sock");
    let _listener = UnixListener::bind(&silent).expect("bind");
    let started = Instant::now();
    assert_eq!(
        fetch(&silent, Duration::from_millis(300)).await,
        Outcome::Failed(Failure::Timeout)
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    let dead = dir.path().join("dead.sock");
    drop(UnixListener::bind(&dead).expect("bind"));
    assert_eq!(fetch(&dead, Duration::from_secs(1)).await, Outcome::Gone);
    let missing = dir.path().join("missing.sock");
    assert_eq!(fetch(&missing, Duration::from_secs(1)).await, Outcome::Gone);
}

#[tokio::test]
async fn an_endless_reply_is_cut_at_the_cap() {
    let dir = TempDir::new("flood");
    let path = dir.path().join("flood.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let writer = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let chunk = vec![b'x'; 64 * 1024];
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
        // Until the reader hangs up: far more than the cap.
        while stream.write_all(&chunk).await.is_ok() {}
    });
    assert_eq!(
        fetch(&path, Duration::from_secs(10)).await,
        Outcome::Failed(Failure::Oversize)
    );
    writer.await.expect("writer ends once the reader hangs up");
}
