use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;

use tokio::io::AsyncWriteExt;

use super::*;
use crate::metrics::test_dir::TempDir;
use crate::timing::Timings;

const CLIENT_ENV: &str = "HAKO_METRICS_TEST_CLIENT";

#[test]
fn request_lines_are_routed_or_refused() {
    let ok = |s: &str| parse_head(s.as_bytes());
    assert_eq!(
        ok("GET /v1/snapshot HTTP/1.1\r\nHost: x"),
        Ok(Route::Snapshot)
    );
    assert_eq!(ok("GET /metrics?x=1 HTTP/1.0"), Ok(Route::Metrics));
    assert_eq!(ok("POST /metrics HTTP/1.1"), Err(RequestError::Method));
    assert_eq!(ok("GET /etc/passwd HTTP/1.1"), Err(RequestError::NotFound));
    for bad in [
        "",
        "GET",
        "GET /metrics",
        "GET /metrics HTTP/2",
        "GET  /metrics HTTP/1.1",
        "GET /metrics HTTP/1.1 extra",
    ] {
        assert_eq!(ok(bad), Err(RequestError::Malformed), "{bad:?}");
    }
    assert_eq!(
        parse_head(b"GET /\xff HTTP/1.1"),
        Err(RequestError::Malformed)
    );
}

#[tokio::test]
async fn the_head_reader_is_capped() {
    let head = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nbody".to_vec();
    let got = read_head(&mut &head[..]).await.expect("head");
    assert_eq!(got, b"GET /metrics HTTP/1.1\r\nHost: x");
    let endless = vec![b'a'; 64 * 1024];
    assert_eq!(
        read_head(&mut &endless[..]).await,
        Err(RequestError::TooLarge)
    );
    let no_end = b"GET /metrics HTTP/1.1\r\n".to_vec();
    assert_eq!(
        read_head(&mut &no_end[..]).await,
        Err(RequestError::Truncated)
    );
    // The end split across one-byte reads is still found.
    let (mut client, mut server) = tokio::io::duplex(1);
    let writer = tokio::spawn(async move {
        client
            .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        client
    });
    let got = read_head(&mut server).await.expect("head");
    assert_eq!(got, b"GET /metrics HTTP/1.1");
    drop(writer.await);
}

fn served(dir: &TempDir) -> (MetricsServer, PathBuf) {
    let metrics = Arc::new(ShimMetrics::new());
    let mut t = Timings::new();
    t.mark("sandbox_prepare");
    metrics.observe_start(&t);
    let socket = dir.path().join("metrics.sock");
    let source = Arc::new(Source::new(metrics, dir.path()));
    let server = MetricsServer::bind(&socket, source).expect("bind");
    (server, socket)
}

async fn ask(socket: &Path, request: &[u8]) -> (String, Vec<u8>) {
    let mut stream = UnixStream::connect(socket).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply))
        .await
        .expect("an answer in time")
        .expect("read");
    let end = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(reply.len());
    let head = String::from_utf8_lossy(&reply[..end]).into_owned();
    let body = reply.get(end + 4..).unwrap_or_default().to_vec();
    (head, body)
}

#[tokio::test]
async fn snapshot_and_metrics_round_trip_on_the_socket() {
    let dir = TempDir::new("server");
    let (server, socket) = served(&dir);
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let (head, body) = ask(&socket, b"GET /v1/snapshot HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains(&format!("Content-Length: {}", body.len())),
        "{head}"
    );
    let snapshot = Snapshot::parse(&body).expect("a valid snapshot");
    let has = |family: &str, label: &str| {
        snapshot
            .samples
            .iter()
            .any(|s| s.family == family && s.labels == [label])
    };
    assert!(has("hako_start_phase_seconds", "sandbox_prepare"));
    assert!(has("hako_host_process_rss_bytes", "shim"));

    let (head, body) = ask(&socket, b"GET /metrics HTTP/1.1\r\n\r\n").await;
    assert!(head.contains(text::CONTENT_TYPE), "{head}");
    let body = String::from_utf8(body).expect("utf-8");
    assert!(
        body.contains("# TYPE hako_start_phase_seconds histogram\n"),
        "{body}"
    );
    assert!(
        body.contains("hako_host_process_cpu_seconds_total{process=\"shim\"}"),
        "{body}"
    );

    let (head, _) = ask(&socket, b"DELETE /metrics HTTP/1.1\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    let (head, _) = ask(&socket, b"GET /nope HTTP/1.1\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    // One byte over the cap: the server reads it all, so it closes with nothing unread
    // (a longer head gets the same answer, but the kernel may deliver a reset before it).
    let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    big.resize(MAX_REQUEST_HEAD + 1, b'a');
    let (head, _) = ask(&socket, &big).await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");

    drop(server);
    assert!(!socket.exists(), "the socket goes with the server");
}

#[tokio::test]
async fn a_slow_client_is_cut_at_the_deadline() {
    let dir = TempDir::new("slow");
    let (_server, socket) = served(&dir);
    let mut stream = UnixStream::connect(&socket).await.expect("connect");
    stream.write_all(b"GET /metr").await.expect("write");
    let started = Instant::now();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply))
        .await
        .expect("closed by the server")
        .expect("read");
    assert!(reply.is_empty(), "no answer to half a request");
    let waited = started.elapsed();
    assert!(
        waited >= READ_DEADLINE - Duration::from_millis(50) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // The server still answers the next one.
    let (head, _) = ask(&socket, b"GET /metrics HTTP/1.1\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

/// Run by `a_non_root_peer_is_refused` in a child as nobody; a no-op otherwise.
#[test]
fn non_root_client() {
    let Some(socket) = std::env::var_os(CLIENT_ENV) else {
        return;
    };
    use std::io::{Read, Write};
    assert!(!nix::unistd::geteuid().is_root());
    let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    // The server may already have closed: a failed write is a refusal too.
    let _ = stream.write_all(b"GET /v1/snapshot HTTP/1.1\r\n\r\n");
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    assert!(reply.is_empty(), "answered a non-root peer");
}

#[tokio::test]
async fn a_non_root_peer_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run a client as another user");
        return;
    }
    let dir = TempDir::new("peer");
    let (_server, socket) = served(&dir);
    // Loosen the mode so the kernel lets nobody connect: the peer check must refuse it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("dir");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("sock");
    let exe = std::env::current_exe().expect("test binary");
    let mut child = std::process::Command::new(exe);
    child
        .args(["--exact", "metrics::server::tests::non_root_client"])
        .args(["--test-threads=1", "--nocapture"])
        .env(CLIENT_ENV, &socket)
        .uid(65534)
        .gid(65534);
    let out = tokio::task::spawn_blocking(move || child.output())
        .await
        .expect("join")
        .expect("run the test binary as nobody");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
