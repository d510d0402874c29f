//! Which sysctls a container may set: the rules runc applies (a sysctl must belong to a
//! namespace the container has, and `kernel.hostname` is the OCI `hostname` field's), checked by
//! the shim when it reads the spec and again by the agent before it writes them.
//!
//! In hako the whole guest kernel is the pod's, but its containers share it: a sysctl outside
//! every namespace would reach the pod's other containers, so it is refused, as runc refuses it
//! for the host's sake.

use std::path::PathBuf;

/// The longest sysctl name and value accepted (the kernel's own are far shorter).
pub const MAX_NAME: usize = 256;
pub const MAX_VALUE: usize = 4096;

/// System V IPC sysctls, which belong to the IPC namespace.
const IPC_SYSCTLS: [&str; 8] = [
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
    "kernel.shmall",
    "kernel.shmmax",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SysctlError {
    #[error("sysctl {0:?}: not a sysctl name (letters, digits, '_', '-', separated by '.' or '/', at most {MAX_NAME} bytes)")]
    BadName(String),
    #[error("sysctl {0:?}: its value is longer than {MAX_VALUE} bytes or holds a NUL")]
    BadValue(String),
    #[error("sysctl {0:?} is not allowed: it conflicts with the OCI \"hostname\" field")]
    Hostname(String),
    #[error("sysctl {name:?} is not allowed in the host's {namespace} namespace: the container needs one of its own")]
    NeedsNamespace {
        name: String,
        namespace: &'static str,
    },
    #[error("sysctl {0:?} is not in a separate kernel namespace: it would reach every container of the pod")]
    NotNamespaced(String),
}

/// The namespaces a container has (its own, or its pod's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Namespaces {
    pub ipc: bool,
    pub uts: bool,
    pub net: bool,
}

/// Checks one sysctl for a container with `namespaces`, as runc does.
pub fn check(name: &str, value: &str, namespaces: Namespaces) -> Result<(), SysctlError> {
    let dotted = name.replace('/', ".");
    let plain = |part: &str| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    if name.len() > MAX_NAME || !dotted.split('.').all(plain) {
        return Err(SysctlError::BadName(name.to_string()));
    }
    if value.len() > MAX_VALUE || value.contains('\0') {
        return Err(SysctlError::BadValue(name.to_string()));
    }
    let needs = |has: bool, namespace: &'static str| {
        if has {
            Ok(())
        } else {
            Err(SysctlError::NeedsNamespace {
                name: name.to_string(),
                namespace,
            })
        }
    };
    if IPC_SYSCTLS.contains(&dotted.as_str()) || dotted.starts_with("fs.mqueue.") {
        return needs(namespaces.ipc, "IPC");
    }
    if dotted.starts_with("net.") {
        return needs(namespaces.net, "network");
    }
    match dotted.as_str() {
        "kernel.domainname" => needs(namespaces.uts, "UTS"),
        "kernel.hostname" => Err(SysctlError::Hostname(name.to_string())),
        _ => Err(SysctlError::NotNamespaced(name.to_string())),
    }
}

/// The file under `/proc/sys` that holds a checked sysctl.
pub fn proc_path(name: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(name.replace('.', "/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Namespaces = Namespaces {
        ipc: true,
        uts: true,
        net: true,
    };

    #[test]
    fn namespaced_sysctls_need_their_namespace() {
        for name in [
            "kernel.shm_rmid_forced",
            "fs.mqueue.msg_max",
            "net.ipv4.ip_forward",
            "net/ipv4/ping_group_range",
            "kernel.domainname",
        ] {
            assert_eq!(check(name, "1", ALL), Ok(()), "{name}");
        }
        let none = Namespaces::default();
        for (name, namespace) in [
            ("kernel.sem", "IPC"),
            ("fs.mqueue.msg_max", "IPC"),
            ("net.core.somaxconn", "network"),
            ("kernel.domainname", "UTS"),
        ] {
            assert_eq!(
                check(name, "1", none),
                Err(SysctlError::NeedsNamespace {
                    name: name.to_string(),
                    namespace
                })
            );
        }
    }

    #[test]
    fn the_rest_is_refused_as_runc_refuses_it() {
        assert_eq!(
            check("kernel.hostname", "x", ALL),
            Err(SysctlError::Hostname("kernel.hostname".into()))
        );
        for name in ["vm.overcommit_memory", "kernel.panic", "kernel.msgmax2"] {
            assert_eq!(
                check(name, "1", ALL),
                Err(SysctlError::NotNamespaced(name.into()))
            );
        }
        for name in [
            "",
            "net..x",
            "../../etc/passwd",
            "net.ipv4/../../x",
            "net.a b",
            ".net",
        ] {
            assert_eq!(
                check(name, "1", ALL),
                Err(SysctlError::BadName(name.into())),
                "{name:?}"
            );
        }
        assert!(check("net.core.somaxconn", "1\0", ALL).is_err());
        assert!(check("net.core.somaxconn", &"9".repeat(MAX_VALUE + 1), ALL).is_err());
        assert_eq!(
            proc_path("net.ipv4.ip_forward"),
            PathBuf::from("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            proc_path("net/ipv4/ip_forward"),
            PathBuf::from("/proc/sys/net/ipv4/ip_forward")
        );
    }
}
