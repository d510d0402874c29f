//! Prometheus metrics of one sandbox (issue 26, docs/metrics.md): the table of families
//! (`families`), the shim's in-process instruments (`registry`), the host's processes read
//! from `/proc` on request (`host`), the typed snapshot that crosses the socket (`snapshot`),
//! its text exposition (`text`) and the socket itself (`server`). Nothing runs while nobody
//! asks: the instruments are updated inline and the rest is read per request.

pub mod families;
pub mod guest;
pub mod host;
pub mod registry;
pub mod server;
pub mod snapshot;
pub mod text;

use std::path::PathBuf;

pub use guest::{AppContainers, ContainerList, GuestSource};
pub use host::HostReader;
pub use registry::{RpcFailure, ShimMetrics, VmInfo};
pub use server::{MetricsServer, Source};
pub use snapshot::Snapshot;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[cfg(test)]
pub(crate) mod test_dir {
    use std::path::{Path, PathBuf};

    /// A fresh directory under the system's temp dir, removed on drop.
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("hako-metrics-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temp dir");
            Self(dir)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
