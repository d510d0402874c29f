//! A logger for PID 1: lines go to stderr, which the kernel connects to the console, which the
//! host keeps in the sandbox's console log.

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::Write;

struct ConsoleLogger;

impl Log for ConsoleLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        };
        // One write per line so lines from several threads do not interleave.
        let line = format!(
            "hako-agent[{}]: {level}: {}\n",
            std::process::id(),
            record.args()
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

static LOGGER: ConsoleLogger = ConsoleLogger;

pub fn init(level: LevelFilter) {
    // Only fails when a logger is already set, which leaves the first one in place.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Reads `hako.log=<level>` from the kernel command line.
pub fn level_from_cmdline(cmdline: &str) -> LevelFilter {
    hako_protocol::cmdline_value(cmdline, hako_protocol::CMDLINE_LOG_LEVEL)
        .and_then(|value| value.parse().ok())
        .unwrap_or(LevelFilter::Info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_comes_from_cmdline() {
        assert_eq!(
            level_from_cmdline("quiet hako.log=debug panic=-1"),
            LevelFilter::Debug
        );
        assert_eq!(level_from_cmdline("quiet"), LevelFilter::Info);
        assert_eq!(level_from_cmdline("hako.log=nonsense"), LevelFilter::Info);
    }
}
