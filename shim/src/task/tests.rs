//! The task service over a real sandbox dir, share mounts and network namespace, with a
//! process standing in for the VMM and a fake agent: the orders containerd relies on and the
//! rollbacks, without booting a VM. Needs root, as the share's mounts do.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::ttrpc::r#async::TtrpcContext;
use containerd_shim::ExitSignal;
use hako_protocol as pb;
use tokio::sync::watch;
use ttrpc::Code;

use super::events::EventSender;
use super::TaskService;
use crate::agent_client::{AgentClient, AgentError};
use crate::sandbox::pod::{Boot, Pod};
use crate::sandbox::{Sandbox, SandboxError};
use crate::vmm::{Hypervisor, NetDevice, VmSpec, VmmError};

const NAMESPACE: &str = "hako-unit";
/// Bounds every wait for something a spawned task does; never reached when all is well.
const PATIENCE: Duration = Duration::from_secs(20);

/// A stand-in agent: records calls, keeps each process's exit status until a signal sets it.
#[derive(Default)]
struct FakeAgent {
    calls: StdMutex<Vec<String>>,
    refuse_create: bool,
    /// Signals time out, as with an agent that stopped answering.
    silent: bool,
    /// Holds CreateContainer until notified.
    create_gate: Option<Arc<tokio::sync::Notify>>,
    exits: StdMutex<HashMap<String, watch::Sender<Option<u32>>>>,
    /// What every process writes to stdout, served once.
    output: StdMutex<Option<Vec<u8>>>,
}

impl FakeAgent {
    fn note(&self, call: String) {
        self.calls.lock().expect("calls").push(call);
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().expect("calls").clone()
    }

    fn exit_of(&self, container_id: &str, exec_id: &str) -> watch::Sender<Option<u32>> {
        self.exits
            .lock()
            .expect("exits")
            .entry(format!("{container_id}/{exec_id}"))
            .or_insert_with(|| watch::channel(None).0)
            .clone()
    }
}

#[async_trait]
impl AgentClient for FakeAgent {
    async fn create_sandbox(
        &self,
        _: &str,
        _: &str,
        _: Vec<pb::Interface>,
        _: Vec<pb::Route>,
        _: Option<pb::PodInit>,
    ) -> Result<u32, AgentError> {
        Ok(0)
    }
    async fn update_interfaces(
        &self,
        _: Vec<pb::Interface>,
        _: Vec<pb::Route>,
    ) -> Result<(), AgentError> {
        Ok(())
    }
    async fn destroy_sandbox(&self) -> Result<(), AgentError> {
        self.note("DestroySandbox".into());
        Ok(())
    }
    async fn create_container(&self, req: pb::CreateContainerRequest) -> Result<u32, AgentError> {
        self.note(format!("CreateContainer {}", req.container_id));
        if let Some(gate) = &self.create_gate {
            gate.notified().await;
        }
        if self.refuse_create {
            return Err(AgentError::Rpc {
                call: "CreateContainer",
                code: Code::INVALID_ARGUMENT,
                message: "the guest refuses".into(),
            });
        }
        Ok(7)
    }
    async fn start_process(&self, container_id: &str, _: &str) -> Result<(), AgentError> {
        self.note(format!("StartProcess {container_id}"));
        Ok(())
    }
    async fn exec_process(&self, _: pb::ExecProcessRequest) -> Result<u32, AgentError> {
        Ok(8)
    }
    async fn delete_process(&self, _: &str, _: &str) -> Result<(), AgentError> {
        Ok(())
    }
    async fn resize_pty(&self, _: &str, _: &str, _: u32, _: u32) -> Result<(), AgentError> {
        Ok(())
    }
    async fn set_paused(&self, _: &str, _: bool) -> Result<(), AgentError> {
        Ok(())
    }
    async fn stats(&self, _: &str) -> Result<pb::StatsContainerResponse, AgentError> {
        Ok(pb::StatsContainerResponse::default())
    }
    async fn update(&self, _: &str, _: Vec<u8>) -> Result<(), AgentError> {
        Ok(())
    }
    async fn oom_event(&self) -> Result<String, AgentError> {
        std::future::pending().await
    }
    async fn remove_container(&self, container_id: &str) -> Result<(), AgentError> {
        self.note(format!("RemoveContainer {container_id}"));
        Ok(())
    }
    async fn wait_process(&self, container_id: &str, exec_id: &str) -> Result<u32, AgentError> {
        let mut rx = self.exit_of(container_id, exec_id).subscribe();
        let status = rx.wait_for(Option::is_some).await.map(|s| s.unwrap_or(0));
        status.map_err(|_| AgentError::Transport {
            call: "WaitProcess",
            message: "gone".into(),
        })
    }
    async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        _: bool,
    ) -> Result<(), AgentError> {
        self.note(format!("SignalProcess {container_id} {signal}"));
        if self.silent {
            return Err(AgentError::Timeout {
                call: "SignalProcess",
                timeout: Duration::from_secs(10),
            });
        }
        self.exit_of(container_id, exec_id)
            .send_replace(Some(128 + signal));
        Ok(())
    }
    async fn write_stdin(&self, _: &str, _: &str, _: Vec<u8>) -> Result<(), AgentError> {
        Ok(())
    }
    async fn close_stdin(&self, _: &str, _: &str) -> Result<(), AgentError> {
        Ok(())
    }
    async fn read_output(
        &self,
        _: &str,
        _: &str,
        stderr: bool,
    ) -> Result<Option<Vec<u8>>, AgentError> {
        if stderr {
            return Ok(None);
        }
        Ok(self.output.lock().expect("output").take())
    }
}

