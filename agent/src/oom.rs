//! OOM kills: each rise of a container's `memory.events` oom_kill count is reported once, to
//! the host's GetOomEvent long poll.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::cgroup::Cgroup;

pub struct OomMonitor {
    tx: mpsc::Sender<String>,
    seen: Mutex<HashMap<String, u64>>,
}

impl OomMonitor {
    pub fn new() -> (Arc<Self>, mpsc::Receiver<String>) {
        let (tx, rx) = mpsc::channel(64);
        let monitor = Arc::new(Self {
            tx,
            seen: Mutex::new(HashMap::new()),
        });
        (monitor, rx)
    }

    /// Reports an OOM kill if the container's count rose since the last check.
    pub async fn check(&self, container_id: &str, cgroup: &Cgroup) {
        let count = cgroup.oom_kills();
        let rose = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            let before = seen.insert(container_id.to_string(), count).unwrap_or(0);
            count > before
        };
        if rose {
            log::warn!("container {container_id} was OOM-killed");
            let _ = self.tx.send(container_id.to_string()).await;
        }
    }

    pub fn forget(&self, container_id: &str) {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(container_id);
    }
}
