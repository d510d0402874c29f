//! Start-phase timings, logged once per container start so slow phases are visible in the logs
//! (and the benchmarks can read them back).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Timings {
    started: Instant,
    last: Instant,
    phases: Vec<(&'static str, Duration)>,
    /// Parts of a phase measured elsewhere (the guest's own clock), shown after the phases and
    /// not counted in the total.
    details: Vec<(&'static str, Duration)>,
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
            details: Vec::new(),
        }
    }

    /// Records the time since the previous mark as `phase`.
    pub fn mark(&mut self, phase: &'static str) {
        let now = Instant::now();
        self.phases.push((phase, now - self.last));
        self.last = now;
    }

    /// Records a part of a phase, such as the guest kernel's share of `agent_ready`.
    pub fn detail(&mut self, name: &'static str, d: Duration) {
        self.details.push((name, d));
    }

    /// The duration recorded for `phase`, if it was marked.
    pub fn phase(&self, phase: &str) -> Option<Duration> {
        self.phases
            .iter()
            .find(|(name, _)| *name == phase)
            .map(|(_, d)| *d)
    }

    /// Every phase, then every detail, as `summary` lists them (for `metrics`).
    pub fn entries(&self) -> impl Iterator<Item = (&'static str, Duration)> + '_ {
        self.phases.iter().chain(&self.details).copied()
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
        for (name, d) in &self.details {
            let _ = write!(out, "{name}={:.1}ms ", d.as_secs_f64() * 1000.0);
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

    #[test]
    fn details_are_listed_but_not_counted() {
        let mut t = Timings::new();
        t.mark("boot");
        let boot = t.phase("boot").expect("marked");
        t.detail("boot.kernel", Duration::from_secs(5));
        let s = t.summary();
        assert!(s.contains("boot.kernel=5000.0ms"), "{s}");
        assert_eq!(t.total(), boot);
        assert_eq!(t.phase("absent"), None);
    }
}
