//! `hako check`'s podman line: whether podman is there and whether a containers.conf gives
//! hako-runtime a name (`podman --runtime hako`).

use std::path::{Path, PathBuf};

/// Where podman reads its engine configuration as root, main file first, then drop-ins.
const CONTAINERS_CONF: &str = "/etc/containers/containers.conf";
const CONTAINERS_CONF_D: &str = "/etc/containers/containers.conf.d";

/// The configuration files podman would read, in order.
pub fn config_files(main: &Path, drop_ins: &Path) -> Vec<PathBuf> {
    let mut files = vec![main.to_path_buf()];
    let mut more: Vec<PathBuf> = std::fs::read_dir(drop_ins)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conf"))
        .collect();
    more.sort();
    files.extend(more);
    files
}

/// The runtime names that point at hako-runtime in `files`, with the file that says so.
pub fn hako_names(files: &[PathBuf]) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        let Ok(value) = text.parse::<toml::Table>() else {
            continue;
        };
        let runtimes = value
            .get("engine")
            .and_then(|e| e.get("runtimes"))
            .and_then(|r| r.as_table());
        for (name, paths) in runtimes.into_iter().flatten() {
            let names_us = paths
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p.as_str())
                .any(|p| p.ends_with("/hako-runtime"));
            if names_us {
                found.push((name.clone(), file.clone()));
            }
        }
    }
    found
}

/// The line for `hako check`; nothing when podman is not installed.
pub fn status(podman: Option<(PathBuf, String)>) -> Option<(bool, String)> {
    let (binary, version) = podman?;
    let files = config_files(Path::new(CONTAINERS_CONF), Path::new(CONTAINERS_CONF_D));
    let names = hako_names(&files);
    Some(match names.first() {
        Some((name, file)) => (
            true,
            format!(
                "{} ({version}): --runtime {name} runs hako-runtime ({})",
                binary.display(),
                file.display()
            ),
        ),
        None => (
            false,
            format!(
                "{} ({version}): no containers.conf names hako-runtime (podman --runtime /usr/local/bin/hako-runtime works; for --runtime hako: scripts/install.sh --configure)",
                binary.display()
            ),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drop_in_naming_hako_runtime_is_found() {
        let dir = std::env::temp_dir().join(format!("hako-podman-conf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("d")).expect("dir");
        std::fs::write(dir.join("main.conf"), "[engine]\nruntime = \"crun\"\n").expect("w");
        std::fs::write(dir.join("d/other.conf"), "{not toml").expect("w");
        std::fs::write(dir.join("d/ignored.txt"), "").expect("w");
        let files = config_files(&dir.join("main.conf"), &dir.join("d"));
        assert_eq!(files.len(), 2, "{files:?}");
        assert!(hako_names(&files).is_empty());
        let ours = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/podman-hako.conf"),
        )
        .expect("the shipped drop-in");
        std::fs::write(dir.join("d/hako.conf"), ours).expect("w");
        let files = config_files(&dir.join("main.conf"), &dir.join("d"));
        let names = hako_names(&files);
        assert_eq!(names, vec![("hako".to_string(), dir.join("d/hako.conf"))]);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
