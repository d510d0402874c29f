//! Harness for the end-to-end tests: a private containerd per test, `ctr`, the local busybox
//! image, and the leak check every test ends with.
//!
//! The tests drive the installed runtime (`scripts/install.sh` puts it in /usr/local/bin), the
//! containerd builds that `scripts/setup.sh` unpacks under /opt/hako/containerd, QEMU, virtiofsd
//! and hako-vsock: nothing is faked.

#![allow(clippy::unwrap_used)] // Test harness: a failed step should fail the test loudly.

pub mod cri;
pub mod docker;
pub mod payload;
pub mod podman;
pub mod portforward;
pub mod prometheus;
pub mod runc;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const RUNTIME: &str = "io.containerd.hako.v2";
pub const IMAGE: &str = "hako.local/busybox:latest";
pub const CONTAINERD_ROOT: &str = "/opt/hako/containerd";
pub const SANDBOX_ROOT: &str = "/run/hako";
/// Processes a hako sandbox consists of (by their 15-character `comm`); none may outlive its
/// test.
pub const HAKO_PROCESSES: [&str; 5] = [
    "qemu-system-x86",
    "cloud-hyperviso",
    "virtiofsd",
    "hako-vsock",
    "containerd-shim",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Where tests record what they could not check here; `scripts/test.sh` prints it after the
/// end-to-end tests, since a passing test's own output is not shown.
pub const SKIPPED_RECORD: &str = "target/e2e-skipped.txt";

/// Reports part of a test as skipped, with the reason: printed, and recorded for
/// `scripts/test.sh` (never counted as passed).
pub fn report_skip(what: &str) {
    use std::io::Write;
    eprintln!("SKIPPED {what}");
    let record = repo_root().join(SKIPPED_RECORD);
    if let Ok(mut file) = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&record)
    {
        let _ = writeln!(file, "SKIPPED {what}");
    }
}

/// The containerd builds to test against: every version under /opt/hako/containerd, or the
/// ones named (comma-separated prefixes) in HAKO_CONTAINERD_VERSIONS.
pub fn containerd_versions() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(CONTAINERD_ROOT)
        .unwrap_or_else(|e| panic!("{CONTAINERD_ROOT}: {e}; run scripts/setup.sh"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("usr/bin/containerd").is_file())
        .collect();
    found.sort();
    if let Ok(wanted) = std::env::var("HAKO_CONTAINERD_VERSIONS") {
        let wanted: Vec<&str> = wanted.split(',').map(str::trim).collect();
        found.retain(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            wanted.iter().any(|w| name.starts_with(w))
        });
    }
    assert!(
        !found.is_empty(),
        "no containerd under {CONTAINERD_ROOT}; run scripts/setup.sh"
    );
    found
}

/// The busybox OCI archive, built once per test binary.
pub fn busybox_archive() -> &'static Path {
    static ARCHIVE: OnceLock<PathBuf> = OnceLock::new();
    ARCHIVE.get_or_init(|| {
        // In the build tree, not /tmp: test binaries run one after another and rebuild the same
        // (reproducible) archive, so nothing accumulates.
        let out = repo_root().join("target/e2e-busybox.tar");
        let status = Command::new(repo_root().join("tests/images/busybox-image.sh"))
            .arg(&out)
            .arg(IMAGE)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "building the busybox image failed");
        out
    })
}

/// What a command printed and how it ended.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// The installed `hako` CLI with `args`, and `env` added to the test's environment.
pub fn hako_cli(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new("/usr/local/bin/hako");
    cmd.args(args).envs(env.iter().copied());
    run_with_timeout(cmd, None, Duration::from_secs(60))
}

