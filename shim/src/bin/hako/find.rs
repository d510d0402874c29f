//! Finding a running sandbox (`hako logs`) or a container in one (`hako ps`) by its id or a
//! prefix that names one only, in one containerd namespace or in all, under the sandbox root:
//! `<root>/<namespace>/<sandbox id>/` and its `rw/<container id>/`.

use std::path::{Path, PathBuf};

use hako_shim::sandbox::paths::{sandbox_dirs, subdirs};

/// The sandbox's directory, for a sandbox; a container's, for a container.
pub struct Found {
    pub namespace: String,
    pub sandbox: String,
    pub container: String,
}

/// `find` by `wanted`; if nothing is found, by the id of the Docker container whose name (or
/// id prefix) is `wanted`, in Docker's namespace unless another is given.
pub fn or_by_docker_name<T>(
    namespace: Option<&str>,
    wanted: &str,
    find: impl Fn(Option<&str>, &str) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let first = find(namespace, wanted);
    if first.is_ok() {
        return first;
    }
    match super::docker::container_id(wanted) {
        Some(id) => find(namespace.or(Some(DOCKER_NAMESPACE)), &id),
        None => first,
    }
}

/// The containerd namespace Docker's containers are in.
const DOCKER_NAMESPACE: &str = "moby";

/// The directory of the one sandbox whose id is `wanted` or starts with it.
pub fn sandbox(root: &Path, namespace: Option<&str>, wanted: &str) -> anyhow::Result<PathBuf> {
    let found = sandbox_dirs(root, namespace);
    unique(
        root,
        found,
        wanted,
        namespace,
        "sandbox",
        " (logs live there while a sandbox runs; containerd's log keeps the shim's)",
    )
}

/// The one container whose id is `wanted` or starts with it, and its sandbox (the pod's, or
/// the container's own outside Kubernetes).
pub fn container(root: &Path, namespace: Option<&str>, wanted: &str) -> anyhow::Result<Found> {
    let found = sandbox_dirs(root, namespace)
        .iter()
        .flat_map(|sandbox| subdirs(&sandbox.join("rw")))
        .collect();
    let dir = unique(root, found, wanted, namespace, "container", "")?;
    // <root>/<namespace>/<sandbox>/rw/<container>
    let name = |p: Option<&Path>| {
        p.and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let sandbox_dir = dir.parent().and_then(Path::parent);
    Ok(Found {
        namespace: name(sandbox_dir.and_then(Path::parent)),
        sandbox: name(sandbox_dir),
        container: name(Some(&dir)),
    })
}

/// The one of `found` named `wanted`, else the one whose name starts with it.
fn unique(
    root: &Path,
    found: Vec<PathBuf>,
    wanted: &str,
    namespace: Option<&str>,
    what: &str,
    hint: &str,
) -> anyhow::Result<PathBuf> {
    let name = |p: &PathBuf| p.file_name().map(|n| n.to_string_lossy().into_owned());
    let mut found: Vec<PathBuf> = found
        .into_iter()
        .filter(|p| name(p).is_some_and(|n| n.starts_with(wanted)))
        .collect();
    // An exact id wins over the longer ids it is a prefix of.
    let exact: Vec<&PathBuf> = found
        .iter()
        .filter(|p| name(p).is_some_and(|n| n == wanted))
        .collect();
    if let [only] = exact[..] {
        return Ok(only.clone());
    }
    let where_ = match namespace {
        Some(ns) => format!("namespace {ns}"),
        None => "any namespace".to_string(),
    };
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => anyhow::bail!(
            "no running {what} {wanted:?} in {where_} under {}{hint}",
            root.display()
        ),
        _ => {
            found.sort();
            let names: Vec<String> = found
                .iter()
                .filter_map(|p| p.strip_prefix(root).ok())
                .map(|p| p.display().to_string())
                .collect();
            anyhow::bail!(
                "{wanted:?} names {} {what}s in {where_}: {}; give more of the id, or -n NAMESPACE",
                names.len(),
                names.join(", ")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(name: &str, dirs: &[&str]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("hako-cli-{name}-{}", std::process::id()));
        for dir in dirs {
            std::fs::create_dir_all(root.join(dir)).expect("mkdir");
        }
        root
    }

    #[test]
    fn a_sandbox_is_found_by_a_unique_prefix_in_any_namespace() {
        let root = tree(
            "sandbox",
            &[
                "default/abc123",
                "default/abc1234",
                "default/abd999",
                "moby/ffff",
                ".vmm-uids/x",
            ],
        );
        let found = |ns: Option<&str>, wanted: &str| {
            sandbox(&root, ns, wanted)
                .map(|p| {
                    p.strip_prefix(&root)
                        .expect("under root")
                        .display()
                        .to_string()
                })
                .map_err(|e| e.to_string())
        };
        assert_eq!(found(None, "ff"), Ok("moby/ffff".into()));
        assert_eq!(
            found(None, "abc123"),
            Ok("default/abc123".into()),
            "an exact id wins"
        );
        assert_eq!(found(Some("default"), "abd"), Ok("default/abd999".into()));
        let ambiguous = found(None, "ab").expect_err("three match");
        assert!(
            ambiguous.contains("default/abc123, default/abc1234, default/abd999"),
            "{ambiguous}"
        );
        let none = found(Some("moby"), "abc").expect_err("not in moby");
        assert!(
            none.contains("no running sandbox \"abc\" in namespace moby"),
            "{none}"
        );
        assert!(
            found(None, "x").is_err(),
            "hako's records are not sandboxes"
        );
        std::fs::remove_dir_all(&root).expect("cleanup");
    }

    #[test]
    fn a_container_is_found_in_its_pod_by_a_unique_prefix() {
        let root = tree(
            "container",
            &[
                "k8s.io/pod1/rw/pod1",
                "k8s.io/pod1/rw/app42",
                "k8s.io/pod1/ro",
                "moby/cafe01/rw/cafe01",
                "moby/cafe02/rw/cafe02",
            ],
        );
        let found = |ns: Option<&str>, wanted: &str| {
            container(&root, ns, wanted)
                .map(|f| format!("{}/{}/{}", f.namespace, f.sandbox, f.container))
                .map_err(|e| e.to_string())
        };
        assert_eq!(found(None, "app"), Ok("k8s.io/pod1/app42".into()));
        assert_eq!(found(None, "pod1"), Ok("k8s.io/pod1/pod1".into()));
        assert_eq!(
            found(Some("moby"), "cafe02"),
            Ok("moby/cafe02/cafe02".into())
        );
        let ambiguous = found(None, "cafe").expect_err("two match");
        assert!(ambiguous.contains("names 2 containers"), "{ambiguous}");
        let none = found(Some("moby"), "app").expect_err("not in moby");
        assert!(
            none.contains("no running container \"app\" in namespace moby"),
            "{none}"
        );
        std::fs::remove_dir_all(&root).expect("cleanup");
    }
}
