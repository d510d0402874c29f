//! The store on a scratch directory: what is found, what is refused, what is rebuilt.

#![allow(clippy::unwrap_used)]

use std::io::{Seek, SeekFrom, Write};

use super::*;

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("hako-tmpl-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn store(&self) -> Store {
        Store::new(&self.0.join("templates"), &self.0.join("run"))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A guest memory of 64 MiB with data at two places and holes elsewhere.
const MEM: u64 = 64 << 20;

const FILES: [&str; 2] = ["state", "mem"];

fn shape(inputs: &str) -> Shape {
    Shape {
        inputs: inputs.to_string(),
        vmm: "test",
        vcpus: 1,
        memory_mib: 64,
    }
}

fn build(store: &Store, key: &str, inputs: &str, body: &[u8]) -> Template {
    use std::os::unix::fs::FileExt;
    let _lock = store.lock(key).unwrap();
    let dir = store.scratch(key).unwrap();
    let mut state = create_file(&dir, "state").unwrap();
    let mem = create_file(&dir, "mem").unwrap();
    state.write_all(body).unwrap();
    mem.set_len(MEM).unwrap();
    mem.write_all_at(&[9u8; 8192], 1 << 20).unwrap();
    mem.write_all_at(b"end", MEM - 3).unwrap();
    drop((state, mem));
    store.finish(key, &dir, &shape(inputs), &FILES).unwrap()
}

#[test]
fn a_built_template_is_found_and_checked_once() {
    let scratch = Scratch::new("found");
    let store = scratch.store();
    assert!(store.lookup("k1", "inputs", &FILES).unwrap().is_none());
    let built = build(&store, "k1", "inputs", &[7u8; 100_000]);
    let [state, mem] = &built.meta.files[..] else {
        panic!("{:?}", built.meta.files)
    };
    assert_eq!((state.name.as_str(), state.len), ("state", 100_000));
    assert_eq!((mem.name.as_str(), mem.len), ("mem", MEM));
    assert!(mem.data < 1 << 20, "{} bytes of data", mem.data);
    let found = store.lookup("k1", "inputs", &FILES).unwrap().unwrap();
    assert_eq!(found.meta, built.meta);
    assert_eq!(fs::read(found.file("state")).unwrap(), vec![7u8; 100_000]);
    // Asked for with other files (another backend's), it is not this one.
    let err = store.lookup("k1", "inputs", &["state"]).unwrap_err();
    assert!(err.to_string().contains("other files"), "{err}");
    assert_eq!(store.list().len(), 1);
    assert!(
        fs::read_dir(&store.dir).unwrap().flatten().all(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name == "k1" || name.ends_with(".lock")
        }),
        "no scratch directory is left"
    );
}

#[test]
fn truncated_corrupt_or_foreign_templates_are_refused_with_the_reason() {
    let scratch = Scratch::new("refused");
    let store = scratch.store();
    build(&store, "k1", "inputs", &[1u8; 4096]);
    let state = store.dir.join("k1/state");
    // Another shape (another kernel, QEMU or size) under the same key.
    let err = store
        .lookup("k1", "other inputs", &FILES)
        .unwrap_err()
        .to_string();
    assert!(err.contains("another kernel"), "{err}");
    // Cut short.
    fs::OpenOptions::new()
        .write(true)
        .open(&state)
        .unwrap()
        .set_len(100)
        .unwrap();
    let err = store
        .lookup("k1", "inputs", &FILES)
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncated"), "{err}");
    // A byte flipped, the size unchanged: the checksum says so (the first check after this
    // change, since the file's identity changed).
    build(&store, "k1", "inputs", &[1u8; 4096]);
    assert!(store.lookup("k1", "inputs", &FILES).unwrap().is_some());
    let mut file = fs::OpenOptions::new().write(true).open(&state).unwrap();
    file.seek(SeekFrom::Start(2000)).unwrap();
    file.write_all(&[2u8]).unwrap();
    drop(file);
    // The same second and inode: the mark would still match, so make the change visible.
    filetime_bump(&state);
    let err = store
        .lookup("k1", "inputs", &FILES)
        .unwrap_err()
        .to_string();
    assert!(err.contains("corrupt"), "{err}");
    // Garbage metadata.
    fs::write(store.dir.join("k1/meta.json"), b"{").unwrap();
    assert!(store.lookup("k1", "inputs", &FILES).is_err());
    // Removed, then built afresh.
    store.remove("k1");
    assert!(store.lookup("k1", "inputs", &FILES).unwrap().is_none());
    build(&store, "k1", "inputs", &[3u8; 10]);
    assert!(store.lookup("k1", "inputs", &FILES).unwrap().is_some());
}

