//! A Docker container's id from its name, for `hako logs` and `hako ps`: Docker never tells
//! the runtime a container's name, so the name is asked of Docker itself (`GET
//! /containers/<name>/json` on its socket, `$DOCKER_HOST` or /var/run/docker.sock). Only an
//! answer that carries a 64-hex id is used; no daemon, no answer.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// An inspect answer is a few KiB; a larger one is not read.
const MAX_ANSWER: u64 = 4 << 20;
const TIMEOUT: Duration = Duration::from_secs(5);

/// The socket Docker's CLI would use: a `unix://` `$DOCKER_HOST`, else the default.
fn socket() -> PathBuf {
    match std::env::var("DOCKER_HOST") {
        Ok(host) => match host.strip_prefix("unix://") {
            Some(path) => PathBuf::from(path),
            None => PathBuf::new(),
        },
        Err(_) => PathBuf::from(DEFAULT_SOCKET),
    }
}

/// The full id of the Docker container `name` (a name or an id prefix, already checked by
/// `ids::validate`, so it needs no quoting in a URL path), if Docker knows it.
pub fn container_id(name: &str) -> Option<String> {
    let mut stream = UnixStream::connect(socket()).ok()?;
    stream.set_read_timeout(Some(TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(TIMEOUT)).ok()?;
    // HTTP/1.0: the daemon closes the connection after its answer, which ends the read.
    let request = format!("GET /containers/{name}/json HTTP/1.0\r\nHost: docker\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut answer = Vec::new();
    stream.take(MAX_ANSWER).read_to_end(&mut answer).ok()?;
    id_from_answer(&answer)
}

fn id_from_answer(answer: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(answer).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.lines().next()?;
    if status.split_whitespace().nth(1) != Some("200") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    let id = value.get("Id")?.as_str()?;
    let hex = id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit());
    hex.then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn only_a_good_answer_gives_an_id() {
        let ok = format!("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{{\"Id\":\"{ID}\",\"Name\":\"/web\"}}");
        assert_eq!(id_from_answer(ok.as_bytes()), Some(ID.to_string()));
        for bad in [
            "HTTP/1.0 404 Not Found\r\n\r\n{\"message\":\"No such container: web\"}".to_string(),
            format!("HTTP/1.0 200 OK\r\n\r\n{{\"Id\":\"{}\"}}", &ID[..12]),
            "HTTP/1.0 200 OK\r\n\r\n{\"Id\":\"../../etc/passwd\"}".to_string(),
            "HTTP/1.0 200 OK\r\n\r\nnot json".to_string(),
            "garbage".to_string(),
        ] {
            assert_eq!(id_from_answer(bad.as_bytes()), None, "{bad}");
        }
    }
}
