//! What `hako-runtime` keeps on disk per container, under its root: `<root>/<id>/state.json`,
//! the stdio FIFOs the keeper and the sandbox server share, and per sandbox the server's
//! socket and log under `<root>/.sandboxes/`. The record is written whole (to a temporary file,
//! then renamed), so a reader never sees half of one.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ids::{validate, IdError};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Id(#[from] IdError),
    #[error("container does not exist")]
    NotFound,
    #[error("container with given ID already exists")]
    Exists,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The process conmon waits on, with its start time so that a recycled pid is never taken
/// for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keeper {
    pub pid: u32,
    pub started: u64,
}

impl Keeper {
    pub fn of(pid: u32) -> Option<Keeper> {
        crate::daemon::start_time(pid).map(|started| Keeper { pid, started })
    }

    pub fn alive(&self) -> bool {
        crate::daemon::start_time(self.pid) == Some(self.started)
    }
}

/// One container's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    /// The sandbox (VM) it runs in: its own id, or the first container's of its pod.
    pub sandbox: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// RFC 3339, UTC, as `state` prints it.
    pub created: String,
    pub keeper: Option<Keeper>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// Paths under the runtime's root.
#[derive(Debug, Clone)]
pub struct Root {
    pub dir: PathBuf,
}

impl Root {
    pub fn new(dir: &Path) -> Root {
        Root {
            dir: dir.to_path_buf(),
        }
    }

    /// A container's directory; the id is checked before it becomes a path.
    pub fn container_dir(&self, id: &str) -> Result<PathBuf, StateError> {
        validate("container id", id)?;
        Ok(self.dir.join(id))
    }

    /// Where one process's FIFOs live: the init's in the container's directory, each exec's
    /// in a directory of its own.
    pub fn process_dir(&self, id: &str, exec_id: &str) -> Result<PathBuf, StateError> {
        let dir = self.container_dir(id)?;
        if exec_id.is_empty() {
            return Ok(dir);
        }
        validate("exec id", exec_id)?;
        Ok(dir.join("exec").join(exec_id))
    }

    /// Ids cannot begin with a dot (`ids::validate`), so these names never meet a container's.
    pub fn sandboxes(&self) -> PathBuf {
        self.dir.join(".sandboxes")
    }

    /// The sandbox server's ttrpc socket.
    pub fn server_socket(&self, sandbox: &str) -> Result<PathBuf, StateError> {
        validate("sandbox id", sandbox)?;
        Ok(self.sandboxes().join(format!("{sandbox}.sock")))
    }

    /// Where `create` and `exec` register keepers with the server (`watch`).
    pub fn keeper_socket(&self, sandbox: &str) -> Result<PathBuf, StateError> {
        validate("sandbox id", sandbox)?;
        Ok(self.sandboxes().join(format!("{sandbox}.keepers")))
    }

    pub fn server_log(&self, sandbox: &str) -> Result<PathBuf, StateError> {
        validate("sandbox id", sandbox)?;
        Ok(self.sandboxes().join(format!("{sandbox}.log")))
    }

    /// Serialises creates: the first container of a sandbox must have started its VM before
    /// the next one looks for the VM that holds its network namespace.
    pub fn create_lock(&self) -> PathBuf {
        self.dir.join(".create.lock")
    }

    /// Makes the root, for root alone (as runc's /run/runc): records name bundles and
    /// annotations, and the sockets drive VMs.
    pub fn make(&self) -> Result<(), StateError> {
        use std::os::unix::fs::PermissionsExt;
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700)).map_err(io(&self.dir))
    }

    /// Makes the container's directory; refuses an id already in use.
    pub fn make_container_dir(&self, id: &str) -> Result<PathBuf, StateError> {
        let dir = self.container_dir(id)?;
        self.make()?;
        match fs::create_dir(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(StateError::Exists),
            Err(e) => Err(io(&dir)(e)),
        }
    }

    pub fn save(&self, record: &Record) -> Result<(), StateError> {
        let dir = self.container_dir(&record.id)?;
        let path = dir.join("state.json");
        let temp = dir.join(".state.json.new");
        let bytes = serde_json::to_vec(record).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        fs::write(&temp, bytes).map_err(io(&temp))?;
        fs::rename(&temp, &path).map_err(io(&path))
    }

    pub fn load(&self, id: &str) -> Result<Record, StateError> {
        let path = self.container_dir(id)?.join("state.json");
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StateError::NotFound),
            Err(e) => return Err(io(&path)(e)),
        };
        let record: Record = serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if record.id != id {
            return Err(StateError::Corrupt {
                path,
                reason: format!("records container {:?}", record.id),
            });
        }
        validate("sandbox id", &record.sandbox)?;
        Ok(record)
    }

    /// Removes the container's directory (its FIFOs and record). Nothing there is mounted.
    pub fn remove(&self, id: &str) -> Result<(), StateError> {
        let dir = self.container_dir(id)?;
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&dir)(e)),
            _ => Ok(()),
        }
    }

    /// The records of every container in `sandbox` other than `except`.
    pub fn members(&self, sandbox: &str, except: &str) -> Vec<Record> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|id| id != except)
            .filter_map(|id| self.load(&id).ok())
            .filter(|r| r.sandbox == sandbox)
            .collect()
    }
}

