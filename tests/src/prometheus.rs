//! A real Prometheus for the metrics tests: Debian's binaries, which scripts/setup.sh unpacks
//! under /opt/hako/prometheus/<version>/ (Debian 12's and unstable's), run on loopback with a
//! 1 s scrape of the node's `hako monitor`; and the monitor itself, run from the installed CLI.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{run_with_timeout, Run, SANDBOX_ROOT};

pub const PROMETHEUS_ROOT: &str = "/opt/hako/prometheus";

/// Every Prometheus under PROMETHEUS_ROOT, oldest first.
pub fn prometheus_versions() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(PROMETHEUS_ROOT)
        .unwrap_or_else(|e| panic!("{PROMETHEUS_ROOT}: {e}; run scripts/setup.sh"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("usr/bin/prometheus").is_file() && p.join("usr/bin/promtool").is_file())
        .collect();
    found.sort();
    assert!(
        !found.is_empty(),
        "no Prometheus under {PROMETHEUS_ROOT}; run scripts/setup.sh"
    );
    found
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// `GET path` on `127.0.0.1:port`: the status code and the body, within 10 s.
pub fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).map_err(|e| e.to_string())?;
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let (head, body) = reply.split_once("\r\n\r\n").ok_or("no head")?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no status")?;
    Ok((code, body.to_string()))
}

/// One HTTP GET on a unix socket, answered and closed by the server: (status line, body).
pub fn get_on_unix_socket(socket: &Path, path: &str) -> (String, String) {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: hako\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// A sandbox's snapshot (`GET /v1/snapshot` on its socket), parsed and validated as the
/// monitor takes it.
pub fn sandbox_snapshot(socket: &Path) -> Vec<hako_shim::metrics::snapshot::Sample> {
    let (status, body) = get_on_unix_socket(socket, "/v1/snapshot");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    hako_shim::metrics::Snapshot::parse(body.as_bytes())
        .unwrap()
        .samples
}

/// The value of a snapshot's counter or gauge `family` with exactly `labels`.
pub fn snapshot_number(
    samples: &[hako_shim::metrics::snapshot::Sample],
    family: &str,
    labels: &[&str],
) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.family == family && s.labels == labels)
        .and_then(|s| match s.value {
            hako_shim::metrics::snapshot::Value::Number(v) => Some(v),
            _ => None,
        })
}

/// A running sandbox's own metrics, from its socket, as Prometheus text.
pub fn sandbox_metrics(namespace: &str, sandbox: &str) -> String {
    let socket = Path::new(SANDBOX_ROOT)
        .join(namespace)
        .join(sandbox)
        .join("metrics.sock");
    let (status, text) = get_on_unix_socket(&socket, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{text}");
    text
}

/// The value of the one sample of `series` (its name and labels, exactly) in Prometheus text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `hako monitor` on a free loopback port, over the tests' sandbox root; killed on drop.
pub struct HakoMonitor {
    pub port: u16,
    child: Child,
}

impl HakoMonitor {
    pub fn start(timeout: &str) -> HakoMonitor {
        let port = free_port();
        let child = Command::new("/usr/local/bin/hako")
            .args(["monitor", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--sandbox-root", SANDBOX_ROOT, "--timeout", timeout])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let monitor = HakoMonitor { port, child };
        crate::eventually(
            "the monitor answers",
            Duration::from_secs(10),
            || match http_get(port, "/-/healthy") {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
        monitor
    }

    /// One scrape of the node: the text, and how long it took.
    pub fn scrape(&self) -> (String, Duration) {
        let started = Instant::now();
        let (code, body) = http_get(self.port, "/metrics").unwrap();
        assert_eq!(code, 200, "{body}");
        (body, started.elapsed())
    }
}

impl Drop for HakoMonitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Prometheus server scraping `target` every second, with its data in a temporary
/// directory; stopped and removed on drop.
pub struct Prometheus {
    pub version: String,
    pub port: u16,
    bin: PathBuf,
    dir: PathBuf,
    child: Child,
}

impl Prometheus {
    pub fn start(install: &Path, target_port: u16) -> Prometheus {
        let version = install.file_name().unwrap().to_string_lossy().into_owned();
        let dir = std::env::temp_dir().join(format!("hako-prometheus-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        // honor_labels: hako's own `namespace` and `pod` labels are the point.
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: hako\n    scrape_interval: 1s\n    scrape_timeout: 1s\n\
             \x20   honor_labels: true\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
        );
        fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let bin = install.join("usr/bin");
        let log = fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(bin.join("prometheus"))
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .current_dir(&dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let prometheus = Prometheus {
            version,
            port,
            bin,
            dir,
            child,
        };
        crate::eventually(
            "Prometheus is ready",
            Duration::from_secs(60),
            || match http_get(port, "/-/ready") {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}; log: {}", prometheus.log())),
            },
        );
        prometheus
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query: each series' labels and value.
    pub fn query(&self, expr: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let (code, body) = http_get(self.port, &format!("/api/v1/query?query={}", encode(expr)))
            .unwrap_or_else(|e| panic!("query {expr}: {e}"));
        assert_eq!(code, 200, "{expr}: {body}");
        let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(reply["status"], "success", "{body}");
        reply["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let labels = r["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect();
                let value = r["value"][1].as_str().unwrap().parse().unwrap();
                (labels, value)
            })
            .collect()
    }

    /// Polls `expr` (bounded) until it has a result, and returns it: Prometheus scrapes once
    /// a second and nothing announces a scrape.
    pub fn query_until_present(&self, expr: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let mut found = Vec::new();
        crate::eventually(expr, Duration::from_secs(30), || {
            found = self.query(expr);
            if found.is_empty() {
                Err(format!("no result; targets: {}", self.targets()))
            } else {
                Ok(())
            }
        });
        found
    }

    /// The scrape targets' state, as Prometheus reports it.
    pub fn targets(&self) -> String {
        http_get(self.port, "/api/v1/targets")
            .map(|(_, body)| body)
            .unwrap_or_else(|e| e)
    }

    /// `promtool check metrics` on `text`.
    pub fn check_metrics(&self, text: &str) -> Run {
        let mut cmd = Command::new(self.bin.join("promtool"));
        cmd.args(["check", "metrics"]);
        run_with_timeout(cmd, Some(text.as_bytes()), Duration::from_secs(30))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
