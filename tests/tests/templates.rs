//! End-to-end: pods started from a template VM (ADR 14). Each test has a template store of its
//! own (`hypervisor.template_dir` in a scratch directory), so what it sees is its own doing:
//! the first start of the shape makes the template, later starts restore it, clones differ
//! where they must, bad templates are replaced, and `templates = false` boots.
//!
//! Boots VMs: `#[ignore]`d in a plain `cargo test`; `scripts/test.sh` runs them.

#![allow(clippy::unwrap_used)] // Test code: a failed step should fail the test loudly.

use std::fs;
use std::path::{Path, PathBuf};

use hako_tests::*;

/// A scratch template store and the configuration that uses it.
struct Store {
    dir: PathBuf,
    config: HakoConfig,
}

impl Store {
    fn new(name: &str, extra: &str) -> Store {
        let dir =
            std::env::temp_dir().join(format!("hako-templates-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let config = HakoConfig::new(&format!(
            "[hypervisor]\ntemplate_dir = \"{}\"\n{extra}",
            dir.display()
        ));
        Store { dir, config }
    }

    /// The templates in the store (directories that are not scratch).
    fn templates(&self) -> Vec<PathBuf> {
        fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .collect()
    }

    fn state(&self) -> PathBuf {
        let templates = self.templates();
        assert_eq!(templates.len(), 1, "{templates:?}");
        templates[0].join("state")
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn the_first_start_of_a_shape_makes_its_template_and_later_ones_restore_it() {
    let store = Store::new("first", "");
    for_each_containerd_with_env(&store.config.env(), |c| {
        let _ = fs::remove_dir_all(&store.dir);
        for (id, made) in [("first", true), ("second", false), ("third", false)] {
            let r = c.run_rm(
                id,
                &[
                    "sh",
                    "-c",
                    "uname -r; grep ' / ' /proc/mounts | cut -d' ' -f3; echo hi",
                ],
            );
            assert_eq!(r.code, 0, "{id}: {r:?}");
            assert_eq!(
                r.stdout,
                format!("{}\nvirtiofs\nhi\n", guest_kernel_release()),
                "{id}"
            );
            assert!(c.restored(id), "{id}: {}", c.start_phases(id));
            assert_eq!(
                c.start_phases(id).contains("vmm_started.template_build="),
                made,
                "{id}: {}",
                c.start_phases(id)
            );
        }
        assert_eq!(store.templates().len(), 1);
        // A pod of another size is another shape.
        let r = c.run_rm_with(
            "small",
            &["--annotation", "io.hako.memory_mib=256"],
            &["true"],
        );
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(store.templates().len(), 2);
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn clones_of_one_template_do_not_share_randomness_and_keep_the_hosts_time() {
    let store = Store::new("clones", "");
    for_each_containerd_with_env(&store.config.env(), |c| {
        let _ = fs::remove_dir_all(&store.dir);
        let probe = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; cat /proc/sys/kernel/random/uuid; date +%s";
        let mut seen = Vec::new();
        for id in ["clone-a", "clone-b", "clone-c"] {
            let r = c.run_rm(id, &["sh", "-c", probe]);
            assert_eq!(r.code, 0, "{id}: {r:?}");
            assert!(c.restored(id), "{id}");
            let lines: Vec<&str> = r.stdout.lines().collect();
            assert_eq!(lines.len(), 3, "{r:?}");
            let guest_now: i64 = lines[2].parse().unwrap();
            let host_now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            assert!(
                (host_now - guest_now).abs() <= 1,
                "{id}: guest {guest_now}, host {host_now}"
            );
            seen.push((lines[0].to_string(), lines[1].to_string()));
        }
        for i in 0..seen.len() {
            for j in i + 1..seen.len() {
                assert_ne!(
                    seen[i].0, seen[j].0,
                    "two clones read the same random bytes"
                );
                assert_ne!(seen[i].1, seen[j].1, "two clones made the same uuid");
            }
        }
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn ten_first_starts_at_once_make_one_template_and_all_run() {
    let store = Store::new("ten", "");
    for_each_containerd_with_env(&store.config.env(), |c| {
        let _ = fs::remove_dir_all(&store.dir);
        let ids: Vec<String> = (0..10).map(|i| format!("once-{i:02}")).collect();
        std::thread::scope(|s| {
            for id in &ids {
                s.spawn(move || {
                    let r = c.run_rm(id, &["echo", id]);
                    assert_eq!((r.code, r.stdout.trim()), (0, id.as_str()), "{r:?}");
                });
            }
        });
        let log = c.log();
        let about: Vec<&str> = log.lines().filter(|l| l.contains("template")).collect();
        assert_eq!(store.templates().len(), 1, "the shims said: {about:#?}");
        let made = log.matches("made template").count();
        assert_eq!(
            made, 1,
            "templates made: {made}; the shims said: {about:#?}"
        );
        for id in &ids {
            assert!(c.restored(id), "{id}");
        }
    });
}

/// Spoils the template, then checks that the next pod still runs (booted), that the shim says
/// why, and that the one after restores a fresh template.
fn survives(c: &Containerd, store: &Store, what: &str, spoil: impl Fn(&Path), why: &str) {
    let r = c.run_rm(&format!("{what}-0"), &["true"]);
    assert_eq!(r.code, 0, "{r:?}");
    spoil(&store.state());
    let id = format!("{what}-1");
    let r = c.run_rm(&id, &["echo", "still runs"]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "still runs\n"),
        "{what}: {r:?}"
    );
    assert!(!c.restored(&id), "{what}: booted");
    assert!(
        c.log()
            .lines()
            .any(|l| l.contains("not starting from a template") && l.contains(why)),
        "{what}: the log says why ({why})"
    );
    let id = format!("{what}-2");
    let r = c.run_rm(&id, &["true"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(c.restored(&id), "{what}: a fresh template");
    assert!(
        c.start_phases(&id).contains("vmm_started.template_build="),
        "{what}"
    );
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn a_bad_template_is_replaced_and_never_fails_a_pod() {
    let store = Store::new("bad", "");
    for_each_containerd_with_env(&store.config.env(), |c| {
        let _ = fs::remove_dir_all(&store.dir);
        survives(
            c,
            &store,
            "truncated",
            |state| {
                let len = fs::metadata(state).unwrap().len();
                fs::OpenOptions::new()
                    .write(true)
                    .open(state)
                    .unwrap()
                    .set_len(len / 2)
                    .unwrap();
            },
            "truncated",
        );
        survives(
            c,
            &store,
            "corrupt",
            |state| {
                let mut bytes = fs::read(state).unwrap();
                let at = bytes.len() / 2;
                bytes[at] ^= 0xff;
                // A new file: as a copy over it would be, with its own identity.
                fs::remove_file(state).unwrap();
                fs::write(state, bytes).unwrap();
            },
            "corrupt",
        );
        survives(
            c,
            &store,
            "foreign",
            |state| {
                // As if made by another QEMU or from another kernel: its recorded inputs differ.
                let meta = state.with_file_name("meta.json");
                let text = fs::read_to_string(&meta).unwrap();
                fs::write(
                    &meta,
                    text.replace("format 2", "format 2\\nfile /usr/bin/another-qemu"),
                )
                .unwrap();
            },
            "another kernel",
        );
        survives(
            c,
            &store,
            "garbage",
            |state| {
                // A state QEMU cannot load, with a checksum that matches it (the store's:
                // each file's name, then each data extent of it with its offset).
                let len = fs::metadata(state).unwrap().len() as usize;
                let garbage = vec![0x5au8; len];
                fs::remove_file(state).unwrap();
                fs::write(state, &garbage).unwrap();
                let meta = state.with_file_name("meta.json");
                let mut parsed: serde_json::Value =
                    serde_json::from_str(&fs::read_to_string(&meta).unwrap()).unwrap();
                parsed["crc32"] =
                    serde_json::json!(checksum(&[state, &state.with_file_name("mem")]));
                fs::write(&meta, parsed.to_string()).unwrap();
            },
            "loading the saved VM failed",
        );
    });
}

#[test]
#[ignore = "boots VMs: run through scripts/test.sh"]
fn templates_off_boots_every_vm() {
    let store = Store::new("off", "templates = false\n");
    for_each_containerd_with_env(&store.config.env(), |c| {
        let r = c.run_rm("booted", &["echo", "booted"]);
        assert_eq!((r.code, r.stdout.as_str()), (0, "booted\n"), "{r:?}");
        assert!(!c.restored("booted"));
        assert!(store.templates().is_empty());
    });
}

/// A template's checksum as the store computes it.
fn checksum(files: &[&Path]) -> u32 {
    use nix::unistd::{lseek, Whence};
    use std::os::unix::fs::FileExt;
    let mut hasher = crc32fast::Hasher::new();
    for path in files {
        hasher.update(path.file_name().unwrap().as_encoded_bytes());
        let file = fs::File::open(path).unwrap();
        let len = file.metadata().unwrap().len() as i64;
        let mut at = 0;
        while at < len {
            let Ok(data) = lseek(&file, at, Whence::SeekData) else {
                break;
            };
            let hole = lseek(&file, data, Whence::SeekHole).unwrap();
            let mut buf = vec![0u8; (hole - data) as usize];
            file.read_exact_at(&mut buf, data as u64).unwrap();
            // The store reads in chunks of 1 MiB, each with its offset.
            for (n, chunk) in buf.chunks(1 << 20).enumerate() {
                hasher.update(&(data as u64 + (n as u64) * (1 << 20)).to_le_bytes());
                hasher.update(chunk);
            }
            at = hole;
        }
    }
    hasher.finalize()
}
