//! The monitor's HTTP endpoint: `GET /metrics` (Prometheus text 0.0.4, one scrape of the node
//! per request), `GET /-/healthy`. The same bounded request reading as the shims' sockets: one
//! request per connection, its head capped at 4 KiB and read within 1 s.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::Monitor;
use crate::metrics::server::{read_head, request_path, respond, RequestError, READ_DEADLINE};
use crate::metrics::text;

/// Requests served at once; more are closed at accept. A scrape fans out to every sandbox, so
/// a flood of requests must not multiply that.
const MAX_CONNECTIONS: usize = 8;

/// Serves `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, monitor: Arc<Monitor>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of fds, most likely: wait instead of spinning on the error.
                log::warn!("monitor: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let monitor = monitor.clone();
        tokio::spawn(async move {
            let _slot = slot;
            handle(stream, &monitor).await;
        });
    }
}

async fn handle(mut stream: TcpStream, monitor: &Monitor) {
    let head = match tokio::time::timeout(READ_DEADLINE, read_head(&mut stream)).await {
        // A slow or silent client is cut without an answer.
        Err(_) | Ok(Err(RequestError::Io(_) | RequestError::Truncated)) => return,
        Ok(head) => head,
    };
    let path = match &head {
        Ok(head) => request_path(head),
        Err(e) => Err(e.clone()),
    };
    let (status, content_type, body) = match path {
        Ok("/metrics") => ("200 OK", text::CONTENT_TYPE, monitor.scrape().await),
        Ok("/-/healthy") => ("200 OK", "text/plain", "ok\n".to_string()),
        Ok("/") => (
            "200 OK",
            "text/plain",
            "hako monitor: the node's pods' metrics are at /metrics\n".to_string(),
        ),
        Ok(_) => ("404 Not Found", "text/plain", "no such path\n".to_string()),
        Err(e) => (e.status(), "text/plain", format!("{e}\n")),
    };
    respond(&mut stream, status, content_type, body.as_bytes()).await;
}
