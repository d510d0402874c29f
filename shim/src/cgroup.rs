//! The pod's cgroup on the host. The VMM, the vsock backend and virtiofsd are the pod, as far
//! as the host can see: they run in the cgroup the spec names for the pod's first container
//! (`linux.cgroupsPath`; with Kubernetes a child of the pod's cgroup, whose limits include the
//! RuntimeClass overhead), as Kata's `sandbox_cgroup_only` does. hako sets no limits of its
//! own there: the containers' limits apply inside the guest; the host's cgroup gives the
//! parent's limits and the accounting.
//!
//! Both cgroup v2 and v1 (every mounted hierarchy, as runc does) are handled. A parent hako had
//! to make (`/default` for ctr, `/docker` for Docker) is listed under the sandbox root, so that
//! whichever sandbox is last to leave it removes it; parents made by others (kubelet's pod
//! cgroups) are never removed.

use std::fs;
use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Made and removed by hako, listed here: `<sandbox_root>/.cgroups/<hash>`.
const REGISTRY: &str = ".cgroups";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The spec's cgroups path is not one hako takes.
    #[error("cgroups path {0:?} must be absolute (or systemd's slice:prefix:name) without '..'")]
    BadPath(String),
    /// A cgroup could not be made.
    #[error("cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A v1 cpuset cgroup that no process can join: it has no CPUs or memory nodes, and none
    /// could be given to it.
    #[error("cgroup {dir} cannot be joined: {file} is empty and cannot be filled from its parent ({reason})")]
    Unjoinable {
        dir: PathBuf,
        file: &'static str,
        reason: String,
    },
}

/// The pod's cgroup: one directory per hierarchy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodCgroup {
    pub dirs: Vec<PathBuf>,
}

/// The relative cgroup path for a spec's `cgroupsPath`: cgroupfs paths as they are, systemd's
/// `slice:prefix:name` as systemd lays it out (`a-b.slice` is `a.slice/a-b.slice`).
pub fn relative_path(cgroups_path: &str) -> Result<PathBuf, CgroupError> {
    let bad = || CgroupError::BadPath(cgroups_path.to_string());
    let path = match cgroups_path.split(':').collect::<Vec<_>>().as_slice() {
        [slice, prefix, name] if !cgroups_path.starts_with('/') => {
            let mut path = PathBuf::new();
            if *slice != "-.slice" && !slice.is_empty() {
                let stem = slice.strip_suffix(".slice").ok_or_else(bad)?;
                let mut sofar = String::new();
                for part in stem.split('-') {
                    if part.is_empty() {
                        return Err(bad());
                    }
                    if !sofar.is_empty() {
                        sofar.push('-');
                    }
                    sofar.push_str(part);
                    path.push(format!("{sofar}.slice"));
                }
            }
            let leaf = if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}-{name}.scope")
            };
            path.push(leaf);
            path
        }
        _ if cgroups_path.starts_with('/') => PathBuf::from(&cgroups_path[1..]),
        _ => return Err(bad()),
    };
    let plain = path
        .components()
        .all(|c| matches!(c, Component::Normal(n) if !n.is_empty()));
    if path.as_os_str().is_empty() || !plain {
        return Err(bad());
    }
    Ok(path)
}

