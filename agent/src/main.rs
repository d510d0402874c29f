//! hako-agent: PID 1 of the hako guest.
//!
//! As `/init` it leaves the initramfs, mounts the kernel filesystems, loads its modules, mounts
//! the sandbox share and serves the agent API on vsock. Run as `container-init <config>` it is
//! the short-lived helper that builds one container (see `init.rs`).

mod boot;
mod cgroup;
mod container;
mod devices;
mod dns;
mod forward;
#[cfg(feature = "hostile")]
mod hostile;
mod init;
mod logger;
mod metrics;
mod mounts;
mod net;
mod oom;
mod pod;
mod ps;
mod reaper;
mod rtnl;
mod server;
mod uevent;
mod vsock;

use std::sync::Arc;
use std::time::Instant;

use hako_protocol::{AGENT_VSOCK_PORT, GUEST_SHARED_DIR, READY_VSOCK_PORT, SHARED_FS_TAG};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if pod::is_pod_init(&args) {
        pod::pause_main();
    }
    if args.get(1).map(String::as_str) == Some(init::HELPER_ARG) {
        let Some(config) = args.get(2) else {
            eprintln!("usage: hako-agent {} <config>", init::HELPER_ARG);
            std::process::exit(2);
        };
        init::helper_main(config);
    }
    if std::process::id() != 1 {
        eprintln!("hako-agent runs as PID 1 inside a hako VM; it has nothing to do here");
        std::process::exit(2);
    }
    if let Err(e) = run_init() {
        log::error!("{e}");
        // Powering off (rather than exiting and panicking the kernel) stops the VM at once, and
        // the host reports the console log.
        nix::unistd::sync();
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    }
    // PID 1 must never return.
    loop {
        std::thread::park();
    }
}

fn run_init() -> Result<(), String> {
    let started = Instant::now();
    let init_since_boot_ms = boot::ms_since_boot();
    let cmdline = boot::read_cmdline().map_err(|e| e.to_string())?;
    logger::init(logger::level_from_cmdline(&cmdline));
    let share = boot::ShareKind::from_cmdline(&cmdline);
    // Modules (a Debian kernel's; hako's own kernel has everything built in) load from the
    // initramfs, before the root leaves it.
    let modules = boot::load_modules(share).map_err(|e| e.to_string())?;
    let loaded = boot::ms_since_boot();
    boot::leave_initramfs().map_err(|e| e.to_string())?;
    let left = boot::ms_since_boot();
    boot::mount_kernel_filesystems().map_err(|e| e.to_string())?;
    let mounted = boot::ms_since_boot();
    wait_for_devices(share).map_err(|e| format!("waiting for the host's devices: {e}"))?;
    boot::mount_share(share, SHARED_FS_TAG, GUEST_SHARED_DIR).map_err(|e| e.to_string())?;
    log::debug!(
        "boot, ms since the kernel started: /init {init_since_boot_ms}, {modules} modules {loaded}, off the initramfs {left}, kernel filesystems {mounted}, share {}",
        boot::ms_since_boot()
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the async runtime: {e}"))?;
    runtime.block_on(serve(started, init_since_boot_ms))
}

/// A VM booted to make a template has neither its share nor its vsock device: the agent says so
/// on the console (the host takes the template then) and waits for them. A VM restored from the
/// template resumes here and gets them hot-plugged; a VM booted cold has them already.
fn wait_for_devices(share: boot::ShareKind) -> std::io::Result<()> {
    let uevents = uevent::Uevents::open()?;
    let drivers = uevent::needed_drivers(share == boot::ShareKind::Virtio9p);
    if drivers.iter().all(|d| uevent::bound(d)) {
        return Ok(());
    }
    // Whatever the log level: the host watches for this line.
    eprintln!("{}", hako_protocol::TEMPLATE_POINT);
    uevents.wait_bound(&drivers)
}

async fn serve(started: Instant, init_since_boot_ms: u64) -> Result<(), String> {
    let reaper = reaper::Reaper::start().map_err(|e| format!("installing SIGCHLD handler: {e}"))?;
    let kernel_release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    cgroup::enable_controllers();
    if let Err(e) = forward::serve() {
        log::warn!("port forwarding into the pod is unavailable: {e}");
    }
    if let Err(e) = dns::serve() {
        log::warn!("Docker's DNS server is unavailable in the pod: {e}");
    }
    if let Err(e) = metrics::serve() {
        log::warn!("the guest's metrics are unavailable: {e}");
    }
    let (oom, oom_events) = oom::OomMonitor::new();
    let containers = Arc::new(container::Containers::new(reaper, oom));
    server::poll_oom(containers.clone());
    let agent = server::Agent {
        #[cfg(feature = "hostile")]
        hostile: hostile::Hostile::from_cmdline(
            &std::fs::read_to_string("/proc/cmdline").unwrap_or_default(),
        ),
        oom_events: tokio::sync::Mutex::new(oom_events),
        containers,
        kernel_release,
        ready_since_boot_ms: Default::default(),
        init_since_boot_ms,
    };
    let agent = Arc::new(agent);
    let service = hako_protocol::create_agent_service(agent.clone());
    let address = format!("vsock://-1:{AGENT_VSOCK_PORT}");
    let mut server = ttrpc::r#async::Server::new()
        .bind(&address)
        .map_err(|e| format!("listening on {address}: {e}"))?
        .register_service(service);
    server
        .start()
        .await
        .map_err(|e| format!("serving on {address}: {e}"))?;
    // Ready means serving: the host splits its boot phases by this time.
    let ready = boot::ms_since_boot();
    agent
        .ready_since_boot_ms
        .store(ready, std::sync::atomic::Ordering::SeqCst);
    let health = agent.health_response();
    log::info!(
        "serving on {address}, {ready} ms after boot ({:?} in init)",
        started.elapsed()
    );
    if let Err(e) = tokio::task::spawn_blocking(move || announce_ready(&health)).await {
        log::warn!("announcing readiness: {e}");
    }
    std::future::pending::<()>().await;
    Ok(())
}

/// Tells the host the agent serves, and how it is (the Health answer), by connecting to the
/// host's readiness port. A host that does not listen there simply dials until the agent
/// answers.
fn announce_ready(health: &hako_protocol::HealthResponse) {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
    use std::io::Write;
    const VMADDR_CID_HOST: u32 = 2;
    let result = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .and_then(|fd| {
        connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &VsockAddr::new(VMADDR_CID_HOST, READY_VSOCK_PORT),
        )?;
        Ok(fd)
    })
    .map_err(std::io::Error::from)
    .and_then(|fd| {
        let message = hako_protocol::ready_message(health).map_err(std::io::Error::other)?;
        std::fs::File::from(fd).write_all(&message)
    });
    match result {
        Ok(()) => log::debug!("told the host the agent is ready"),
        Err(e) => log::warn!("cannot tell the host the agent is ready: {e}"),
    }
}
