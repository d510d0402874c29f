//! Running the same `ctr` command under runc beside hako, for the tests that compare them.

/// containerd's runc shim.
pub const RUNC: &str = "io.containerd.runc.v2";
/// runc leaves the parent of the cgroups it makes (ctr's `/default`) behind: its containers go
/// under a parent of the tests' own, removed with `remove_parent`.
pub const PARENT: &str = "hako-e2e-runc";

/// `ctr` arguments that put a runc container's cgroup under `PARENT`.
pub fn cgroup(id: &str) -> [String; 2] {
    ["--cgroup".to_string(), format!("/{PARENT}/{id}")]
}

/// Removes `PARENT` from every hierarchy (its containers are gone by now).
pub fn remove_parent() {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for hierarchy in hierarchies.flatten() {
        let parent = hierarchy.path().join(PARENT);
        if parent.exists() {
            std::fs::remove_dir(&parent).unwrap_or_else(|e| panic!("{}: {e}", parent.display()));
        }
    }
}