/// A `sleep` standing in for the VMM: a real process to kill, with its exit watched.
struct FakeVm {
    pid: u32,
    exit: watch::Receiver<Option<i32>>,
}

impl FakeVm {
    fn spawn() -> Self {
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let (tx, exit) = watch::channel(None);
        std::thread::spawn(move || {
            let code = child.wait().map(|s| s.code().unwrap_or(137)).unwrap_or(255);
            tx.send_replace(Some(code));
        });
        Self { pid, exit }
    }
}

#[async_trait]
impl Hypervisor for FakeVm {
    async fn prepare(&mut self, _: &VmSpec) -> Result<(), VmmError> {
        Ok(())
    }
    async fn start(&mut self, _: &VmSpec) -> Result<(), VmmError> {
        Ok(())
    }
    async fn stop(&mut self, grace: Duration) {
        crate::vmm::kill_failed_vm(self.pid);
        let _ = tokio::time::timeout(grace, self.exit.wait_for(Option::is_some)).await;
    }
    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }
    fn exit_watch(&self) -> Option<watch::Receiver<Option<i32>>> {
        Some(self.exit.clone())
    }
    fn log_tail(&self) -> String {
        String::new()
    }
    async fn add_nic(&mut self, _: &NetDevice) -> Result<(), VmmError> {
        Ok(())
    }
    async fn remove_nic(&mut self, _: &str, _: Duration) -> Result<(), VmmError> {
        Ok(())
    }
}

/// Boots by installing a `FakeVm` and the fake agent; keeps each VM's exit watch.
struct FakeBoot {
    agent: Arc<FakeAgent>,
    vms: StdMutex<Vec<watch::Receiver<Option<i32>>>>,
}

#[async_trait]
impl Boot for FakeBoot {
    async fn boot(&self, sandbox: &mut Sandbox, _: &str) -> Result<(), SandboxError> {
        let vm = FakeVm::spawn();
        self.vms.lock().expect("vms").push(vm.exit.clone());
        sandbox.install(Box::new(vm), self.agent.clone());
        Ok(())
    }
}

/// Records each event's topic, in order.
struct Recorder(watch::Sender<Vec<String>>);

#[async_trait]
impl EventSender for Recorder {
    async fn send(&self, topic: &str, _event: Box<dyn MessageDyn>) {
        self.0.send_modify(|topics| topics.push(topic.to_string()));
    }
}

/// A service with the fakes, its own sandbox root and bundles in a private dir.
struct Bench {
    dir: PathBuf,
    service: TaskService,
    agent: Arc<FakeAgent>,
    boot: Arc<FakeBoot>,
    events: watch::Receiver<Vec<String>>,
}

