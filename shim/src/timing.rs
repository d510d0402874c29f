//! Start-phase timings, logged once per container start so slow phases are visible in the logs
//! (and the benchmarks can read them back).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Timings {
    started: Instant,
    last: Instant,
    phases: Vec<(&'static str, Duration)>,
}

impl Default for Timings {
    fn default() -> Self {
        Self::new()
    }
}

impl Timings {
    pub fn new() -> Self {
        let now = Instant::now();
        Self {
            started: now,
            last: now,
            phases: Vec::new(),
        }
    }

    /// Records the time since the previous mark as `phase`.
    pub fn mark(&mut self, phase: &'static str) {
        let now = Instant::now();
        self.phases.push((phase, now - self.last));
        self.last = now;
    }

    pub fn total(&self) -> Duration {
        self.last - self.started
    }

    /// `phase=12.3ms ... total=45.6ms`, the format the benchmarks parse.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for (phase, d) in &self.phases {
            let _ = write!(out, "{phase}={:.1}ms ", d.as_secs_f64() * 1000.0);
        }
        let _ = write!(out, "total={:.1}ms", self.total().as_secs_f64() * 1000.0);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lists_phases_in_order_and_the_total() {
        let mut t = Timings::new();
        t.mark("prepare");
        t.mark("boot");
        let s = t.summary();
        let prepare = s.find("prepare=").expect("prepare");
        let boot = s.find("boot=").expect("boot");
        assert!(prepare < boot, "{s}");
        assert!(s.ends_with("ms") && s.contains("total="), "{s}");
    }
}
