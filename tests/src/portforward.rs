//! The client end of CRI port forwarding, as `kubectl port-forward` reaches it through kubelet:
//! the streaming URL containerd's PortForward returns, spoken to over WebSocket with the
//! `v4.channel.k8s.io` protocol (each message is a channel number and bytes; channel 0 carries
//! the port's data, channel 1 its errors, and each starts with the port number).
//!
//! containerd's streaming server listens on the node's loopback, so the client runs in the
//! node's network namespace.

#![allow(clippy::unwrap_used)] // Test harness: a failed step should fail the test loudly.

use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::Message;

const DATA: u8 = 0;
const ERROR: u8 = 1;
/// How long the exchange may take, start to end.
const PATIENCE: Duration = Duration::from_secs(60);

/// What came back through a forwarded connection.
#[derive(Debug, Default)]
pub struct Forwarded {
    pub data: Vec<u8>,
    pub error: String,
}

/// Opens the streaming `url` for `port` from inside `node_netns`, sends `send` to the pod's port,
/// and collects what comes back until the pod closes the connection (or `until` is found in the
/// data, for servers that keep it open).
pub fn exchange(node_netns: &str, url: &str, port: u16, send: &[u8], until: &str) -> Forwarded {
    let netns = Path::new("/run/netns").join(node_netns);
    let url = format!("{url}?port={port}").replacen("http://", "ws://", 1);
    let send = send.to_vec();
    let until = until.to_string();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&netns).unwrap();
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        run(&url, port, &send, &until)
    })
    .join()
    .unwrap()
}

fn run(url: &str, port: u16, send: &[u8], until: &str) -> Forwarded {
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("v4.channel.k8s.io"),
    );
    let host = request.uri().authority().unwrap().to_string();
    let tcp = TcpStream::connect(&host).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (mut socket, response) = tungstenite::client(request, tcp)
        .unwrap_or_else(|e| panic!("WebSocket handshake with {url}: {e}"));
    assert_eq!(response.status(), 101, "{response:?}");

    let mut out = Forwarded::default();
    let mut announced = 0;
    let mut sent = false;
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < PATIENCE,
            "port {port}: no end after {PATIENCE:?}: {out:?}"
        );
        let message = match socket.read() {
            Ok(message) => message,
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => break,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => panic!("port {port}: {e}; so far {out:?}"),
        };
        let bytes = match message {
            Message::Binary(bytes) => bytes.to_vec(),
            Message::Close(_) => break,
            _ => continue,
        };
        let Some((&channel, payload)) = bytes.split_first() else {
            continue;
        };
        // Each channel's first message is the port number, little-endian.
        if announced < 2
            && payload.len() == 2
            && u16::from_le_bytes([payload[0], payload[1]]) == port
        {
            announced += 1;
            if announced == 2 && !sent {
                let mut frame = vec![DATA];
                frame.extend_from_slice(send);
                socket.send(Message::binary(frame)).unwrap();
                sent = true;
            }
            continue;
        }
        match channel {
            DATA => out.data.extend_from_slice(payload),
            ERROR => out.error.push_str(&String::from_utf8_lossy(payload)),
            _ => {}
        }
        if !until.is_empty() && String::from_utf8_lossy(&out.data).contains(until) {
            break;
        }
        if !out.error.is_empty() {
            break;
        }
    }
    let _ = socket.close(None);
    out
}
