//! The client against a fake API server: requests as sent, answers and errors as parsed.

use super::super::types::{ConsoleConfig, ConsoleMode, CpusConfig, MemoryConfig, PayloadConfig};
use super::super::types::{SerialConfig, VmState};
use super::fake::{fake_server, Reply, TempDir};
use super::*;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

const SHORT: Duration = Duration::from_millis(200);

fn client(dir: &TempDir) -> ApiClient {
    ApiClient::with_timeout(dir.socket(), Duration::from_secs(5)).expect("client")
}

fn small_config() -> VmConfig {
    VmConfig {
        payload: PayloadConfig {
            kernel: Some("/g/vmlinux".into()),
            initramfs: Some("/g/initramfs.cpio".into()),
            cmdline: Some("console=ttyS0".into()),
            firmware: None,
        },
        cpus: Some(CpusConfig {
            boot_vcpus: 1,
            max_vcpus: 1,
            kvm_hyperv: None,
            max_phys_bits: None,
            nested: None,
        }),
        memory: Some(MemoryConfig {
            size: 256 << 20,
            shared: Some(true),
            hugepages: None,
            mergeable: None,
            prefault: None,
            hotplug_size: None,
        }),
        serial: Some(SerialConfig {
            mode: ConsoleMode::File,
            file: Some("/run/sb/console.log".into()),
            socket: None,
        }),
        console: Some(ConsoleConfig {
            mode: ConsoleMode::Off,
            file: None,
            socket: None,
            iommu: None,
        }),
        ..VmConfig::default()
    }
}

#[tokio::test]
async fn ping_is_a_get_and_parses_the_answer() {
    let dir = TempDir::new("ping");
    let mut seen = fake_server(
        &dir,
        vec![Reply::With(
            200,
            r#"{"build_version":"v48.0","version":"48.0.0","pid":77,"features":["kvm"]}"#,
        )],
    );
    let pong = client(&dir).ping().await.expect("ping");
    assert_eq!(pong.version, "48.0.0");
    assert_eq!(pong.pid, Some(77));
    let req = seen.recv().await.expect("request");
    assert_eq!(req.request_line(), "GET /api/v1/vmm.ping HTTP/1.1");
    assert!(req.body.is_empty());
}

#[tokio::test]
async fn create_puts_the_config_as_json() {
    let dir = TempDir::new("create");
    let mut seen = fake_server(&dir, vec![Reply::With(204, "")]);
    client(&dir).create(&small_config()).await.expect("create");
    let req = seen.recv().await.expect("request");
    assert_eq!(req.request_line(), "PUT /api/v1/vm.create HTTP/1.1");
    assert!(
        req.head
            .to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{}",
        req.head
    );
    let body = req.json();
    assert_eq!(body["payload"]["kernel"], "/g/vmlinux");
    assert_eq!(body["payload"]["initramfs"], "/g/initramfs.cpio");
    assert_eq!(body["cpus"]["boot_vcpus"], 1);
    assert_eq!(body["memory"]["size"], 268435456u64);
    assert_eq!(body["memory"]["shared"], true);
    assert_eq!(body["serial"]["mode"], "File");
    assert_eq!(body["console"]["mode"], "Off");
    assert!(body.get("net").is_none(), "{body}");
}

#[tokio::test]
async fn info_parses_state_config_and_memory() {
    let dir = TempDir::new("info");
    let _seen = fake_server(
        &dir,
        vec![Reply::With(
            200,
            r#"{"config":{"payload":{"kernel":"/g/vmlinux"},
                "cpus":{"boot_vcpus":2,"max_vcpus":2},
                "memory":{"size":268435456,"shared":true},"iommu":false},
                "state":"Running","memory_actual_size":268435456}"#,
        )],
    );
    let info = client(&dir).info().await.expect("info");
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.memory_actual_size, Some(256 << 20));
    assert_eq!(info.config.cpus.map(|c| c.max_vcpus), Some(2));
}

#[tokio::test]
async fn actions_are_puts_without_a_body() {
    let dir = TempDir::new("actions");
    let mut seen = fake_server(&dir, (0..6).map(|_| Reply::With(204, "")).collect());
    let api = client(&dir);
    api.boot().await.expect("boot");
    api.pause().await.expect("pause");
    api.resume().await.expect("resume");
    api.shutdown().await.expect("shutdown");
    api.delete().await.expect("delete");
    api.vmm_shutdown().await.expect("vmm.shutdown");
    for endpoint in [
        "vm.boot",
        "vm.pause",
        "vm.resume",
        "vm.shutdown",
        "vm.delete",
        "vmm.shutdown",
    ] {
        let req = seen.recv().await.expect("request");
        assert_eq!(
            req.request_line(),
            format!("PUT /api/v1/{endpoint} HTTP/1.1")
        );
        // Cloud Hypervisor refuses these with 400 when they carry a body.
        assert!(req.body.is_empty(), "{endpoint}: {:?}", req.body);
    }
}

