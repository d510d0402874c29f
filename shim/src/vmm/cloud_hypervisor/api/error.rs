//! What a call to the API can fail with, and how bodies are quoted in messages.

use std::path::PathBuf;
use std::time::Duration;

/// How much of an unparseable body an error message quotes.
const QUOTE_LEN: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Nothing at the socket path: the VMM is not running, or not yet listening.
    #[error("cloud-hypervisor {endpoint}: API socket {} does not exist", socket.display())]
    SocketMissing {
        endpoint: &'static str,
        socket: PathBuf,
    },
    /// The socket exists but the connection failed (refused: the VMM is gone).
    #[error("cloud-hypervisor {endpoint}: cannot connect to {}: {message}", socket.display())]
    Connect {
        endpoint: &'static str,
        socket: PathBuf,
        message: String,
    },
    /// No complete answer in time.
    #[error("cloud-hypervisor {endpoint}: no answer within {timeout:?}")]
    Timeout {
        endpoint: &'static str,
        timeout: Duration,
    },
    /// The API answered with an error status; `message` is its body.
    #[error("cloud-hypervisor {endpoint}: HTTP {status}: {message}")]
    Status {
        endpoint: &'static str,
        status: u16,
        message: String,
    },
    /// A success status with a body that is not what the endpoint returns.
    #[error("cloud-hypervisor {endpoint}: bad response: {message}")]
    BadResponse {
        endpoint: &'static str,
        message: String,
    },
    /// The connection broke before a full answer (typically the VMM died mid-call).
    #[error("cloud-hypervisor {endpoint}: connection lost before a full answer: {message}")]
    Disconnected {
        endpoint: &'static str,
        message: String,
    },
    /// The HTTP client itself could not be set up.
    #[error("cloud-hypervisor API client: {message}")]
    Setup { message: String },
}

impl ApiError {
    /// The HTTP status of an error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Cloud Hypervisor's error bodies are a JSON array of the error's chain, outermost first
/// (`["Error from API","The VM could not boot","..."]`); anything else is quoted as it is.
pub(super) fn api_message(body: &[u8]) -> String {
    if let Ok(chain) = serde_json::from_slice::<Vec<String>>(body) {
        if !chain.is_empty() {
            return chain.join(": ");
        }
    }
    let text = String::from_utf8_lossy(body);
    if text.trim().is_empty() {
        "(no message)".to_string()
    } else {
        quote(body)
    }
}

pub(super) fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(QUOTE_LEN) {
        Some((cut, _)) => format!("{:?}...", &text[..cut]),
        None => format!("{text:?}"),
    }
}

/// reqwest's own message is terse ("error sending request"); the causes say what happened.
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

pub(super) fn io_error_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        source = cause.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_messages_join_the_error_chain_or_quote_the_body() {
        assert_eq!(api_message(br#"["a","b"]"#), "a: b");
        assert_eq!(api_message(b"  "), "(no message)");
        assert_eq!(api_message(b"oops"), "\"oops\"");
        let long = vec![b'x'; 2000];
        assert!(api_message(&long).ends_with("..."));
    }
}
