//! The guest's metrics on vsock port `METRICS_VSOCK_PORT` (issue 26, docs/metrics.md). The
//! shim dials per scrape and writes one frame holding a `MetricsRequest`; the agent answers one
//! frame holding `GuestMetrics` and closes. A frame is a 4-byte big-endian length and that many
//! bytes of body. The reader takes the length first and refuses one over its cap without
//! reading the body, so a guest claiming 100 MiB costs the host four bytes.

/// The frame header's length.
pub const HEADER: usize = 4;
/// The largest answer the shim reads: a typical pod's is ~1 KB, 100 containers' ~20 KB.
pub const MAX_GUEST_METRICS: usize = 256 * 1024;
/// The most containers a request names; the agent answers for no more. 256 containers' series
/// come to ~0.9 MB of snapshot, within the monitor's read cap (`MAX_SNAPSHOT_BYTES`).
pub const MAX_METRICS_CONTAINERS: usize = 256;
/// The largest request the agent reads: `MAX_METRICS_CONTAINERS` ids of 128 bytes and their tags.
pub const MAX_METRICS_REQUEST: usize = 80 * 1024;
/// The most interfaces and disks an answer carries; the shim keeps no more either.
pub const MAX_GUEST_NICS: usize = 16;
pub const MAX_GUEST_DISKS: usize = 16;
/// The longest interface name (the kernel's IFNAMSIZ less its NUL) and disk name kept.
pub const MAX_NIC_NAME: usize = 15;
pub const MAX_DISK_NAME: usize = 32;
/// The longest container id an answer names (`valid_id`'s bound).
pub const MAX_ID: usize = 128;

use protobuf::Message;

use crate::{GuestMetrics, MetricsRequest};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("a frame of {len} bytes, more than {max}")]
    TooLarge { len: usize, max: usize },
    #[error("a message that does not encode or decode: {0}")]
    Message(String),
}

/// The shim's request frame for `container_ids` (the first `MAX_METRICS_CONTAINERS`).
pub fn request_frame(container_ids: &[String]) -> Result<Vec<u8>, FrameError> {
    let request = MetricsRequest {
        container_ids: container_ids
            .iter()
            .take(MAX_METRICS_CONTAINERS)
            .cloned()
            .collect(),
        ..Default::default()
    };
    let body = request
        .write_to_bytes()
        .map_err(|e| FrameError::Message(e.to_string()))?;
    frame(&body, MAX_METRICS_REQUEST)
}

/// A request's body, as the agent reads it (the host is trusted; the caps hold anyway).
pub fn parse_request(body: &[u8]) -> Result<MetricsRequest, FrameError> {
    if body.len() > MAX_METRICS_REQUEST {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max: MAX_METRICS_REQUEST,
        });
    }
    MetricsRequest::parse_from_bytes(body).map_err(|e| FrameError::Message(e.to_string()))
}

/// The agent's answer frame.
pub fn answer_frame(metrics: &GuestMetrics) -> Result<Vec<u8>, FrameError> {
    let body = metrics
        .write_to_bytes()
        .map_err(|e| FrameError::Message(e.to_string()))?;
    frame(&body, MAX_GUEST_METRICS)
}

/// `body` behind its header.
pub fn frame(body: &[u8], max: usize) -> Result<Vec<u8>, FrameError> {
    let len = u32::try_from(body.len())
        .ok()
        .filter(|len| *len as usize <= max)
        .ok_or(FrameError::TooLarge {
            len: body.len(),
            max,
        })?;
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// The body length a header announces, if it is within `max`.
pub fn parse_header(header: [u8; HEADER], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_its_length_then_its_body() {
        let f = frame(b"abc", 10).expect("fits");
        assert_eq!(f, [0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(parse_header([0, 0, 0, 3], 10), Ok(3));
        assert_eq!(parse_header([0, 0, 0, 0], 10), Ok(0));
        assert_eq!(
            frame(&[0; 11], 10),
            Err(FrameError::TooLarge { len: 11, max: 10 })
        );
        // 100 MiB claimed: refused from the header alone.
        let claim = (100u32 << 20).to_be_bytes();
        assert!(parse_header(claim, MAX_GUEST_METRICS).is_err());
        assert!(parse_header([0xff; 4], MAX_GUEST_METRICS).is_err());
        assert_eq!(
            parse_header((MAX_GUEST_METRICS as u32).to_be_bytes(), MAX_GUEST_METRICS),
            Ok(MAX_GUEST_METRICS)
        );
    }

    #[test]
    fn a_request_round_trips_and_is_capped() {
        let ids: Vec<String> = (0..MAX_METRICS_CONTAINERS + 5)
            .map(|n| format!("{n:0>128}"))
            .collect();
        let f = request_frame(&ids).expect("fits the request cap");
        let len = parse_header([f[0], f[1], f[2], f[3]], MAX_METRICS_REQUEST).expect("len");
        let request = parse_request(&f[HEADER..HEADER + len]).expect("parses");
        assert_eq!(request.container_ids.len(), MAX_METRICS_CONTAINERS);
        assert_eq!(request.container_ids[..], ids[..MAX_METRICS_CONTAINERS]);
        assert!(parse_request(b"\x0a\xff").is_err());
    }
}
