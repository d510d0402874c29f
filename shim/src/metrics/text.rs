//! A snapshot as Prometheus text (0.0.4), through the families table: each family's HELP and
//! TYPE once, then its series. prometheus-client does the escaping and the number formats.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::families::{self, Kind};
use super::snapshot::{Snapshot, Value};

pub use prometheus_text::CONTENT_TYPE;

/// One sandbox's snapshot (or the monitor's own samples) and the labels every one of its
/// series gets in front of its family's own.
#[derive(Debug, Clone)]
pub struct Part {
    pub labels: Vec<(&'static str, String)>,
    pub snapshot: Arc<Snapshot>,
}

#[derive(Debug)]
struct PartsCollector(Vec<Part>);

impl Collector for PartsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in families::all() {
            let mut series = self
                .0
                .iter()
                .flat_map(|part| {
                    part.snapshot
                        .samples
                        .iter()
                        .filter(|s| s.family == family.name)
                        .map(move |s| (part, s))
                })
                .peekable();
            // A family with no series is left out, as client libraries do with empty vecs.
            if series.peek().is_none() {
                continue;
            }
            let kind = match family.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
                Kind::Histogram => MetricType::Histogram,
            };
            let mut metric =
                encoder.encode_descriptor(family.base_name(), family.help, None, kind)?;
            for (part, sample) in series {
                let labels: Vec<(&str, &str)> = part
                    .labels
                    .iter()
                    .map(|(name, value)| (*name, value.as_str()))
                    .chain(
                        family
                            .labels
                            .iter()
                            .copied()
                            .zip(sample.labels.iter().map(String::as_str)),
                    )
                    .collect();
                let mut one = metric.encode_family(&labels)?;
                match (&sample.value, family.kind) {
                    (Value::Number(v), Kind::Counter) => one.encode_counter::<NoLabelSet, _, f64>(
                        v,
                        None::<&Exemplar<NoLabelSet, f64>>,
                    )?,
                    (Value::Number(v), _) => one.encode_gauge(v)?,
                    (
                        Value::Histogram {
                            buckets,
                            count,
                            sum,
                        },
                        _,
                    ) => {
                        let pairs: Vec<(f64, u64)> = family
                            .buckets
                            .iter()
                            .copied()
                            .zip(buckets.iter().copied())
                            .collect();
                        one.encode_histogram::<NoLabelSet>(*sum, *count, &pairs, None)?
                    }
                }
            }
        }
        Ok(())
    }
}

/// The text of a validated snapshot (an unvalidated one may render a wrong type's value).
pub fn render(snapshot: Arc<Snapshot>) -> String {
    render_all(vec![Part {
        labels: Vec::new(),
        snapshot,
    }])
}

/// The text of many parts, each family's HELP and TYPE once over all of them.
pub fn render_all(parts: Vec<Part>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(PartsCollector(parts)));
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would leave a partial text, which
    // is still better than none.
    let _ = prometheus_text::encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::metrics::families::find;
    use crate::metrics::snapshot::Sample;
    use crate::metrics::{HostReader, ShimMetrics};
    use crate::timing::Timings;

    fn sample_snapshot() -> Snapshot {
        let m = ShimMetrics::new();
        let mut t = Timings::new();
        t.mark("sandbox_prepare");
        t.mark("agent_ready");
        m.observe_start(&t);
        m.observe_rpc("CreateSandbox", std::time::Duration::from_millis(40), None);
        m.observe_rpc(
            "StartContainer",
            std::time::Duration::from_millis(3),
            Some(crate::metrics::RpcFailure::Guest),
        );
        m.observe_hotplug("nic", "remove", std::time::Duration::from_millis(9), false);
        let mut samples = m.samples();
        let dir = std::env::temp_dir();
        samples.extend(HostReader::new(&dir).samples());
        samples.push(Sample {
            family: "hako_host_process_rss_bytes".into(),
            labels: vec!["vmm".into()],
            value: Value::Number(3.5e9),
        });
        let s = Snapshot::new(samples);
        s.validate().expect("valid");
        s
    }

    /// A small check of the 0.0.4 grammar: HELP then TYPE once per family, before its
    /// samples; every sample line a known family's name (with a histogram's suffixes), valid
    /// labels and a number; histograms' buckets cumulative and ending in `+Inf` = `_count`.
    #[test]
    fn exposition_is_valid_prometheus_text() {
        let text = render(Arc::new(sample_snapshot()));
        assert!(text.ends_with('\n'), "{text}");
        let mut typed: BTreeMap<String, String> = BTreeMap::new();
        let mut current = String::new();
        let mut helped = Vec::new();
        let mut last_bucket: BTreeMap<String, (u64, bool)> = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().expect("name");
                assert!(!helped.contains(&name.to_string()), "HELP twice: {name}");
                helped.push(name.to_string());
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("type");
                assert_eq!(helped.last().map(String::as_str), Some(name), "{line}");
                let family = find(name).expect("known family");
                assert_eq!(kind, family.kind.as_str());
                assert!(typed.insert(name.into(), kind.into()).is_none(), "{line}");
                current = name.to_string();
                continue;
            }
            assert!(!line.starts_with('#'), "{line}");
            let (series, value) = line.rsplit_once(' ').expect("value");
            let v: f64 = value.parse().expect("number");
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.strip_suffix('}').expect("closing brace")),
                None => (series, ""),
            };
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|b| typed.get(*b).is_some_and(|k| k == "histogram"))
                })
                .unwrap_or(name);
            assert_eq!(current, family, "a sample outside its family: {line}");
            for pair in labels.split(',').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').expect("label");
                assert!(
                    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{k}"
                );
                assert!(
                    v.starts_with('"') && v.ends_with('"') && v.len() >= 2,
                    "{v}"
                );
            }
            if name.ends_with("_bucket") {
                let key = format!("{family}{}", labels.split(",le=").next().unwrap_or(""));
                let n = v as u64;
                let entry = last_bucket.entry(key).or_insert((0, false));
                assert!(n >= entry.0 && !entry.1, "not cumulative: {line}");
                *entry = (n, labels.ends_with("le=\"+Inf\""));
            }
        }
        assert!(last_bucket.values().all(|(_, inf)| *inf));
        for name in [
            "hako_start_phase_seconds",
            "hako_agent_rpc_errors_total",
            "hako_hotplug_total",
            "hako_host_process_cpu_seconds_total",
        ] {
            assert!(typed.contains_key(name), "{name} missing:\n{text}");
        }
        assert!(
            text.contains(
                "hako_agent_rpc_errors_total{method=\"StartContainer\",reason=\"guest\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("hako_host_process_rss_bytes{process=\"vmm\"} 3500000000"),
            "{text}"
        );
    }

    #[test]
    fn an_empty_snapshot_renders_nothing() {
        assert_eq!(render(Arc::new(Snapshot::new(vec![]))), "");
    }
}