impl Bench {
    fn new(agent: FakeAgent) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: run the unit tests as root, as scripts/test.sh does"
        );
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "hako-task-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join("hako.toml"),
            format!(
                "[runtime]\nsandbox_root = \"{}\"\nvmm_uid_count = 0\n",
                dir.join("sb").display()
            ),
        )
        .expect("config");
        let agent = Arc::new(agent);
        let boot = Arc::new(FakeBoot {
            agent: agent.clone(),
            vms: StdMutex::new(Vec::new()),
        });
        let (tx, events) = watch::channel(Vec::new());
        let service = TaskService::with_pod(
            Pod::with_boot(NAMESPACE, boot.clone()),
            Arc::new(Recorder(tx)),
            Arc::new(ExitSignal::default()),
        );
        Self {
            dir,
            service,
            agent,
            boot,
            events,
        }
    }

    /// A bundle for `id`; with `sandbox`, the CRI annotation puts it in that pod.
    fn create_request(&self, id: &str, sandbox: Option<&str>) -> api::CreateTaskRequest {
        let bundle = self.dir.join("bundles").join(id);
        std::fs::create_dir_all(bundle.join("rootfs")).expect("rootfs");
        let annotations = sandbox
            .map(|s| format!(r#","annotations":{{"io.kubernetes.cri.sandbox-id":"{s}"}}"#))
            .unwrap_or_default();
        let spec = format!(
            r#"{{"ociVersion":"1.0.2","process":{{"args":["sh"],"cwd":"/","user":{{"uid":0,"gid":0}}}},
                "root":{{"path":"rootfs"}},
                "linux":{{"namespaces":[{{"type":"mount"}},{{"type":"pid"}},{{"type":"ipc"}},{{"type":"uts"}},{{"type":"network"}}]}}{annotations}}}"#
        );
        std::fs::write(bundle.join("config.json"), spec).expect("spec");
        // runtimeoptions.v1.Options { config_path }: field 2, as containerd sends ConfigPath.
        let path = self.dir.join("hako.toml").display().to_string();
        let mut value = vec![0x12, path.len() as u8];
        value.extend_from_slice(path.as_bytes());
        api::CreateTaskRequest {
            id: id.to_string(),
            bundle: bundle.display().to_string(),
            options: MessageField::some(Any {
                type_url: "runtimeoptions.v1.Options".to_string(),
                value,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn sandbox_dir(&self, sandbox: &str) -> PathBuf {
        self.dir.join("sb").join(NAMESPACE).join(sandbox)
    }

    async fn create(&self, id: &str, sandbox: Option<&str>) -> ttrpc::Result<u32> {
        let req = self.create_request(id, sandbox);
        self.service.create(&ctx(), req).await.map(|r| r.pid)
    }

    async fn start(&self, id: &str) -> ttrpc::Result<u32> {
        let req = api::StartRequest {
            id: id.to_string(),
            ..Default::default()
        };
        self.service.start(&ctx(), req).await.map(|r| r.pid)
    }

    async fn kill(&self, id: &str, signal: u32) -> ttrpc::Result<()> {
        let req = api::KillRequest {
            id: id.to_string(),
            signal,
            ..Default::default()
        };
        self.service.kill(&ctx(), req).await.map(drop)
    }

    async fn wait(&self, id: &str) -> u32 {
        let req = api::WaitRequest {
            id: id.to_string(),
            ..Default::default()
        };
        let waited = tokio::time::timeout(PATIENCE, self.service.wait(&ctx(), req)).await;
        waited.expect("exit in time").expect("wait").exit_status
    }

    async fn delete(&self, id: &str) -> ttrpc::Result<u32> {
        let req = api::DeleteRequest {
            id: id.to_string(),
            ..Default::default()
        };
        self.service
            .delete(&ctx(), req)
            .await
            .map(|r| r.exit_status)
    }

    /// Waits until `topic` has been published, and returns every topic so far.
    async fn events_until(&self, topic: &str) -> Vec<String> {
        let mut rx = self.events.clone();
        let seen = tokio::time::timeout(PATIENCE, rx.wait_for(|t| t.iter().any(|s| s == topic)))
            .await
            .expect("event in time")
            .expect("recorder alive")
            .clone();
        seen
    }

    /// Whether the stand-in VMM of the `n`th boot has exited.
    fn vm_exited(&self, n: usize) -> bool {
        self.boot.vms.lock().expect("vms")[n].borrow().is_some()
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = crate::sandbox::mounts::unmount_all_under(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ctx() -> TtrpcContext {
    TtrpcContext {
        mh: Default::default(),
        metadata: HashMap::new(),
        timeout_nano: 0,
    }
}

fn code(e: ttrpc::Error) -> Code {
    match e {
        ttrpc::Error::RpcStatus(status) => status.code(),
        other => panic!("not a status: {other:?}"),
    }
}

fn is_mount_point(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let wanted = path.display().to_string();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(wanted.as_str()))
}

/// Whether `path` is a mount point in a share's namespace: one this process holds open other
/// than its own (`sandbox::share::namespace`). Tests running at once may hold several.
fn is_share_mount_point(path: &Path) -> bool {
    use nix::sched::{setns, unshare, CloneFlags};
    let own = std::fs::read_link("/proc/thread-self/ns/mnt").expect("own namespace");
    let wanted = path.display().to_string();
    std::fs::read_dir("/proc/self/fd")
        .expect("fds")
        .flatten()
        .filter(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|l| l != own && l.to_string_lossy().starts_with("mnt:["))
        })
        .filter_map(|fd| std::fs::File::open(fd.path()).ok())
        .any(|ns| {
            std::thread::scope(|s| {
                s.spawn(|| {
                    unshare(CloneFlags::CLONE_FS).expect("unshare");
                    setns(&ns, CloneFlags::CLONE_NEWNS).expect("setns");
                    std::fs::read_to_string("/proc/thread-self/mountinfo")
                        .expect("mountinfo")
                        .lines()
                        .any(|l| l.split_whitespace().nth(4) == Some(wanted.as_str()))
                })
                .join()
                .expect("look inside")
            })
        })
}

#[tokio::test]
async fn a_container_life_publishes_events_in_containerds_order_and_the_last_delete_tears_down() {
    let b = Bench::new(FakeAgent::default());
    let pid = b.create("life", None).await.expect("create");
    assert!(pid > 0, "the task pid is the VMM's");
    assert!(b.sandbox_dir("life").join("rw/life/rootfs").is_dir());
    assert_eq!(b.start("life").await.expect("start"), pid);
    b.kill("life", 15).await.expect("kill");
    assert_eq!(b.wait("life").await, 128 + 15);
    b.events_until("/tasks/exit").await;
    assert_eq!(b.delete("life").await.expect("delete"), 128 + 15);
    let topics = b.events_until("/tasks/delete").await;
    assert_eq!(
        topics,
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    assert_eq!(
        b.agent.calls(),
        [
            "CreateContainer life",
            "StartProcess life",
            "SignalProcess life 15",
            "RemoveContainer life",
            "DestroySandbox",
        ]
    );
    assert!(b.vm_exited(0), "the last Delete stops the VM");
    assert!(
        !b.sandbox_dir("life").exists(),
        "and removes the sandbox dir"
    );
}

#[tokio::test]
async fn the_sandbox_stays_until_its_last_container_is_deleted() {
    let b = Bench::new(FakeAgent::default());
    b.create("pod", Some("pod")).await.expect("create pod");
    b.create("member", Some("pod"))
        .await
        .expect("create member");
    assert!(b.sandbox_dir("pod").join("rw/member/rootfs").is_dir());
    for id in ["member", "pod"] {
        b.kill(id, 9).await.expect("kill");
        assert_eq!(b.wait(id).await, 137);
    }
    b.delete("member").await.expect("delete member");
    assert!(!b.vm_exited(0), "a member's Delete leaves the VM");
    assert!(!b.sandbox_dir("pod").join("rw/member").exists());
    assert!(b.sandbox_dir("pod").join("rw/pod/rootfs").is_dir());
    b.delete("pod").await.expect("delete pod");
    assert!(b.vm_exited(0));
    assert!(!b.sandbox_dir("pod").exists());
}

#[tokio::test]
async fn a_create_the_guest_refuses_rolls_the_new_sandbox_back() {
    let b = Bench::new(FakeAgent {
        refuse_create: true,
        ..FakeAgent::default()
    });
    let err = b.create("refused", None).await.expect_err("refused");
    assert_eq!(code(err), Code::INVALID_ARGUMENT);
    assert!(b.vm_exited(0), "the VM it booted is stopped");
    assert!(
        !b.sandbox_dir("refused").exists(),
        "nothing is left on disk"
    );
    assert!(!is_mount_point(&b.dir.join("bundles/refused/rootfs")));
    assert!(b.events.borrow().is_empty(), "no event for a failed create");
    assert!(b.service.pod.is_empty().await);
}

#[tokio::test]
async fn a_racing_duplicate_create_leaves_the_first_container_whole() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let b = Bench::new(FakeAgent {
        create_gate: Some(gate.clone()),
        ..FakeAgent::default()
    });
    // join! polls in order: the first Create stops in the guest (at the gate) holding the
    // sandbox, the second gets past the service's own check and waits for the sandbox, and
    // only then is the gate opened.
    let (first, second, ()) = tokio::join!(b.create("twin", None), b.create("twin", None), async {
        gate.notify_one()
    });
    first.expect("the first create");
    assert_eq!(code(second.expect_err("a duplicate")), Code::ALREADY_EXISTS);
    assert_eq!(
        b.agent.calls(),
        ["CreateContainer twin"],
        "the duplicate never reached the guest"
    );
    let share = b.sandbox_dir("twin").join("rw/twin/rootfs");
    assert!(
        is_share_mount_point(&share),
        "the first container's share is still mounted"
    );
    assert!(!is_mount_point(&share), "in the share's namespace only");
    assert!(!b.vm_exited(0));
    b.kill("twin", 9).await.expect("kill");
    b.wait("twin").await;
    b.delete("twin").await.expect("delete");
}

#[tokio::test]
async fn sigkill_ends_the_vm_when_the_agent_is_silent() {
    let b = Bench::new(FakeAgent {
        silent: true,
        ..FakeAgent::default()
    });
    b.create("mute", None).await.expect("create");
    b.start("mute").await.expect("start");
    // Another signal fails as the agent does.
    let err = b.kill("mute", 15).await.expect_err("no answer");
    assert_eq!(code(err), Code::DEADLINE_EXCEEDED);
    assert!(!b.vm_exited(0));
    b.kill("mute", 9)
        .await
        .expect("SIGKILL succeeds by ending the VM");
    assert_eq!(b.wait("mute").await, 137, "the process died with its VM");
    assert!(b.vm_exited(0));
    assert_eq!(
        b.events_until("/tasks/exit").await,
        ["/tasks/create", "/tasks/start", "/tasks/exit"]
    );
    b.delete("mute").await.expect("delete");
    assert!(!b.sandbox_dir("mute").exists());
}

/// Issue 27: Go's fifo package (ctr, dockerd, containerd's CRI) opens the client's end of an
/// output FIFO in the background, so a fast process can write, exit and have its stream ended
/// before that open arrives. Its output must still reach the client, as under runc.
#[tokio::test]
async fn output_written_before_the_client_opens_its_fifo_still_reaches_it() {
    let b = Bench::new(FakeAgent {
        output: StdMutex::new(Some(b"all of it\n".to_vec())),
        ..Default::default()
    });
    let fifo = b.dir.join("late-stdout");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let mut req = b.create_request("late", None);
    req.stdout = fifo.display().to_string();
    b.service.create(&ctx(), req).await.expect("create");
    b.start("late").await.expect("start");
    b.kill("late", 15).await.expect("kill");
    b.events_until("/tasks/exit").await;
    // Only now does the client's end open.
    let mut reader = tokio::net::unix::pipe::OpenOptions::new()
        .open_receiver(&fifo)
        .expect("reader");
    let mut got = Vec::new();
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(PATIENCE, reader.read_to_end(&mut got))
        .await
        .expect("the output and its end arrive")
        .expect("read");
    assert_eq!(String::from_utf8_lossy(&got), "all of it\n");
    b.delete("late").await.expect("delete");
}

/// Issue 24: Pids answers the VMM's host pid, the one process of the host a container's
/// processes run in, for every container of the pod, never a guest pid (which names some
/// other host process).
#[tokio::test]
async fn pids_answers_the_vmms_host_pid_for_every_container_of_the_pod() {
    let b = Bench::new(FakeAgent::default());
    let pids = |id: &str| {
        let req = api::PidsRequest {
            id: id.to_string(),
            ..Default::default()
        };
        let service = &b.service;
        async move {
            let r = service.pids(&ctx(), req).await.expect("pids");
            r.processes.iter().map(|p| p.pid).collect::<Vec<u32>>()
        }
    };
    let vmm = b.create("pod", Some("pod")).await.expect("create pod");
    b.create("member", Some("pod"))
        .await
        .expect("create member");
    b.start("pod").await.expect("start");
    assert_eq!(pids("pod").await, [vmm]);
    assert_eq!(pids("member").await, [vmm], "the same VM");
    b.kill("member", 9).await.expect("kill");
    assert_eq!(b.wait("member").await, 137);
    assert!(
        pids("member").await.is_empty(),
        "an exited container has none"
    );
    assert_eq!(pids("pod").await, [vmm]);
    b.kill("pod", 9).await.expect("kill");
    b.wait("pod").await;
    b.delete("member").await.expect("delete member");
    b.delete("pod").await.expect("delete pod");
}
