//! Docker's embedded DNS server for the pod (ADR 12). A container on a user-defined Docker
//! network asks 127.0.0.11:53, which only answers in the pod's network namespace on the host.
//! Once the host's relay (shim `sandbox::dns`) connects to vsock port `DNS_VSOCK_PORT`, the
//! agent listens on 127.0.0.11:53 (UDP and TCP) in the guest, which is the pod's network
//! namespace, and carries each query to the host in a frame (`hako_protocol::dns`) with an id
//! of its own, and each answer back to whoever asked, with the id they chose.
//!
//! Blocking threads: one for UDP, one accepting TCP and one per TCP client (at most
//! `MAX_TCP_CLIENTS`), one reading the host's answers. Queries in flight are bounded
//! (`MAX_PENDING`) and forgotten after `PENDING_FOR`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use hako_protocol::dns::{
    header, message_id, parse_header, set_message_id, Transport, HEADER, MIN_MESSAGE, RESOLVER,
    RESOLVER_PORT,
};
use nix::sys::socket::accept;

/// Queries waiting for an answer; more are dropped, as a busy server would.
const MAX_PENDING: usize = 256;
/// How long a query waits for its answer (clients retry long before).
const PENDING_FOR: Duration = Duration::from_secs(10);
/// TCP clients served at once; more are closed at once.
const MAX_TCP_CLIENTS: usize = 16;
/// The pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Who asked, to send the answer back to.
enum Client {
    Udp(SocketAddr),
    Tcp(mpsc::SyncSender<Vec<u8>>),
}

struct Query {
    client: Client,
    /// The id the client chose.
    id: u16,
    at: Instant,
}

/// Queries in flight, by the id the agent gave them.
#[derive(Default)]
struct Pending {
    queries: HashMap<u16, Query>,
    next: u16,
}

impl Pending {
    /// The id the query travels under; `None` when too many are in flight.
    fn insert(&mut self, query: Query) -> Option<u16> {
        let now = query.at;
        self.queries
            .retain(|_, q| now.duration_since(q.at) < PENDING_FOR);
        if self.queries.len() >= MAX_PENDING {
            return None;
        }
        // At most MAX_PENDING ids are taken, so a free one is found within MAX_PENDING + 1.
        loop {
            let id = self.next;
            self.next = self.next.wrapping_add(1);
            if let std::collections::hash_map::Entry::Vacant(slot) = self.queries.entry(id) {
                slot.insert(query);
                return Some(id);
            }
        }
    }

    fn take(&mut self, id: u16) -> Option<Query> {
        self.queries.remove(&id)
    }
}

struct Relay {
    udp: UdpSocket,
    pending: Mutex<Pending>,
    /// The connection to the host, once it has made one.
    host: Mutex<Option<File>>,
    tcp_clients: AtomicUsize,
}

/// The relay, made when the host first connects.
static RELAY: Mutex<Option<Arc<Relay>>> = Mutex::new(None);

/// Listens on the relay's vsock port; each connection from the host is served on a thread.
pub fn serve() -> io::Result<()> {
    let listener = crate::vsock::listen_on(hako_protocol::DNS_VSOCK_PORT, 4)?;
    std::thread::Builder::new()
        .name("dns".into())
        .spawn(move || loop {
            match accept(listener.as_raw_fd()) {
                Ok(fd) => {
                    // SAFETY: accept(2) returned a new descriptor that nothing else owns.
                    let host = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                    let spawned =
                        std::thread::Builder::new()
                            .name("dns-host".into())
                            .spawn(move || {
                                if let Err(e) = serve_host(host) {
                                    log::info!("dns relay: {e}");
                                }
                            });
                    if let Err(e) = spawned {
                        log::warn!("dns relay: cannot start a thread: {e}");
                    }
                }
                Err(e) => {
                    log::warn!("dns relay: accept: {e}");
                    std::thread::sleep(ACCEPT_BACKOFF);
                }
            }
        })?;
    Ok(())
}

/// One connection from the host: listen (once per VM), say so, then hand each answer that
/// arrives to the client that asked.
fn serve_host(mut host: File) -> io::Result<()> {
    let relay = match relay() {
        Ok(relay) => relay,
        Err(e) => {
            host.write_all(
                format!("ERR listening on {RESOLVER}:{RESOLVER_PORT}: {e}\n").as_bytes(),
            )?;
            return Ok(());
        }
    };
    host.write_all(b"OK\n")?;
    #[cfg(feature = "hostile")]
    if crate::hostile::floods_dns() {
        log::warn!("HOSTILE: flooding the host's DNS relay");
        for frame in crate::hostile::dns_flood() {
            host.write_all(&frame)?;
        }
        // Then stay connected, as a relay that merely went quiet would.
        return host.read_to_end(&mut Vec::new()).map(drop);
    }
    *lock(&relay.host) = Some(host.try_clone()?);
    let mut message = vec![0u8; usize::from(u16::MAX)];
    loop {
        let mut head = [0u8; HEADER];
        host.read_exact(&mut head)?;
        let (_, len) = parse_header(head).map_err(io::Error::other)?;
        host.read_exact(&mut message[..len])?;
        let answer = &mut message[..len];
        let Some(query) = message_id(answer).and_then(|id| lock(&relay.pending).take(id)) else {
            continue;
        };
        set_message_id(answer, query.id);
        match query.client {
            Client::Udp(to) => {
                let _ = relay.udp.send_to(answer, to);
            }
            Client::Tcp(to) => {
                let _ = to.try_send(answer.to_vec());
            }
        }
    }
}

