//! Test-only: a guest that attacks its host. Built only with `--features hostile`, for the
//! hostile-guest end-to-end tests (tests/tests/hostile_guest.rs); the agent hako ships has none
//! of it. What it does is chosen on the kernel command line: `hako.hostile=oom` makes
//! GetOomEvent answer at once, for ever, with ids that are not the pod's own (another pod's
//! container, an id with a forged log line in it); `hako.hostile=dns` makes the DNS relay, once
//! the host connects, send `DNS_FLOOD` queries at once and then a frame that is not one;
//! `hako.hostile=metrics-flood` answers a metrics request with a header claiming
//! `METRICS_FLOOD` bytes and then bytes until the host closes, `hako.hostile=metrics-garbage`
//! with a frame of a valid length over random bytes.

use std::sync::atomic::{AtomicU64, Ordering};

/// The forged OOM ids, in turn.
const FORGED_OOM: [&str; 3] = [
    "victim",
    "victim\nlevel=error msg=\"forged by the guest\"",
    "../../victim",
];

/// Queries the hostile DNS relay sends at once.
pub const DNS_FLOOD: u16 = 2000;

/// Whether the kernel command line asks for the DNS flood (read where the relay starts, which
/// has no Agent at hand).
pub fn floods_dns() -> bool {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    hako_protocol::cmdline_value(&cmdline, "hako.hostile")
        .unwrap_or_default()
        .split(',')
        .any(|w| w == "dns")
}

/// The flood, a frame each: well-formed queries for `flood.test`, then a frame of an unknown
/// transport.
pub fn dns_flood() -> Vec<Vec<u8>> {
    use hako_protocol::dns::{header, Transport};
    let mut frames = Vec::new();
    for id in 0..DNS_FLOOD {
        let mut query = id.to_be_bytes().to_vec();
        query.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        query.extend_from_slice(b"\x05flood\x04test\x00\x00\x01\x00\x01");
        if let Ok(head) = header(Transport::Udp, &query) {
            let mut frame = head.to_vec();
            frame.extend_from_slice(&query);
            frames.push(frame);
        }
    }
    let mut bad = vec![9, 0, 12];
    bad.extend_from_slice(&[0; 12]);
    frames.push(bad);
    frames
}

/// What the flooding metrics answer claims to hold: far over the host's cap.
pub const METRICS_FLOOD: u32 = 100 << 20;
/// The garbage answer's length: within the host's cap.
const METRICS_GARBAGE: usize = 64 * 1024;

/// `metrics-flood` or `metrics-garbage`, when the kernel command line asks for either.
pub fn metrics_mode() -> Option<&'static str> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let wanted = hako_protocol::cmdline_value(&cmdline, "hako.hostile").unwrap_or_default();
    ["metrics-flood", "metrics-garbage"]
        .into_iter()
        .find(|mode| wanted.split(',').any(|w| w == *mode))
}

/// The hostile answer to a metrics request.
pub fn metrics_answer(mode: &str, stream: &mut std::fs::File) -> std::io::Result<()> {
    use std::io::{Read, Write};
    if mode == "metrics-flood" {
        stream.write_all(&METRICS_FLOOD.to_be_bytes())?;
        // Until the host closes (a write error) or stops reading (the send timeout).
        let chunk = vec![0x5a; 64 * 1024];
        loop {
            stream.write_all(&chunk)?;
        }
    }
    let mut garbage = vec![0u8; METRICS_GARBAGE];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut garbage)?;
    // Field 0 is no protobuf field: the body cannot decode, whatever the random bytes after.
    garbage[0] = 0;
    stream.write_all(&(METRICS_GARBAGE as u32).to_be_bytes())?;
    stream.write_all(&garbage)
}

pub struct Hostile {
    oom: bool,
    sent: AtomicU64,
}

impl Hostile {
    pub fn from_cmdline(cmdline: &str) -> Self {
        let wanted = hako_protocol::cmdline_value(cmdline, "hako.hostile").unwrap_or_default();
        if !wanted.is_empty() {
            log::warn!("HOSTILE test agent: {wanted}");
        }
        Self {
            oom: wanted.split(',').any(|w| w == "oom"),
            sent: AtomicU64::new(0),
        }
    }

    /// The next forged OOM id, when forging them.
    pub fn forged_oom(&self) -> Option<String> {
        if !self.oom {
            return None;
        }
        let n = self.sent.fetch_add(1, Ordering::SeqCst) as usize;
        Some(FORGED_OOM[n % FORGED_OOM.len()].to_string())
    }
}
