//! `hako monitor`: serves the node's pods' metrics for Prometheus until SIGTERM or SIGINT
//! (hako_shim::monitor; configs/hako-monitor.service runs it under systemd).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hako_shim::config::Config;
use hako_shim::monitor::{self, Monitor};

#[derive(clap::Args)]
pub struct Args {
    /// The address to serve /metrics on. Keep it on loopback, or behind a firewall: the
    /// figures name every pod on the node.
    #[arg(long, default_value = monitor::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// A sandbox root to find sandboxes under; repeat it for RuntimeClasses whose
    /// configuration names another root. Default: the effective configuration's.
    #[arg(long = "sandbox-root")]
    sandbox_roots: Vec<PathBuf>,
    /// How long one sandbox may take to answer (e.g. 1s, 500ms); a sandbox that takes longer
    /// shows `hako_sandbox_up 0`.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    timeout: Duration,
    /// Sandboxes scraped at once.
    #[arg(long, default_value_t = monitor::DEFAULT_CONCURRENCY)]
    concurrency: usize,
}

pub fn command(args: Args) -> anyhow::Result<bool> {
    let roots = if args.sandbox_roots.is_empty() {
        vec![Config::load(None)?.config.runtime.sandbox_root]
    } else {
        args.sandbox_roots
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let shown: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        eprintln!(
            "hako monitor: serving http://{}/metrics for the sandboxes under {}",
            listener.local_addr().unwrap_or(args.listen),
            shown.join(", ")
        );
        let monitor = Arc::new(Monitor::new(roots, args.timeout, args.concurrency));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("handling SIGTERM")?;
        tokio::select! {
            _ = monitor::serve(listener, monitor) => {}
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok(true)
    })
}

/// `1s`, `1.5s`, `500ms`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, scale) = if let Some(ms) = s.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(secs) = s.strip_suffix('s') {
        (secs, 1.0)
    } else {
        return Err(format!("{s:?}: give a unit, as in 1s or 500ms"));
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 1s or 500ms"))?;
    let secs = value * scale;
    if !(0.001..=60.0).contains(&secs) {
        return Err(format!("{s:?}: between 1ms and 60s"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit_and_a_sane_size() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        for bad in ["1", "", "ms", "-1s", "0s", "90s", "NaNs", "1h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
