//! The device nodes a container asks for (`linux.devices`: Docker's `--device`, CRI's devices,
//! and every host device under `--privileged`). A node is a major:minor number that the kernel
//! it is opened on resolves, so in the guest it names the guest's device, never the host's.
//! The devices the kernel itself numbers the same everywhere (null, zero, full, random,
//! urandom, tty, ptmx, net/tun, fuse) are created in the container as runc creates them. Any
//! other would open whatever the guest has at that number, or nothing: it is refused, naming
//! it. A privileged container (its device rules allow every device) gets the guest's own
//! devices instead (the agent adds them), and the host's, which Docker and the CRI list for it
//! unasked, are left out without an error.

use oci_spec::runtime::{LinuxDevice, LinuxDeviceCgroup, LinuxDeviceType};

/// (type, major, minor, name): what every Linux kernel has at these numbers.
const PORTABLE: [(LinuxDeviceType, i64, i64, &str); 9] = [
    (LinuxDeviceType::C, 1, 3, "null"),
    (LinuxDeviceType::C, 1, 5, "zero"),
    (LinuxDeviceType::C, 1, 7, "full"),
    (LinuxDeviceType::C, 1, 8, "random"),
    (LinuxDeviceType::C, 1, 9, "urandom"),
    (LinuxDeviceType::C, 5, 0, "tty"),
    (LinuxDeviceType::C, 5, 2, "ptmx"),
    (LinuxDeviceType::C, 10, 200, "net/tun"),
    (LinuxDeviceType::C, 10, 229, "fuse"),
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("device {path} ({kind} {major}:{minor}) cannot be given to a container in a VM: the guest kernel would open its own device at that number, not the host's (a host disk or GPU needs passthrough, which hako does not do); hako gives the devices every kernel has: {portable}")]
    NotInGuest {
        path: String,
        kind: &'static str,
        major: i64,
        minor: i64,
        portable: String,
    },
}

/// The devices the guest creates in the container; an error for one it cannot give.
pub fn for_guest(
    devices: &[LinuxDevice],
    rules: &[LinuxDeviceCgroup],
) -> Result<Vec<LinuxDevice>, DeviceError> {
    let privileged = allows_every_device(rules);
    let mut kept = Vec::new();
    for device in devices {
        let portable = PORTABLE.iter().any(|(kind, major, minor, _)| {
            device.typ() == *kind && device.major() == *major && device.minor() == *minor
        });
        if portable {
            kept.push(device.clone());
        } else if !privileged {
            return Err(DeviceError::NotInGuest {
                path: device.path().display().to_string(),
                kind: if device.typ() == LinuxDeviceType::B {
                    "block"
                } else {
                    "char"
                },
                major: device.major(),
                minor: device.minor(),
                portable: PORTABLE
                    .iter()
                    .map(|(.., name)| format!("/dev/{name}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    Ok(kept)
}

/// Whether the rules, in order, end by allowing every device (Docker's and the CRI's
/// privileged container): a last rule for all devices that allows all access, with no deny
/// after it. The agent's own emulation of the rules (agent devices.rs) agrees whenever this
/// says yes.
pub fn allows_every_device(rules: &[LinuxDeviceCgroup]) -> bool {
    let mut all = false;
    for rule in rules {
        let every = matches!(rule.typ(), None | Some(LinuxDeviceType::A))
            && rule.major().is_none()
            && rule.minor().is_none();
        let access = rule.access().as_deref().unwrap_or("rwm");
        let full = ['r', 'w', 'm'].iter().all(|c| access.contains(*c));
        if !rule.allow() {
            all = false;
        } else if every && full {
            all = true;
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices(json: &str) -> Vec<LinuxDevice> {
        serde_json::from_str(json).expect("valid devices")
    }

    fn rules(json: &str) -> Vec<LinuxDeviceCgroup> {
        serde_json::from_str(json).expect("valid rules")
    }

    const FUSE_AND_DISK: &str = r#"[
        {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 438},
        {"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}
    ]"#;
    const PRIVILEGED: &str =
        r#"[{"allow": false, "access": "rwm"}, {"allow": true, "access": "rwm"}]"#;

    #[test]
    fn the_kernels_own_devices_are_kept_under_any_name() {
        let asked = devices(
            r#"[{"path": "/dev/h4null", "type": "c", "major": 1, "minor": 3},
                {"path": "/dev/net/tun", "type": "c", "major": 10, "minor": 200}]"#,
        );
        assert_eq!(for_guest(&asked, &[]), Ok(asked.clone()));
    }

    #[test]
    fn a_host_device_is_refused_naming_it() {
        let err = for_guest(&devices(FUSE_AND_DISK), &[]).expect_err("a host disk");
        let text = err.to_string();
        assert!(
            text.contains("/dev/sda") && text.contains("block 8:0") && text.contains("/dev/fuse"),
            "{text}"
        );
        // A character device the guest numbers differently: the host's serial port.
        let serial = devices(r#"[{"path": "/dev/ttyS0", "type": "c", "major": 4, "minor": 64}]"#);
        assert!(for_guest(&serial, &[]).is_err());
    }

    #[test]
    fn a_privileged_container_leaves_the_hosts_devices_out() {
        let kept = for_guest(&devices(FUSE_AND_DISK), &rules(PRIVILEGED)).expect("privileged");
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].path().display().to_string(), "/dev/fuse");
    }

    #[test]
    fn only_an_allow_all_rule_at_the_end_is_privileged() {
        assert!(allows_every_device(&rules(PRIVILEGED)));
        assert!(allows_every_device(&rules(
            r#"[{"allow": true, "type": "a"}]"#
        )));
        for not in [
            r#"[]"#,
            r#"[{"allow": false, "access": "rwm"}]"#,
            r#"[{"allow": true, "access": "rw"}]"#,
            r#"[{"allow": true, "type": "c", "access": "rwm"}]"#,
            r#"[{"allow": true, "major": 1, "access": "rwm"}]"#,
            r#"[{"allow": true, "access": "rwm"}, {"allow": false, "type": "c", "major": 1, "minor": 3, "access": "w"}]"#,
        ] {
            assert!(!allows_every_device(&rules(not)), "{not}");
        }
    }
}
