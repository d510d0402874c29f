//! The life of one process as containerd sees it: created, running, stopped; its exit is
//! broadcast once to every waiter.

use std::time::SystemTime;

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub status: u32,
    pub at: SystemTime,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// The transition is not allowed from the current status.
    #[error("cannot {action} a {status:?} process")]
    Transition {
        action: &'static str,
        status: Status,
    },
}

#[derive(Debug)]
pub struct Process {
    status: Status,
    exit: watch::Sender<Option<Exit>>,
}

impl Default for Process {
    fn default() -> Self {
        Self::new()
    }
}

impl Process {
    pub fn new() -> Self {
        Self {
            status: Status::Created,
            exit: watch::channel(None).0,
        }
    }

    pub fn status(&self) -> Status {
        self.status
    }

    pub fn exit(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    pub fn exit_watch(&self) -> watch::Receiver<Option<Exit>> {
        self.exit.subscribe()
    }

    pub fn start(&mut self) -> Result<(), StateError> {
        match self.status {
            Status::Created => {
                self.status = Status::Running;
                Ok(())
            }
            status => Err(StateError::Transition {
                action: "start",
                status,
            }),
        }
    }

    /// Records the exit. Only the first exit counts.
    pub fn set_exited(&mut self, status: u32) -> Option<Exit> {
        if self.status == Status::Stopped {
            return None;
        }
        self.status = Status::Stopped;
        let exit = Exit {
            status,
            at: SystemTime::now(),
        };
        self.exit.send_replace(Some(exit));
        Some(exit)
    }

    /// A running process cannot be deleted; created and stopped ones can.
    pub fn check_delete(&self) -> Result<(), StateError> {
        match self.status {
            Status::Running => Err(StateError::Transition {
                action: "delete",
                status: Status::Running,
            }),
            _ => Ok(()),
        }
    }
}

/// Waits for the exit on a receiver taken from `Process::exit_watch`.
pub async fn wait_exit(mut rx: watch::Receiver<Option<Exit>>) -> Option<Exit> {
    loop {
        if let Some(exit) = *rx.borrow_and_update() {
            return Some(exit);
        }
        rx.changed().await.ok()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_running_stopped() {
        let mut p = Process::new();
        assert_eq!(p.status(), Status::Created);
        p.start().expect("start");
        assert_eq!(p.status(), Status::Running);
        assert!(p.check_delete().is_err());
        assert_eq!(p.set_exited(7).map(|e| e.status), Some(7));
        assert_eq!(p.status(), Status::Stopped);
        assert!(p.check_delete().is_ok());
    }

    #[test]
    fn cannot_start_twice_or_after_exit() {
        let mut p = Process::new();
        p.start().expect("start");
        assert!(p.start().is_err());
        p.set_exited(0);
        assert_eq!(
            p.start(),
            Err(StateError::Transition {
                action: "start",
                status: Status::Stopped
            })
        );
    }

    #[test]
    fn only_the_first_exit_counts() {
        let mut p = Process::new();
        p.set_exited(1);
        assert!(p.set_exited(2).is_none());
        assert_eq!(p.exit().map(|e| e.status), Some(1));
    }

    #[tokio::test]
    async fn waiters_see_the_exit() {
        let mut p = Process::new();
        let rx = p.exit_watch();
        let waiter = tokio::spawn(wait_exit(rx));
        p.start().expect("start");
        p.set_exited(137);
        let exit = waiter.await.expect("join").expect("exit");
        assert_eq!(exit.status, 137);
    }
}
