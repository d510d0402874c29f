//! What a pod asks for, read from the CRI `PodSandboxConfig` that containerd's shim sandboxer
//! passes in CreateSandbox (as an `Any`). Only the fields hako acts on are read, straight from
//! the protobuf wire format: the message is the tenant's, so every length is checked against
//! what is left and nothing is trusted beyond the bytes given.

use std::collections::BTreeMap;

/// The `Any` type CRI marshals its pod config as.
pub const POD_SANDBOX_CONFIG_TYPE: &str = "runtime.v1.PodSandboxConfig";
/// CRI's NamespaceMode for "the node's namespace" (hostNetwork, hostPID, hostIPC).
const NAMESPACE_NODE: u64 = 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodConfigError {
    #[error("the pod's config is not a CRI PodSandboxConfig (its type is {0:?})")]
    WrongType(String),
    #[error("the pod's config is malformed: {0}")]
    Malformed(&'static str),
}

/// The pod's settings hako uses.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PodConfig {
    pub hostname: String,
    pub dns: Option<Dns>,
    pub annotations: BTreeMap<String, String>,
    pub cgroup_parent: String,
    pub sysctls: BTreeMap<String, String>,
    pub host_network: bool,
    pub host_pid: bool,
    pub host_ipc: bool,
    /// kubelet's sum of the containers' limits (`linux.resources`): memory in bytes, the CPU
    /// quota and period in µs; 0 for none.
    pub memory_limit: i64,
    pub cpu_quota: i64,
    pub cpu_period: i64,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dns {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

impl Dns {
    /// The pod's /etc/resolv.conf, as CRI writes it for a pod with a DNS config.
    pub fn resolv_conf(&self) -> String {
        let mut out = String::new();
        if !self.searches.is_empty() {
            out.push_str(&format!("search {}\n", self.searches.join(" ")));
        }
        for server in &self.servers {
            out.push_str(&format!("nameserver {server}\n"));
        }
        if !self.options.is_empty() {
            out.push_str(&format!("options {}\n", self.options.join(" ")));
        }
        out
    }
}

impl PodConfig {
    /// Reads the config from CreateSandbox's `options`; an absent one is an empty config.
    pub fn from_any(type_url: &str, value: &[u8]) -> Result<PodConfig, PodConfigError> {
        if type_url.is_empty() && value.is_empty() {
            return Ok(PodConfig::default());
        }
        let name = type_url.rsplit('/').next().unwrap_or_default();
        if name != POD_SANDBOX_CONFIG_TYPE {
            return Err(PodConfigError::WrongType(type_url.to_string()));
        }
        PodConfig::decode(value)
    }

    fn decode(bytes: &[u8]) -> Result<PodConfig, PodConfigError> {
        let mut config = PodConfig::default();
        for field in Fields(bytes) {
            match field? {
                (2, Value::Bytes(b)) => config.hostname = text(b)?,
                (4, Value::Bytes(b)) => config.dns = Some(decode_dns(b)?),
                (7, Value::Bytes(b)) => {
                    let (k, v) = map_entry(b)?;
                    config.annotations.insert(k, v);
                }
                (8, Value::Bytes(b)) => decode_linux(b, &mut config)?,
                _ => {}
            }
        }
        Ok(config)
    }
}

fn decode_dns(bytes: &[u8]) -> Result<Dns, PodConfigError> {
    let mut dns = Dns::default();
    for field in Fields(bytes) {
        match field? {
            (1, Value::Bytes(b)) => dns.servers.push(text(b)?),
            (2, Value::Bytes(b)) => dns.searches.push(text(b)?),
            (3, Value::Bytes(b)) => dns.options.push(text(b)?),
            _ => {}
        }
    }
    Ok(dns)
}

fn decode_linux(bytes: &[u8], config: &mut PodConfig) -> Result<(), PodConfigError> {
    for field in Fields(bytes) {
        match field? {
            (1, Value::Bytes(b)) => config.cgroup_parent = text(b)?,
            (2, Value::Bytes(security)) => {
                for field in Fields(security) {
                    if let (1, Value::Bytes(namespaces)) = field? {
                        for field in Fields(namespaces) {
                            match field? {
                                (1, Value::Varint(mode)) => {
                                    config.host_network = mode == NAMESPACE_NODE
                                }
                                (2, Value::Varint(mode)) => {
                                    config.host_pid = mode == NAMESPACE_NODE
                                }
                                (3, Value::Varint(mode)) => {
                                    config.host_ipc = mode == NAMESPACE_NODE
                                }
                                _ => {}
                            }
                        }
                    }
                }
            }
            (5, Value::Bytes(resources)) => {
                for field in Fields(resources) {
                    // int64 on the wire: a negative one is a 10-byte varint.
                    match field? {
                        (1, Value::Varint(n)) => config.cpu_period = n as i64,
                        (2, Value::Varint(n)) => config.cpu_quota = n as i64,
                        (4, Value::Varint(n)) => config.memory_limit = n as i64,
                        _ => {}
                    }
                }
            }
            (3, Value::Bytes(b)) => {
                let (k, v) = map_entry(b)?;
                config.sysctls.insert(k, v);
            }
            _ => {}
        }
    }
    Ok(())
}

/// A `map<string, string>` entry: key is field 1, value field 2.
fn map_entry(bytes: &[u8]) -> Result<(String, String), PodConfigError> {
    let (mut key, mut value) = (String::new(), String::new());
    for field in Fields(bytes) {
        match field? {
            (1, Value::Bytes(b)) => key = text(b)?,
            (2, Value::Bytes(b)) => value = text(b)?,
            _ => {}
        }
    }
    Ok((key, value))
}

fn text(bytes: &[u8]) -> Result<String, PodConfigError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| PodConfigError::Malformed("a string is not UTF-8"))
}

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// The fields of one message, in wire order.
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Value<'a>), PodConfigError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        Some(self.field())
    }
}

