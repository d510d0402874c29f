//! podman 4.3 and conmon 2.1 (Debian 12's packages) driving `hako-runtime`, beside the same
//! podman driving runc, its default runtime: each test runs one half per runtime and compares
//! what podman showed.
//!
//! podman keeps images and containers in a storage of the tests' own (`STORAGE`, kept between
//! runs like the busybox archive: only images stay in it, busybox and the pause image podman
//! builds for pods from the host's catatonit), with a private containers.conf,
//! and every podman command runs in a network namespace the harness makes for the half
//! (`HostNetns`, "the host" as in the Docker tests): podman's bridge, netavark's firewall rules
//! and forwarding sysctls, published ports and `curl` all live there, not on the real host.

#![allow(clippy::unwrap_used)] // Test harness: a failed step should fail the test loudly.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::docker::{HostNetns, NetSnapshot};
use crate::{
    assert_no_leaks, busybox_archive, guest_kernel_release, mounts_anywhere_under, report_skip,
    run_with_timeout, HostState, Run, IMAGE,
};

/// Where `scripts/install.sh` puts the runtime.
pub const HAKO_RUNTIME: &str = "/usr/local/bin/hako-runtime";
/// hako-runtime's state root (`--root` unset): a directory per container, and `.sandboxes/`
/// with each sandbox server's socket and log, none of which may outlive its container or
/// sandbox.
pub const RUNTIME_ROOT: &str = "/run/hako-runtime";
/// What hako-runtime keeps under its root for good: the lock that serialises creates, and the
/// (empty) directory of the servers' sockets.
const RUNTIME_PERMANENT: [&str; 2] = [".create.lock", ".sandboxes"];
/// Images and the container database: on disk, kept between runs.
pub const STORAGE: &str = "/var/tmp/hako-podman-e2e";
/// podman's run state (mounts, exit files, locks): on tmpfs, as /run/containers is.
pub const RUN_STATE: &str = "/run/hako-podman-e2e";
/// The test containers' limits must stay within this machine's hard limits: podman asks for
/// 1048576 open files and processes by default, which runc cannot grant without
/// CAP_SYS_RESOURCE here. Logs go to files so that `podman logs` works without journald.
const CONTAINERS_CONF: &str = "[containers]\n\
    default_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\
    log_driver = \"k8s-file\"\n";
/// How long one podman command may take: podman itself gives a container's create 240 s.
const DEADLINE: Duration = Duration::from_secs(240);
/// Cgroups podman makes once and keeps (its cgroupfs parent and the conmons' cgroup in it, or
/// systemd's slice): not a leak of any test's.
const PODMAN_CGROUP_PARENTS: [&str; 2] = ["libpod_parent", "machine.slice"];

static NEXT: AtomicU32 = AtomicU32::new(0);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Runc,
    Hako,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Runc => "runc",
            Runtime::Hako => "hako",
        }
    }

    /// podman's global flags that pick this runtime: none for runc, podman's default here.
    pub fn args(self) -> &'static [&'static str] {
        match self {
            Runtime::Runc => &[],
            Runtime::Hako => &["--runtime", HAKO_RUNTIME],
        }
    }

    /// What `uname -r` prints in a container: the host's kernel under runc, the guest's under
    /// hako, which is how a test knows the container really ran in a VM.
    pub fn kernel_release(self) -> String {
        match self {
            Runtime::Runc => fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap()
                .trim()
                .to_string(),
            Runtime::Hako => guest_kernel_release(),
        }
    }
}

/// The runtimes to test: both, or those HAKO_PODMAN_RUNTIMES names (`runc`, `hako`,
/// comma-separated). A half left out is reported as skipped, never as passed.
pub fn runtimes(test: &str) -> Vec<Runtime> {
    let wanted = std::env::var("HAKO_PODMAN_RUNTIMES").unwrap_or_else(|_| "runc,hako".into());
    let names: Vec<&str> = wanted.split(',').map(str::trim).collect();
    for name in &names {
        assert!(
            ["runc", "hako"].contains(name),
            "HAKO_PODMAN_RUNTIMES={wanted}: {name} is neither runc nor hako"
        );
    }
    let mut chosen = Vec::new();
    for runtime in [Runtime::Runc, Runtime::Hako] {
        if names.contains(&runtime.name()) {
            chosen.push(runtime);
        } else {
            report_skip(&format!(
                "podman::{test} under {}: left out by HAKO_PODMAN_RUNTIMES={wanted}",
                runtime.name()
            ));
        }
    }
    if chosen.contains(&Runtime::Hako) {
        assert!(
            Path::new(HAKO_RUNTIME).is_file(),
            "{HAKO_RUNTIME} is not installed: run scripts/install.sh \
             (or HAKO_PODMAN_RUNTIMES=runc for the runc half alone)"
        );
    }
    chosen
}

