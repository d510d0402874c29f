//! What crosses `metrics.sock`: one sandbox's values as typed samples, each naming its family
//! in `families`. The reader (the monitor, a later step) deserialises into these types and
//! calls `validate`, so a shim it cannot trust to be well-formed costs it a bounded amount.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::families::{self, Kind};

pub const SNAPSHOT_VERSION: u32 = 1;
/// The most of a snapshot a reader takes: typical pods' are 5-20 KB, and a pod of
/// `MAX_METRICS_CONTAINERS` (256) containers' ~0.9 MB.
pub const MAX_SNAPSHOT_BYTES: usize = 2 << 20;
/// Host-side families have a few dozen series; the guest's per-container ones will add
/// ~20 per container for at most 256 containers.
pub const MAX_SAMPLES: usize = 20_000;
pub const MAX_LABEL_VALUE: usize = 128;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SnapshotError {
    #[error("snapshot version {0} is not {SNAPSHOT_VERSION}")]
    Version(u32),
    #[error("{0} samples, more than {MAX_SAMPLES}")]
    TooMany(usize),
    #[error("unknown family {0:?}")]
    UnknownFamily(String),
    #[error("family {family}: {reason}")]
    Invalid {
        family: &'static str,
        reason: String,
    },
    #[error("malformed snapshot: {0}")]
    Malformed(String),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    /// The Kubernetes pod the sandbox runs, for a CRI pod: the monitor labels every series of
    /// the sandbox with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodLabels>,
    #[serde(default)]
    pub samples: Vec<Sample>,
}

/// A CRI pod's name, namespace and uid, as containerd's CRI plugin annotates every container
/// of the pod. Whoever writes the pod spec chooses them and they reach an operator's
/// dashboards, so they are checked here, where they are taken and where they are read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodLabels {
    pub name: String,
    pub namespace: String,
    pub uid: String,
}

pub const POD_NAME_ANNOTATION: &str = "io.kubernetes.cri.sandbox-name";
pub const POD_NAMESPACE_ANNOTATION: &str = "io.kubernetes.cri.sandbox-namespace";
pub const POD_UID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-uid";

impl PodLabels {
    /// The pod's labels from a container's annotations, if all three are there and valid.
    pub fn from_annotations(
        annotations: &std::collections::HashMap<String, String>,
    ) -> Option<Self> {
        let get = |key| annotations.get(key).cloned();
        let pod = Self {
            name: get(POD_NAME_ANNOTATION)?,
            namespace: get(POD_NAMESPACE_ANNOTATION)?,
            uid: get(POD_UID_ANNOTATION)?,
        };
        pod.valid().then_some(pod)
    }

    /// Names are DNS-1123 subdomains (what Kubernetes accepts for a pod's name and
    /// namespace); the uid is a UUID's characters.
    pub fn valid(&self) -> bool {
        let dns = |s: &str| {
            !s.is_empty()
                && s.len() <= 253
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        };
        let uid = !self.uid.is_empty()
            && self.uid.len() <= 36
            && self.uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        dns(&self.name) && dns(&self.namespace) && uid
    }
}

/// One series: the values of its family's labels, in the family's order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub family: String,
    #[serde(default)]
    pub labels: Vec<String>,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Value {
    /// A counter's or a gauge's value.
    Number(f64),
    /// `buckets[i]` counts the observations in (bound[i-1], bound[i]] of the family's bounds,
    /// not cumulated; `count` also covers those above the last bound.
    Histogram {
        buckets: Vec<u64>,
        count: u64,
        sum: f64,
    },
}

impl Snapshot {
    pub fn new(samples: Vec<Sample>) -> Self {
        Self {
            version: SNAPSHOT_VERSION,
            pod: None,
            samples,
        }
    }

    /// Parses at most `MAX_SNAPSHOT_BYTES` and validates: what a reader does with a reply.
    pub fn parse(bytes: &[u8]) -> Result<Self, SnapshotError> {
        if bytes.len() > MAX_SNAPSHOT_BYTES {
            return Err(SnapshotError::Malformed(format!(
                "{} bytes, more than {MAX_SNAPSHOT_BYTES}",
                bytes.len()
            )));
        }
        let snapshot: Snapshot =
            serde_json::from_slice(bytes).map_err(|e| SnapshotError::Malformed(e.to_string()))?;
        snapshot.validate()?;
        Ok(snapshot)
    }

