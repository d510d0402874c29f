//! The virtio-vsock device as a vhost-user backend: QEMU hands it the guest's memory and the
//! three queues; it moves packets between the queues and the `Muxer`.
//!
//! A packet's payload may span any number of descriptors: Linux 6.12 and later put a payload
//! above 32 KiB in page fragments, one descriptor each. Every chain taken from a queue is given
//! back, whatever it holds, so a malformed one can neither stall the queue nor lose the
//! packets after it.

use std::io::{self, Read, Write};
use std::sync::Mutex;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::header::{Header, HEADER_LEN, MAX_PAYLOAD};
use crate::muxer::Muxer;

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const EVENT_QUEUE: u16 = 2;
const NUM_QUEUES: usize = 3;
/// The muxer's epoll set, as an event of the backend's own (above the queues and the exit event).
pub const HOST_EVENT: u16 = NUM_QUEUES as u16 + 1;
const QUEUE_SIZE: usize = 1024;

type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

pub struct VsockDevice {
    guest_cid: u64,
    inner: Mutex<Inner>,
}

struct Inner {
    muxer: Muxer,
    mem: Option<Memory>,
    event_idx: bool,
    /// A packet's worth of payload, reused.
    buf: Vec<u8>,
    /// Malformed chains given back unread, for the log.
    malformed: u64,
}

impl VsockDevice {
    pub fn new(guest_cid: u64, muxer: Muxer) -> VsockDevice {
        VsockDevice {
            guest_cid,
            inner: Mutex::new(Inner {
                muxer,
                mem: None,
                event_idx: false,
                buf: vec![0; MAX_PAYLOAD],
                malformed: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock has already ended the device's thread; what is left
        // is still consistent enough to shut down with.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    /// Takes every packet the guest has sent.
    fn process_tx(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem) = self.mem.clone() else {
            return Ok(());
        };
        loop {
            if self.event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            let mut used = false;
            loop {
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.memory());
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let guard = mem.memory();
                match read_packet(&guard, chain, &mut self.buf) {
                    Ok((h, len)) => self.muxer.guest_sent(&h, &self.buf[..len]),
                    Err(e) => self.malformed(e),
                }
                vring.add_used(head, 0).map_err(io::Error::other)?;
                used = true;
            }
            if used {
                self.signal(vring)?;
            }
            if !self.event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }

    /// Fills the guest's receive buffers with what the connections have to send.
    fn process_rx(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem) = self.mem.clone() else {
            return Ok(());
        };
        loop {
            let mut used = false;
            let mut out_of_buffers = false;
            while self.muxer.has_work() {
                let guard = mem.memory();
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.memory());
                let Some(chain) = chain else {
                    out_of_buffers = true;
                    break;
                };
                let head = chain.head_index();
                let mut writer = match chain.writer(&guard) {
                    Ok(w) if w.available_bytes() >= HEADER_LEN => w,
                    _ => {
                        self.malformed("a receive buffer smaller than a header");
                        vring.add_used(head, 0).map_err(io::Error::other)?;
                        used = true;
                        continue;
                    }
                };
                let room = (writer.available_bytes() - HEADER_LEN).min(self.buf.len());
                let Some((h, len)) = self.muxer.next_for_guest(&mut self.buf[..room]) else {
                    // Nothing after all (a host socket had no data): the buffer stays the guest's.
                    vring.get_mut().get_queue_mut().go_to_previous_position();
                    break;
                };
                if let Err(e) = write_packet(&mut writer, &h, &self.buf[..len]) {
                    // Only a buffer that is not guest memory can fail here: the guest loses
                    // this packet, as it asked for.
                    self.malformed(e);
                }
                vring
                    .add_used(head, (HEADER_LEN + len) as u32)
                    .map_err(io::Error::other)?;
                used = true;
            }
            if used {
                self.signal(vring)?;
            }
            // Out of buffers with work left: the guest's next refill must wake us, and it may
            // already have happened.
            if !out_of_buffers
                || !self.event_idx
                || !vring.enable_notification().map_err(io::Error::other)?
            {
                return Ok(());
            }
        }
    }

    fn signal(&self, vring: &VringRwLock) -> io::Result<()> {
        if !self.event_idx || vring.needs_notification().map_err(io::Error::other)? {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    fn malformed(&mut self, what: impl std::fmt::Display) {
        self.malformed += 1;
        // Bounded: a guest sending garbage must not fill the host's log.
        if self.malformed <= 10 || self.malformed.is_power_of_two() {
            log::warn!(
                "malformed descriptor chain #{} given back: {what}",
                self.malformed
            );
        }
    }
}

/// Reads one packet from a transmit chain: the header, then `len` bytes of payload from
/// wherever the chain's readable descriptors put them.
fn read_packet<T>(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<T>,
    buf: &mut [u8],
) -> Result<(Header, usize), String>
where
    T: std::ops::Deref<Target = GuestMemoryMmap>,
{
    let mut reader = chain.reader(mem).map_err(|e| e.to_string())?;
    let mut raw = [0u8; HEADER_LEN];
    reader
        .read_exact(&mut raw)
        .map_err(|e| format!("header: {e}"))?;
    let h = Header::parse(&raw);
    let len = h.len as usize;
    if len > MAX_PAYLOAD || len > buf.len() {
        return Err(format!("a payload of {len} bytes, above {MAX_PAYLOAD}"));
    }
    reader
        .read_exact(&mut buf[..len])
        .map_err(|e| format!("payload of {len} bytes: {e}"))?;
    Ok((h, len))
}

/// Writes one packet into a receive chain, across as many descriptors as it has.
fn write_packet(
    writer: &mut virtio_queue::Writer<'_>,
    h: &Header,
    payload: &[u8],
) -> io::Result<()> {
    writer.write_all(&h.to_bytes())?;
    writer.write_all(payload)
}

impl VhostUserBackend for VsockDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_F_NOTIFY_ON_EMPTY)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG
    }

    fn reset_device(&self) {
        self.lock().muxer.reset();
    }

    fn set_event_idx(&self, enabled: bool) {
        self.lock().event_idx = enabled;
    }

    /// The device's configuration space: the guest's context id.
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.guest_cid.to_le_bytes();
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= config.len() => config[start..end].to_vec(),
            _ => Vec::new(),
        }
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        self.lock().mem = Some(mem);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if !evset.contains(EventSet::IN) {
            return Ok(());
        }
        let [rx, tx, ..] = vrings else {
            return Err(io::Error::other("the vsock device has three queues"));
        };
        let mut inner = self.lock();
        match device_event {
            RX_QUEUE => {}
            TX_QUEUE => inner.process_tx(tx)?,
            // The device never sends transport events; the guest's buffers there stay unused.
            EVENT_QUEUE => return Ok(()),
            HOST_EVENT => inner.muxer.poll_host(),
            other => return Err(io::Error::other(format!("unknown event {other}"))),
        }
        inner.process_rx(rx)
    }
}

#[cfg(test)]
mod tests;
