//! The port-forward exchange on vsock port `FORWARD_VSOCK_PORT`: the host writes the pod's TCP
//! port as a decimal line ("8080\n"); the agent answers "OK\n" once it is connected to that port
//! on the guest's loopback, or "ERR <reason>\n"; after "OK" the connection carries the bytes.

/// The longest request line, newline excluded.
pub const MAX_REQUEST: usize = 5;
/// The longest answer line the host reads, newline excluded.
pub const MAX_ANSWER: usize = 512;

/// The request line for `port`.
pub fn request(port: u16) -> String {
    format!("{port}\n")
}

/// The port a request line (without its newline) names: 1 to 65535, digits only.
pub fn parse_request(line: &[u8]) -> Result<u16, String> {
    let text = std::str::from_utf8(line).map_err(|_| "the request is not text".to_string())?;
    if text.is_empty() || text.len() > MAX_REQUEST || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{text:?} is not a port number"));
    }
    match text.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(format!("{text:?} is not a port number (1 to 65535)")),
    }
}

/// Reads an answer line (without its newline): `Ok` for "OK", the reason for "ERR <reason>".
pub fn parse_answer(line: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(line);
    match text.strip_prefix("ERR ") {
        _ if text == "OK" => Ok(()),
        Some(reason) => Err(reason.to_string()),
        None => Err(format!("unexpected answer {text:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_one_port() {
        assert_eq!(parse_request(b"8080"), Ok(8080));
        assert_eq!(
            parse_request(request(65535).trim_end().as_bytes()),
            Ok(65535)
        );
        for bad in [
            &b""[..],
            b"0",
            b"65536",
            b"-1",
            b" 80",
            b"80a",
            b"123456",
            b"\xff",
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_answer(b"OK"), Ok(()));
        assert_eq!(parse_answer(b"ERR refused"), Err("refused".to_string()));
        assert!(parse_answer(b"OKAY").is_err());
    }
}