    /// Every sample names a known family, has its type and its label names' count, label
    /// values in a tight character set, finite non-negative numbers and consistent histogram
    /// counts, and no series appears twice.
    pub fn validate(&self) -> Result<(), SnapshotError> {
        if self.version != SNAPSHOT_VERSION {
            return Err(SnapshotError::Version(self.version));
        }
        if self.pod.as_ref().is_some_and(|p| !p.valid()) {
            return Err(SnapshotError::Malformed("invalid pod labels".into()));
        }
        if self.samples.len() > MAX_SAMPLES {
            return Err(SnapshotError::TooMany(self.samples.len()));
        }
        let mut seen = BTreeSet::new();
        for sample in &self.samples {
            let family = families::find(&sample.family)
                .ok_or_else(|| SnapshotError::UnknownFamily(truncate(&sample.family)))?;
            let invalid = |reason: String| SnapshotError::Invalid {
                family: family.name,
                reason,
            };
            if sample.labels.len() != family.labels.len() {
                return Err(invalid(format!("{} label values", sample.labels.len())));
            }
            if let Some(bad) = sample.labels.iter().find(|v| !valid_label_value(v)) {
                return Err(invalid(format!("label value {:?}", truncate(bad))));
            }
            check_value(family, &sample.value).map_err(invalid)?;
            if !seen.insert((family.name, &sample.labels)) {
                return Err(invalid(format!("series {:?} twice", sample.labels)));
            }
        }
        Ok(())
    }
}

fn check_value(family: &families::Family, value: &Value) -> Result<(), String> {
    match (family.kind, value) {
        (Kind::Counter | Kind::Gauge, Value::Number(v)) if v.is_finite() && *v >= 0.0 => Ok(()),
        (Kind::Counter | Kind::Gauge, Value::Number(v)) => Err(format!("value {v}")),
        (
            Kind::Histogram,
            Value::Histogram {
                buckets,
                count,
                sum,
            },
        ) => {
            if buckets.len() != family.buckets.len() {
                return Err(format!("{} buckets", buckets.len()));
            }
            let bucketed = buckets
                .iter()
                .try_fold(0u64, |acc, b| acc.checked_add(*b))
                .ok_or("bucket counts overflow")?;
            if bucketed > *count {
                return Err(format!("buckets hold {bucketed}, count is {count}"));
            }
            if !sum.is_finite() || *sum < 0.0 {
                return Err(format!("sum {sum}"));
            }
            Ok(())
        }
        (kind, _) => Err(format!("a value of the wrong type for a {}", kind.as_str())),
    }
}

