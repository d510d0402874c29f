//! Test-only: a guest that attacks its host. Built only with `--features hostile`, for the
//! hostile-guest end-to-end tests (tests/tests/hostile_guest.rs); the agent hako ships has none
//! of it. What it does is chosen on the kernel command line: `hako.hostile=oom` makes
//! GetOomEvent answer at once, for ever, with ids that are not the pod's own (another pod's
//! container, an id with a forged log line in it); `hako.hostile=dns` makes the DNS relay, once
//! the host connects, send `DNS_FLOOD` queries at once and then a frame that is not one.

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