impl<'a> Fields<'a> {
    fn field(&mut self) -> Result<(u64, Value<'a>), PodConfigError> {
        let tag = self.varint()?;
        let value = match tag & 7 {
            0 => Value::Varint(self.varint()?),
            1 => self.skip(8)?,
            2 => {
                let len = usize::try_from(self.varint()?)
                    .map_err(|_| PodConfigError::Malformed("a length is too large"))?;
                if len > self.0.len() {
                    return Err(PodConfigError::Malformed("a field runs past the end"));
                }
                let (bytes, rest) = self.0.split_at(len);
                self.0 = rest;
                Value::Bytes(bytes)
            }
            5 => self.skip(4)?,
            _ => return Err(PodConfigError::Malformed("an unknown wire type")),
        };
        Ok((tag >> 3, value))
    }

    fn skip(&mut self, n: usize) -> Result<Value<'a>, PodConfigError> {
        if n > self.0.len() {
            return Err(PodConfigError::Malformed("a field runs past the end"));
        }
        self.0 = &self.0[n..];
        Ok(Value::Fixed)
    }

    fn varint(&mut self) -> Result<u64, PodConfigError> {
        let mut value = 0u64;
        for shift in 0..10 {
            let (&byte, rest) = self
                .0
                .split_first()
                .ok_or(PodConfigError::Malformed("a number runs past the end"))?;
            self.0 = rest;
            value |= u64::from(byte & 0x7f) << (7 * shift);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(PodConfigError::Malformed(
            "a number is longer than 10 bytes",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Protobuf encoding by hand, for the tests.
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn bytes_field(field: u64, value: &[u8], out: &mut Vec<u8>) {
        varint(field << 3 | 2, out);
        varint(value.len() as u64, out);
        out.extend_from_slice(value);
    }
    fn entry(k: &str, v: &str) -> Vec<u8> {
        let mut e = Vec::new();
        bytes_field(1, k.as_bytes(), &mut e);
        bytes_field(2, v.as_bytes(), &mut e);
        e
    }

    fn sample() -> Vec<u8> {
        let mut dns = Vec::new();
        bytes_field(1, b"10.96.0.10", &mut dns);
        bytes_field(2, b"default.svc.cluster.local", &mut dns);
        bytes_field(2, b"svc.cluster.local", &mut dns);
        bytes_field(3, b"ndots:5", &mut dns);
        let mut namespaces = Vec::new();
        varint(2 << 3, &mut namespaces);
        varint(NAMESPACE_NODE, &mut namespaces);
        let mut security = Vec::new();
        bytes_field(1, &namespaces, &mut security);
        let mut linux = Vec::new();
        bytes_field(1, b"/kubepods/pod1", &mut linux);
        bytes_field(2, &security, &mut linux);
        bytes_field(3, &entry("net.ipv4.ip_forward", "1"), &mut linux);
        // kubelet's sum of the limits: period, quota, a negative shares and memory.
        let mut resources = Vec::new();
        for (field, value) in [
            (1, 100_000u64),
            (2, 250_000),
            (3, -2i64 as u64),
            (4, 1 << 30),
        ] {
            varint(field << 3, &mut resources);
            varint(value, &mut resources);
        }
        bytes_field(5, &resources, &mut linux);
        let mut pod = Vec::new();
        bytes_field(1, b"\x0a\x03web", &mut pod);
        bytes_field(2, b"web-0", &mut pod);
        bytes_field(3, b"/var/log/pods/x", &mut pod);
        bytes_field(4, &dns, &mut pod);
        // A fixed64 and a varint field hako does not read are skipped.
        varint(9 << 3 | 1, &mut pod);
        pod.extend_from_slice(&[0; 8]);
        varint(10 << 3, &mut pod);
        varint(300, &mut pod);
        bytes_field(7, &entry("io.hako.vcpus", "2"), &mut pod);
        bytes_field(8, &linux, &mut pod);
        pod
    }

    #[test]
    fn a_pod_config_is_read() {
        let config =
            PodConfig::from_any("type.googleapis.com/runtime.v1.PodSandboxConfig", &sample())
                .expect("decodes");
        assert_eq!(config.hostname, "web-0");
        assert_eq!(config.cgroup_parent, "/kubepods/pod1");
        assert!(config.host_pid && !config.host_network && !config.host_ipc);
        assert_eq!(config.annotations["io.hako.vcpus"], "2");
        assert_eq!(config.sysctls["net.ipv4.ip_forward"], "1");
        assert_eq!(
            (config.cpu_period, config.cpu_quota, config.memory_limit),
            (100_000, 250_000, 1 << 30)
        );
        assert_eq!(
            config.dns.expect("dns").resolv_conf(),
            "search default.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"
        );
    }

    #[test]
    fn an_absent_config_is_empty_and_a_foreign_one_is_refused() {
        assert_eq!(PodConfig::from_any("", &[]), Ok(PodConfig::default()));
        assert!(matches!(
            PodConfig::from_any("type.googleapis.com/google.protobuf.Empty", &[]),
            Err(PodConfigError::WrongType(_))
        ));
    }

    #[test]
    fn every_truncation_of_a_config_is_an_error_or_a_prefix_never_a_panic() {
        let pod = sample();
        for end in 0..pod.len() {
            let _ = PodConfig::from_any(POD_SANDBOX_CONFIG_TYPE, &pod[..end]);
        }
        let huge_length = [0x12, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(PodConfig::from_any(POD_SANDBOX_CONFIG_TYPE, &huge_length).is_err());
        let endless_varint = [0x80u8; 16];
        assert!(PodConfig::from_any(POD_SANDBOX_CONFIG_TYPE, &endless_varint).is_err());
        assert!(PodConfig::from_any(POD_SANDBOX_CONFIG_TYPE, &[0x0f]).is_err());
    }
}
