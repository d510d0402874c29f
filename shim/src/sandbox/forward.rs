//! Port forwarding into the pod (ADR 11): each connection to the pod's loopback on the host
//! (`net::forward` redirects them onto one listener) is carried to the same port on the guest's
//! loopback through the agent's forwarder (vsock port `FORWARD_VSOCK_PORT`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hako_protocol::forward::{parse_answer, request, MAX_ANSWER};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::agent_client::{connect, read_line};
use crate::metrics::{families, ShimMetrics};
use crate::net::forward::{listen_in, original_port, redirect_loopback, remove_redirect};
use crate::net::NetError;

/// Connections carried at once; more wait for one to end.
const MAX_FORWARDS: usize = 64;
/// The pause after a failed accept (descriptors or memory exhausted).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long the agent may take to connect to the port in the pod.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The forwarder of one sandbox; it stops with the sandbox.
pub struct PortForward {
    netns: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

/// The listener and redirect being made in a namespace while the VM boots (each waits for a
/// thread that enters the namespace, so off the runtime). Dropped unused (the boot failed), it
/// removes the redirect again once it is made.
pub struct Preparing {
    netns: PathBuf,
    made: Option<tokio::task::JoinHandle<Result<std::net::TcpListener, NetError>>>,
}

impl Preparing {
    pub fn start(netns: &Path) -> Self {
        let path = netns.to_path_buf();
        let made = tokio::task::spawn_blocking(move || {
            let listener = listen_in(&path)?;
            redirect_loopback(&path)?;
            Ok(listener)
        });
        Self {
            netns: netns.to_path_buf(),
            made: Some(made),
        }
    }

    /// Serves the listener through the agent behind `agent_socket`.
    pub async fn serve(
        mut self,
        agent_socket: &Path,
        metrics: Arc<ShimMetrics>,
    ) -> Result<PortForward, String> {
        let Some(made) = self.made.take() else {
            return Err("already taken".to_string());
        };
        let listener = made
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        PortForward::start(&self.netns, listener, agent_socket, metrics).map_err(|e| e.to_string())
    }
}

impl Drop for Preparing {
    fn drop(&mut self) {
        if let Some(made) = self.made.take() {
            let netns = self.netns.clone();
            tokio::spawn(async move {
                if let Ok(Ok(_listener)) = made.await {
                    let _ = tokio::task::spawn_blocking(move || remove_redirect(&netns)).await;
                }
            });
        }
    }
}

impl PortForward {
    fn start(
        netns: &Path,
        listener: std::net::TcpListener,
        agent_socket: &Path,
        metrics: Arc<ShimMetrics>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::from_std(listener)?;
        let agent_socket = agent_socket.to_path_buf();
        let slots = Arc::new(Semaphore::new(MAX_FORWARDS));
        let task = tokio::spawn(async move {
            loop {
                let client = match listener.accept().await {
                    Ok((client, _)) => client,
                    Err(e) => {
                        // Out of descriptors or memory: a retry at once would fail the same
                        // way and spin; the pending connection waits in the backlog meanwhile.
                        log::warn!("port forward: accept: {e}");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (agent_socket, metrics) = (agent_socket.clone(), metrics.clone());
                tokio::spawn(async move {
                    let result = match carry(client, &agent_socket).await {
                        Ok(()) => "carried",
                        Err(e) => {
                            log::info!("port forward: {e}");
                            match e {
                                Ended::Refused(_) => "refused",
                                Ended::Failed(_) => "failed",
                            }
                        }
                    };
                    metrics.count(&families::PORT_FORWARD_CONNECTIONS_TOTAL, &[result]);
                    drop(slot);
                });
            }
        });
        Ok(Self {
            netns: netns.to_path_buf(),
            task,
        })
    }

    /// Stops serving; the redirect goes too when the namespace outlives the sandbox.
    pub fn stop(self, namespace_outlives: bool) {
        self.task.abort();
        if namespace_outlives {
            if let Err(e) = remove_redirect(&self.netns) {
                log::warn!("port forward: {e}");
            }
        }
    }
}

/// How a connection that was not carried ended: the guest refused it (nothing listens on the
/// port there), or something failed on the way.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

/// One connection: the port it was made to, the agent's answer, then bytes both ways.
async fn carry(mut client: TcpStream, agent_socket: &Path) -> Result<(), Ended> {
    let port = original_port(&client);
    let mut guest = connect(agent_socket, hako_protocol::FORWARD_VSOCK_PORT)
        .await
        .map_err(Ended::Failed)?;
    guest
        .write_all(request(port).as_bytes())
        .await
        .map_err(|e| Ended::Failed(format!("port {port}: {e}")))?;
    let line = tokio::time::timeout(ANSWER_TIMEOUT, read_line(&mut guest, MAX_ANSWER))
        .await
        .map_err(|_| {
            Ended::Failed(format!(
                "port {port}: no answer from the agent in {ANSWER_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| Ended::Failed(format!("port {port}: the agent's answer: {e}")))?;
    // The reason comes from the guest: quoted, never interpreted.
    parse_answer(&line).map_err(|reason| Ended::Refused(format!("port {port}: {reason:?}")))?;
    tokio::io::copy_bidirectional(&mut client, &mut guest)
        .await
        .map(drop)
        .map_err(|e| Ended::Failed(format!("port {port}: {e}")))
}
