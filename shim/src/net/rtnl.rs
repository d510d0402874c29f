//! rtnetlink conversations with the pod's network namespace, in-process (the `rtnetlink`
//! crate), where the shim once spawned `nsenter ip` and `nsenter tc` for each step.
//!
//! The API is sync, each conversation on a thread of its own that entered the namespace and
//! drives a current-thread runtime: the netlink socket has to be made by a thread inside the
//! namespace anyway, the tap's queues are opened from that same thread, and the callers are sync
//! (`PodNetwork`, teardown from `net.json`) while some run on the shim's runtime, where blocking
//! on another runtime would panic. A conversation is a handful of messages; the thread and the
//! runtime cost tens of microseconds, where each spawn cost milliseconds.

use std::future::Future;
use std::path::Path;

use futures_util::{Stream, TryStreamExt};
use netlink_packet_route::link::LinkAttribute;
use rtnetlink::Handle;

use super::namespace::on_thread_in;
use super::NetError;

/// Runs `talk` with a handle on a netlink socket that belongs to `netns`, and waits for it.
/// `what` names the conversation in errors about the namespace itself.
pub fn run_in<T, F, Fut>(netns: &Path, what: &str, talk: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetError>>,
{
    on_thread_in(netns, what, move || run_here(talk))
}

/// Runs `talk` with a handle on a netlink socket of this thread's namespace. For a thread that
/// entered the pod's namespace (`on_thread_in`), never for one of the shim's runtime threads.
pub fn run_here<T, F, Fut>(talk: F) -> Result<T, NetError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, NetError>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| failed("starting a netlink runtime", e))?;
    runtime.block_on(async move {
        // The socket is made here, by this thread, so in this thread's namespace.
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|e| failed("opening an rtnetlink socket", e))?;
        let driver = tokio::spawn(connection);
        let result = talk(handle).await;
        driver.abort();
        result
    })
}

/// The error for a failed `operation`: the kernel's errno as the system words it, when the
/// kernel answered with one.
pub fn failed(operation: impl Into<String>, error: impl Into<Failure>) -> NetError {
    NetError::Netlink {
        operation: operation.into(),
        reason: error.into().0,
    }
}

/// Why a netlink step failed, in words.
pub struct Failure(String);

impl From<rtnetlink::Error> for Failure {
    fn from(e: rtnetlink::Error) -> Self {
        match e {
            rtnetlink::Error::NetlinkError(message) => Failure(message.to_io().to_string()),
            other => Failure(other.to_string()),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure(e.to_string())
    }
}

/// Collects a dump; `operation` names it in the error.
pub async fn dump<M>(
    messages: impl Stream<Item = Result<M, rtnetlink::Error>>,
    operation: &str,
) -> Result<Vec<M>, NetError> {
    messages
        .try_collect()
        .await
        .map_err(|e| failed(operation, e))
}

/// The index of the link named `name`.
pub async fn index_of(handle: &Handle, name: &str) -> Result<u32, NetError> {
    let operation = || format!("finding link {name}");
    let link = handle
        .link()
        .get()
        .match_name(name)
        .execute()
        .try_next()
        .await
        .map_err(|e| failed(operation(), e))?;
    link.map(|l| l.header.index)
        .ok_or_else(|| NetError::Netlink {
            operation: operation(),
            reason: "the kernel listed no such link".to_string(),
        })
}

/// The name of link `index`, if it has one.
pub async fn name_of(handle: &Handle, index: u32) -> Result<Option<String>, NetError> {
    let link = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .map_err(|e| failed(format!("finding link {index}"), e))?;
    Ok(link.and_then(|l| {
        l.attributes.into_iter().find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name),
            _ => None,
        })
    }))
}
