//! End-to-end: `scripts/install.sh` into a scratch root (DESTDIR). `--configure` writes the
//! containerd runtime entry in the format of each containerd version (and that containerd reads
//! it back), Docker's daemon.json, podman's drop-in and /etc/hako; a second run changes nothing; `--uninstall`
//! removes all of it but the operator's /etc/hako.
//!
//! Needs the release build and guest image that `scripts/install.sh` makes: `#[ignore]`d in a
//! plain `cargo test`; `scripts/test.sh` runs it.

#![allow(clippy::unwrap_used)] // Test code: a failed step should fail the test loudly.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hako_tests::*;

fn install(root: &Path, containerd_bin: &Path, args: &[&str]) -> Run {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install.sh");
    let mut cmd = Command::new(script);
    cmd.args(args).env("DESTDIR", root).env(
        "PATH",
        format!(
            "{}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            containerd_bin.display()
        ),
    );
    run_with_timeout(cmd, None, Duration::from_secs(120))
}

#[test]
#[ignore = "needs the release build and guest image: run through scripts/test.sh"]
fn install_configure_and_uninstall_leave_a_clean_root() {
    for containerd in containerd_versions() {
        let bin = containerd.join("usr/bin");
        let root = std::env::temp_dir().join(format!("hako-install-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        let r = install(&root, &bin, &["--no-build", "--configure"]);
        assert_eq!(r.code, 0, "{r:?}");

        let installed: Vec<PathBuf> = [
            "usr/local/bin/containerd-shim-hako-v2",
            "usr/local/bin/hako",
            "usr/local/bin/hako-runtime",
            "etc/containers/containers.conf.d/hako.conf",
            "usr/share/hako/guest/vmlinuz",
            "usr/share/hako/guest/vmlinux",
            "usr/share/hako/guest/initramfs.cpio",
            "usr/share/defaults/hako/configuration.toml",
            "usr/local/lib/systemd/system/hako-monitor.service",
            "etc/hako/configuration.toml",
        ]
        .iter()
        .map(|p| root.join(p))
        .collect();
        for path in &installed {
            assert!(path.is_file(), "{} missing: {r:?}", path.display());
        }

        // systemd's own parser takes the monitor's unit without a complaint.
        let mut verify = Command::new("systemd-analyze");
        verify
            .arg("verify")
            .arg(root.join("usr/local/lib/systemd/system/hako-monitor.service"));
        let verify = run_with_timeout(verify, None, Duration::from_secs(30));
        assert_eq!((verify.code, verify.stderr.as_str()), (0, ""), "{verify:?}");

        // containerd's own parser takes the entry, in its version's format.
        let config = root.join("etc/containerd/config.toml");
        let text = fs::read_to_string(&config).unwrap();
        let v2 = containerd.display().to_string().contains("/1.");
        let (version, plugin) = if v2 {
            (
                "version = 2",
                r#"plugins."io.containerd.grpc.v1.cri".containerd.runtimes.hako"#,
            )
        } else {
            (
                "version = 3",
                r#"plugins."io.containerd.cri.v1.runtime".containerd.runtimes.hako"#,
            )
        };
        assert!(text.starts_with(version), "{text}");
        assert!(text.contains(plugin), "{text}");
        let mut dump = Command::new(bin.join("containerd"));
        dump.arg("--config").arg(&config).args(["config", "dump"]);
        let dump = run_with_timeout(dump, None, Duration::from_secs(30));
        assert_eq!(dump.code, 0, "{dump:?}");
        // containerd 1.7 prints TOML strings with double quotes, 2.x with single ones.
        assert!(
            dump.stdout
                .lines()
                .any(|l| l.contains("runtime_type") && l.contains(RUNTIME)),
            "{dump:?}"
        );
        assert!(
            dump.stdout.contains("/etc/hako/configuration.toml"),
            "{dump:?}"
        );
        // 2.x gets the Sandbox API's handler too.
        let sandboxer = dump
            .stdout
            .lines()
            .any(|l| l.contains("sandboxer") && l.contains("shim"));
        assert_eq!(sandboxer, !v2, "{dump:?}");

        let daemon: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(root.join("etc/docker/daemon.json")).unwrap())
                .unwrap();
        assert_eq!(daemon["runtimes"]["hako"]["runtimeType"], RUNTIME);

        // A second --configure adds nothing.
        let r = install(&root, &bin, &["--no-build", "--configure"]);
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(fs::read_to_string(&config).unwrap(), text);

        let r = install(&root, &bin, &["--uninstall"]);
        assert_eq!(r.code, 0, "{r:?}");
        for path in &installed[..9] {
            assert!(!path.exists(), "{} left: {r:?}", path.display());
        }
        assert!(!root.join("etc/docker/daemon.json").exists());
        let left = fs::read_to_string(&config).unwrap();
        assert!(!left.contains("hako"), "{left}");
        // The operator's configuration stays, as the uninstall message says.
        assert!(root.join("etc/hako/configuration.toml").is_file());
        fs::remove_dir_all(&root).unwrap();
    }
}