/// Label values hako produces are names from its own code (`vmm`, `CreateContainer`,
/// `agent_ready.kernel`); anything else is refused rather than escaped.
pub fn valid_label_value(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_LABEL_VALUE
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':'))
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number(family: &str, labels: &[&str], v: f64) -> Sample {
        Sample {
            family: family.into(),
            labels: labels.iter().map(|s| s.to_string()).collect(),
            value: Value::Number(v),
        }
    }

    fn phase(buckets: Vec<u64>, count: u64, sum: f64) -> Sample {
        Sample {
            family: "hako_start_phase_seconds".into(),
            labels: vec!["total".into()],
            value: Value::Histogram {
                buckets,
                count,
                sum,
            },
        }
    }

    #[test]
    fn a_good_snapshot_round_trips() {
        let mut buckets = vec![0; 13];
        buckets[6] = 2;
        let s = Snapshot::new(vec![
            phase(buckets, 3, 12.5),
            number("hako_host_process_rss_bytes", &["vmm"], 1e6),
        ]);
        let bytes = serde_json::to_vec(&s).expect("serialises");
        assert_eq!(Snapshot::parse(&bytes), Ok(s));
    }

    #[test]
    fn bad_samples_are_refused() {
        let rss = "hako_host_process_rss_bytes";
        let cases = [
            number("hako_nope", &["vmm"], 1.0),
            number(rss, &[], 1.0),
            number(rss, &["vmm", "extra"], 1.0),
            number(rss, &["a b"], 1.0),
            number(rss, &["x\"}\n"], 1.0),
            number(rss, &[""], 1.0),
            number(rss, &[&"v".repeat(MAX_LABEL_VALUE + 1)], 1.0),
            number(rss, &["vmm"], -1.0),
            number(rss, &["vmm"], f64::NAN),
            number(rss, &["vmm"], f64::INFINITY),
            number("hako_start_phase_seconds", &["total"], 1.0),
            phase(vec![0; 12], 0, 0.0),
            phase(vec![1; 13], 12, 1.0),
            phase(vec![u64::MAX; 13], u64::MAX, 1.0),
            phase(vec![0; 13], 0, -1.0),
            Sample {
                family: rss.into(),
                labels: vec!["vmm".into()],
                value: Value::Histogram {
                    buckets: vec![],
                    count: 0,
                    sum: 0.0,
                },
            },
        ];
        for case in cases {
            let s = Snapshot::new(vec![case.clone()]);
            assert!(s.validate().is_err(), "{case:?} passed");
        }
    }

    #[test]
    fn pod_labels_come_only_from_valid_annotations() {
        let of = |pairs: &[(&str, &str)]| {
            let map = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            PodLabels::from_annotations(&map)
        };
        let good = [
            (POD_NAME_ANNOTATION, "web-0"),
            (POD_NAMESPACE_ANNOTATION, "shop.prod"),
            (POD_UID_ANNOTATION, "6f1d3c2a-9b1e-4d7e-8f00-0123456789ab"),
        ];
        assert_eq!(
            of(&good),
            Some(PodLabels {
                name: "web-0".into(),
                namespace: "shop.prod".into(),
                uid: "6f1d3c2a-9b1e-4d7e-8f00-0123456789ab".into(),
            })
        );
        assert_eq!(of(&good[..2]), None, "no uid");
        let long = "a".repeat(254);
        for (key, bad) in [
            (POD_NAME_ANNOTATION, "Web"),
            (POD_NAME_ANNOTATION, "a\"} 1\nhako_x{a=\""),
            (POD_NAME_ANNOTATION, long.as_str()),
            (POD_NAMESPACE_ANNOTATION, ""),
            (POD_UID_ANNOTATION, "not-a-uid!"),
            (POD_UID_ANNOTATION, "0123456789abcdef0123456789abcdef01234"),
        ] {
            let mut pairs = good.to_vec();
            pairs.retain(|(k, _)| *k != key);
            pairs.push((key, bad));
            assert_eq!(of(&pairs), None, "{key}={bad:?}");
        }
    }

    #[test]
    fn duplicates_versions_and_counts_are_refused() {
        let one = number("hako_host_process_rss_bytes", &["vmm"], 1.0);
        let twice = Snapshot::new(vec![one.clone(), one.clone()]);
        assert!(twice.validate().is_err());
        let mut old = Snapshot::new(vec![]);
        old.version = 0;
        assert_eq!(old.validate(), Err(SnapshotError::Version(0)));
        let many = Snapshot::new(vec![one; MAX_SAMPLES + 1]);
        assert_eq!(
            many.validate(),
            Err(SnapshotError::TooMany(MAX_SAMPLES + 1))
        );
    }

    #[test]
    fn garbage_and_oversized_input_is_an_error_not_a_panic() {
        for bytes in [
            &b""[..],
            b"{",
            b"null",
            b"[]",
            b"{\"version\":1,\"samples\":{}}",
            b"{\"version\":1,\"samples\":[{\"family\":1}]}",
            b"{\"version\":1e999}",
            b"\xff\xfe\x00",
        ] {
            assert!(Snapshot::parse(bytes).is_err(), "{bytes:?}");
        }
        let big = vec![b' '; MAX_SNAPSHOT_BYTES + 1];
        assert!(matches!(
            Snapshot::parse(&big),
            Err(SnapshotError::Malformed(_))
        ));
        let forged_pod = br#"{"version":1,"pod":{"name":"a\"b","namespace":"x","uid":"1"}}"#;
        assert!(Snapshot::parse(forged_pod).is_err());
        // Unknown fields are ignored, so a newer shim's snapshot still reads.
        let newer = br#"{"version":1,"samples":[],"guest":{"x":1}}"#;
        assert_eq!(Snapshot::parse(newer), Ok(Snapshot::new(vec![])));
    }
}