fn filetime_bump(path: &Path) {
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(later)
        .unwrap();
}

#[test]
fn the_key_follows_every_input() {
    let scratch = Scratch::new("inputs");
    let kernel = scratch.0.join("vmlinux");
    fs::write(&kernel, b"kernel").unwrap();
    let args = vec!["-m".to_string(), "512M".to_string()];
    let one = inputs(&args, &[&kernel]);
    assert_eq!(key(&one), key(&inputs(&args, &[&kernel])));
    assert_ne!(one, inputs(&["-m".into(), "256M".into()], &[&kernel]));
    // A new kernel file (a reinstall) is another shape.
    fs::remove_file(&kernel).unwrap();
    fs::write(&kernel, b"kernel, rebuilt").unwrap();
    assert_ne!(one, inputs(&args, &[&kernel]));
    assert_eq!(key(&one).len(), 16);
}

#[test]
fn ten_builders_at_once_make_one_template() {
    let scratch = Scratch::new("once");
    let store = scratch.store();
    let built = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..10 {
            s.spawn(|| {
                let _lock = store.lock("k1").unwrap();
                if store.lookup("k1", "inputs", &FILES).unwrap().is_some() {
                    return;
                }
                built.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let dir = store.scratch("k1").unwrap();
                create_file(&dir, "state")
                    .unwrap()
                    .write_all(b"state")
                    .unwrap();
                create_file(&dir, "mem").unwrap();
                store.finish("k1", &dir, &shape("inputs"), &FILES).unwrap();
            });
        }
    });
    assert_eq!(built.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn a_vms_own_memory_copies_only_the_templates_data() {
    use std::os::unix::fs::MetadataExt;
    let scratch = Scratch::new("copy");
    let store = scratch.store();
    let template = build(&store, "k1", "inputs", b"state");
    let copy_path = scratch.0.join("mem");
    let copy = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&copy_path)
        .unwrap();
    let copied = copy_sparse(&fs::File::open(template.file("mem")).unwrap(), &copy).unwrap();
    assert_eq!(copied, template.meta.files[1].data);
    let meta = copy.metadata().unwrap();
    assert_eq!(meta.len(), MEM);
    // Allocated blocks (512 bytes each): the data, not the 64 MiB.
    assert!(meta.blocks() * 512 < 1 << 20, "{} blocks", meta.blocks());
    let bytes = fs::read(&copy_path).unwrap();
    assert_eq!(bytes, fs::read(template.file("mem")).unwrap());
    // A memory file with a byte changed fails the checksum.
    use std::os::unix::fs::FileExt;
    fs::OpenOptions::new()
        .write(true)
        .open(template.file("mem"))
        .unwrap()
        .write_all_at(&[1u8], (1 << 20) + 10)
        .unwrap();
    filetime_bump(&template.file("mem"));
    let err = store
        .lookup("k1", "inputs", &FILES)
        .unwrap_err()
        .to_string();
    assert!(err.contains("corrupt"), "{err}");
}

#[test]
fn a_dense_file_is_copied_without_its_zero_pages() {
    use std::os::unix::fs::MetadataExt;
    // What Cloud Hypervisor writes: every byte of the guest's memory, zeros included.
    let scratch = Scratch::new("dense");
    let dense = scratch.0.join("memory-ranges");
    let mut bytes = vec![0u8; 4 << 20];
    bytes[3 * 4096..4 * 4096].fill(5);
    bytes[(4 << 20) - 1] = 1;
    fs::write(&dense, &bytes).unwrap();
    let copy = create_file(&scratch.0, "copy").unwrap();
    let copied = copy_sparse(&fs::File::open(&dense).unwrap(), &copy).unwrap();
    assert_eq!(copied, 2 * 4096, "two pages hold data");
    let meta = copy.metadata().unwrap();
    assert_eq!(meta.len(), 4 << 20);
    assert!(meta.blocks() * 512 <= 16 * 4096, "{} blocks", meta.blocks());
    assert_eq!(fs::read(scratch.0.join("copy")).unwrap(), bytes);
}