/// podman with the tests' storage and configuration, as a command line: `env` carries the
/// configuration, so that the line keeps it when `on_tty` hands it to a shell.
fn podman_line() -> Vec<String> {
    let conf = Path::new(STORAGE).join("containers.conf");
    vec![
        "env".into(),
        format!("CONTAINERS_CONF={}", conf.display()),
        "podman".into(),
        "--root".into(),
        format!("{STORAGE}/storage"),
        "--runroot".into(),
        format!("{RUN_STATE}/runroot"),
        "--tmpdir".into(),
        format!("{RUN_STATE}/tmp"),
    ]
}

/// podman with the tests' storage and configuration, in the current network namespace.
fn podman_command(args: &[&str]) -> Command {
    let line = podman_line();
    let mut cmd = Command::new(&line[0]);
    cmd.args(&line[1..]).args(args);
    cmd
}

/// Writes the configuration and loads the busybox image, once per test binary; checks that
/// podman's default runtime, the runc half's, is runc.
fn prepare_storage() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        fs::create_dir_all(STORAGE).unwrap();
        fs::write(Path::new(STORAGE).join("containers.conf"), CONTAINERS_CONF).unwrap();
        let archive = busybox_archive().display().to_string();
        let load = run_with_timeout(podman_command(&["load", "-i", &archive]), None, DEADLINE);
        assert!(
            load.code == 0 && load.stdout.contains(IMAGE),
            "podman load: {load:?}"
        );
        let info = podman_command(&["info", "--format", "{{.Host.OCIRuntime.Name}}"]);
        let info = run_with_timeout(info, None, DEADLINE);
        assert_eq!(
            info.stdout.trim(),
            "runc",
            "podman's default runtime: {info:?}"
        );
    });
}

/// One half of a test: podman with one runtime, in a network namespace of its own.
pub struct Podman {
    pub runtime: Runtime,
    pub host: HostNetns,
    /// podman's working directory, which conmon inherits: conmon 2.1.6 drops an `oom` file in
    /// it when its container is OOM-killed (cgroup v1, no `--persist-dir` from podman 4.3).
    cwd: ScratchDir,
}

impl Podman {
    pub fn command(&self, args: &[&str]) -> Command {
        // nsenter and env exec: a deadline's kill reaches podman itself.
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.host.path().display()))
            .args(podman_line())
            .args(self.runtime.args())
            .args(args)
            .current_dir(&self.cwd.path);
        cmd
    }

    /// `podman <args>` under this half's runtime.
    pub fn podman(&self, args: &[&str]) -> Run {
        run_with_timeout(self.command(args), None, DEADLINE)
    }

    /// `podman <args>`, which must succeed.
    pub fn must(&self, args: &[&str]) -> Run {
        let r = self.podman(args);
        assert_eq!(r.code, 0, "podman {args:?} under {:?}: {r:?}", self.runtime);
        r
    }

    /// `podman inspect --format <format> <name>`, trimmed.
    pub fn inspect(&self, name: &str, format: &str) -> String {
        self.must(&["inspect", "--format", format, name])
            .stdout
            .trim()
            .to_string()
    }

    /// A container's state as `podman inspect` shows it: status, running, exit code.
    pub fn state(&self, name: &str) -> String {
        self.inspect(
            name,
            "{{.State.Status}} {{.State.Running}} {{.State.ExitCode}}",
        )
    }

    /// `podman <args>` on a terminal of `cols` x `rows`, as at a user's terminal.
    pub fn on_tty(&self, args: &[&str], cols: u16, rows: u16) -> Run {
        crate::on_tty(self.command(args), cols, rows)
    }

    /// A shell command in podman's network namespace: "the host" as podman sees it.
    pub fn on_host(&self, script: &str) -> Run {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.host.path().display()))
            .args(["sh", "-c", script]);
        run_with_timeout(cmd, None, Duration::from_secs(60))
    }

    /// What podman still lists: containers, then pods.
    fn listed(&self) -> (String, String) {
        let ps = self.must(&["ps", "-a", "--format", "{{.ID}} {{.Names}} {{.Status}}"]);
        let pods = self.must(&["pod", "ps", "--format", "{{.ID}} {{.Name}} {{.Status}}"]);
        (ps.stdout, pods.stdout)
    }

    /// Removes every container and pod, without waiting for them to stop: after a failure.
    fn remove_everything(&self) {
        let pods = self.podman(&["pod", "ps", "-q", "--no-trunc"]).stdout;
        let _ = self.podman(&["pod", "rm", "-af", "-t", "0"]);
        let _ = self.podman(&["rm", "-af", "-t", "0"]);
        for pod in pods.split_whitespace() {
            remove_pod_cgroups(pod);
        }
    }
}