/// The relay of this VM, listening; made by the first connection from the host.
fn relay() -> io::Result<Arc<Relay>> {
    let mut made = lock(&RELAY);
    if let Some(relay) = made.as_ref() {
        return Ok(relay.clone());
    }
    let address = SocketAddr::from((RESOLVER, RESOLVER_PORT));
    let tcp = TcpListener::bind(address)?;
    let relay = Arc::new(Relay {
        udp: UdpSocket::bind(address)?,
        pending: Mutex::new(Pending::default()),
        host: Mutex::new(None),
        tcp_clients: AtomicUsize::new(0),
    });
    let udp = relay.clone();
    std::thread::Builder::new()
        .name("dns-udp".into())
        .spawn(move || serve_udp(&udp))?;
    let tcp_relay = relay.clone();
    std::thread::Builder::new()
        .name("dns-tcp".into())
        .spawn(move || serve_tcp(&tcp_relay, &tcp))?;
    *made = Some(relay.clone());
    Ok(relay)
}

fn serve_udp(relay: &Relay) {
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    loop {
        match relay.udp.recv_from(&mut buf) {
            Ok((n, from)) => relay.ask(Client::Udp(from), Transport::Udp, &mut buf[..n]),
            Err(e) => {
                log::warn!("dns relay: udp: {e}");
                std::thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }
}

fn serve_tcp(relay: &Arc<Relay>, listener: &TcpListener) {
    loop {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) => {
                log::warn!("dns relay: tcp accept: {e}");
                std::thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        if relay.tcp_clients.fetch_add(1, Ordering::SeqCst) >= MAX_TCP_CLIENTS {
            relay.tcp_clients.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let relay = relay.clone();
        let done = relay.clone();
        let spawned = std::thread::Builder::new()
            .name("dns-tcp-client".into())
            .spawn(move || {
                let _ = serve_tcp_client(&relay, client);
                relay.tcp_clients.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            done.tcp_clients.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// DNS over TCP: each message is preceded by its length; answered in order.
fn serve_tcp_client(relay: &Relay, mut client: TcpStream) -> io::Result<()> {
    client.set_read_timeout(Some(PENDING_FOR))?;
    client.set_write_timeout(Some(PENDING_FOR))?;
    let (answers, answered) = mpsc::sync_channel(4);
    let mut message = vec![0u8; usize::from(u16::MAX)];
    loop {
        let mut len = [0u8; 2];
        client.read_exact(&mut len)?;
        let len = usize::from(u16::from_be_bytes(len));
        let query = &mut message[..len];
        client.read_exact(query)?;
        relay.ask(Client::Tcp(answers.clone()), Transport::Tcp, query);
        let answer = answered
            .recv_timeout(PENDING_FOR)
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?;
        let mut out = u16::try_from(answer.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes()
            .to_vec();
        out.extend_from_slice(&answer);
        client.write_all(&out)?;
    }
}

impl Relay {
    /// Sends a client's query to the host under an id of the agent's; dropped when it is not a
    /// DNS message, too many are in flight or the host is not connected.
    fn ask(&self, client: Client, transport: Transport, query: &mut [u8]) {
        let Some(id) = message_id(query).filter(|_| query.len() >= MIN_MESSAGE) else {
            return;
        };
        let at = Instant::now();
        let Some(ours) = lock(&self.pending).insert(Query { client, id, at }) else {
            log::debug!("dns relay: {MAX_PENDING} queries in flight; one dropped");
            return;
        };
        set_message_id(query, ours);
        let Ok(head) = header(transport, query) else {
            lock(&self.pending).take(ours);
            return;
        };
        let mut frame = Vec::with_capacity(HEADER + query.len());
        frame.extend_from_slice(&head);
        frame.extend_from_slice(query);
        let mut host = lock(&self.host);
        let sent = host.as_mut().map(|h| h.write_all(&frame));
        if !matches!(sent, Some(Ok(()))) {
            lock(&self.pending).take(ours);
        }
    }
}

/// A poisoned lock only means a relay thread panicked; the data is still whole.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(at: Instant) -> Query {
        Query {
            client: Client::Udp(SocketAddr::from(([127, 0, 0, 1], 5353))),
            id: 7,
            at,
        }
    }

    #[test]
    fn queries_in_flight_get_distinct_ids_and_are_bounded() {
        let mut pending = Pending::default();
        let now = Instant::now();
        let ids: Vec<u16> = (0..MAX_PENDING)
            .map(|_| pending.insert(query(now)).expect("test step"))
            .collect();
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), MAX_PENDING);
        assert!(pending.insert(query(now)).is_none(), "the bound holds");
        let answered = pending.take(ids[3]).expect("test step");
        assert_eq!(answered.id, 7, "the client's own id comes back");
        assert!(
            pending.take(ids[3]).is_none(),
            "an answer is delivered once"
        );
        assert!(pending.insert(query(now)).is_some(), "a slot freed");
    }

    #[test]
    fn unanswered_queries_are_forgotten() {
        let mut pending = Pending::default();
        let then = Instant::now();
        for _ in 0..MAX_PENDING {
            pending.insert(query(then)).expect("test step");
        }
        let later = then + PENDING_FOR;
        assert!(pending.insert(query(later)).is_some());
        assert_eq!(pending.queries.len(), 1);
    }

    #[test]
    fn ids_skip_those_in_flight_when_they_wrap() {
        let mut pending = Pending {
            next: u16::MAX,
            ..Default::default()
        };
        let now = Instant::now();
        assert_eq!(pending.insert(query(now)), Some(u16::MAX));
        assert_eq!(pending.insert(query(now)), Some(0));
        pending.next = u16::MAX;
        assert_eq!(pending.insert(query(now)), Some(1), "MAX and 0 are taken");
    }
}
