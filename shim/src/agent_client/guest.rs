//! The guest's metrics, fetched per scrape on vsock port `METRICS_VSOCK_PORT` (issue 26): one
//! connection, one request frame naming the pod's containers, one answer frame, all under one
//! deadline. The answer is a hostile guest's bytes: its length is read first and a frame over
//! `MAX_GUEST_METRICS` is refused unread; the body is decoded here by hand, within caps, and
//! only what passes the checks comes out (`GuestFigures`).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use hako_protocol::metrics::{
    parse_header, request_frame, HEADER, MAX_DISK_NAME, MAX_GUEST_DISKS, MAX_GUEST_METRICS,
    MAX_GUEST_NICS, MAX_NIC_NAME,
};
use protobuf::rt::WireType;
use protobuf::CodedInputStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why an answer was refused, as `hako_guest_metrics_rejected_total{reason}` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the answer claims more than {MAX_GUEST_METRICS} bytes")]
    Oversize,
    #[error("a malformed answer")]
    Malformed,
    #[error("no answer within the deadline")]
    Timeout,
    #[error("the guest did not take the connection")]
    Refused,
}

impl Rejection {
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::Oversize => "oversize",
            Rejection::Malformed => "malformed",
            Rejection::Timeout => "timeout",
            Rejection::Refused => "refused",
        }
    }
}

/// A field the guest left out (or sent out of bounds) is `None`.
pub type Fields<const N: usize> = [Option<u64>; N];

/// The guest's answer, checked: names in a tight charset, no entry twice, containers only the
/// ones asked for, doubles finite and in 0..1e6.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct GuestFigures {
    /// total, available, free, cached, buffers, shmem, slab, swap_total, swap_free (bytes).
    pub memory: Fields<9>,
    /// user, nice, system, idle, iowait, irq, softirq, steal (ticks), user_hz, procs_running,
    /// procs_blocked.
    pub cpu: Fields<11>,
    pub load: [Option<f64>; 3],
    /// rx bytes, packets, errors, drops, then tx the same.
    pub interfaces: Vec<(String, Fields<8>)>,
    /// reads completed, read bytes, writes completed, written bytes, io time (ms).
    pub disks: Vec<(String, Fields<5>)>,
    /// The 18 numbers of `ContainerMetrics`, in its field order (2..=19).
    pub containers: Vec<(String, Fields<18>)>,
    pub truncated: bool,
}

/// Dials the guest through the hybrid-vsock `socket`, asks for `container_ids` and decodes the
/// answer, everything within `deadline`.
pub async fn fetch(
    socket: &Path,
    container_ids: &[String],
    deadline: Duration,
) -> Result<GuestFigures, Rejection> {
    let exchange = async {
        let mut stream = super::connect(socket, hako_protocol::METRICS_VSOCK_PORT)
            .await
            .map_err(|_| Rejection::Refused)?;
        let request = request_frame(container_ids).map_err(|_| Rejection::Refused)?;
        stream
            .write_all(&request)
            .await
            .map_err(|_| Rejection::Refused)?;
        let mut header = [0u8; HEADER];
        stream
            .read_exact(&mut header)
            .await
            .map_err(|_| Rejection::Refused)?;
        // Over the cap: the stream is dropped (closed) here, its body never read.
        let len = parse_header(header, MAX_GUEST_METRICS).map_err(|_| Rejection::Oversize)?;
        let mut body = vec![0u8; len];
        stream
            .read_exact(&mut body)
            .await
            .map_err(|_| Rejection::Malformed)?;
        decode(&body, container_ids).map_err(|_| Rejection::Malformed)
    };
    tokio::time::timeout(deadline, exchange)
        .await
        .unwrap_or(Err(Rejection::Timeout))
}

