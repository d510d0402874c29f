//! Test-only: a guest that attacks its host. Built only with `--features hostile`, for the
//! hostile-guest end-to-end tests (tests/tests/hostile_guest.rs); the agent hako ships has none
//! of it. What it does is chosen on the kernel command line: `hako.hostile=oom` makes
//! GetOomEvent answer at once, for ever, with ids that are not the pod's own (another pod's
//! container, an id with a forged log line in it).

use std::sync::atomic::{AtomicU64, Ordering};

/// The forged OOM ids, in turn.
const FORGED_OOM: [&str; 3] = [
    "victim",
    "victim\nlevel=error msg=\"forged by the guest\"",
    "../../victim",
];

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
