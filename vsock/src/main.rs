//! hako-vsock: the virtio-vsock device of a QEMU guest, as a vhost-user backend. One process
//! per VM, started by the shim:
//!
//! ```text
//! hako-vsock --socket <vhost-user socket> --uds-path <host socket> [--guest-cid N]
//! ```
//!
//! QEMU connects to `--socket`. Host clients connect to `--uds-path` and write
//! `CONNECT <port>\n`; once the guest accepts they read `OK <port>\n` and then the stream. A
//! guest that dials host port P reaches the listener at `<uds-path>_P`. Once QEMU is connected,
//! the process runs under a seccomp filter; it exits when QEMU hangs up.

mod conn;
mod device;
mod header;
mod muxer;
mod seccomp;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use device::{VsockDevice, HOST_EVENT};
use muxer::Muxer;

const USAGE: &str = "usage: hako-vsock --socket PATH --uds-path PATH [--guest-cid N] | --version

The virtio-vsock device of one QEMU guest (a vhost-user backend), started by hako's shim.
QEMU connects to --socket; host clients connect to --uds-path and write \"CONNECT <port>\\n\";
the guest reaches host listeners at <uds-path>_<port>. Logs go to standard error
(HAKO_VSOCK_LOG=debug for more; HAKO_VSOCK_SECCOMP=log logs calls outside the seccomp filter
instead of dying on them).";

#[derive(Debug, PartialEq, Eq)]
struct Args {
    socket: PathBuf,
    uds_path: PathBuf,
    guest_cid: u64,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut socket = None;
    let mut uds_path = None;
    let mut guest_cid = 3u64;
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match flag.as_str() {
            "--socket" => socket = Some(PathBuf::from(value("--socket")?)),
            "--uds-path" => uds_path = Some(PathBuf::from(value("--uds-path")?)),
            "--guest-cid" => {
                let v = value("--guest-cid")?;
                guest_cid = v
                    .parse()
                    .ok()
                    .filter(|cid| *cid > 2 && *cid < u64::from(u32::MAX))
                    .ok_or(format!("--guest-cid {v:?}: a context id above 2"))?;
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Args {
        socket: socket.ok_or("--socket is required")?,
        uds_path: uds_path.ok_or("--uds-path is required")?,
        guest_cid,
    })
}

struct StderrLogger {
    level: log::LevelFilter,
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            eprintln!("hako-vsock {}: {}", record.level(), record.args());
        }
    }

    fn flush(&self) {}
}

fn run(args: Args) -> Result<(), String> {
    let muxer = Muxer::new(args.guest_cid, &args.uds_path).map_err(|e| e.to_string())?;
    let host_events = muxer.epoll_fd();
    let device = Arc::new(VsockDevice::new(args.guest_cid, muxer));
    let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("hako-vsock".to_string(), device, memory)
        .map_err(|e| format!("cannot create the vhost-user device: {e}"))?;
    for handler in daemon.get_epoll_handlers() {
        handler
            .register_listener(host_events, EventSet::IN, u64::from(HOST_EVENT))
            .map_err(|e| format!("cannot watch the host sockets: {e}"))?;
    }
    let mut listener = Listener::new(&args.socket, true)
        .map_err(|e| format!("cannot listen on {}: {e}", args.socket.display()))?;
    daemon
        .start(&mut listener)
        .map_err(|e| format!("waiting for QEMU on {}: {e}", args.socket.display()))?;
    // QEMU is connected: the socket file goes now (the listener removes it as it is dropped).
    drop(listener);
    // Every thread exists now: from here on, each is held to what moving packets needs.
    let log_only = std::env::var("HAKO_VSOCK_SECCOMP").as_deref() == Ok("log");
    seccomp::confine(log_only).map_err(|e| format!("cannot install the seccomp filter: {e}"))?;
    log::info!(
        "serving guest cid {} ({} <-> {})",
        args.guest_cid,
        args.socket.display(),
        args.uds_path.display()
    );
    match daemon.wait() {
        Ok(()) => Ok(()),
        Err(e) => Err(format!("the vhost-user connection failed: {e}")),
    }
}

fn main() -> ExitCode {
    let level = match std::env::var("HAKO_VSOCK_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        Ok("trace") => log::LevelFilter::Trace,
        Ok("warn") => log::LevelFilter::Warn,
        _ => log::LevelFilter::Info,
    };
    let logger: &'static StderrLogger = Box::leak(Box::new(StderrLogger { level }));
    let _ = log::set_logger(logger).map(|()| log::set_max_level(level));
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("hako-vsock {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("hako-vsock: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, String> {
        parse_args(list.iter().map(|s| s.to_string()))
    }

    #[test]
    fn arguments_are_parsed_and_checked() {
        assert_eq!(
            args(&["--socket", "/a", "--uds-path", "/b"]),
            Ok(Args {
                socket: "/a".into(),
                uds_path: "/b".into(),
                guest_cid: 3
            })
        );
        assert_eq!(
            args(&["--guest-cid", "7", "--socket", "/a", "--uds-path", "/b"]).map(|a| a.guest_cid),
            Ok(7)
        );
        for (bad, why) in [
            (&["--socket", "/a"][..], "--uds-path is required"),
            (&["--uds-path", "/b"][..], "--socket is required"),
            (&["--socket"][..], "--socket needs a value"),
            (
                &["--guest-cid", "2", "--socket", "/a", "--uds-path", "/b"][..],
                "above 2",
            ),
            (&["--guest-cid", "x"][..], "above 2"),
            (&["--groups", "x"][..], "unknown argument"),
        ] {
            let err = args(bad).expect_err("refused");
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        assert_eq!(args(&["--help"]), Err(String::new()));
    }
}