/// A `GuestMetrics` body, field by field. Unknown fields are skipped; a known field of the
/// wrong type, or any framing the bytes do not hold, refuses the whole answer. Entries past a
/// cap, with a bad name, for a container not asked for or seen before are dropped.
pub fn decode(body: &[u8], asked: &[String]) -> protobuf::Result<GuestFigures> {
    let asked: BTreeSet<&str> = asked.iter().map(String::as_str).collect();
    let mut out = GuestFigures::default();
    let mut is = CodedInputStream::from_bytes(body);
    while let Some(tag) = is.read_raw_tag_or_eof()? {
        let (field, wire) = unpack(tag)?;
        match (field, wire) {
            (1, WireType::LengthDelimited) => out.memory = record(&mut is, 0, false)?.1,
            (2, WireType::LengthDelimited) => out.cpu = record(&mut is, 0, false)?.1,
            (3, WireType::LengthDelimited) => {
                let (_, bits): (_, Fields<3>) = record(&mut is, 0, true)?;
                out.load = bits.map(|b| b.map(f64::from_bits).filter(|v| bounded(*v)));
            }
            (4, WireType::LengthDelimited) => {
                let (name, fields) = record(&mut is, MAX_NIC_NAME, false)?;
                let fresh = |n: &String| !out.interfaces.iter().any(|(seen, _)| seen == n);
                match name.filter(fresh) {
                    Some(_) if out.interfaces.len() >= MAX_GUEST_NICS => out.truncated = true,
                    Some(name) => out.interfaces.push((name, fields)),
                    None => {}
                }
            }
            (5, WireType::LengthDelimited) => {
                let (name, fields) = record(&mut is, MAX_DISK_NAME, false)?;
                let fresh = |n: &String| !out.disks.iter().any(|(seen, _)| seen == n);
                match name.filter(fresh) {
                    Some(_) if out.disks.len() >= MAX_GUEST_DISKS => out.truncated = true,
                    Some(name) => out.disks.push((name, fields)),
                    None => {}
                }
            }
            (6, WireType::LengthDelimited) => {
                let (id, fields) = record(&mut is, hako_protocol::metrics::MAX_ID, false)?;
                let wanted = |id: &String| {
                    asked.contains(id.as_str())
                        && !out.containers.iter().any(|(seen, _)| seen == id)
                };
                if let Some(id) = id.filter(wanted) {
                    out.containers.push((id, fields));
                }
            }
            (7, WireType::Varint) => out.truncated |= is.read_bool()?,
            (1..=7, _) => return Err(malformed("a field of the wrong wire type")),
            _ => is.skip_field(wire)?,
        }
    }
    Ok(out)
}

/// A load average as a gauge takes it.
fn bounded(v: f64) -> bool {
    v.is_finite() && (0.0..1e6).contains(&v)
}

/// One sub-message: with `name_cap` > 0 its field 1 is a name (kept only if it is within the
/// cap and a valid label value) and its numbers are fields 2..=N+1, else its numbers are
/// fields 1..=N; varints, or with `doubles` 64-bit fixed (kept as bits). Later fields are
/// skipped.
fn record<const N: usize>(
    is: &mut CodedInputStream<'_>,
    name_cap: usize,
    doubles: bool,
) -> protobuf::Result<(Option<String>, Fields<N>)> {
    let len = is.read_raw_varint32()?;
    let end = is.pos() + u64::from(len);
    let outer = is.push_limit(u64::from(len))?;
    let named = name_cap > 0;
    let first = if named { 2 } else { 1 };
    let mut name = None;
    let mut fields = [None; N];
    while !is.eof()? {
        let tag = is.read_raw_tag_or_eof()?.unwrap_or_default();
        let (field, wire) = unpack(tag)?;
        let number = wire
            == if doubles {
                WireType::Fixed64
            } else {
                WireType::Varint
            };
        if named && field == 1 {
            if wire != WireType::LengthDelimited {
                return Err(malformed("a name of the wrong wire type"));
            }
            name = read_name(is, name_cap)?;
        } else if let Some(slot) = (field as usize)
            .checked_sub(first)
            .and_then(|i| fields.get_mut(i))
        {
            if !number {
                return Err(malformed("a number of the wrong wire type"));
            }
            *slot = Some(if doubles {
                is.read_fixed64()?
            } else {
                is.read_uint64()?
            });
        } else {
            is.skip_field(wire)?;
        }
    }
    // A slice's end reads as the limit's: an entry that claims more than the answer holds.
    if is.pos() != end {
        return Err(malformed("an entry longer than the answer"));
    }
    is.pop_limit(outer);
    Ok((name, fields))
}

/// A name of at most `cap` bytes that is a valid label value; a longer or stranger one is
/// skipped unread past the cap and makes its entry dropped.
fn read_name(is: &mut CodedInputStream<'_>, cap: usize) -> protobuf::Result<Option<String>> {
    let len = is.read_raw_varint32()?;
    let keep = len.min(u32::try_from(cap + 1).unwrap_or(u32::MAX));
    let bytes = is.read_raw_bytes(keep)?;
    is.skip_raw_bytes(len - keep)?;
    Ok(String::from_utf8(bytes)
        .ok()
        .filter(|s| s.len() <= cap && crate::metrics::snapshot::valid_label_value(s)))
}

fn unpack(tag: u32) -> protobuf::Result<(u32, WireType)> {
    let wire = WireType::new(tag & 7).ok_or_else(|| malformed("an unknown wire type"))?;
    if tag >> 3 == 0 {
        return Err(malformed("field 0"));
    }
    Ok((tag >> 3, wire))
}

fn malformed(what: &str) -> protobuf::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string()).into()
}

#[cfg(test)]
#[path = "guest_tests.rs"]
mod tests;
