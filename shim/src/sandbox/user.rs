//! The unprivileged user a pod's VMM and vsock backend run as: a uid (and the same gid) of the
//! pod's own, from a range no one on the host uses, so an escape into QEMU owns nothing on the
//! host and cannot signal or trace another pod's VMM. A uid is claimed with a file under the
//! sandbox root (`.vmm-uids/<uid>`, made exclusively) and given back at teardown.

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::vmm::VmmUser;

const CLAIMS: &str = ".vmm-uids";

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("no free uid for the VMM in {base}..{end} (runtime.vmm_uid_base and vmm_uid_count in the hako configuration): {count} pods hold them", end = u64::from(*base) + u64::from(*count))]
    Exhausted { base: u32, count: u32 },
    #[error("claiming a uid for the VMM under {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A uid claimed for one sandbox.
#[derive(Debug)]
pub struct Claim {
    pub user: VmmUser,
    file: PathBuf,
}

/// Claims a uid from `base..base+count` for the sandbox `key` (namespace/id): the first free one
/// from a place the key picks, so pods rarely probe far.
pub fn claim(root: &Path, key: &str, base: u32, count: u32) -> Result<Claim, UserError> {
    let dir = root.join(CLAIMS);
    fs::create_dir_all(&dir).map_err(|source| UserError::Io {
        path: dir.clone(),
        source,
    })?;
    let start = {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        (hasher.finish() % u64::from(count.max(1))) as u32
    };
    for step in 0..count {
        let uid = base + (start + step) % count;
        let file = dir.join(uid.to_string());
        match OpenOptions::new().write(true).create_new(true).open(&file) {
            Ok(mut f) => {
                let _ = f.write_all(key.as_bytes());
                return Ok(Claim {
                    user: VmmUser {
                        uid,
                        gid: uid,
                        groups: kvm_group().into_iter().collect(),
                    },
                    file,
                });
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(UserError::Io { path: file, source }),
        }
    }
    Err(UserError::Exhausted { base, count })
}

impl Claim {
    /// Where the claim is, for the sandbox's record (`release_file` frees it after a crash).
    pub fn file(&self) -> &Path {
        &self.file
    }

    pub fn release(&self) {
        release_file(&self.file);
    }
}

/// Frees a claim by its file (from the sandbox's record).
pub fn release_file(file: &Path) {
    if file.parent().and_then(Path::file_name) == Some(CLAIMS.as_ref()) {
        let _ = fs::remove_file(file);
    }
}

/// The group that may use `/dev/kvm`, if there is one: a VMM on KVM needs it.
fn kvm_group() -> Option<u32> {
    fs::metadata("/dev/kvm")
        .ok()
        .map(|m| m.gid())
        .filter(|g| *g != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_pod_gets_a_uid_of_its_own_until_it_gives_it_back() {
        let root = std::env::temp_dir().join(format!("hako-uids-{}", std::process::id()));
        let a = claim(&root, "default/a", 5000, 2).expect("a");
        let b = claim(&root, "default/b", 5000, 2).expect("b");
        assert_ne!(a.user.uid, b.user.uid);
        assert!((5000..5002).contains(&a.user.uid) && a.user.gid == a.user.uid);
        let err = claim(&root, "default/c", 5000, 2).expect_err("all taken");
        assert!(err.to_string().contains("no free uid"), "{err}");
        a.release();
        let c = claim(&root, "default/c", 5000, 2).expect("a's uid is free again");
        assert_eq!(c.user.uid, a.user.uid);
        // Only claim files are removed through a record.
        release_file(&root.join("not-a-claim"));
        fs::remove_dir_all(&root).expect("cleanup");
    }
}
