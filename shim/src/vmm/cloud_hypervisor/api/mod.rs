//! A typed client for Cloud Hypervisor's HTTP API on its `--api-socket` unix socket.
//!
//! Every call is bounded by a timeout (per client, `DEFAULT_TIMEOUT` unless set) and fails with
//! an `ApiError` that names the endpoint. `transport.rs` carries the requests; this file knows
//! the endpoints and their bodies.

mod error;
#[cfg(test)]
pub(super) mod fake;
#[cfg(test)]
mod tests;
mod transport;

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::types::{
    FsConfig, NetConfig, PciDeviceInfo, RestoreConfig, VmConfig, VmInfo, VmRemoveDevice,
    VmSnapshotConfig, VmmPingResponse, VsockConfig,
};
use error::quote;
pub use error::ApiError;
use transport::{Answer, Transport};

/// Long enough for `vm.create` and `vm.boot`, which allocate guest memory and set up devices
/// before they answer; short enough that a wedged VMM does not hold a containerd call for long.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// One VMM's API.
#[derive(Debug, Clone)]
pub struct ApiClient {
    transport: Transport,
}

impl ApiClient {
    pub fn new(socket: impl Into<PathBuf>) -> Result<Self, ApiError> {
        Self::with_timeout(socket, DEFAULT_TIMEOUT)
    }

    pub fn with_timeout(socket: impl Into<PathBuf>, timeout: Duration) -> Result<Self, ApiError> {
        Ok(Self {
            transport: Transport::new(socket.into(), timeout)?,
        })
    }

    /// The same VMM with another timeout per call (such as a stop's grace period).
    pub fn with_call_timeout(&self, timeout: Duration) -> Self {
        Self {
            transport: self.transport.with_timeout(timeout),
        }
    }

    pub fn socket(&self) -> &Path {
        self.transport.socket()
    }

    pub fn timeout(&self) -> Duration {
        self.transport.timeout()
    }

    /// `GET vmm.ping`: the VMM's version, pid and build features.
    pub async fn ping(&self) -> Result<VmmPingResponse, ApiError> {
        let endpoint = "vmm.ping";
        let answer = self.transport.call(Method::GET, endpoint, None).await?;
        parse_json(endpoint, &answer.body)
    }

    /// `PUT vm.create`: defines the VM; it does not run until `boot`.
    pub async fn create(&self, config: &VmConfig) -> Result<(), ApiError> {
        self.put_json("vm.create", config).await.map(drop)
    }

    /// `GET vm.info`.
    pub async fn info(&self) -> Result<VmInfo, ApiError> {
        let endpoint = "vm.info";
        let answer = self.transport.call(Method::GET, endpoint, None).await?;
        parse_json(endpoint, &answer.body)
    }

    /// `PUT vm.boot`.
    pub async fn boot(&self) -> Result<(), ApiError> {
        self.put_empty("vm.boot").await
    }

    /// `PUT vm.shutdown`: stops the guest; the VMM stays up.
    pub async fn shutdown(&self) -> Result<(), ApiError> {
        self.put_empty("vm.shutdown").await
    }

    /// `PUT vm.delete`: forgets the VM; the VMM stays up.
    pub async fn delete(&self) -> Result<(), ApiError> {
        self.put_empty("vm.delete").await
    }

    /// `PUT vmm.shutdown`: the VMM process exits.
    pub async fn vmm_shutdown(&self) -> Result<(), ApiError> {
        self.put_empty("vmm.shutdown").await
    }

    /// `PUT vm.pause`: stops the vCPUs; the VM can then be saved.
    pub async fn pause(&self) -> Result<(), ApiError> {
        self.put_empty("vm.pause").await
    }

    /// `PUT vm.resume`.
    pub async fn resume(&self) -> Result<(), ApiError> {
        self.put_empty("vm.resume").await
    }

    /// `PUT vm.snapshot`: saves the paused VM into `destination_url`'s directory.
    pub async fn snapshot(&self, destination_url: &str) -> Result<(), ApiError> {
        let body = VmSnapshotConfig {
            destination_url: destination_url.to_string(),
        };
        self.put_json("vm.snapshot", &body).await.map(drop)
    }