/// Runs `half` once per runtime (`runtimes`), each in a fresh network namespace with the leak
/// checks before and after, and asserts that what the halves returned, what podman showed the
/// user, is the same under hako-runtime as under runc. Each half asserts its own expectations
/// too, so the runc half alone proves the test can fail.
pub fn compare<T: PartialEq + std::fmt::Debug>(
    test: &str,
    half: impl Fn(&Podman) -> T,
) -> Vec<(Runtime, T)> {
    prepare_storage();
    let mut seen = Vec::new();
    for runtime in runtimes(test) {
        eprintln!("--- podman under {}", runtime.name());
        seen.push((runtime, run_half(runtime, &half)));
    }
    if let [(_, runc), (_, hako)] = &seen[..] {
        assert_eq!(
            runc, hako,
            "{test}: podman showed something else under hako-runtime (right) than under runc (left)"
        );
    }
    seen
}

/// Runs `half` under hako-runtime alone, with the same leak checks, for what runc does not
/// refuse (the host's network) and hako must.
pub fn under_hako_only(test: &str, half: impl Fn(&Podman)) {
    prepare_storage();
    if runtimes(test).contains(&Runtime::Hako) {
        run_half(Runtime::Hako, &half);
    }
}

fn run_half<T>(runtime: Runtime, half: &impl Fn(&Podman) -> T) -> T {
    assert_no_leaks("before the test");
    // Not cleared if found: what is there now is no test's of this run.
    assert_runtime_clean(&Ours::storage(), "before the test", false);
    let host_state = host_state();
    let cgroups = podman_cgroups();
    let started = Instant::now();
    let p = Podman {
        runtime,
        host: HostNetns::create(),
        cwd: ScratchDir::new("cwd"),
    };
    let listed = p.listed();
    assert_eq!(
        listed,
        (String::new(), String::new()),
        "podman storage {STORAGE} holds containers or pods from an earlier run: remove them \
         (podman --root {STORAGE}/storage --runroot {RUN_STATE}/runroot --tmpdir {RUN_STATE}/tmp \
         rm -af)"
    );
    let net = p.host.snapshot();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| half(&p)));
    let context = format!("podman under {}", runtime.name());
    match outcome {
        Ok(value) => {
            assert_left_nothing(&p, &net, started, &context);
            drop(p);
            assert_no_leaks(&context);
            assert_host_as_before(&host_state, &cgroups, &context);
            value
        }
        Err(panic) => {
            p.remove_everything();
            drop(p);
            reap_runtime(&Ours::since(started));
            std::panic::resume_unwind(panic);
        }
    }
}

/// podman lists nothing, nothing of the half's is left with the runtime (`assert_runtime_clean`),
/// and podman's "host" namespace is as it was.
fn assert_left_nothing(p: &Podman, net: &NetSnapshot, started: Instant, context: &str) {
    let listed = p.listed();
    assert_eq!(
        listed,
        (String::new(), String::new()),
        "{context}: podman still lists containers or pods"
    );
    assert_runtime_clean(&Ours::since(started), context, true);
    p.host.assert_unchanged(net, context);
}

/// What of hako-runtime's belongs to these tests (other people's containers on the machine are
/// neither counted nor touched): the containers podman made in the tests' storage, by id, and
/// any record or command line that names that storage.
pub struct Ours {
    ids: BTreeSet<String>,
}

impl Ours {
    /// Only what names the tests' storage: before a test, when no id is known.
    fn storage() -> Ours {
        Ours {
            ids: BTreeSet::new(),
        }
    }

    /// The containers podman made (infra containers included) since `started`, from its
    /// event log in the tests' storage.
    fn since(started: Instant) -> Ours {
        let window = format!("{}s", started.elapsed().as_secs() + 5);
        let events = podman_command(&[
            "events",
            "--stream=false",
            "--since",
            &window,
            "--filter",
            "type=container",
            "--format",
            "{{.ID}}",
        ]);
        let events = run_with_timeout(events, None, DEADLINE);
        assert_eq!(events.code, 0, "podman events: {events:?}");
        Ours {
            ids: events
                .stdout
                .split_whitespace()
                .map(str::to_string)
                .collect(),
        }
    }

