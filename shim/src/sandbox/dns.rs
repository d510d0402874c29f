//! Docker's embedded DNS server for the pod's containers (ADR 12). On a user-defined network
//! Docker writes `nameserver 127.0.0.11` into the container's resolv.conf and answers there in
//! the pod's network namespace on the host, out of the guest's reach. When a container whose
//! resolv.conf says so starts, the shim connects to the agent's DNS relay (vsock port
//! `DNS_VSOCK_PORT`), which then answers on 127.0.0.11:53 in the guest and sends each query
//! here; the shim asks Docker's server from a socket in the pod's namespace and sends the
//! answer back. The shim only ever talks to that one address there, at a bounded rate.

use std::io::Read;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hako_protocol::dns::{header, parse_header, Transport, HEADER, RESOLVER, RESOLVER_PORT};
use hako_protocol::forward::{parse_answer, MAX_ANSWER};
use nix::sys::socket::{bind, SockType, SockaddrIn};
use oci_spec::runtime::Spec;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, UdpSocket};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::agent_client::{connect, read_line};
use crate::metrics::{families, ShimMetrics};
use crate::net::namespace::socket_in;
use crate::rate_limit::RateLimit;

/// The most of a resolv.conf the shim reads (Docker's are a few hundred bytes).
const MAX_RESOLV_CONF: u64 = 64 * 1024;
/// Queries the guest may send per second; more wait.
const QUERIES_PER_SECOND: u32 = 200;
/// TCP queries asked at once.
const MAX_TCP_QUERIES: usize = 16;
/// How long Docker's server may take over a TCP query.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent may take to listen.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The relay of one sandbox; it stops with the sandbox.
pub struct DnsRelay {
    task: JoinHandle<()>,
}

impl DnsRelay {
    /// Asks the agent to listen on 127.0.0.11:53 and relays what it sends to Docker's server in
    /// `netns`. Returns once the agent listens, so a process started after it can resolve.
    pub async fn start(
        netns: &Path,
        agent_socket: &Path,
        metrics: Arc<ShimMetrics>,
    ) -> Result<Self, String> {
        let udp = socket_in_pod(netns, SockType::Datagram).await?;
        bind(udp.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0))
            .map_err(|e| format!("binding a socket on the pod's loopback: {e}"))?;
        let udp = UdpSocket::from_std(std::net::UdpSocket::from(udp)).map_err(|e| e.to_string())?;
        let mut guest = connect(agent_socket, hako_protocol::DNS_VSOCK_PORT).await?;
        let line = tokio::time::timeout(ANSWER_TIMEOUT, read_line(&mut guest, MAX_ANSWER))
            .await
            .map_err(|_| format!("no answer from the agent in {ANSWER_TIMEOUT:?}"))??;
        // The reason comes from the guest: quoted, never interpreted.
        parse_answer(&line).map_err(|reason| format!("the agent: {reason:?}"))?;
        let netns = netns.to_path_buf();
        let server = SocketAddr::from((RESOLVER, RESOLVER_PORT));
        let task = tokio::spawn(async move {
            if let Err(e) = relay(guest, udp, &netns, server, &metrics).await {
                log::warn!("dns relay: {e}");
            }
        });
        Ok(Self { task })
    }
}

/// Dropped with the sandbox, the relay stops.
impl Drop for DnsRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The host file that `spec` binds at /etc/resolv.conf, if any.
pub fn resolv_conf_source(spec: &Spec) -> Option<PathBuf> {
    spec.mounts()
        .as_deref()?
        .iter()
        .rev()
        .find(|m| m.destination() == Path::new("/etc/resolv.conf"))
        .and_then(|m| m.source().clone())
}

/// Whether the resolv.conf `source` (an `O_PATH` descriptor from `resolve::open_source`, which
/// walks the path as bind sources are walked, never through a link the guest planted) names
/// Docker's embedded server. Only a regular file is opened, and only its first
/// `MAX_RESOLV_CONF` bytes are read.
pub fn names_docker_server(source: &OwnedFd) -> bool {
    let is_file =
        nix::sys::stat::fstat(source).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG);
    if !is_file {
        return false;
    }
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/proc/self/fd/{}", source.as_raw_fd()));
    let Ok(file) = opened else {
        return false;
    };
    let mut text = Vec::new();
    if file.take(MAX_RESOLV_CONF).read_to_end(&mut text).is_err() {
        return false;
    }
    let wanted = RESOLVER.to_string();
    String::from_utf8_lossy(&text).lines().any(|line| {
        let mut words = line.split_whitespace();
        words.next() == Some("nameserver") && words.next() == Some(wanted.as_str())
    })
}