    /// `PUT vm.restore`: makes this VMM's VM from a saved one; it comes back paused.
    pub async fn restore(&self, config: &RestoreConfig) -> Result<(), ApiError> {
        self.put_json("vm.restore", config).await.map(drop)
    }

    /// `PUT vm.add-vsock`. `None` when the VM is not booted yet.
    pub async fn add_vsock(&self, vsock: &VsockConfig) -> Result<Option<PciDeviceInfo>, ApiError> {
        let endpoint = "vm.add-vsock";
        let answer = self.put_json(endpoint, vsock).await?;
        parse_device(endpoint, &answer)
    }

    /// `PUT vm.remove-device`: unplugs the device `id` (a NIC the pod lost).
    pub async fn remove_device(&self, id: &str) -> Result<(), ApiError> {
        let body = VmRemoveDevice { id: id.to_string() };
        self.put_json("vm.remove-device", &body).await.map(drop)
    }

    /// `PUT vm.add-fs`. `None` when the VM is not booted yet (the device is part of the boot).
    pub async fn add_fs(&self, fs: &FsConfig) -> Result<Option<PciDeviceInfo>, ApiError> {
        let endpoint = "vm.add-fs";
        let answer = self.put_json(endpoint, fs).await?;
        parse_device(endpoint, &answer)
    }

    /// `PUT vm.add-net`, with `fds` (tap queue fds, one per queue pair, still owned by the
    /// caller) handed over to the VMM. `None` when the VM is not booted yet.
    ///
    /// Cloud Hypervisor takes tap fds only as SCM_RIGHTS ancillary data on the API socket,
    /// received together with the bytes of the request they belong to (numbers in the
    /// body's `fds` are discarded), and only on `vm.add-net`: `vm.create` drops them. reqwest
    /// (hyper) writes requests with plain writes and has no way to attach ancillary data, so
    /// with fds this one call is a small hand-written HTTP/1.1 exchange: the whole request
    /// goes out in one `sendmsg` that carries the fds, as Cloud Hypervisor's own `ch-remote`
    /// does it.
    pub async fn add_net(
        &self,
        net: &NetConfig,
        fds: &[RawFd],
    ) -> Result<Option<PciDeviceInfo>, ApiError> {
        let endpoint = "vm.add-net";
        if fds.is_empty() {
            let answer = self.put_json(endpoint, net).await?;
            return parse_device(endpoint, &answer);
        }
        let body = encode(endpoint, net)?;
        let answer = self.transport.put_with_fds(endpoint, &body, fds).await?;
        parse_device(endpoint, &answer)
    }

    async fn put_empty(&self, endpoint: &'static str) -> Result<(), ApiError> {
        self.transport
            .call(Method::PUT, endpoint, None)
            .await
            .map(drop)
    }

    async fn put_json<T: Serialize>(
        &self,
        endpoint: &'static str,
        body: &T,
    ) -> Result<Answer, ApiError> {
        let body = encode(endpoint, body)?;
        self.transport.call(Method::PUT, endpoint, Some(body)).await
    }
}

fn encode<T: Serialize>(endpoint: &'static str, body: &T) -> Result<Vec<u8>, ApiError> {
    // Cannot fail for these types (no maps with non-string keys); still not a panic.
    serde_json::to_vec(body).map_err(|e| ApiError::Setup {
        message: format!("{endpoint}: cannot encode the request: {e}"),
    })
}

fn parse_json<T: DeserializeOwned>(endpoint: &'static str, body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadResponse {
        endpoint,
        message: format!("{e} in {}", quote(body)),
    })
}

/// 204 (cold-plugged into a VM not yet booted) has no body; 200 carries the new device.
fn parse_device(
    endpoint: &'static str,
    answer: &Answer,
) -> Result<Option<PciDeviceInfo>, ApiError> {
    if answer.status == 204 || answer.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    parse_json(endpoint, &answer.body).map(Some)
}
