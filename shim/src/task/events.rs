//! Events to containerd, behind a narrow trait so tests can record them instead.

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::protobuf::MessageDyn;

#[async_trait]
pub trait EventSender: Send + Sync {
    async fn send(&self, topic: &str, event: Box<dyn MessageDyn>);
}

/// Publishes to containerd's event service at TTRPC_ADDRESS.
pub struct ContainerdEvents {
    pub publisher: RemotePublisher,
    pub namespace: String,
}

#[async_trait]
impl EventSender for ContainerdEvents {
    async fn send(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let ctx = ttrpc::context::Context::default();
        if let Err(e) = self
            .publisher
            .publish(ctx, topic, &self.namespace, event)
            .await
        {
            log::warn!("publishing {topic}: {e}");
        }
    }
}
