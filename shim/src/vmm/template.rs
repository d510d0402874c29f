//! The template store (ADR 14): one saved VM per shape, under `hypervisor.template_dir`
//! (`/var/lib/hako/templates`). A template is a directory of the files its backend saved (QEMU:
//! `state`, its migration stream, and `mem`, the guest memory as a sparse file; Cloud
//! Hypervisor: its snapshot's `config.json`, `state.json` and `memory-ranges`) of a VM booted
//! without its share, vsock device or NICs and stopped where its agent waits for them, and
//! `meta.json`, which says what it was made from and checks each file. The key hashes everything
//! that makes the VM what it is (the definition of its hardware, the kernel, initramfs and VMM
//! binary by identity); the same text is kept in the metadata and compared, so a template of
//! another shape can never be taken for this one.
//!
//! `start.rs` holds what both backends do around the store: the template VM's wait, and what a
//! start from a template reports.

pub mod start;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Bumped when what a template holds changes meaning: older ones are rebuilt.
const FORMAT: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A template that cannot be used: it is removed and made again.
    #[error("template {key} is unusable: {reason}")]
    Unusable { key: String, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TemplateError + '_ {
    move |source| TemplateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a template was made from, and how to check its files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub format: u32,
    /// The shape's inputs, word for word (see `inputs`).
    pub inputs: String,
    /// The VMM that saved it ("qemu", "cloud-hypervisor"), and the VM's size, for `hako
    /// template list`.
    pub vmm: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub files: Vec<FileMeta>,
    /// Over each file in order: each data extent with its offset.
    pub crc32: u32,
    pub created_unix: u64,
}

/// One file of a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    pub name: String,
    /// Its length, and the bytes of it that hold data (the rest are holes).
    pub len: u64,
    pub data: u64,
}

impl Meta {
    /// The bytes the template keeps on disk.
    pub fn data(&self) -> u64 {
        self.files.iter().map(|f| f.data).sum()
    }
}

/// What a backend says of the shape it saved, besides its files.
#[derive(Debug, Clone)]
pub struct Shape {
    pub inputs: String,
    pub vmm: &'static str,
    pub vcpus: u32,
    pub memory_mib: u32,
}

/// The text a shape's key is made from: the format, the identity (path, device, inode, size,
/// modification time) of each file the VM is made from (the VMM's binary among them), and the
/// definition of its hardware (with the per-VM paths left out).
pub fn inputs(definition: &[String], files: &[&Path]) -> String {
    let mut text = format!("format {FORMAT}\n");
    for file in files {
        let identity = fs::metadata(file)
            .map(|m| format!("{} {} {} {}", m.dev(), m.ino(), m.size(), m.mtime()))
            .unwrap_or_else(|e| format!("missing ({e})"));
        text.push_str(&format!("file {} {identity}\n", file.display()));
    }
    text.push_str("args");
    for arg in definition {
        text.push(' ');
        text.push_str(arg);
    }
    text.push('\n');
    text
}

