//! The system calls hako-vsock keeps once QEMU is connected. The device parses queues a
//! hostile guest writes; whatever a bug there could be made to do is held to moving bytes
//! between sockets it already has, unix sockets it dials, and the guest memory QEMU sends.
//! Anything else kills the process (the pod's agent channel with it), never the host.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Allowed with any arguments.
const ALLOWED: &[libc::c_long] = &[
    // Moving bytes: guest packets to host sockets and back, eventfd kicks and calls, the log.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    // vhost-user messages carry descriptors (memory regions, kick and call eventfds).
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    // Host clients and the host listeners the guest dials.
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    // Guest memory regions as QEMU sends them, and the allocator.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_lseek,
    // Threads waiting on each other, and their end.
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    // A thread the vhost-user daemon spawned just before the filter starts here.
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_sched_getaffinity,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_gettid,
    libc::SYS_getpid,
];

fn arg_eq(index: u8, value: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )?])
}

fn filter(on_violation: SeccompAction) -> Result<BpfProgram, seccompiler::Error> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|nr| (*nr, Vec::new())).collect();
    // Unix sockets only: the guest dials host listeners by path, never a network.
    rules.insert(
        libc::SYS_socket,
        vec![arg_eq(0, libc::AF_UNIX as u64).map_err(seccompiler::Error::Backend)?],
    );
    // Naming a thread as it starts.
    rules.insert(
        libc::SYS_prctl,
        vec![arg_eq(0, libc::PR_SET_NAME as u64).map_err(seccompiler::Error::Backend)?],
    );
    // The one ioctl the standard library makes: setting a socket non-blocking.
    rules.insert(
        libc::SYS_ioctl,
        vec![arg_eq(1, libc::FIONBIO).map_err(seccompiler::Error::Backend)?],
    );
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(seccompiler::Error::Backend)?;
    let filter = SeccompFilter::new(rules, on_violation, SeccompAction::Allow, arch)
        .map_err(seccompiler::Error::Backend)?;
    BpfProgram::try_from(filter).map_err(seccompiler::Error::Backend)
}

/// Installs the filter on every thread of the process. With `log_only`, a call outside the
/// list is logged by the kernel's audit (`dmesg`: type=1326) instead of killing the process: for
/// finding what a new path needs (`HAKO_VSOCK_SECCOMP=log`).
pub fn confine(log_only: bool) -> Result<(), seccompiler::Error> {
    let action = if log_only {
        SeccompAction::Log
    } else {
        SeccompAction::KillProcess
    };
    let program = filter(action)?;
    seccompiler::apply_filter_all_threads(&program)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_for_this_architecture() {
        let program = filter(SeccompAction::KillProcess).expect("compiles");
        assert!(!program.is_empty());
    }

    /// In a child process: a call on the list works, and one outside it kills the process.
    #[test]
    fn a_confined_process_is_killed_by_a_call_outside_the_list() {
        let program = filter(SeccompAction::KillProcess).expect("compiles");
        let mut pipe = [0; 2];
        // SAFETY: a pipe for the child's one message.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        // SAFETY: fork in a test; the child makes only async-signal-safe calls and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            // SAFETY: the child never returns into the test harness.
            unsafe {
                if seccompiler::apply_filter_all_threads(&program).is_err() {
                    libc::_exit(3);
                }
                // write is on the list.
                libc::write(pipe[1], b"w".as_ptr().cast(), 1);
                // socketpair is not: the process dies here.
                let mut fds = [0; 2];
                libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr());
                libc::_exit(4);
            }
        }
        let mut status = 0;
        let mut byte = [0u8; 1];
        // SAFETY: waiting for our own child, reading its pipe.
        unsafe {
            libc::waitpid(pid, &mut status, 0);
            libc::close(pipe[1]);
            assert_eq!(libc::read(pipe[0], byte.as_mut_ptr().cast(), 1), 1);
            libc::close(pipe[0]);
        }
        assert_eq!(&byte, b"w");
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "status {status:#x}"
        );
    }
}
