//! NICs in and out of a running VM over QMP: the tap queues travel as fds on the socket, and
//! each NIC takes a free PCIe root port.

use std::time::Duration;

use serde_json::json;

use super::args::port_id;
use super::Qemu;
use crate::vmm::qmp::QmpError;
use crate::vmm::{NetDevice, VmmError};

impl Qemu {
    /// Hot-plugs `nic` into a free root port: its tap queues go over the QMP socket, a tap
    /// netdev takes them, and a virtio-net device on the port uses it.
    pub(super) async fn plug(&mut self, nic: &NetDevice) -> Result<(), VmmError> {
        let port =
            self.ports
                .iter()
                .position(Option::is_none)
                .ok_or_else(|| VmmError::NoFreeSlot {
                    nic: nic.id.clone(),
                    slots: self.ports.len(),
                })?;
        let mut qmp = self.qmp().await?;
        let names: Vec<String> = (0..nic.tap_fds.len())
            .map(|q| format!("{}-q{q}", nic.id))
            .collect();
        for (name, fd) in names.iter().zip(&nic.tap_fds) {
            qmp.send_fd(name, *fd).await?;
        }
        let mut netdev = json!({ "type": "tap", "id": nic.id });
        if names.len() == 1 {
            netdev["fd"] = json!(names[0]);
        } else {
            netdev["fds"] = json!(names.join(":"));
        }
        if self.host.vhost_net {
            netdev["vhost"] = json!(true);
        }
        if let Err(e) = qmp.execute("netdev_add", Some(netdev)).await {
            for name in &names {
                let _ = qmp
                    .execute("closefd", Some(json!({ "fdname": name })))
                    .await;
            }
            return Err(e.into());
        }
        let mut device = json!({
            "driver": "virtio-net-pci",
            "id": nic.id,
            "netdev": nic.id,
            "mac": nic.mac,
            "bus": port_id(port),
        });
        if names.len() > 1 {
            device["mq"] = json!(true);
            device["vectors"] = json!(2 * names.len() + 2);
        }
        if let Err(e) = qmp.execute("device_add", Some(device)).await {
            let _ = qmp
                .execute("netdev_del", Some(json!({ "id": nic.id })))
                .await;
            return Err(e.into());
        }
        self.ports[port] = Some(nic.id.clone());
        Ok(())
    }

    /// Unplugs a NIC. The agent has powered its slot off already, which unplugs it at once; a
    /// guest that did not gets the standard unplug request (an attention button the guest
    /// honours after five seconds), bounded by `timeout`. The netdev, which holds the tap
    /// queues, goes either way.
    pub(super) async fn unplug(&mut self, id: &str, timeout: Duration) -> Result<(), VmmError> {
        let mut qmp = self.qmp().await?;
        match qmp.execute("device_del", Some(json!({ "id": id }))).await {
            Ok(_) => {
                let deleted = qmp
                    .wait_event("DEVICE_DELETED", |e| e["data"]["device"] == id, timeout)
                    .await;
                if let Err(e) = deleted {
                    log::warn!("NIC {id} is still in the VM after {timeout:?} ({e}); its network is cut off regardless");
                }
            }
            Err(QmpError::Command { class, .. }) if class == "DeviceNotFound" => {}
            Err(e) => log::warn!("unplugging NIC {id}: {e}"),
        }
        let _ = qmp.execute("netdev_del", Some(json!({ "id": id }))).await;
        for port in &mut self.ports {
            if port.as_deref() == Some(id) {
                *port = None;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::vmm::Hypervisor;

    /// A Qemu whose QMP socket is a fake monitor's, with `ports` root ports.
    fn driven(socket: &Path, ports: Vec<Option<String>>) -> Qemu {
        crate::vmm::qemu::on_socket(socket, ports, None)
    }

    #[tokio::test]
    async fn a_nic_is_plugged_into_a_free_port_with_its_queues_and_unplugged_again() {
        let dir = std::env::temp_dir().join(format!("hako-plug-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let socket = dir.join("qmp.sock");
        let ok = "{\"return\": {}}\n";
        let server = crate::vmm::qmp::fake::qemu(&socket, vec![ok, ok, ok, ok, ok]).await;
        let tap = std::fs::File::open("/dev/null").expect("a stand-in for a tap queue");
        let mut qemu = driven(&socket, vec![Some("nic0".into()), None]);
        let nic = NetDevice {
            id: "nic1".into(),
            tap_fds: vec![std::os::fd::AsRawFd::as_raw_fd(&tap)],
            mac: "02:42:ac:11:00:03".into(),
        };
        qemu.add_nic(&nic).await.expect("plugged");
        assert_eq!(
            qemu.ports,
            [Some("nic0".to_string()), Some("nic1".to_string())]
        );
        let seen = server.await.expect("server");
        assert_eq!(
            seen[1..],
            [
                r#"{"arguments":{"fdname":"nic1-q0"},"execute":"getfd"}"#,
                r#"{"arguments":{"fd":"nic1-q0","id":"nic1","type":"tap"},"execute":"netdev_add"}"#,
                r#"{"arguments":{"bus":"nicport1","driver":"virtio-net-pci","id":"nic1","mac":"02:42:ac:11:00:03","netdev":"nic1"},"execute":"device_add"}"#,
            ]
        );
        // No port left: a clear error, nothing sent.
        let err = qemu.add_nic(&nic).await.expect_err("full");
        assert!(
            err.to_string().contains("hypervisor.hotplug_slots"),
            "{err}"
        );

        // Unplugging: the guest already released it (DeviceNotFound), the netdev goes.
        let server = crate::vmm::qmp::fake::qemu(
            &socket,
            vec![
                ok,
                "{\"error\": {\"class\": \"DeviceNotFound\", \"desc\": \"Device 'nic1' not found\"}}\n",
                ok,
            ],
        )
        .await;
        qemu.remove_nic("nic1", Duration::from_secs(1))
            .await
            .expect("unplugged");
        assert_eq!(qemu.ports, [Some("nic0".to_string()), None]);
        let seen = server.await.expect("server");
        assert_eq!(
            seen[1..],
            [
                r#"{"arguments":{"id":"nic1"},"execute":"device_del"}"#,
                r#"{"arguments":{"id":"nic1"},"execute":"netdev_del"}"#,
            ]
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