/// The key of a shape: 16 hex digits of a hash of its inputs.
pub fn key(inputs: &str) -> String {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same text gives the same key from one run to the next.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    inputs.hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// A usable template.
#[derive(Debug, Clone)]
pub struct Template {
    pub key: String,
    pub dir: PathBuf,
    pub meta: Meta,
}

impl Template {
    /// One of its files, by name.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// The store: `dir` holds the templates; `verified` (under the sandbox root, on tmpfs) marks
/// those whose checksum was checked since the host booted.
#[derive(Clone)]
pub struct Store {
    pub dir: PathBuf,
    verified: PathBuf,
}

/// The store's lock for one key, held while it is built (`flock`), so that pods started at
/// once make one template.
pub struct BuildLock {
    _file: fs::File,
}

impl Store {
    pub fn new(dir: &Path, sandbox_root: &Path) -> Store {
        Store {
            dir: dir.to_path_buf(),
            verified: sandbox_root.join(".templates-verified"),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// The template of `key` made from `inputs`, with exactly the files `names`: `Ok(None)`
    /// when there is none yet, an `Unusable` error when the one there must go.
    pub fn lookup(
        &self,
        key: &str,
        inputs: &str,
        names: &[&str],
    ) -> Result<Option<Template>, TemplateError> {
        let dir = self.path(key);
        let meta_path = dir.join("meta.json");
        let bytes = match fs::read(&meta_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&meta_path)(e)),
        };
        let unusable = |reason: String| TemplateError::Unusable {
            key: key.to_string(),
            reason,
        };
        let meta: Meta = serde_json::from_slice(&bytes)
            .map_err(|e| unusable(format!("{}: {e}", meta_path.display())))?;
        if meta.format != FORMAT || meta.inputs != inputs {
            return Err(unusable(
                "made from another kernel, initramfs, VMM or VM shape".to_string(),
            ));
        }
        if !meta
            .files
            .iter()
            .map(|f| f.name.as_str())
            .eq(names.iter().copied())
        {
            return Err(unusable(format!(
                "holds other files than {}",
                names.join(", ")
            )));
        }
        let mut identity = Vec::new();
        for file in &meta.files {
            let on_disk = fs::metadata(dir.join(&file.name))
                .map_err(|e| unusable(format!("{}: {e}", file.name)))?;
            if on_disk.len() != file.len {
                return Err(unusable(format!(
                    "{} is {} bytes, {} when it was made (truncated?)",
                    file.name,
                    on_disk.len(),
                    file.len
                )));
            }
            identity.push(format!(
                "{}.{}.{}",
                on_disk.ino(),
                on_disk.mtime(),
                on_disk.mtime_nsec()
            ));
        }
        let template = Template {
            key: key.to_string(),
            dir,
            meta,
        };
        self.verify_once(&template, &identity.join("-"))
            .map_err(unusable)?;
        Ok(Some(template))
    }

    /// Checks the files' checksum the first time the template is used after the host booted
    /// (and after a file changed): reading them costs about as much as a restore.
    fn verify_once(&self, template: &Template, identity: &str) -> Result<(), String> {
        let mark = self.verified.join(format!("{}-{identity}", template.key));
        if mark.exists() {
            return Ok(());
        }
        let names: Vec<&str> = template
            .meta
            .files
            .iter()
            .map(|f| f.name.as_str())
            .collect();
        let crc = checksum(&template.dir, &names).map_err(|e| format!("reading it: {e}"))?;
        if crc != template.meta.crc32 {
            return Err(format!(
                "checksum {crc:08x}, {:08x} when it was made (corrupt)",
                template.meta.crc32
            ));
        }
        let _ = fs::create_dir_all(&self.verified);
        let _ = fs::write(&mark, b"");
        Ok(())
    }

    /// Takes the build lock of `key`, waiting for whoever holds it (blocking: run it off the
    /// async threads).
    pub fn lock(&self, key: &str) -> Result<BuildLock, TemplateError> {
        use std::os::fd::AsRawFd;
        // Root's alone: every pod of a shape resumes from what is in it.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io_err(&self.dir))?;
        let path = self.dir.join(format!(".{key}.lock"));
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        // SAFETY: flock on a descriptor we own; it is released when the file is closed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } < 0 {
            return Err(io_err(&path)(std::io::Error::last_os_error()));
        }
        Ok(BuildLock { _file: file })
    }

    /// A fresh directory to build `key` in (under the lock); the backend makes its files in
    /// it (`create_file`).
    pub fn scratch(&self, key: &str) -> Result<PathBuf, TemplateError> {
        let dir = self.dir.join(format!(".{key}.{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir))?;
        Ok(dir)
    }

    /// Seals a built template of the files `names` in `scratch`: their checksum and the
    /// metadata written, then the directory renamed into place in one step, replacing an
    /// unusable one.
    pub fn finish(
        &self,
        key: &str,
        scratch: &Path,
        shape: &Shape,
        names: &[&str],
    ) -> Result<Template, TemplateError> {
        let mut files = Vec::new();
        for name in names {
            let path = scratch.join(name);
            let file = fs::File::open(&path).map_err(io_err(&path))?;
            file.sync_all().map_err(io_err(&path))?;
            let len = file.metadata().map_err(io_err(&path))?.len();
            let data = data_extents(&file)
                .map_err(io_err(&path))?
                .iter()
                .map(|(_, len)| len)
                .sum();
            files.push(FileMeta {
                name: name.to_string(),
                len,
                data,
            });
        }
        let crc32 = checksum(scratch, names).map_err(io_err(scratch))?;
        let meta = Meta {
            format: FORMAT,
            inputs: shape.inputs.clone(),
            vmm: shape.vmm.to_string(),
            vcpus: shape.vcpus,
            memory_mib: shape.memory_mib,
            files,
            crc32,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let meta_path = scratch.join("meta.json");
        let mut file = fs::File::create(&meta_path).map_err(io_err(&meta_path))?;
        let body = serde_json::to_vec_pretty(&meta).map_err(|e| io_err(&meta_path)(e.into()))?;
        file.write_all(&body)
            .and_then(|()| file.sync_all())
            .map_err(io_err(&meta_path))?;
        let final_dir = self.path(key);
        self.remove(key);
        fs::rename(scratch, &final_dir).map_err(io_err(&final_dir))?;
        Ok(Template {
            key: key.to_string(),
            dir: final_dir,
            meta,
        })
    }

    /// Removes the template of `key`, if any.
    pub fn remove(&self, key: &str) {
        let _ = fs::remove_dir_all(self.path(key));
    }

    /// Every template in the store, with its metadata if it has any.
    pub fn list(&self) -> Vec<(String, Option<Meta>)> {
        let mut found: Vec<(String, Option<Meta>)> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| !name.starts_with('.'))
            .map(|key| {
                let meta = fs::read(self.path(&key).join("meta.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                (key, meta)
            })
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    }
}

/// Creates the file `name` in `dir` (a scratch directory, or a VM's own), new, for reading and
/// writing, private.
pub fn create_file(dir: &Path, name: &str) -> Result<fs::File, TemplateError> {
    let path = dir.join(name);
    fs::OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(&path))
}

/// The (offset, length) of each run of data in a sparse file, holes left out.
fn data_extents(file: &fs::File) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let len = file.metadata()?.len() as i64;
    let mut extents = Vec::new();
    let mut at = 0i64;
    while at < len {
        // SAFETY: lseek on a descriptor we own.
        let data = unsafe { libc::lseek(file.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        extents.push((data as u64, (hole - data) as u64));
        at = hole;
    }
    Ok(extents)
}

/// Calls `each` with every chunk of data of `file` in its extents, and the chunk's offset.
fn for_each_data(
    file: &fs::File,
    mut each: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    for (start, len) in data_extents(file)? {
        let mut done = 0;
        while done < len {
            let want = ((len - done) as usize).min(buf.len());
            let n = file.read_at(&mut buf[..want], start + done)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            each(start + done, &buf[..n])?;
            done += n as u64;
        }
    }
    Ok(())
}

/// The template's checksum: each file in order, each data extent of it with its offset.
fn checksum(dir: &Path, names: &[&str]) -> std::io::Result<u32> {
    let mut hasher = crc32fast::Hasher::new();
    for name in names {
        hasher.update(name.as_bytes());
        for_each_data(&fs::File::open(dir.join(name))?, |offset, data| {
            hasher.update(&offset.to_le_bytes());
            hasher.update(data);
            Ok(())
        })?;
    }
    Ok(hasher.finalize())
}

/// Copies `from` into `to` (a new file) as a sparse file: only its data, and of that only the
/// pages that are not all zeros, so that a guest memory of hundreds of MiB costs the tens it
/// holds. Returns the bytes copied.
pub fn copy_sparse(from: &fs::File, to: &fs::File) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    to.set_len(from.metadata()?.len())?;
    let mut copied = 0;
    for_each_data(from, |offset, data| {
        for (i, page) in data.chunks(PAGE).enumerate() {
            if page.iter().any(|&b| b != 0) {
                to.write_all_at(page, offset + (i * PAGE) as u64)?;
                copied += page.len() as u64;
            }
        }
        Ok(())
    })?;
    Ok(copied)
}

/// Makes the template of the configuration's own shape with its backend, replacing the one there
/// (`hako template build`).
pub async fn build_for_config(
    config: &crate::config::Config,
) -> Result<Template, start::SnapshotError> {
    match config.hypervisor.kind {
        crate::config::HypervisorKind::Qemu => {
            crate::vmm::qemu::snapshot::build_for_config(config).await
        }
        crate::config::HypervisorKind::CloudHypervisor => {
            crate::vmm::cloud_hypervisor::snapshot::build_for_config(config).await
        }
    }
}

#[cfg(test)]
mod tests;
