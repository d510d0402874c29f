//! Port forwarding into the pod: the host's forwarder (shim `sandbox::forward`) connects to vsock
//! port `FORWARD_VSOCK_PORT`, names a TCP port on a line of its own, and from the answer on the
//! connection carries the bytes of a connection to that port on the guest's loopback, which is
//! the pod's (`kubectl port-forward`).
//!
//! Blocking threads, two per connection: forwards are few, and each is bounded by
//! `MAX_FORWARDS`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hako_protocol::forward::{parse_request, MAX_REQUEST};
use nix::sys::socket::{accept, shutdown, Shutdown as SockShutdown};

/// Connections forwarded at once; more are refused until one ends.
const MAX_FORWARDS: usize = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Listens on the forward port and serves each connection on threads of its own.
pub fn serve() -> io::Result<()> {
    let listener = crate::vsock::listen_on(hako_protocol::FORWARD_VSOCK_PORT, 16)?;
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("forward".into())
        .spawn(move || loop {
            let fd = match accept(std::os::fd::AsRawFd::as_raw_fd(&listener)) {
                // SAFETY: accept(2) returned a new descriptor that nothing else owns.
                Ok(fd) => unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) },
                Err(e) => {
                    // Out of descriptors or memory: retrying at once would spin.
                    log::warn!("port forward: accept: {e}");
                    std::thread::sleep(ACCEPT_BACKOFF);
                    continue;
                }
            };
            if active.fetch_add(1, Ordering::SeqCst) >= MAX_FORWARDS {
                active.fetch_sub(1, Ordering::SeqCst);
                let _ = File::from(fd).write_all(
                    format!("ERR more than {MAX_FORWARDS} forwards at once\n").as_bytes(),
                );
                continue;
            }
            let done = active.clone();
            let spawned = std::thread::Builder::new()
                .name("forward-conn".into())
                .spawn(move || {
                    if let Err(e) = forward(fd) {
                        log::debug!("port forward: {e}");
                    }
                    done.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                // The slot was taken for a thread that never ran: give it back.
                active.fetch_sub(1, Ordering::SeqCst);
                log::warn!("port forward: cannot start a thread: {e}");
            }
        })?;
    Ok(())
}

/// One forwarded connection: the request line, the answer, then bytes both ways.
fn forward(host: OwnedFd) -> io::Result<()> {
    let mut request = Vec::with_capacity(8);
    let mut byte = [0u8; 1];
    let mut reader = File::from(host.try_clone()?);
    while request.len() <= MAX_REQUEST {
        if reader.read(&mut byte)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no request"));
        }
        if byte[0] == b'\n' {
            break;
        }
        request.push(byte[0]);
    }
    let mut writer = File::from(host.try_clone()?);
    let port = match parse_request(&request) {
        Ok(port) => port,
        Err(e) => {
            writer.write_all(format!("ERR {e}\n").as_bytes())?;
            return Ok(());
        }
    };
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let pod = match TcpStream::connect_timeout(&address, CONNECT_TIMEOUT) {
        Ok(pod) => pod,
        Err(e) => {
            writer
                .write_all(format!("ERR connecting to {address} in the pod: {e}\n").as_bytes())?;
            return Ok(());
        }
    };
    writer.write_all(b"OK\n")?;
    let mut pod_reader = pod.try_clone()?;
    let mut pod_writer = pod;
    let upstream = std::thread::Builder::new()
        .name("forward-up".into())
        .spawn(move || {
            let _ = io::copy(&mut reader, &mut pod_writer);
            let _ = pod_writer.shutdown(Shutdown::Write);
        })?;
    let _ = io::copy(&mut pod_reader, &mut writer);
    let _ = shutdown(
        std::os::fd::AsRawFd::as_raw_fd(&writer),
        SockShutdown::Write,
    );
    let _ = upstream.join();
    Ok(())
}
