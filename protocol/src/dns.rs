//! The DNS relay on vsock port `DNS_VSOCK_PORT` (ADR 12). Docker's embedded DNS server answers
//! on 127.0.0.11:53 in the pod's network namespace on the host, which the guest cannot reach:
//! the agent answers there in the guest instead and carries each query to the host over one
//! connection the host opens. The host writes nothing first; the agent answers "OK\n" once it
//! listens, or "ERR <reason>\n" (read as `forward::parse_answer` reads it). Then both sides
//! write frames: a 3-byte header (the transport, then the message's length, big-endian) and one
//! whole DNS message. Queries flow to the host, answers back, matched by the message's id,
//! which the agent makes unique among the queries it has in flight.

use std::net::Ipv4Addr;

/// Docker's embedded DNS server, in a container's (here: the pod's) network namespace.
pub const RESOLVER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);
pub const RESOLVER_PORT: u16 = 53;

/// The frame header's length.
pub const HEADER: usize = 3;
/// A DNS message's fixed header: anything shorter is not one.
pub const MIN_MESSAGE: usize = 12;

/// How a query reached the agent, and so how the host asks the resolver: a UDP answer may be
/// truncated, and the client then asks again over TCP, which must reach the resolver as TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp = 0,
    Tcp = 1,
}

/// The header of a frame carrying `message`.
pub fn header(transport: Transport, message: &[u8]) -> Result<[u8; HEADER], String> {
    let len = u16::try_from(message.len())
        .ok()
        .filter(|len| usize::from(*len) >= MIN_MESSAGE)
        .ok_or_else(|| format!("a DNS message of {} bytes", message.len()))?;
    let [high, low] = len.to_be_bytes();
    Ok([transport as u8, high, low])
}

/// The transport and message length a frame header announces; anything else ends the relay.
pub fn parse_header(header: [u8; HEADER]) -> Result<(Transport, usize), String> {
    let transport = match header[0] {
        0 => Transport::Udp,
        1 => Transport::Tcp,
        other => return Err(format!("unknown transport {other}")),
    };
    let len = usize::from(u16::from_be_bytes([header[1], header[2]]));
    if len < MIN_MESSAGE {
        return Err(format!("a DNS message of {len} bytes"));
    }
    Ok((transport, len))
}

/// A DNS message's id: its first two bytes.
pub fn message_id(message: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*message.first()?, *message.get(1)?]))
}

/// Replaces a message's id (the caller checked it has one).
pub fn set_message_id(message: &mut [u8], id: u16) {
    if let Some(first) = message.get_mut(..2) {
        first.copy_from_slice(&id.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_one_whole_message_of_a_known_transport() {
        let message = [7u8; 300];
        let h = header(Transport::Tcp, &message).expect("test step");
        assert_eq!(h, [1, 1, 44]);
        assert_eq!(parse_header(h), Ok((Transport::Tcp, 300)));
        assert_eq!(
            parse_header(header(Transport::Udp, &[0; 12]).expect("test step")),
            Ok((Transport::Udp, 12))
        );
        assert!(header(Transport::Udp, &[0; 11]).is_err());
        assert!(header(Transport::Udp, &vec![0; 65536]).is_err());
        assert!(parse_header([2, 0, 20]).is_err(), "no third transport");
        assert!(parse_header([0, 0, 11]).is_err(), "shorter than a header");
        assert!(parse_header([0, 0, 0]).is_err());
    }

    #[test]
    fn ids_are_the_first_two_bytes() {
        let mut message = vec![0x12, 0x34, 1, 0];
        assert_eq!(message_id(&message), Some(0x1234));
        set_message_id(&mut message, 0xbeef);
        assert_eq!(message, [0xbe, 0xef, 1, 0]);
        assert_eq!(message_id(&[1]), None);
    }
}