/// Polls `probe` (bounded) until it holds: a server in a VM is listening, or a log line is
/// there, a moment after the command returns, and nothing announces it.
pub fn eventually(what: &str, timeout: Duration, mut probe: impl FnMut() -> Result<(), String>) {
    let started = Instant::now();
    loop {
        match probe() {
            Ok(()) => return,
            Err(last) => assert!(
                started.elapsed() < timeout,
                "{what}: not within {timeout:?}; last try: {last}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pid of the shim serving sandbox `id` (its `-id` argument), if one runs.
pub fn shim_pid_for(id: &str) -> Option<u32> {
    fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
        let cmdline = fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_shim = args.first()?.ends_with("containerd-shim-hako-v2");
        let has_id = args.windows(2).any(|w| w[0] == "-id" && w[1] == id);
        (is_shim && has_id).then_some(pid)
    })
}

/// Runs `cmd` with a deadline; a hang is a test failure, not a stuck suite.
pub fn run_with_timeout(mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Run {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let shown = format!("{cmd:?}");
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{shown}: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input).unwrap();
    }
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(output) => output.unwrap().into(),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("{shown} did not finish within {timeout:?}");
        }
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A private containerd: its own root, state and sockets under /tmp, stopped on drop.
pub struct Containerd {
    pub version: String,
    bin: PathBuf,
    dir: PathBuf,
    env: Vec<(String, String)>,
    /// The network namespace containerd (and so its shims) runs in; the host's when `None`.
    netns: Option<PathBuf>,
    child: std::sync::Mutex<Option<Child>>,
}

impl Containerd {
    pub fn start(install: &Path) -> Containerd {
        Self::start_with_env(install, &[])
    }

    /// `start`, with extra environment for containerd and so for the shims it starts (such as
    /// HAKO_CONFIG).
    pub fn start_with_env(install: &Path, env: &[(&str, &str)]) -> Containerd {
        Self::start_in(install, env, None)
    }

    /// `start_with_env`, with containerd (and its shims) in the network namespace `netns`.
    pub fn start_in(install: &Path, env: &[(&str, &str)], netns: Option<&Path>) -> Containerd {
        let version = install.file_name().unwrap().to_string_lossy().into_owned();
        let dir = std::env::temp_dir().join(format!(
            "hako-e2e-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/containerd.sock\"\n\
             [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n",
            d = dir.display()
        );
        fs::write(dir.join("config.toml"), config).unwrap();
        let containerd = Containerd {
            version,
            bin: install.join("usr/bin"),
            dir,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            netns: netns.map(Path::to_path_buf),
            child: std::sync::Mutex::new(None),
        };
        containerd.spawn();
        let archive = busybox_archive();
        let import = containerd.ctr(&["image", "import", &archive.display().to_string()]);
        assert_eq!(import.code, 0, "image import failed: {import:?}");
        containerd
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// A program of this containerd's build (`containerd`, `ctr`).
    pub fn binary(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the daemon (its log appended to) and waits until it answers.
    fn spawn(&self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("containerd.log"))
            .unwrap();
        // nsenter execs containerd, so the child is containerd itself.
        let mut command = match &self.netns {
            Some(netns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", netns.display()))
                    .arg(self.bin.join("containerd"));
                c
            }
            None => Command::new(self.bin.join("containerd")),
        };
        let child = command
            .arg("--config")
            .arg(self.dir.join("config.toml"))
            .env(
                "PATH",
                format!(
                    "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin:{}",
                    self.bin.display()
                ),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        *self.child() = Some(child);
        self.wait_ready();
    }

    /// Stops the daemon (SIGTERM) and waits for it to exit; shims keep running.
    pub fn stop(&self) {
        let child = self.child().take();
        stop_child(child);
    }

    /// Stops containerd and starts it again on the same state, as an operator's restart does.
    pub fn restart(&self) {
        self.stop();
        self.spawn();
    }

    fn wait_ready(&self) {
        let started = Instant::now();
        loop {
            let up = fs::metadata(self.socket())
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false)
                && self.ctr(&["version"]).code == 0;
            if up {
                return;
            }
            let exited = self.child().as_mut().and_then(|c| c.try_wait().unwrap());
            if let Some(status) = exited {
                panic!(
                    "containerd {} exited with {status}: {}",
                    self.version,
                    self.log()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "containerd {} did not come up: {}",
                self.version,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// The start-phase line the shim logged for container `id`.
    pub fn start_phases(&self, id: &str) -> String {
        self.log()
            .lines()
            .rfind(|l| l.contains(&format!("container {id} start phases:")) && l.contains("total="))
            .unwrap_or_else(|| panic!("no start phases for {id}"))
            .to_string()
    }

    /// Whether the start of container `id` restored a template rather than booted (ADR 14).
    pub fn restored(&self, id: &str) -> bool {
        let line = self.start_phases(id);
        let restored = line.contains("vmm_started.restore=");
        assert_eq!(
            restored,
            !line.contains("agent_ready.kernel="),
            "a start is a restore or a boot: {line}"
        );
        restored
    }

    /// The daemon's own directory: its root (`root/`), state and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.bin.join("ctr"));
        cmd.arg("--address").arg(self.socket()).args(args);
        cmd
    }

    pub fn ctr(&self, args: &[&str]) -> Run {
        run_with_timeout(self.ctr_command(args), None, Duration::from_secs(120))
    }

    pub fn ctr_stdin(&self, args: &[&str], stdin: &[u8]) -> Run {
        run_with_timeout(
            self.ctr_command(args),
            Some(stdin),
            Duration::from_secs(120),
        )
    }

    /// `ctr run --rm --runtime hako <image> <id> <cmd...>`
    pub fn run_rm(&self, id: &str, cmd: &[&str]) -> Run {
        let mut args = vec!["run", "--rm", "--runtime", RUNTIME, IMAGE, id];
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
        remove_daemon_leftovers(&self.dir, None);
    }
}

/// Stops a daemon the harness started: SIGTERM, then waits for it.
pub fn stop_child(child: Option<Child>) {
    if let Some(mut child) = child {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = child.wait();
    }
}

/// After a harness daemon stopped: unmounts what it left under `dir` (snapshots, rootfs
/// mounts), deletes its network namespace, and removes `dir` unless a test is failing (its
/// logs are worth keeping then).
pub fn remove_daemon_leftovers(dir: &Path, netns: Option<&str>) {
    for m in mounts_under(dir).into_iter().rev() {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
    if let Some(netns) = netns {
        let _ = Command::new("ip")
            .args(["netns", "del", netns])
            .stderr(Stdio::null())
            .status();
    }
    if !std::thread::panicking() {
        let _ = fs::remove_dir_all(dir);
    }
}

/// Mount points at or below `dir`, in the host's (the test's) mount namespace.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    mounts_in(Path::new("/proc/self/mountinfo"), dir)
}

fn mounts_in(mountinfo: &Path, dir: &Path) -> Vec<PathBuf> {
    fs::read_to_string(mountinfo)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Mount points at or below `dir` in every mount namespace a process is in, each with the pid
/// of a process in that namespace. (No process is in hako's share namespace itself: the shim
/// holds it by descriptor and virtiofsd pivots into a copy; a leftover of it shows as a live
/// shim or virtiofsd in `hako_processes`.)
pub fn mounts_anywhere_under(dir: &Path) -> Vec<(u32, PathBuf)> {
    let mut seen = BTreeSet::new();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(ns) = fs::read_link(entry.path().join("ns/mnt")) else {
            continue;
        };
        if seen.insert(ns) {
            let mounts = mounts_in(&entry.path().join("mountinfo"), dir);
            found.extend(mounts.into_iter().map(|m| (pid, m)));
        }
    }
    found
}

/// Pids and names of live hako processes (zombies included: they are leaks too). A helper is
/// hako's when its command line names the sandbox root (other QEMUs on the machine are not), or,
/// for a zombie, which has no command line left, when its parent is a hako shim.
pub fn hako_processes() -> BTreeSet<(u32, String)> {
    let mut found = BTreeSet::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(comm) = fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        let comm = comm.trim().to_string();
        if !HAKO_PROCESSES.iter().any(|p| comm.starts_with(p)) {
            continue;
        }
        let is_hako = if comm == "containerd-shim" {
            is_hako_shim(pid)
        } else {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(SANDBOX_ROOT)
                || (is_zombie(pid) && parent(pid).is_some_and(is_hako_shim))
        };
        if is_hako {
            found.insert((pid, comm));
        }
    }
    found
}

/// The share's mount namespace of sandbox `namespace/sandbox` (ADR 15), as a path `nsenter
/// --mount=` takes: the descriptor by which its shim holds it. (virtiofsd's own namespace is a
/// copy it pivoted into the share; the host's tree is not in it.)
pub fn share_namespace(namespace: &str, sandbox: &str) -> PathBuf {
    let host = fs::read_link("/proc/self/ns/mnt").unwrap();
    let wanted = format!("-namespace {namespace} -id {sandbox} ");
    let shim = hako_processes()
        .into_iter()
        .filter(|(_, comm)| comm == "containerd-shim")
        .map(|(pid, _)| pid)
        .find(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(&wanted)
        })
        .unwrap_or_else(|| panic!("no shim serves {namespace}/{sandbox}"));
    fs::read_dir(format!("/proc/{shim}/fd"))
        .unwrap()
        .flatten()
        .map(|fd| fd.path())
        .find(|fd| {
            fs::read_link(fd).is_ok_and(|l| l != host && l.to_string_lossy().starts_with("mnt:["))
        })
        .unwrap_or_else(|| panic!("the shim of {namespace}/{sandbox} holds no mount namespace"))
}

/// Runs `command` in the mount namespace at `ns` (`share_namespace`).
pub fn in_namespace(ns: &Path, command: &[&str]) -> Run {
    let out = Command::new("nsenter")
        .arg(format!("--mount={}", ns.display()))
        .arg("--")
        .args(command)
        .output()
        .unwrap();
    out.into()
}

/// A process's parent pid.
fn parent(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Whether a process has exited and waits to be reaped.
pub fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn is_hako_shim(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("containerd-shim-hako-v2"))
        .unwrap_or(false)
}

/// Sandbox directories left under /run/hako/<namespace>/ (namespaces start with a letter or
/// digit; hako's own records under the root start with a dot).
pub fn sandbox_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(namespaces) = fs::read_dir(SANDBOX_ROOT) {
        for ns in namespaces.flatten() {
            if ns.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if let Ok(sandboxes) = fs::read_dir(ns.path()) {
                dirs.extend(sandboxes.flatten().map(|s| s.path()));
            }
        }
    }
    dirs
}

/// hako's records under the sandbox root that live as long as some sandbox does: the VMMs'
/// uid claims and the cgroup parents hako made.
pub fn sandbox_records() -> Vec<PathBuf> {
    [".vmm-uids", ".cgroups"]
        .iter()
        .flat_map(|d| {
            fs::read_dir(Path::new(SANDBOX_ROOT).join(d))
                .into_iter()
                .flatten()
        })
        .flatten()
        // The registry's lock file stays; it records nothing.
        .filter(|e| e.file_name() != ".lock")
        .map(|e| e.path())
        .collect()
}

/// What the host has that hako must leave as it found it: the host namespace's network
/// interfaces (no tap or veth may stay), the named network namespaces, the nsfs mounts that
/// keep namespaces alive anywhere, and the cgroups (two levels under /sys/fs/cgroup).
#[derive(Debug, PartialEq, Eq)]
pub struct HostState {
    pub links: BTreeSet<String>,
    pub netns: BTreeSet<String>,
    pub nsfs_mounts: BTreeSet<String>,
    pub cgroups: BTreeSet<PathBuf>,
}

impl HostState {
    pub fn now() -> Self {
        let names = |dir: &str| -> BTreeSet<String> {
            fs::read_dir(dir)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        let nsfs_mounts = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" - nsfs "))
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .collect();
        let mut cgroups = BTreeSet::new();
        for top in fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            for dir in fs::read_dir(top.path()).into_iter().flatten().flatten() {
                if dir.file_type().is_ok_and(|t| t.is_dir()) {
                    cgroups.insert(dir.path());
                }
            }
        }
        HostState {
            links: names("/sys/class/net"),
            netns: names("/run/netns"),
            nsfs_mounts,
            cgroups,
        }
    }
}

/// Asserts that the host is as `before` was taken. Namespaces and interfaces go with the
/// processes that hold them, so this waits (up to 20 s) like the leak check.
pub fn assert_host_unchanged(before: &HostState, context: &str) {
    let started = Instant::now();
    loop {
        let now = HostState::now();
        if &now == before {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{context}: the host changed:\nbefore: {before:#?}\nafter: {now:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What a test may leave behind: nothing.
#[derive(Debug, PartialEq, Eq)]
pub struct Leftovers {
    pub processes: BTreeSet<(u32, String)>,
    /// In any mount namespace, with a pid that is in it.
    pub mounts: Vec<(u32, PathBuf)>,
    pub sandbox_dirs: Vec<PathBuf>,
    pub records: Vec<PathBuf>,
}

impl Leftovers {
    pub fn now() -> Self {
        Leftovers {
            processes: hako_processes(),
            mounts: mounts_anywhere_under(Path::new(SANDBOX_ROOT)),
            sandbox_dirs: sandbox_dirs(),
            records: sandbox_records(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.processes.is_empty()
            && self.mounts.is_empty()
            && self.sandbox_dirs.is_empty()
            && self.records.is_empty()
    }
}

/// Asserts that no hako process, mount or sandbox dir exists. containerd stops the shim after
/// the last Delete on its own schedule, so this waits (up to 20 s) for that to settle.
pub fn assert_no_leaks(context: &str) {
    let started = Instant::now();
    loop {
        let left = Leftovers::now();
        if left.is_empty() {
            return;
        }
        if started.elapsed() >= Duration::from_secs(20) {
            // Reported once, here; cleared so that the tests after this one start clean.
            reap_leftovers();
            panic!("{context}: left behind after the test: {left:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Clears what a failed test left, as containerd clears a dead shim's sandbox: every hako
/// process killed, then the shim's own `delete` run for each sandbox dir, then any mount still
/// under the sandbox root detached. Only for after a failure has been reported: a test that
/// passes must leave nothing for this to do.
pub fn reap_leftovers() {
    for (pid, _) in hako_processes() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let started = Instant::now();
    while hako_processes().iter().any(|(pid, _)| !is_zombie(*pid))
        && started.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    for dir in sandbox_dirs() {
        let (Some(id), Some(ns)) = (
            dir.file_name().map(|n| n.to_string_lossy().into_owned()),
            dir.parent()
                .and_then(Path::file_name)
                .map(|n| n.to_string_lossy().into_owned()),
        ) else {
            continue;
        };
        let mut delete = Command::new("containerd-shim-hako-v2");
        delete.args([
            "-namespace",
            &ns,
            "-id",
            &id,
            "-bundle",
            "/nonexistent",
            "delete",
        ]);
        let run = run_with_timeout(delete, None, Duration::from_secs(30));
        eprintln!("reaped sandbox {}: exit {:?}", dir.display(), run.code);
    }
    for m in mounts_under(Path::new(SANDBOX_ROOT)).into_iter().rev() {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Runs `test` against every containerd version, each on a fresh daemon, with the leak check
/// before (nothing from earlier tests) and after.
pub fn for_each_containerd(test: impl Fn(&Containerd)) {
    for_each_containerd_with_env(&[], test)
}

/// `for_each_containerd`, with extra environment for containerd and its shims (such as a
/// HAKO_CONFIG for the test).
pub fn for_each_containerd_with_env(env: &[(&str, &str)], test: impl Fn(&Containerd)) {
    for install in containerd_versions() {
        assert_no_leaks("before the test");
        let host = HostState::now();
        let containerd = Containerd::start_with_env(&install, env);
        eprintln!("--- containerd {}", containerd.version);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| test(&containerd)));
        if let Err(panic) = outcome {
            // What the shims logged (through containerd) says why; the directory goes below.
            let log = containerd.log();
            let notable: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("level=error") || l.contains("level=warn"))
                .collect();
            eprintln!(
                "containerd {} warnings and errors (last 40):\n{}",
                containerd.version,
                notable[notable.len().saturating_sub(40)..].join("\n")
            );
            // Leave no VM behind for the next test: stop every task this containerd still has.
            containerd.remove_all_tasks();
            drop(containerd);
            reap_leftovers();
            std::panic::resume_unwind(panic);
        }
        drop(containerd);
        assert_no_leaks(&format!("containerd {}", install.display()));
        assert_host_unchanged(&host, &format!("containerd {}", install.display()));
    }
}

/// The guest kernel release the installed guest image boots.
pub fn guest_kernel_release() -> String {
    fs::read_to_string("/usr/share/hako/guest/kernel-release")
        .expect("the guest image is installed (scripts/install.sh)")
        .trim()
        .to_string()
}

impl Containerd {
    /// `ctr run -d --runtime hako [extra...] <image> <id> <cmd...>`
    pub fn run_detached(&self, id: &str, extra: &[&str], cmd: &[&str]) -> Run {
        let mut args = vec!["run", "-d", "--runtime", RUNTIME];
        args.extend_from_slice(extra);
        args.push(IMAGE);
        args.push(id);
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }

    /// `ctr run --rm --runtime hako [extra...] <image> <id> <cmd...>`
    pub fn run_rm_with(&self, id: &str, extra: &[&str], cmd: &[&str]) -> Run {
        let mut args = vec!["run", "--rm", "--runtime", RUNTIME];
        args.extend_from_slice(extra);
        args.push(IMAGE);
        args.push(id);
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }

    /// `ctr task exec --exec-id <exec_id> [extra...] <id> <cmd...>`
    pub fn exec(&self, id: &str, exec_id: &str, extra: &[&str], cmd: &[&str]) -> Run {
        let mut args = vec!["task", "exec", "--exec-id", exec_id];
        args.extend_from_slice(extra);
        args.push(id);
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }

    /// The containerd daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child().as_ref().map(Child::id).unwrap_or(0)
    }

    /// The bundle containerd made for a task in the `default` namespace.
    pub fn bundle_dir(&self, id: &str) -> PathBuf {
        self.dir
            .join("state/io.containerd.runtime.v2.task/default")
            .join(id)
    }

    /// Calls the shim's Task.Update directly (ctr has no command for it), as containerd's CRI
    /// does for UpdateContainerResources. `resources` is OCI LinuxResources JSON.
    pub fn shim_update(&self, id: &str, resources: &str) -> Result<(), String> {
        use containerd_shim_protos::shim::shim::UpdateTaskRequest;
        use containerd_shim_protos::shim::shim_ttrpc::TaskClient;
        use protobuf::well_known_types::any::Any;
        let address =
            fs::read_to_string(self.bundle_dir(id).join("address")).map_err(|e| e.to_string())?;
        let client = ttrpc::Client::connect(address.trim()).map_err(|e| e.to_string())?;
        let task = TaskClient::new(client);
        let req = UpdateTaskRequest {
            id: id.to_string(),
            resources: protobuf::MessageField::some(Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
                    .to_string(),
                value: resources.as_bytes().to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        };
        task.update(ttrpc::context::with_timeout(30_000_000_000), &req)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// Calls the Task API's Create on the shim that runs `anchor`, as containerd would, with
    /// a bundle the test made: for inputs containerd itself never sends.
    pub fn shim_create(&self, anchor: &str, id: &str, bundle: &Path) -> Result<u32, String> {
        use containerd_shim_protos::shim::shim::CreateTaskRequest;
        use containerd_shim_protos::shim::shim_ttrpc::TaskClient;
        let address = fs::read_to_string(self.bundle_dir(anchor).join("address"))
            .map_err(|e| e.to_string())?;
        let client = ttrpc::Client::connect(address.trim()).map_err(|e| e.to_string())?;
        let task = TaskClient::new(client);
        let req = CreateTaskRequest {
            id: id.to_string(),
            bundle: bundle.display().to_string(),
            ..Default::default()
        };
        task.create(ttrpc::context::with_timeout(60_000_000_000), &req)
            .map(|r| r.pid)
            .map_err(|e| e.to_string())
    }

    /// The STATUS column of `ctr task ls` for `id`.
    pub fn task_status(&self, id: &str) -> Option<String> {
        let ls = self.ctr(&["task", "ls"]);
        ls.stdout
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cols| cols.first() == Some(&id))
            .and_then(|cols| cols.get(2).map(|s| s.to_string()))
    }

    /// The task's pid as containerd reports it (for hako: the VMM's).
    pub fn task_pid(&self, id: &str) -> u32 {
        let ls = self.ctr(&["task", "ls"]);
        ls.stdout
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cols| cols.first() == Some(&id))
            .and_then(|cols| cols.get(1).and_then(|p| p.parse().ok()))
            .unwrap_or_else(|| panic!("no task {id}: {ls:?}"))
    }

    /// Polls `ctr task ls` (bounded) until `id` has `status`.
    pub fn wait_status(&self, id: &str, status: &str) {
        let started = Instant::now();
        while self.task_status(id).as_deref() != Some(status) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "task {id} never reached {status}; it is {:?}",
                self.task_status(id)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Best-effort cleanup after a failed test: every task and container goes.
    pub fn remove_all_tasks(&self) {
        let ls = self.ctr(&["task", "ls", "-q"]);
        for id in ls.stdout.split_whitespace() {
            let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
            let _ = self.ctr(&["task", "delete", "-f", id]);
        }
        let ls = self.ctr(&["container", "ls", "-q"]);
        for id in ls.stdout.split_whitespace() {
            let _ = self.ctr(&["container", "rm", id]);
        }
    }

    /// Kills, deletes and removes a detached task and its container.
    pub fn remove_task(&self, id: &str) {
        if self.task_status(id).as_deref() != Some("STOPPED") {
            let r = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
            assert_eq!(r.code, 0, "kill {id}: {r:?}");
            self.wait_status(id, "STOPPED");
        }
        let r = self.ctr(&["task", "delete", id]);
        assert_eq!(r.code, 0, "task delete {id}: {r:?}");
        let r = self.ctr(&["container", "rm", id]);
        assert_eq!(r.code, 0, "container rm {id}: {r:?}");
    }

    /// Starts `ctr events`; the watcher collects what it prints.
    pub fn events(&self) -> EventWatcher {
        let mut child = self
            .ctr_command(&["events"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().unwrap().push(line);
            }
        });
        EventWatcher { child, lines }
    }

    /// Runs `ctr <args>` on a terminal (under `script`), the terminal sized `cols`x`rows`.
    pub fn ctr_on_tty(&self, args: &[&str], cols: u16, rows: u16) -> Run {
        on_tty(self.ctr_command(args), cols, rows)
    }
}

/// Runs `cmd` on a terminal of `cols` x `rows` (through `script`), as a user at a terminal
/// would, and returns what it printed there.
pub fn on_tty(cmd: Command, cols: u16, rows: u16) -> Run {
    let mut line = format!("stty cols {cols} rows {rows}; {:?}", cmd.get_program());
    for a in cmd.get_args() {
        line.push_str(&format!(
            " '{}'",
            a.to_string_lossy().replace('\'', "'\\''")
        ));
    }
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &line, "/dev/null"]);
    // A stdin that stays open: `script` forwards EOF into the terminal otherwise.
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stdin = child.stdin.take();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = rx
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("{line} did not finish");
        });
    drop(stdin);
    output.unwrap().into()
}

/// `ctr events` running in the background.
pub struct EventWatcher {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl EventWatcher {
    /// Every event line printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits (bounded) until a printed event line contains every one of `parts`.
    pub fn wait_for(&self, parts: &[&str]) -> String {
        let started = Instant::now();
        loop {
            if let Some(line) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return line.clone();
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no event with {parts:?}; saw: {:#?}",
                self.lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for EventWatcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A hako configuration file for one test (the rest is the built-in defaults), passed to the
/// shims as HAKO_CONFIG; removed on drop.
pub struct HakoConfig {
    dir: PathBuf,
    pub path: String,
}

impl HakoConfig {
    pub fn new(toml: &str) -> HakoConfig {
        let dir = std::env::temp_dir().join(format!(
            "hako-config-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("configuration.toml");
        fs::write(&file, toml).unwrap();
        HakoConfig {
            path: file.display().to_string(),
            dir,
        }
    }

    /// The environment that makes containerd's shims read it.
    pub fn env(&self) -> [(&str, &str); 1] {
        [("HAKO_CONFIG", self.path.as_str())]
    }
}

impl Drop for HakoConfig {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}