#[tokio::test]
async fn device_adds_answer_none_when_cold_and_the_device_when_hot() {
    let dir = TempDir::new("add");
    let mut seen = fake_server(
        &dir,
        vec![
            Reply::With(204, ""),
            Reply::With(200, r#"{"id":"_fs1","bdf":"0000:00:05.0"}"#),
        ],
    );
    let api = client(&dir);
    let fs = FsConfig {
        tag: "hakoShared".into(),
        socket: "/run/sb/fs.sock".into(),
        num_queues: 1,
        queue_size: 1024,
        id: None,
    };
    assert_eq!(api.add_fs(&fs).await.expect("add-fs"), None);
    let device = api.add_fs(&fs).await.expect("add-fs when hot");
    assert_eq!(
        device,
        Some(PciDeviceInfo {
            id: "_fs1".into(),
            bdf: "0000:00:05.0".into()
        })
    );
    let req = seen.recv().await.expect("add-fs");
    assert_eq!(req.request_line(), "PUT /api/v1/vm.add-fs HTTP/1.1");
    assert_eq!(
        req.json(),
        serde_json::json!({"tag": "hakoShared", "socket": "/run/sb/fs.sock",
                           "num_queues": 1, "queue_size": 1024})
    );
    let req = seen.recv().await.expect("add-fs when hot");
    assert_eq!(req.request_line(), "PUT /api/v1/vm.add-fs HTTP/1.1");
}

#[tokio::test]
async fn snapshot_restore_and_add_vsock_send_their_bodies() {
    let dir = TempDir::new("snapshot");
    let mut seen = fake_server(
        &dir,
        vec![
            Reply::With(204, ""),
            Reply::With(204, ""),
            Reply::With(200, r#"{"id":"_vsock0","bdf":"0000:00:06.0"}"#),
        ],
    );
    let api = client(&dir);
    api.snapshot("file:///var/lib/hako/t/k1")
        .await
        .expect("snapshot");
    api.restore(&RestoreConfig {
        source_url: "file:///run/hako/ns/sb/vmm/restore".into(),
        prefault: Some(false),
    })
    .await
    .expect("restore");
    let vsock = VsockConfig {
        cid: 3,
        socket: "/run/sb/agent.sock".into(),
        iommu: None,
        id: None,
    };
    let device = api.add_vsock(&vsock).await.expect("add-vsock");
    assert_eq!(device.map(|d| d.id), Some("_vsock0".to_string()));
    let req = seen.recv().await.expect("snapshot");
    assert_eq!(req.request_line(), "PUT /api/v1/vm.snapshot HTTP/1.1");
    assert_eq!(
        req.json(),
        serde_json::json!({"destination_url": "file:///var/lib/hako/t/k1"})
    );
    let req = seen.recv().await.expect("restore");
    assert_eq!(req.request_line(), "PUT /api/v1/vm.restore HTTP/1.1");
    assert_eq!(
        req.json(),
        serde_json::json!({"source_url": "file:///run/hako/ns/sb/vmm/restore", "prefault": false})
    );
    let req = seen.recv().await.expect("add-vsock");
    assert_eq!(req.request_line(), "PUT /api/v1/vm.add-vsock HTTP/1.1");
    assert_eq!(
        req.json(),
        serde_json::json!({"cid": 3, "socket": "/run/sb/agent.sock"})
    );
}

#[tokio::test]
async fn add_net_hands_the_tap_fd_over_with_scm_rights() {
    let dir = TempDir::new("net");
    let mut seen = fake_server(
        &dir,
        vec![
            Reply::With(204, ""),
            Reply::With(200, r#"{"id":"_net1","bdf":"0000:00:06.0"}"#),
        ],
    );
    // Any open file stands in for a tap: what matters is that the server gets the same
    // open file, not a number.
    let file = std::fs::File::create(dir.0.join("stand-in-tap")).expect("file");
    let net = NetConfig {
        mac: Some("02:42:0a:58:00:02".into()),
        num_queues: Some(2),
        queue_size: Some(256),
        ..NetConfig::default()
    };
    let api = client(&dir);
    let cold = api
        .add_net(&net, &[file.as_raw_fd()])
        .await
        .expect("add-net");
    assert_eq!(cold, None);
    let hot = api
        .add_net(&net, &[file.as_raw_fd()])
        .await
        .expect("add-net");
    assert_eq!(hot.map(|d| d.id), Some("_net1".to_string()));

    let req = seen.recv().await.expect("request");
    assert_eq!(req.request_line(), "PUT /api/v1/vm.add-net HTTP/1.1");
    assert_eq!(
        req.json(),
        serde_json::json!({"mac": "02:42:0a:58:00:02", "num_queues": 2, "queue_size": 256})
    );
    assert_eq!(req.fds.len(), 1, "one fd per tap queue pair");
    let received = std::fs::File::from(req.fds.into_iter().next().expect("fd"));
    let (ours, theirs) = (
        file.metadata().expect("stat"),
        received.metadata().expect("stat"),
    );
    assert_eq!((ours.dev(), ours.ino()), (theirs.dev(), theirs.ino()));
}

#[tokio::test]
async fn add_net_without_fds_goes_the_ordinary_way() {
    let dir = TempDir::new("net-nofd");
    let mut seen = fake_server(&dir, vec![Reply::With(204, "")]);
    let net = NetConfig {
        tap: Some("tap0".into()),
        ..NetConfig::default()
    };
    assert_eq!(client(&dir).add_net(&net, &[]).await.expect("add"), None);
    let req = seen.recv().await.expect("request");
    assert!(req.fds.is_empty());
    assert_eq!(req.json(), serde_json::json!({"tap": "tap0"}));
}

#[tokio::test]
async fn error_statuses_carry_status_endpoint_and_the_api_message() {
    let dir = TempDir::new("status");
    let _seen = fake_server(
        &dir,
        vec![
            Reply::With(
                500,
                r#"["Error from API","The VM could not boot","Error loading kernel"]"#,
            ),
            Reply::With(404, ""),
            Reply::With(400, "Bad Request: invalid net config"),
        ],
    );
    let api = client(&dir);
    let err = api.boot().await.expect_err("500");
    assert_eq!(err.status(), Some(500));
    let text = err.to_string();
    assert!(
        text.contains("vm.boot") && text.contains("HTTP 500"),
        "{text}"
    );
    assert!(
        text.contains("The VM could not boot: Error loading kernel"),
        "{text}"
    );
    let err = api.info().await.expect_err("404");
    assert!(
        matches!(&err, ApiError::Status { endpoint: "vm.info", status: 404, message }
            if message == "(no message)"),
        "{err:?}"
    );
    let err = api
        .add_net(&NetConfig::default(), &[0])
        .await
        .expect_err("400");
    assert!(
        matches!(&err, ApiError::Status { endpoint: "vm.add-net", status: 400, message }
            if message.contains("invalid net config")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_missing_socket_is_named() {
    let dir = TempDir::new("missing");
    let api = client(&dir);
    let err = api.ping().await.expect_err("no socket");
    assert!(
        matches!(&err, ApiError::SocketMissing { endpoint: "vmm.ping", socket }
            if *socket == dir.socket()),
        "{err:?}"
    );
    assert!(err.to_string().contains("does not exist"), "{err}");
    let err = api
        .add_net(&NetConfig::default(), &[0])
        .await
        .expect_err("no socket");
    assert!(matches!(err, ApiError::SocketMissing { .. }), "{err:?}");
}

#[tokio::test]
async fn a_socket_nobody_listens_on_is_a_connect_error() {
    let dir = TempDir::new("refused");
    // Binding creates the socket file; dropping the listener leaves it behind, unserved,
    // as a VMM that died does.
    drop(std::os::unix::net::UnixListener::bind(dir.socket()).expect("bind"));
    let err = client(&dir).ping().await.expect_err("refused");
    assert!(matches!(err, ApiError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("cannot connect"), "{err}");
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    let dir = TempDir::new("silent");
    let _seen = fake_server(&dir, vec![Reply::Silent, Reply::Silent]);
    let api = ApiClient::with_timeout(dir.socket(), SHORT).expect("client");
    let err = api.info().await.expect_err("timeout");
    assert!(
        matches!(err, ApiError::Timeout { endpoint: "vm.info", timeout } if timeout == SHORT),
        "{err:?}"
    );
    assert!(err.to_string().contains("no answer within 200ms"), "{err}");
    let err = api
        .add_net(&NetConfig::default(), &[0])
        .await
        .expect_err("timeout");
    assert!(matches!(err, ApiError::Timeout { .. }), "{err:?}");
}

#[tokio::test]
async fn a_connection_closed_early_is_reported_as_lost() {
    let dir = TempDir::new("close");
    let _seen = fake_server(&dir, vec![Reply::Close, Reply::Close]);
    let api = client(&dir);
    let err = api.create(&small_config()).await.expect_err("closed");
    assert!(
        matches!(
            err,
            ApiError::Disconnected {
                endpoint: "vm.create",
                ..
            }
        ),
        "{err:?}"
    );
    let err = api
        .add_net(&NetConfig::default(), &[0])
        .await
        .expect_err("closed");
    assert!(
        matches!(&err, ApiError::Disconnected { message, .. }
            if message.contains("closed without answering")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_body_that_is_not_the_expected_json_is_a_bad_response() {
    let dir = TempDir::new("bad");
    let _seen = fake_server(
        &dir,
        vec![
            Reply::With(200, "pong"),
            Reply::With(200, r#"{"state":"Running"}"#),
        ],
    );
    let api = client(&dir);
    let err = api.ping().await.expect_err("not json");
    assert!(
        matches!(&err, ApiError::BadResponse { endpoint: "vmm.ping", message }
            if message.contains("\"pong\"")),
        "{err:?}"
    );
    let err = api.info().await.expect_err("no config");
    assert!(
        matches!(&err, ApiError::BadResponse { message, .. } if message.contains("config")),
        "{err:?}"
    );
}