/// The mounted cgroup hierarchies: every v1 hierarchy and the v2 one.
fn hierarchies() -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fstype = after.split_whitespace().next()?;
            (fstype == "cgroup" || fstype == "cgroup2")
                .then(|| before.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

impl PodCgroup {
    /// Makes the cgroup `cgroups_path` in every hierarchy. `registry_root` is the sandbox root,
    /// where the parents hako makes are listed. On error nothing is left.
    pub fn create(cgroups_path: &str, registry_root: &Path) -> Result<PodCgroup, CgroupError> {
        let relative = relative_path(cgroups_path)?;
        let mut cgroup = PodCgroup::default();
        for hierarchy in hierarchies() {
            let dir = hierarchy.join(&relative);
            if let Err(e) = make(&HostTree, &hierarchy, &relative, registry_root) {
                cgroup.remove(registry_root);
                return Err(e);
            }
            cgroup.dirs.push(dir);
        }
        Ok(cgroup)
    }

    /// The `cgroup.procs` files a process writes to join the cgroup.
    pub fn procs(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Whether a process can join every directory of the cgroup now: checked before the
    /// helpers are spawned, so that a failure names the cgroup and the file rather than the
    /// kernel's bare ENOSPC from the child.
    pub fn check_joinable(&self) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            for file in CPUSET_FILES {
                if HostTree
                    .read(&dir.join(file))
                    .is_ok_and(|v| v.trim().is_empty())
                {
                    return Err(CgroupError::Unjoinable {
                        dir: dir.clone(),
                        file,
                        reason: "it was emptied after the pod's cgroup was made".to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Removes the cgroup once its processes are gone, and the parents hako made that are empty
    /// then. The helpers have been stopped already, but an exiting process stays in its cgroup
    /// until its parent has reaped it (virtiofsd's sandboxed child is reaped by init), and a
    /// v1 cgroup gives no event for that: look again every few milliseconds, up to `patience`,
    /// then kill what is left (it is the pod's) and remove what can be removed.
    pub async fn remove_when_empty(&self, registry_root: &Path, patience: Duration) {
        let started = std::time::Instant::now();
        let mut killed = false;
        loop {
            let left: Vec<i32> = self.procs().iter().flat_map(|p| pids(p)).collect();
            if left.is_empty() {
                break;
            }
            if started.elapsed() >= patience {
                if killed {
                    break;
                }
                log::warn!("pod cgroup still holds {left:?} {patience:?} after its helpers stopped; killing them");
                for pid in left {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                killed = true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.remove(registry_root);
    }

    /// Removes the cgroup, and the parents hako made that are empty now. Its processes must
    /// have exited. Best effort.
    pub fn remove(&self, registry_root: &Path) {
        for dir in &self.dirs {
            if let Err(e) = fs::remove_dir(dir) {
                if e.kind() != ErrorKind::NotFound {
                    log::warn!("removing cgroup {}: {e}", dir.display());
                }
                continue;
            }
            for parent in dir.ancestors().skip(1) {
                // Under the registry's lock: between this rmdir and the unlisting, another
                // sandbox could make the parent again and list it, and lose its entry.
                let _lock = RegistryLock::take(registry_root);
                let entry = registry_entry(registry_root, parent);
                if !entry.exists() || fs::remove_dir(parent).is_err() {
                    break;
                }
                let _ = fs::remove_file(entry);
            }
        }
    }
}

fn pids(procs: &Path) -> Vec<i32> {
    fs::read_to_string(procs)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The file operations `make` needs: the host's cgroup filesystems, or a stand-in in tests.
trait Tree {
    fn create_dir(&self, dir: &Path) -> std::io::Result<()>;
    fn read(&self, file: &Path) -> std::io::Result<String>;
    fn write(&self, file: &Path, value: &str) -> std::io::Result<()>;
}

struct HostTree;

impl Tree for HostTree {
    fn create_dir(&self, dir: &Path) -> std::io::Result<()> {
        fs::create_dir(dir)
    }
    fn read(&self, file: &Path) -> std::io::Result<String> {
        fs::read_to_string(file)
    }
    fn write(&self, file: &Path, value: &str) -> std::io::Result<()> {
        fs::write(file, value)
    }
}

/// Makes `relative` under `hierarchy`, listing the parents it makes. A parent another sandbox
/// removes meanwhile is made again. Every level is made joinable on the way down, whoever made
/// it: another shim that made a parent a moment ago may not have filled it yet.
fn make(
    tree: &dyn Tree,
    hierarchy: &Path,
    relative: &Path,
    registry_root: &Path,
) -> Result<(), CgroupError> {
    let mut last = None;
    for _ in 0..3 {
        let mut dir = hierarchy.to_path_buf();
        let mut result = Ok(());
        for part in relative.components() {
            dir.push(part);
            let leaf = dir.as_path() == hierarchy.join(relative);
            // Every level is made, listed (a parent) and filled under the registry's lock, as
            // a parent is removed and unlisted (see `remove`): a level seen by another shim is
            // either gone or whole, never made but not filled yet.
            let lock = RegistryLock::take(registry_root);
            let made = tree.create_dir(&dir);
            if made.is_ok() && !leaf {
                list(registry_root, &dir);
            }
            let step = match made {
                Ok(()) => fill_cpuset(tree, &dir),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => fill_cpuset(tree, &dir),
                Err(source) => Err(CgroupError::Io {
                    path: dir.clone(),
                    source,
                }),
            };
            drop(lock);
            if let Err(e) = step {
                result = Err(e);
                break;
            }
        }
        match result {
            Ok(()) => return Ok(()),
            // A parent removed under us (NotFound) is made again; anything else is final.
            Err(CgroupError::Io { ref source, .. }) if source.kind() == ErrorKind::NotFound => {
                last = result.err()
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or(CgroupError::BadPath(relative.display().to_string())))
}

/// A v1 cpuset cgroup's own CPUs and memory nodes: empty when it is made.
const CPUSET_FILES: [&str; 2] = ["cpuset.cpus", "cpuset.mems"];

/// A new v1 cpuset cgroup starts with no CPUs or memory nodes, and no process may join it
/// (ENOSPC) until it has some: it gets its parent's, which `make` has filled already. Other
/// hierarchies have no such files; a directory that is gone already is `make`'s to redo.
fn fill_cpuset(tree: &dyn Tree, dir: &Path) -> Result<(), CgroupError> {
    for file in CPUSET_FILES {
        let own = dir.join(file);
        let Ok(value) = tree.read(&own) else {
            continue;
        };
        if !value.trim().is_empty() {
            continue;
        }
        let unjoinable = |reason: String| CgroupError::Unjoinable {
            dir: dir.to_path_buf(),
            file,
            reason,
        };
        let parent = dir
            .parent()
            .ok_or_else(|| unjoinable("no parent".to_string()))?;
        let inherited = tree
            .read(&parent.join(file))
            .map_err(|e| unjoinable(format!("reading the parent's: {e}")))?;
        if inherited.trim().is_empty() {
            return Err(unjoinable("the parent's is empty too".to_string()));
        }
        match tree.write(&own, inherited.trim()) {
            Ok(()) => {}
            // Removed meanwhile by a sandbox leaving its parent: `make` makes it again.
            Err(source) if source.kind() == ErrorKind::NotFound => {
                return Err(CgroupError::Io { path: own, source })
            }
            Err(e) => return Err(unjoinable(format!("writing {}: {e}", inherited.trim()))),
        }
    }
    Ok(())
}

/// An exclusive lock over the registry of parents (`flock` on `<registry>/.lock`), released on
/// drop; held for one make-and-list or remove-and-unlist. Without the file (no sandbox root
/// yet, a read-only root) it is a no-op: nothing is listed then either.
struct RegistryLock {
    /// Held open for the lock's life: closing it releases the lock.
    _file: Option<fs::File>,
}

impl RegistryLock {
    fn take(registry_root: &Path) -> RegistryLock {
        use std::os::fd::AsRawFd;
        let dir = registry_root.join(REGISTRY);
        let _ = fs::create_dir_all(&dir);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(".lock"))
            .ok();
        if let Some(f) = &file {
            // SAFETY: flock on a descriptor we own; it is released when the file is closed.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        }
        RegistryLock { _file: file }
    }
}

fn registry_entry(registry_root: &Path, dir: &Path) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut hasher);
    registry_root
        .join(REGISTRY)
        .join(format!("{:016x}", hasher.finish()))
}

fn list(registry_root: &Path, dir: &Path) {
    let entry = registry_entry(registry_root, dir);
    if let Some(parent) = entry.parent() {
        let _ = fs::create_dir_all(parent);
    }
    let _ = fs::write(entry, dir.as_os_str().as_encoded_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_cgroupfs_or_systemd_and_stay_inside() {
        assert_eq!(
            relative_path("/default/t1").ok(),
            Some(PathBuf::from("default/t1"))
        );
        assert_eq!(
            relative_path("/kubepods/burstable/pod12/abc").ok(),
            Some(PathBuf::from("kubepods/burstable/pod12/abc"))
        );
        assert_eq!(
            relative_path("system.slice:docker:abc").ok(),
            Some(PathBuf::from("system.slice/docker-abc.scope"))
        );
        assert_eq!(
            relative_path("kubepods-besteffort-pod1.slice:cri-containerd:x").ok(),
            Some(PathBuf::from(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-x.scope"
            ))
        );
        for bad in [
            "",
            "/",
            "relative/x",
            "/a/../../etc",
            "/a//b/..",
            "a-.slice:p:n",
            "x:y",
        ] {
            assert!(relative_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_pod_cgroup_is_made_in_every_hierarchy_and_removed_with_its_parents() {
        // Never a silent pass: hako's tests run as root (scripts/test.sh).
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: run the unit tests as root, as scripts/test.sh does"
        );
        let registry = std::env::temp_dir().join(format!("hako-cg-{}", std::process::id()));
        let path = format!("/hako-test-{}/pod", std::process::id());
        let cgroup = PodCgroup::create(&path, &registry).expect("create");
        assert!(!cgroup.dirs.is_empty());
        for dir in &cgroup.dirs {
            assert!(dir.is_dir(), "{}", dir.display());
        }
        // A second pod under the same parent keeps it while it lives.
        let other = PodCgroup::create(
            &format!("/hako-test-{}/other", std::process::id()),
            &registry,
        )
        .expect("create");
        cgroup.remove(&registry);
        for dir in &cgroup.dirs {
            assert!(!dir.exists() && dir.parent().is_some_and(Path::is_dir));
        }
        other.remove(&registry);
        for dir in &other.dirs {
            assert!(!dir.exists());
            assert!(
                !dir.parent().is_some_and(Path::exists),
                "the parent hako made goes too"
            );
        }
        let _ = fs::remove_dir_all(&registry);
    }

    /// A v1 cpuset tree in memory: a new directory has empty `cpuset.cpus` and `cpuset.mems`,
    /// as the kernel makes it. The first write into a shared parent (`default`) is held until
    /// every other thread has finished `make`: the widest gap between a shim making the parent
    /// and filling it.
    struct FakeCpuset {
        files: std::sync::Mutex<std::collections::HashMap<PathBuf, String>>,
        held: std::sync::Mutex<bool>,
        done: (std::sync::Mutex<usize>, std::sync::Condvar),
        others: usize,
    }

    impl FakeCpuset {
        fn new(root: &Path, others: usize) -> FakeCpuset {
            let files = [("cpuset.cpus", "0-1"), ("cpuset.mems", "0")]
                .into_iter()
                .map(|(f, v)| (root.join(f), v.to_string()))
                .collect();
            FakeCpuset {
                files: std::sync::Mutex::new(files),
                held: std::sync::Mutex::new(false),
                done: (std::sync::Mutex::new(0), std::sync::Condvar::new()),
                others,
            }
        }

        fn finished(&self) {
            *self.done.0.lock().expect("lock") += 1;
            self.done.1.notify_all();
        }
    }

    impl Tree for FakeCpuset {
        fn create_dir(&self, dir: &Path) -> std::io::Result<()> {
            let mut files = self.files.lock().expect("lock");
            let marker = dir.join("cpuset.cpus");
            if files.contains_key(&marker) {
                return Err(ErrorKind::AlreadyExists.into());
            }
            for f in CPUSET_FILES {
                files.insert(dir.join(f), String::new());
            }
            Ok(())
        }

        fn read(&self, file: &Path) -> std::io::Result<String> {
            let files = self.files.lock().expect("lock");
            files.get(file).cloned().ok_or(ErrorKind::NotFound.into())
        }

        fn write(&self, file: &Path, value: &str) -> std::io::Result<()> {
            let shared_parent = file.parent().and_then(Path::file_name) == Some("default".as_ref());
            let first =
                shared_parent && !std::mem::replace(&mut *self.held.lock().expect("lock"), true);
            if first {
                let (count, cvar) = &self.done;
                let mut done = count.lock().expect("lock");
                // Bounded, so that code which waits for the holder fails rather than hangs.
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while *done < self.others && std::time::Instant::now() < deadline {
                    done = cvar
                        .wait_timeout(done, Duration::from_millis(100))
                        .expect("wait")
                        .0;
                }
            }
            self.files
                .lock()
                .expect("lock")
                .insert(file.to_path_buf(), value.to_string());
            Ok(())
        }
    }

    #[test]
    fn pods_made_at_once_are_all_joinable_whoever_made_the_parent() {
        const PODS: usize = 8;
        let hierarchy = Path::new("/fake/cpuset");
        // No registry (it cannot be made under /proc), so no lock: the shims race as they
        // would without one, and each level must still be filled by whoever gets there.
        let registry = PathBuf::from("/proc/self/hako-no-registry");
        let tree = FakeCpuset::new(hierarchy, PODS - 1);
        std::thread::scope(|s| {
            for n in 0..PODS {
                let (tree, registry) = (&tree, &registry);
                s.spawn(move || {
                    let made = make(
                        tree,
                        hierarchy,
                        &PathBuf::from(format!("default/pod{n}")),
                        registry,
                    );
                    tree.finished();
                    made.expect("made");
                });
            }
        });
        let files = tree.files.lock().expect("lock");
        for n in 0..PODS {
            for f in CPUSET_FILES {
                let file = hierarchy.join(format!("default/pod{n}")).join(f);
                assert!(
                    files.get(&file).is_some_and(|v| !v.is_empty()),
                    "{} is empty: no process could join pod{n}",
                    file.display()
                );
            }
        }
        let _ = fs::remove_dir_all(&registry);
    }

    #[test]
    fn a_cpuset_that_cannot_be_filled_is_named() {
        let hierarchy = Path::new("/fake/cpuset");
        let tree = FakeCpuset::new(hierarchy, 0);
        tree.files
            .lock()
            .expect("lock")
            .insert(hierarchy.join("cpuset.mems"), String::new());
        let registry = std::env::temp_dir().join(format!("hako-cg-empty-{}", std::process::id()));
        let err = make(&tree, hierarchy, Path::new("pod"), &registry).expect_err("refused");
        let _ = fs::remove_dir_all(&registry);
        let msg = err.to_string();
        assert!(
            msg.contains("/fake/cpuset/pod") && msg.contains("cpuset.mems"),
            "{msg}"
        );
    }

    /// Two sandboxes come and go under one parent, again and again: the parent is never left
    /// behind unlisted (one removing it while the other made it again lost the other's entry,
    /// and the parent stayed after both had gone).
    #[test]
    fn a_parent_made_and_removed_by_two_sandboxes_at_once_goes_with_the_last() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: run the unit tests as root, as scripts/test.sh does"
        );
        let registry = std::env::temp_dir().join(format!("hako-cg-churn-{}", std::process::id()));
        let parent = format!("hako-churn-{}", std::process::id());
        std::thread::scope(|s| {
            for name in ["a", "b"] {
                let (registry, parent) = (&registry, &parent);
                s.spawn(move || {
                    for _ in 0..100 {
                        let cgroup = PodCgroup::create(&format!("/{parent}/{name}"), registry)
                            .expect("create");
                        cgroup.remove(registry);
                    }
                });
            }
        });
        let left: Vec<PathBuf> = hierarchies()
            .into_iter()
            .map(|h| h.join(&parent))
            .filter(|p| p.exists())
            .collect();
        assert!(left.is_empty(), "parents left: {left:?}");
        let listed = fs::read_dir(registry.join(REGISTRY))
            .map(|d| d.flatten().filter(|e| e.file_name() != ".lock").count())
            .unwrap_or(0);
        assert_eq!(listed, 0, "entries left in the registry");
        let _ = fs::remove_dir_all(&registry);
    }
}