/// Carries queries from the guest to Docker's server and its answers back, until the guest's
/// connection ends or sends something that is not a frame.
/// `server` is Docker's (a stand-in in tests), reached from sockets in `netns`.
async fn relay(
    guest: impl AsyncRead + AsyncWrite + Send + 'static,
    udp: UdpSocket,
    netns: &Path,
    server: SocketAddr,
    metrics: &Arc<ShimMetrics>,
) -> Result<(), String> {
    let count = |result| metrics.count(&families::DNS_RELAY_QUERIES_TOTAL, &[result]);
    let (mut from_guest, mut to_guest) = tokio::io::split(guest);
    let (answers, mut answered) = mpsc::channel::<Vec<u8>>(64);
    // The relay's own tasks: dropped with it (the sandbox stops it by aborting), they end too.
    let mut tasks = JoinSet::new();
    tasks.spawn(async move {
        while let Some(frame) = answered.recv().await {
            if to_guest.write_all(&frame).await.is_err() {
                return;
            }
        }
    });
    let udp = Arc::new(udp);
    {
        let (udp, answers, metrics) = (udp.clone(), answers.clone(), metrics.clone());
        tasks.spawn(async move {
            let mut buf = vec![0u8; usize::from(u16::MAX)];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                if from != server {
                    continue;
                }
                if let Some(frame) = frame(Transport::Udp, &buf[..n]) {
                    // A guest that does not read its answers loses them, as over UDP.
                    if answers.try_send(frame).is_err() {
                        metrics.count(&families::DNS_RELAY_QUERIES_TOTAL, &["dropped"]);
                    }
                }
            }
        });
    }
    let tcp_slots = Arc::new(Semaphore::new(MAX_TCP_QUERIES));
    let mut bucket = RateLimit::new(QUERIES_PER_SECOND);
    let mut message = vec![0u8; usize::from(u16::MAX)];
    let result = loop {
        let mut head = [0u8; HEADER];
        if let Err(e) = from_guest.read_exact(&mut head).await {
            break Err(format!("the guest's connection: {e}"));
        }
        let (transport, len) = match parse_header(head) {
            Ok(frame) => frame,
            Err(e) => {
                count("malformed");
                break Err(format!("the guest sent a bad frame ({e:?}); relay ended"));
            }
        };
        if let Err(e) = from_guest.read_exact(&mut message[..len]).await {
            break Err(format!("the guest's connection: {e}"));
        }
        if bucket.take().await {
            metrics.count(&families::DNS_RELAY_THROTTLED_TOTAL, &[]);
        }
        // Forget the TCP queries that have ended.
        while tasks.try_join_next().is_some() {}
        let query = &message[..len];
        match transport {
            Transport::Udp => match udp.send_to(query, server).await {
                Ok(_) => count("relayed"),
                Err(e) => {
                    count("dropped");
                    log::debug!("dns relay: asking {server}: {e}");
                }
            },
            Transport::Tcp => {
                let Ok(slot) = tcp_slots.clone().try_acquire_owned() else {
                    count("dropped");
                    continue;
                };
                count("relayed");
                let (query, answers, netns) =
                    (query.to_vec(), answers.clone(), netns.to_path_buf());
                tasks.spawn(async move {
                    match tokio::time::timeout(TCP_TIMEOUT, ask_over_tcp(&netns, server, &query))
                        .await
                    {
                        Ok(Ok(answer)) => {
                            if let Some(frame) = frame(Transport::Tcp, &answer) {
                                let _ = answers.send(frame).await;
                            }
                        }
                        Ok(Err(e)) => log::debug!("dns relay: asking {server} over tcp: {e}"),
                        Err(_) => log::debug!("dns relay: {server} did not answer over tcp"),
                    }
                    drop(slot);
                });
            }
        }
    };
    tasks.abort_all();
    result
}

fn frame(transport: Transport, message: &[u8]) -> Option<Vec<u8>> {
    let head = header(transport, message).ok()?;
    let mut frame = Vec::with_capacity(HEADER + message.len());
    frame.extend_from_slice(&head);
    frame.extend_from_slice(message);
    Some(frame)
}

