//! The template store (ADR 14): one saved VM per shape, under `hypervisor.template_dir`
//! (`/var/lib/hako/templates`): `<key>/mem` is the guest memory (a sparse file: what the guest
//! never touched, or gave back, is a hole) and `<key>/state` QEMU's migration stream of
//! everything else, of a VM booted without its share, vsock device or NICs and stopped where its
//! agent waits for them; `<key>/meta.json` says what it was made from. The key hashes everything that makes the VM
//! what it is (the command line that defines its hardware, the kernel, initramfs and QEMU
//! binary by identity, QEMU's version); the same text is kept in the metadata and compared, so a
//! template of another shape can never be taken for this one.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Bumped when what a template holds changes meaning: older ones are rebuilt.
const FORMAT: u32 = 1;

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

/// What a template was made from, and how to check its state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub format: u32,
    /// The shape's inputs, word for word (see `inputs`).
    pub inputs: String,
    pub state_len: u64,
    /// The guest memory file's length (the VM's memory) and the bytes of it that hold data.
    pub mem_len: u64,
    pub mem_data: u64,
    /// Over the state, then each data extent of the memory file with its offset.
    pub crc32: u32,
    pub created_unix: u64,
}

/// The text a shape's key is made from: the format, the identity (path, device, inode, size,
/// modification time) of each file the VM is made from (QEMU's binary among them), and the
/// command line that defines its hardware (with the per-VM paths left out).
pub fn inputs(command_line: &[String], files: &[&Path]) -> String {
    let mut text = format!("format {FORMAT}\n");
    for file in files {
        let identity = fs::metadata(file)
            .map(|m| format!("{} {} {} {}", m.dev(), m.ino(), m.size(), m.mtime()))
            .unwrap_or_else(|e| format!("missing ({e})"));
        text.push_str(&format!("file {} {identity}\n", file.display()));
    }
    text.push_str("args");
    for arg in command_line {
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
    pub state: PathBuf,
    pub mem: PathBuf,
    pub meta: Meta,
}

/// The store: `dir` holds the templates; `verified` (under the sandbox root, on tmpfs) marks
/// those whose checksum was checked since the host booted.
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

    /// The template of `key` made from `inputs`: `Ok(None)` when there is none yet, an
    /// `Unusable` error when the one there must go.
    pub fn lookup(&self, key: &str, inputs: &str) -> Result<Option<Template>, TemplateError> {
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
                "made from another kernel, initramfs, QEMU or VM shape".to_string(),
            ));
        }
        let (state, mem) = (dir.join("state"), dir.join("mem"));
        let mut identity = Vec::new();
        for (path, wanted) in [(&state, meta.state_len), (&mem, meta.mem_len)] {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let on_disk = fs::metadata(path).map_err(|e| unusable(format!("{name}: {e}")))?;
            if on_disk.len() != wanted {
                return Err(unusable(format!(
                    "{name} is {} bytes, {wanted} when it was made (truncated?)",
                    on_disk.len()
                )));
            }
            identity.push(format!(
                "{}.{}.{}",
                on_disk.ino(),
                on_disk.mtime(),
                on_disk.mtime_nsec()
            ));
        }
        self.verify_once(key, &state, &mem, &identity.join("-"), &meta)
            .map_err(unusable)?;
        Ok(Some(Template {
            key: key.to_string(),
            state,
            mem,
            meta,
        }))
    }

    /// Checks the state's checksum the first time it is used after the host booted (and after
    /// it changed): reading it costs about as much as a restore.
    fn verify_once(
        &self,
        key: &str,
        state: &Path,
        mem: &Path,
        identity: &str,
        meta: &Meta,
    ) -> Result<(), String> {
        let mark = self.verified.join(format!("{key}-{identity}"));
        if mark.exists() {
            return Ok(());
        }
        let crc = checksum(state, mem).map_err(|e| format!("reading it: {e}"))?;
        if crc != meta.crc32 {
            return Err(format!(
                "state checksum {crc:08x}, {:08x} when it was made (corrupt)",
                meta.crc32
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

    /// A fresh directory to build `key` in (under the lock), and the state and memory files in
    /// it.
    pub fn scratch(&self, key: &str) -> Result<(PathBuf, fs::File, fs::File), TemplateError> {
        let dir = self.dir.join(format!(".{key}.{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir))?;
        let open = |name: &str| {
            let path = dir.join(name);
            fs::OpenOptions::new()
                .create_new(true)
                .read(true)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(io_err(&path))
        };
        Ok((dir.clone(), open("state")?, open("mem")?))
    }

    /// Seals a built template: its checksum and metadata written, then the directory renamed
    /// into place in one step, replacing an unusable one.
    pub fn finish(
        &self,
        key: &str,
        scratch: &Path,
        inputs: &str,
    ) -> Result<Template, TemplateError> {
        let (state, mem) = (scratch.join("state"), scratch.join("mem"));
        let len = fs::metadata(&state).map_err(io_err(&state))?.len();
        let mem_len = fs::metadata(&mem).map_err(io_err(&mem))?.len();
        let mem_data = data_extents(&fs::File::open(&mem).map_err(io_err(&mem))?)
            .map_err(io_err(&mem))?
            .iter()
            .map(|(_, len)| len)
            .sum();
        let crc32 = checksum(&state, &mem).map_err(io_err(&state))?;
        let meta = Meta {
            format: FORMAT,
            inputs: inputs.to_string(),
            state_len: len,
            mem_len,
            mem_data,
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
        for file in [&state, &mem] {
            fs::File::open(file)
                .and_then(|f| f.sync_all())
                .map_err(io_err(file))?;
        }
        let final_dir = self.path(key);
        self.remove(key);
        fs::rename(scratch, &final_dir).map_err(io_err(&final_dir))?;
        Ok(Template {
            key: key.to_string(),
            state: final_dir.join("state"),
            mem: final_dir.join("mem"),
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

/// The template's checksum: the state, then each data extent of the memory with its offset.
fn checksum(state: &Path, mem: &Path) -> std::io::Result<u32> {
    let mut hasher = crc32fast::Hasher::new();
    let mut file = fs::File::open(state)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    for_each_data(&fs::File::open(mem)?, |offset, data| {
        hasher.update(&offset.to_le_bytes());
        hasher.update(data);
        Ok(())
    })?;
    Ok(hasher.finalize())
}

/// Copies a template's memory into `to`, a new VM's own file: only the data, so the copy is as
/// sparse as the template (tens of MiB of a guest's hundreds). Returns the bytes copied.
pub fn copy_memory(template: &Path, to: &fs::File) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let from = fs::File::open(template)?;
    to.set_len(from.metadata()?.len())?;
    let mut copied = 0;
    for_each_data(&from, |offset, data| {
        to.write_all_at(data, offset)?;
        copied += data.len() as u64;
        Ok(())
    })?;
    Ok(copied)
}

#[cfg(test)]
mod tests;