/// What `state` prints: the runtime spec's state, with runc's field names and its `owner`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OciState<'a> {
    pub oci_version: &'a str,
    pub id: &'a str,
    pub pid: u32,
    pub status: &'a str,
    pub bundle: &'a Path,
    pub rootfs: &'a Path,
    pub created: &'a str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: &'a BTreeMap<String, String>,
    pub owner: &'a str,
}

/// Now, as RFC 3339 in UTC with nanoseconds, as runc prints `created`.
pub fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs() as i64, now.subsec_nanos())
}

/// Seconds since the epoch as an RFC 3339 UTC time (civil-from-days, no time zone data).
pub fn rfc3339(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{d:02}T{h:02}:{m:02}:{s:02}.{nanos:09}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_root(name: &str) -> Root {
        let dir = std::env::temp_dir().join(format!("hako-rt-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        Root::new(&dir)
    }

    fn record(id: &str, sandbox: &str) -> Record {
        Record {
            id: id.into(),
            sandbox: sandbox.into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: rfc3339(0, 0),
            keeper: None,
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn a_record_round_trips_and_an_id_is_taken_once() {
        let root = temp_root("roundtrip");
        root.make_container_dir("c1").expect("dir");
        assert!(matches!(
            root.make_container_dir("c1"),
            Err(StateError::Exists)
        ));
        let r = record("c1", "c1");
        root.save(&r).expect("save");
        assert_eq!(root.load("c1").expect("load"), r);
        assert!(matches!(root.load("c2"), Err(StateError::NotFound)));
        root.remove("c1").expect("remove");
        root.remove("c1").expect("removing twice is fine");
        assert!(matches!(root.load("c1"), Err(StateError::NotFound)));
        let _ = fs::remove_dir_all(&root.dir);
    }

    #[test]
    fn ids_from_the_command_line_never_leave_the_root() {
        let root = temp_root("ids");
        for bad in ["../x", "a/b", "", ".hidden", "x\n"] {
            assert!(root.container_dir(bad).is_err(), "{bad:?}");
            assert!(root.server_socket(bad).is_err(), "{bad:?}");
        }
        assert!(root.process_dir("c", "../e").is_err());
        assert_eq!(
            root.process_dir("c", "e1").expect("exec dir"),
            root.dir.join("c/exec/e1")
        );
    }

    #[test]
    fn no_id_names_the_roots_own_entries() {
        let root = temp_root("own");
        for own in [root.sandboxes(), root.create_lock()] {
            let name = own.file_name().and_then(|n| n.to_str()).expect("a name");
            assert!(root.container_dir(name).is_err(), "{name}");
        }
    }

    #[test]
    fn a_forged_record_is_refused() {
        let root = temp_root("forged");
        root.make_container_dir("c1").expect("dir");
        let path = root.dir.join("c1/state.json");
        fs::write(&path, "{garbage").expect("write");
        assert!(matches!(root.load("c1"), Err(StateError::Corrupt { .. })));
        // A record under another container's name, or naming a sandbox outside the rules.
        root.save(&record("c1", "../etc")).expect("save");
        assert!(root.load("c1").is_err());
        fs::write(
            &path,
            serde_json::to_vec(&record("c2", "c2")).expect("json"),
        )
        .expect("w");
        assert!(matches!(root.load("c1"), Err(StateError::Corrupt { .. })));
        let _ = fs::remove_dir_all(&root.dir);
    }

    #[test]
    fn members_are_the_other_containers_of_the_sandbox() {
        let root = temp_root("members");
        for (id, sandbox) in [("infra", "infra"), ("a", "infra"), ("b", "other")] {
            root.make_container_dir(id).expect("dir");
            root.save(&record(id, sandbox)).expect("save");
        }
        let ids: Vec<String> = root
            .members("infra", "infra")
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, vec!["a".to_string()]);
        let _ = fs::remove_dir_all(&root.dir);
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(rfc3339(1_796_947_200, 0), "2026-12-11T00:00:00.000000000Z");
    }
}