/// A socket of the pod's namespace, made off the async runtime (a thread enters the namespace).
async fn socket_in_pod(netns: &Path, kind: SockType) -> Result<std::os::fd::OwnedFd, String> {
    let netns = netns.to_path_buf();
    tokio::task::spawn_blocking(move || socket_in(&netns, kind))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// One query over TCP from the pod's namespace: length-prefixed each way.
async fn ask_over_tcp(netns: &Path, server: SocketAddr, query: &[u8]) -> Result<Vec<u8>, String> {
    let fd = socket_in_pod(netns, SockType::Stream).await?;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    let mut stream = socket.connect(server).await.map_err(|e| e.to_string())?;
    let len = u16::try_from(query.len()).map_err(|_| "query too long".to_string())?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(query);
    stream.write_all(&out).await.map_err(|e| e.to_string())?;
    let len = stream.read_u16().await.map_err(|e| e.to_string())?;
    let mut answer = vec![0u8; usize::from(len)];
    stream
        .read_exact(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("hako-dns-{name}-{}", std::process::id()));
        std::fs::write(&path, text).expect("test step");
        path
    }

    #[test]
    fn only_a_nameserver_line_for_dockers_server_counts() {
        use crate::sandbox::resolve::{identity, open_source};
        let asks = |path: &Path, guest_writable: &[_]| {
            open_source(path, guest_writable).is_ok_and(|source| names_docker_server(&source))
        };
        let docker = temp(
            "docker",
            "# Generated by Docker Engine.\nnameserver 127.0.0.11\noptions ndots:0\n",
        );
        assert!(asks(&docker, &[]));
        let host = temp("host", "nameserver 10.0.0.53\nsearch example\n");
        assert!(!asks(&host, &[]));
        let comment = temp(
            "comment",
            "# nameserver 127.0.0.11\nnameserver 127.0.0.111\n",
        );
        assert!(!asks(&comment, &[]));
        assert!(!asks(&std::env::temp_dir(), &[]), "a directory is not read");
        assert!(!asks(Path::new("/nonexistent/resolv.conf"), &[]));
        // A link the guest could have planted (in a directory it can write) is not followed.
        let volume = std::env::temp_dir().join(format!("hako-dns-vol-{}", std::process::id()));
        std::fs::create_dir_all(&volume).expect("test step");
        let link = volume.join("resolv.conf");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&docker, &link).expect("test step");
        let dir = std::fs::File::open(&volume).expect("test step");
        let writable = [identity(&dir).expect("test step")];
        assert!(!asks(&link, &writable), "a planted symlink is not followed");
        for p in [docker, host, comment] {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_dir_all(&volume);
    }

    #[test]
    fn the_resolv_conf_is_the_bind_at_etc_resolv_conf() {
        let spec: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"mounts":[
                {"destination":"/etc/resolv.conf","type":"bind","source":"/var/lib/docker/containers/x/resolv.conf","options":["rbind"]},
                {"destination":"/etc/hosts","type":"bind","source":"/h","options":["rbind"]}]}"#,
        )
        .expect("test step");
        assert_eq!(
            resolv_conf_source(&spec),
            Some(PathBuf::from("/var/lib/docker/containers/x/resolv.conf"))
        );
    }

    /// A stand-in for Docker's server on loopback, UDP and TCP, that answers each query with
    /// the query itself, its first flag byte set.
    async fn stand_in_server() -> SocketAddr {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("test step");
        let address = udp.local_addr().expect("test step");
        let tcp = tokio::net::TcpListener::bind(address)
            .await
            .expect("test step");
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                buf[2] |= 0x80;
                udp.send_to(&buf[..n], from).await.expect("test step");
            }
        });
        tokio::spawn(async move {
            while let Ok((mut client, _)) = tcp.accept().await {
                let len = client.read_u16().await.expect("test step");
                let mut query = vec![0u8; usize::from(len)];
                client.read_exact(&mut query).await.expect("test step");
                query[2] |= 0x80;
                client.write_u16(len).await.expect("test step");
                client.write_all(&query).await.expect("test step");
            }
        });
        address
    }

    fn query(id: u16) -> Vec<u8> {
        let mut query = id.to_be_bytes().to_vec();
        query.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 2, b'n', b'2', 0, 0, 1, 0, 1]);
        query
    }

    /// The relay between a stand-in guest and a stand-in server: answers come back in frames
    /// of the transport they were asked on; a frame that is not one ends the relay.
    #[tokio::test]
    async fn queries_reach_the_server_and_answers_come_back() {
        if !nix::unistd::Uid::effective().is_root() {
            panic!("this test enters a network namespace (its own): run it as root");
        }
        let server = stand_in_server().await;
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("test step");
        let (guest, host) = tokio::io::duplex(1 << 16);
        let metrics = Arc::new(ShimMetrics::new());
        let counted = metrics.clone();
        let relay = tokio::spawn(async move {
            relay(host, udp, Path::new("/proc/self/ns/net"), server, &counted).await
        });
        let (mut guest_read, mut guest_write) = tokio::io::split(guest);
        for (transport, id) in [(Transport::Udp, 0x0101), (Transport::Tcp, 0x0202)] {
            guest_write
                .write_all(&frame(transport, &query(id)).expect("test step"))
                .await
                .expect("test step");
            let mut head = [0u8; HEADER];
            guest_read.read_exact(&mut head).await.expect("test step");
            let (got, len) = parse_header(head).expect("test step");
            let mut answer = vec![0u8; len];
            guest_read.read_exact(&mut answer).await.expect("test step");
            assert_eq!(got, transport);
            let mut expected = query(id);
            expected[2] |= 0x80;
            assert_eq!(answer, expected, "{transport:?}");
        }
        guest_write.write_all(&[9, 0, 12]).await.expect("test step");
        let ended = relay.await.expect("test step").expect_err("test step");
        assert!(ended.contains("bad frame"), "{ended}");
        let counted: Vec<(Vec<String>, f64)> = metrics
            .samples()
            .into_iter()
            .filter(|s| s.family == families::DNS_RELAY_QUERIES_TOTAL.name)
            .filter_map(|s| match s.value {
                crate::metrics::snapshot::Value::Number(n) => Some((s.labels, n)),
                _ => None,
            })
            .collect();
        assert_eq!(
            counted,
            vec![
                (vec!["malformed".to_string()], 1.0),
                (vec!["relayed".to_string()], 2.0)
            ]
        );
    }
}
