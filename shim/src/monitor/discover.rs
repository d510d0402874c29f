//! The sandboxes to scrape: every `<root>/<namespace>/<sandbox id>/metrics.sock`, listed afresh
//! on each scrape (a `readdir` per namespace costs microseconds and never goes stale). The
//! namespace and the id come from the path, checked with the shim's own id rule; a directory
//! whose names fail it is not a sandbox hako made.

use std::path::{Path, PathBuf};

use crate::sandbox::paths::{sandbox_dirs, METRICS_SOCKET};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    pub namespace: String,
    pub sandbox_id: String,
    pub socket: PathBuf,
}

/// The sandboxes under `roots` that serve metrics, in path order. A sandbox with no socket is
/// still being prepared (or torn down): it is left out.
pub fn targets(roots: &[PathBuf]) -> Vec<Target> {
    let mut found: Vec<Target> = roots
        .iter()
        .flat_map(|root| sandbox_dirs(root, None))
        .filter_map(|dir| target(&dir))
        .collect();
    found.sort();
    found.dedup();
    found
}

fn target(dir: &Path) -> Option<Target> {
    let name = |p: Option<&Path>| p.and_then(Path::file_name)?.to_str().map(str::to_string);
    let sandbox_id = name(Some(dir))?;
    let namespace = name(dir.parent())?;
    if !hako_protocol::valid_id(&sandbox_id) || !hako_protocol::valid_id(&namespace) {
        return None;
    }
    let socket = dir.join(METRICS_SOCKET);
    // lstat: a symlink or a regular file is not the shim's socket.
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket());
    is_socket.then_some(Target {
        namespace,
        sandbox_id,
        socket,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::test_dir::TempDir;

    #[test]
    fn only_sockets_in_validly_named_sandbox_dirs_are_targets() {
        let root = TempDir::new("discover");
        let r = root.path();
        let bind = |rel: &str| {
            let path = r.join(rel);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::os::unix::net::UnixListener::bind(&path).expect("bind")
        };
        let _a = bind("k8s.io/abc/metrics.sock");
        let _b = bind("default/one/metrics.sock");
        let _hidden = bind(".templates/t1/metrics.sock");
        let _bad = bind("default/bad name/metrics.sock");
        std::fs::create_dir_all(r.join("default/booting")).expect("mkdir");
        std::fs::create_dir_all(r.join("moby/file")).expect("mkdir");
        std::fs::write(r.join("moby/file/metrics.sock"), b"").expect("file");
        std::fs::create_dir_all(r.join("moby/link")).expect("mkdir");
        std::os::unix::fs::symlink(
            r.join("k8s.io/abc/metrics.sock"),
            r.join("moby/link/metrics.sock"),
        )
        .expect("symlink");
        let found: Vec<(String, String)> = targets(&[r.to_path_buf(), r.to_path_buf()])
            .into_iter()
            .map(|t| (t.namespace, t.sandbox_id))
            .collect();
        assert_eq!(
            found,
            vec![
                ("default".to_string(), "one".to_string()),
                ("k8s.io".to_string(), "abc".to_string()),
            ]
        );
        assert!(targets(&[r.join("nowhere")]).is_empty());
    }
}
