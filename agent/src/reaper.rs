//! PID 1 inherits every orphan in the guest, so one reaper collects all exits with
//! `waitpid(-1)` and hands each status to whoever watches that pid.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// Exit statuses of pids nobody watched yet, kept so a watch that comes late still sees the
/// exit. Bounded: orphans that nobody will ever ask about must not grow it forever.
const UNCLAIMED_LIMIT: usize = 4096;

#[derive(Default)]
struct State {
    watchers: HashMap<i32, oneshot::Sender<u32>>,
    unclaimed: HashMap<i32, u32>,
    unclaimed_order: VecDeque<i32>,
}

#[derive(Default)]
pub struct Reaper {
    state: Mutex<State>,
}

impl Reaper {
    /// Starts reaping on SIGCHLD. Must be called before any child is spawned.
    pub fn start() -> std::io::Result<Arc<Self>> {
        let reaper = Arc::new(Self::default());
        let mut sigchld = signal(SignalKind::child())?;
        let task_reaper = reaper.clone();
        tokio::spawn(async move {
            loop {
                task_reaper.reap_all();
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(reaper)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain maps behind, still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Resolves with the exit status of `pid` (the exit code, or 128 + signal).
    pub fn watch(&self, pid: i32) -> oneshot::Receiver<u32> {
        let (tx, rx) = oneshot::channel();
        let mut state = self.lock();
        if let Some(status) = state.unclaimed.remove(&pid) {
            state.unclaimed_order.retain(|p| *p != pid);
            let _ = tx.send(status);
        } else {
            state.watchers.insert(pid, tx);
        }
        rx
    }

    fn reap_all(&self) {
        loop {
            let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid.as_raw(), code as u32),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid.as_raw(), 128 + sig as u32),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    log::warn!("waitpid: {e}");
                    return;
                }
            };
            self.deliver(pid, status);
        }
    }

    fn deliver(&self, pid: i32, status: u32) {
        let mut state = self.lock();
        match state.watchers.remove(&pid) {
            Some(tx) => {
                let _ = tx.send(status);
            }
            None => {
                if state.unclaimed_order.len() >= UNCLAIMED_LIMIT {
                    if let Some(old) = state.unclaimed_order.pop_front() {
                        state.unclaimed.remove(&old);
                    }
                }
                state.unclaimed.insert(pid, status);
                state.unclaimed_order.push_back(pid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn late_watch_sees_earlier_exit() {
        let reaper = Reaper::default();
        reaper.deliver(42, 7);
        assert_eq!(reaper.watch(42).await.ok(), Some(7));
    }

    #[tokio::test]
    async fn watch_before_exit_resolves_on_delivery() {
        let reaper = Reaper::default();
        let rx = reaper.watch(43);
        reaper.deliver(43, 137);
        assert_eq!(rx.await.ok(), Some(137));
    }

    #[test]
    fn unclaimed_statuses_are_bounded() {
        let reaper = Reaper::default();
        for pid in 0..(UNCLAIMED_LIMIT as i32 + 10) {
            reaper.deliver(pid, 0);
        }
        let state = reaper.lock();
        assert_eq!(state.unclaimed.len(), UNCLAIMED_LIMIT);
        assert!(!state.unclaimed.contains_key(&0));
    }
}
