//! The container's OCI seccomp profile, compiled to BPF in the guest and installed just before
//! exec (or before the user switch when no_new_privileges is off, while CAP_SYS_ADMIN is held).
//!
//! One filter returns the default action for every syscall no rule names and allows the rest;
//! one more filter per other action returns that action for its rules. The kernel runs them all
//! and takes the strictest answer, so a rule's action wins over the allow, and an errno rule
//! over the default errno (the later filter's data wins among equals).

use std::collections::BTreeMap;
use std::str::FromStr;

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::InitError;

const EPERM: u32 = libc::EPERM as u32;

fn err(what: impl std::fmt::Display) -> InitError {
    InitError::Seccomp(what.to_string())
}

fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<SeccompAction, InitError> {
    Ok(match a {
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActErrno => SeccompAction::Errno(errno.unwrap_or(EPERM)),
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActTrace => SeccompAction::Trace(errno.unwrap_or(EPERM)),
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        other => return Err(err(format!("action {other:?} is not supported"))),
    })
}

/// Rules per syscall number; an empty list means "always".
type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Adds a rule for a syscall. `None` (no conditions) replaces whatever was there: it matches
/// always. The caller never adds conditional rules after an unconditional one.
fn add(rules: &mut Rules, nr: i64, rule: Option<SeccompRule>) {
    match rule {
        None => {
            rules.insert(nr, Vec::new());
        }
        Some(rule) => rules.entry(nr).or_default().push(rule),
    }
}

/// Compiles the profile into the BPF programs to install, in order.
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<BpfProgram>, InitError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(err)?;
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let mut allowed: Rules = BTreeMap::new();
    let mut by_action: Vec<(SeccompAction, Rules)> = Vec::new();
    let mut unconditional: std::collections::BTreeSet<(usize, i64)> = Default::default();

    for syscall in profile.syscalls().as_deref().unwrap_or_default() {
        let act = action(syscall.action(), syscall.errno_ret())?;
        if act == default {
            continue;
        }
        let conditions = syscall
            .args()
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|a| {
                let op = match a.op() {
                    LinuxSeccompOperator::ScmpCmpNe => SeccompCmpOp::Ne,
                    LinuxSeccompOperator::ScmpCmpLt => SeccompCmpOp::Lt,
                    LinuxSeccompOperator::ScmpCmpLe => SeccompCmpOp::Le,
                    LinuxSeccompOperator::ScmpCmpEq => SeccompCmpOp::Eq,
                    LinuxSeccompOperator::ScmpCmpGe => SeccompCmpOp::Ge,
                    LinuxSeccompOperator::ScmpCmpGt => SeccompCmpOp::Gt,
                    LinuxSeccompOperator::ScmpCmpMaskedEq => SeccompCmpOp::MaskedEq(a.value()),
                };
                let value = match a.op() {
                    LinuxSeccompOperator::ScmpCmpMaskedEq => a.value_two().unwrap_or(0),
                    _ => a.value(),
                };
                let index = u8::try_from(a.index())
                    .map_err(|_| err(format!("argument index {}", a.index())))?;
                SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value).map_err(err)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let rule = if conditions.is_empty() {
            None
        } else {
            Some(SeccompRule::new(conditions).map_err(err)?)
        };
        let slot = match by_action.iter().position(|(a, _)| *a == act) {
            Some(i) => i,
            None => {
                by_action.push((act.clone(), BTreeMap::new()));
                by_action.len() - 1
            }
        };
        for name in syscall.names() {
            // Names of other architectures or newer kernels are skipped, as libseccomp does.
            let Ok(sysno) = syscalls::Sysno::from_str(name) else {
                continue;
            };
            let nr = sysno.id() as i64;
            for (target, key) in [(&mut allowed, usize::MAX), (&mut by_action[slot].1, slot)] {
                if unconditional.contains(&(key, nr)) {
                    continue;
                }
                match &rule {
                    None => {
                        unconditional.insert((key, nr));
                        add(target, nr, None);
                    }
                    Some(r) => add(target, nr, Some(r.clone())),
                }
            }
        }
    }

    let mut programs = Vec::new();
    if default != SeccompAction::Allow {
        let filter = SeccompFilter::new(allowed, default.clone(), SeccompAction::Allow, arch)
            .map_err(err)?;
        programs.push(BpfProgram::try_from(filter).map_err(err)?);
    }
    for (act, rules) in by_action {
        if act == SeccompAction::Allow || rules.is_empty() {
            continue;
        }
        let filter = SeccompFilter::new(rules, SeccompAction::Allow, act, arch).map_err(err)?;
        programs.push(BpfProgram::try_from(filter).map_err(err)?);
    }
    Ok(programs)
}

/// Installs the programs on this thread (and so on what it execs). Needs no_new_privs or
/// CAP_SYS_ADMIN.
pub fn install(programs: &[BpfProgram]) -> Result<(), InitError> {
    for program in programs {
        let prog = libc::sock_fprog {
            len: u16::try_from(program.len()).map_err(|_| err("filter too long"))?,
            filter: program.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: seccomp(SECCOMP_SET_MODE_FILTER) reads `prog` and the instructions it points
        // to, which outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &prog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(err(format!(
                "installing the filter: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).expect("valid profile")
    }

    #[test]
    fn an_allow_list_becomes_one_filter() {
        let p = profile(
            r#"{"defaultAction": "SCMP_ACT_ERRNO",
                "syscalls": [{"names": ["read", "write", "exit_group", "no_such_call"], "action": "SCMP_ACT_ALLOW"}]}"#,
        );
        assert_eq!(compile(&p).expect("compiles").len(), 1);
    }

    #[test]
    fn other_actions_get_a_filter_each() {
        let p = profile(
            r#"{"defaultAction": "SCMP_ACT_ERRNO",
                "syscalls": [
                  {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
                  {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                   "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
                  {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                   "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
                  {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
                  {"names": ["ptrace"], "action": "SCMP_ACT_KILL_PROCESS"}]}"#,
        );
        assert_eq!(compile(&p).expect("compiles").len(), 3);
    }

    #[test]
    fn a_block_list_needs_no_default_filter() {
        let p = profile(
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mount"], "action": "SCMP_ACT_ERRNO"}]}"#,
        );
        assert_eq!(compile(&p).expect("compiles").len(), 1);
    }

    #[test]
    fn notify_is_refused_clearly() {
        let p = profile(r#"{"defaultAction": "SCMP_ACT_NOTIFY"}"#);
        let e = compile(&p).expect_err("unsupported");
        assert!(e.to_string().contains("not supported"), "{e}");
    }
}
