//! The device nodes a spec lists (`linux.devices`), made in the container as runc makes them:
//! mknod by type and major:minor, with the spec's mode and owner. The shim has already refused
//! every device the guest kernel does not number as the host does (shim sandbox/devices.rs).
//! A privileged container (its device rules allow every device) also gets every device node of
//! the guest's own /dev, as runc gives a privileged container the host's.

use std::fs;
use std::os::unix::fs::{chown, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType};

use super::error::{io, sys, InitError};
use crate::mounts::resolve_in_root;

/// runc's mode for a device the spec gives none.
const DEFAULT_MODE: u32 = 0o666;
/// The guest's /dev is the agent's own devtmpfs: a few hundred nodes at most. Bounded all the
/// same, as is its depth.
const MAX_GUEST_NODES: usize = 4096;
const MAX_DEPTH: usize = 3;
/// What a container has of its own, or must not get from the guest's /dev: its own devpts,
/// shm and mqueue, and the console, which is the container's terminal when it has one.
const NOT_FROM_GUEST: [&str; 5] = ["pts", "shm", "mqueue", "console", "hugepages"];

/// Makes each of the spec's devices at its path in the container.
pub fn create(root: &Path, devices: &[LinuxDevice]) -> Result<(), InitError> {
    for device in devices {
        let shown = device.path().display().to_string();
        let path = resolve_in_root(root, &shown)?;
        let kind = match device.typ() {
            LinuxDeviceType::B => SFlag::S_IFBLK,
            LinuxDeviceType::P => SFlag::S_IFIFO,
            _ => SFlag::S_IFCHR,
        };
        let (major, minor) = (
            number(device.major(), &shown)?,
            number(device.minor(), &shown)?,
        );
        let mode = device.file_mode().unwrap_or(DEFAULT_MODE) & 0o7777;
        let uid = device.uid().unwrap_or(0);
        let gid = device.gid().unwrap_or(0);
        make_node(&path, kind, makedev(major, minor), mode, uid, gid, &shown)?;
    }
    Ok(())
}

/// A device number from the spec: runc refuses negative ones too.
fn number(n: i64, shown: &str) -> Result<u64, InitError> {
    u64::try_from(n)
        .ok()
        .filter(|n| *n <= u64::from(u32::MAX))
        .ok_or_else(|| InitError::Device(format!("{shown}: device number {n} is out of range")))
}

fn make_node(
    path: &Path,
    kind: SFlag,
    dev: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    shown: &str,
) -> Result<(), InitError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io(format!("mkdir {}", parent.display())))?;
    }
    match mknod(path, kind, Mode::from_bits_truncate(mode), dev) {
        // A node the container has already (the usual ones are bound in first) stays, as
        // with runc.
        Err(nix::errno::Errno::EEXIST) => return Ok(()),
        other => other.map_err(sys(format!("making device {shown}")))?,
    }
    // mknod's mode went through the umask.
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(io(format!("setting the mode of {shown}")))?;
    chown(path, Some(uid), Some(gid)).map_err(io(format!("setting the owner of {shown}")))
}

/// Gives the container's /dev every device node of the guest's /dev it does not have yet.
/// Runs before `pivot_root`, while the guest's /dev is still `/dev`. Each target is resolved
/// inside the root, as the spec's are.
pub fn add_guest_devices(root: &Path) -> Result<(), InitError> {
    let mut made = 0;
    copy_nodes(root, Path::new(""), &mut made)
}

/// Copies the nodes of the guest's `/dev/<rel>` into the container's.
fn copy_nodes(root: &Path, rel: &Path, made: &mut usize) -> Result<(), InitError> {
    let from = Path::new("/dev").join(rel);
    let entries = fs::read_dir(&from).map_err(io(format!("reading {}", from.display())))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if rel.as_os_str().is_empty() && NOT_FROM_GUEST.iter().any(|n| name == *n) {
            continue;
        }
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        let rel = rel.join(&name);
        let kind = meta.file_type();
        if kind.is_dir() && rel.components().count() < MAX_DEPTH {
            copy_nodes(root, &rel, made)?;
            continue;
        }
        let sflag = if kind.is_char_device() {
            SFlag::S_IFCHR
        } else if kind.is_block_device() {
            SFlag::S_IFBLK
        } else {
            continue;
        };
        let shown = format!("/dev/{}", rel.display());
        let target = resolve_in_root(root, &shown)?;
        if target.symlink_metadata().is_ok() {
            continue;
        }
        *made += 1;
        if *made > MAX_GUEST_NODES {
            return Err(InitError::Device(format!(
                "the guest's /dev has more than {MAX_GUEST_NODES} device nodes"
            )));
        }
        make_node(
            &target,
            sflag,
            meta.rdev(),
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid(),
            &shown,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_device_is_made_inside_the_root_with_its_mode_and_owner() {
        let dir = std::env::temp_dir().join(format!("hako-devnodes-test-{}", std::process::id()));
        let root = dir.join("root");
        let outside = dir.join("outside");
        fs::create_dir_all(root.join("dev")).expect("mkdir");
        fs::create_dir_all(&outside).expect("mkdir");
        // An image's link pointing out of the root is followed inside it.
        symlink(&outside, root.join("dev/net")).expect("symlink");
        let devices: Vec<LinuxDevice> = serde_json::from_str(
            r#"[{"path": "/dev/h4null", "type": "c", "major": 1, "minor": 3, "fileMode": 400, "uid": 1000, "gid": 5},
                {"path": "/dev/net/tun", "type": "c", "major": 10, "minor": 200}]"#,
        )
        .expect("devices");
        create(&root, &devices).expect("made");
        let null = fs::metadata(root.join("dev/h4null")).expect("made");
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), makedev(1, 3));
        assert_eq!(
            (null.mode() & 0o7777, null.uid(), null.gid()),
            (0o620, 1000, 5)
        );
        let outside_resolved = root.join(outside.strip_prefix("/").expect("absolute"));
        assert!(fs::metadata(outside_resolved.join("tun"))
            .is_ok_and(|m| m.file_type().is_char_device()));
        assert!(
            fs::read_dir(&outside).expect("read").next().is_none(),
            "nothing made outside the root"
        );
        // Made again (the usual nodes are bound in first): left as it is.
        create(&root, &devices).expect("kept");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn negative_device_numbers_are_refused() {
        let devices: Vec<LinuxDevice> =
            serde_json::from_str(r#"[{"path": "/dev/x", "type": "c", "major": -1, "minor": 3}]"#)
                .expect("devices");
        let err = create(Path::new("/nonexistent"), &devices).expect_err("negative");
        assert!(err.to_string().contains("out of range"), "{err}");
    }
}