    fn names(&self, text: &str) -> bool {
        text.contains(STORAGE) || self.ids.iter().any(|id| text.contains(id.as_str()))
    }

    /// A container's directory: its id, or the bundle its record names.
    fn owns_container(&self, dir: &Path) -> bool {
        let record = fs::read_to_string(dir.join("state.json")).unwrap_or_default();
        self.names(&dir.display().to_string()) || self.names(&record)
    }
}

/// Waits (up to 20 s: conmon runs podman's cleanup after its container exits) until none of
/// `ours` is left: no conmon of the tests' storage, no hako-runtime process, no container state
/// or server socket or log under RUNTIME_ROOT, no mount of the tests' storage.
fn assert_runtime_clean(ours: &Ours, context: &str, reap: bool) {
    let started = Instant::now();
    loop {
        let conmons = processes(|comm, cmdline| comm == "conmon" && cmdline.contains(STORAGE));
        let runtimes = hako_runtime_processes(ours);
        let states = runtime_states(ours);
        // A container's rootfs or shm mount still held, in any mount namespace (the
        // runtime's processes have their own).
        let mounts: Vec<(u32, PathBuf)> = [STORAGE, RUN_STATE]
            .iter()
            .flat_map(|dir| mounts_anywhere_under(Path::new(dir)))
            .collect();
        if conmons.is_empty() && runtimes.is_empty() && states.is_empty() && mounts.is_empty() {
            return;
        }
        if started.elapsed() >= Duration::from_secs(20) {
            // What the runtime kept says which step left it.
            for state in &states {
                let listing = Command::new("ls").arg("-lR").arg(state).output();
                let listing = listing.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
                let record = fs::read_to_string(state.join("state.json")).unwrap_or_default();
                eprintln!("{}: {listing:?}\nstate.json: {record}", state.display());
            }
            if reap {
                reap_runtime(ours);
            }
            panic!(
                "{context}: left behind: conmon {conmons:?}, hako-runtime {runtimes:?}, \
                 state {states:?}, mounts {mounts:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Pids of processes whose `comm` and command line match.
fn processes(matches: impl Fn(&str, &str) -> bool) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(comm) = fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if matches(comm.trim(), &cmdline) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// hako-runtime's processes of ours (keepers, sandbox servers, commands; zombies too): none
/// outlives its container.
fn hako_runtime_processes(ours: &Ours) -> Vec<(u32, String)> {
    processes(|comm, cmdline| comm.starts_with("hako-runtime") && ours.names(cmdline))
}

/// What hako-runtime keeps of ours under its root beyond `RUNTIME_PERMANENT`: containers'
/// state directories, and servers' sockets and logs (named after their sandboxes, which are
/// named after their first containers).
fn runtime_states(ours: &Ours) -> Vec<PathBuf> {
    let entries = |dir: &Path| -> Vec<PathBuf> {
        fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect()
    };
    let root = Path::new(RUNTIME_ROOT);
    let mut found: Vec<PathBuf> = entries(root)
        .into_iter()
        .filter(|p| {
            !RUNTIME_PERMANENT
                .iter()
                .any(|k| p.file_name().unwrap() == *k)
        })
        .filter(|p| ours.owns_container(p))
        .collect();
    let mut sandboxes: BTreeSet<String> = ours.ids.clone();
    for dir in &found {
        let record = fs::read_to_string(dir.join("state.json")).unwrap_or_default();
        let record: serde_json::Value = serde_json::from_str(&record).unwrap_or_default();
        if let Some(sandbox) = record["sandbox"].as_str() {
            sandboxes.insert(sandbox.to_string());
        }
    }
    found.extend(entries(&root.join(".sandboxes")).into_iter().filter(|p| {
        p.file_stem()
            .is_some_and(|s| sandboxes.contains(&*s.to_string_lossy()))
    }));
    found
}

/// After this test's failure, so that the tests after it start clean: deletes each container
/// of ours left with the runtime's own `delete --force`, then kills what of ours still runs
/// (hako-runtime's processes, and the VMMs and helpers of our sandboxes), and removes what
/// the dead servers left in `.sandboxes/` (printing their logs first). Nothing of anyone
/// else's is touched.
fn reap_runtime(ours: &Ours) {
    let sandboxes = Path::new(RUNTIME_ROOT).join(".sandboxes");
    for state in runtime_states(ours) {
        if state.is_dir() {
            let id = state.file_name().unwrap().to_string_lossy().into_owned();
            let mut delete = Command::new(HAKO_RUNTIME);
            delete.args(["delete", "--force", &id]);
            let r = run_with_timeout(delete, None, Duration::from_secs(60));
            eprintln!("reaped hako-runtime container {id}: {r:?}");
        }
    }
    let helpers = crate::hako_processes().into_iter().filter(|(pid, _)| {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        ours.names(&String::from_utf8_lossy(&cmdline))
    });
    for pid in hako_runtime_processes(ours)
        .into_iter()
        .map(|(pid, _)| pid)
        .chain(helpers.map(|(pid, _)| pid))
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    for state in runtime_states(ours) {
        if state.starts_with(&sandboxes) {
            if state.extension().is_some_and(|e| e == "log") {
                let log = fs::read_to_string(&state).unwrap_or_default();
                eprintln!("{} (a server's log):\n{log}", state.display());
            }
            let _ = fs::remove_file(&state);
        }
    }
}

fn is_podman_parent(cgroup: &Path) -> bool {
    cgroup
        .file_name()
        .is_some_and(|n| PODMAN_CGROUP_PARENTS.iter().any(|p| n == *p))
}

/// The host's state without podman's permanent cgroup parents (made by whichever podman ran
/// first on this machine, perhaps this test).
fn host_state() -> HostState {
    let mut state = HostState::now();
    state.cgroups.retain(|c| !is_podman_parent(c));
    state
}

/// Cgroups under podman's parents (any hierarchy, three levels down), except the conmons'
/// shared one: containers' and pods' cgroups, which go with them.
fn podman_cgroups() -> BTreeSet<PathBuf> {
    fn walk(dir: &Path, depth: u32, found: &mut BTreeSet<PathBuf>) {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            if depth == 0 && entry.file_name() == "conmon" {
                continue;
            }
            found.insert(path.clone());
            if depth < 2 {
                walk(&path, depth + 1, found);
            }
        }
    }
    let mut found = BTreeSet::new();
    let mut tops = vec![PathBuf::from("/sys/fs/cgroup")];
    tops.extend(
        fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path()),
    );
    for top in tops {
        for parent in PODMAN_CGROUP_PARENTS {
            walk(&top.join(parent), 0, &mut found);
        }
    }
    found
}

/// Removes the empty cgroups podman 4.3 leaves for a removed pod in the hierarchies it does not
/// manage (the named systemd one and cgroup v2's on a hybrid host), under runc as under hako:
/// podman's leak, not the runtime's. A cgroup that still holds a process is not empty, stays,
/// and fails the check of the host.
pub fn remove_pod_cgroups(pod_id: &str) {
    for hierarchy in fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        for parent in PODMAN_CGROUP_PARENTS {
            let _ = fs::remove_dir(hierarchy.path().join(parent).join(pod_id));
        }
    }
}

/// Waits (up to 20 s, as `assert_host_unchanged`) until the host's interfaces, namespaces,
/// nsfs mounts and cgroups, podman's included, are as before the test.
fn assert_host_as_before(state: &HostState, cgroups: &BTreeSet<PathBuf>, context: &str) {
    let started = Instant::now();
    loop {
        let (now, now_cgroups) = (host_state(), podman_cgroups());
        if &now == state && &now_cgroups == cgroups {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{context}: the host changed:\nbefore: {state:#?}\n{cgroups:#?}\n\
             after: {now:#?}\n{now_cgroups:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A host directory for a test's volumes, removed on drop.
pub struct ScratchDir {
    pub path: PathBuf,
}

impl ScratchDir {
    pub fn new(name: &str) -> ScratchDir {
        let path = std::env::temp_dir().join(format!(
            "hako-podman-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        ScratchDir { path }
    }

    /// `<dir>:<target>[:<options>]` for `-v`.
    pub fn volume(&self, target: &str, options: &str) -> String {
        let mut spec = format!("{}:{target}", self.path.display());
        if !options.is_empty() {
            spec.push(':');
            spec.push_str(options);
        }
        spec
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// `/dev/pts/<n>` with the number left out: which replica a terminal gets is no behaviour.
pub fn without_pts_number(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("/dev/pts/") {
        let (before, after) = rest.split_at(at + "/dev/pts/".len());
        out.push_str(before);
        out.push('N');
        rest = after.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}
