//! containerd-shim-hako-v2: containerd's runtime shim for `io.containerd.hako.v2`.

use hako_shim::shim::{shim_config, HakoShim, RUNTIME_ID};

#[tokio::main]
async fn main() {
    // The shim crate insists on TTRPC_ADDRESS even for `delete`, which an operator may run by
    // hand after a crash; `delete` never publishes, so an empty address is enough there.
    if std::env::var_os("TTRPC_ADDRESS").is_none() && std::env::args().any(|a| a == "delete") {
        // SAFETY: the runtime's worker threads are idle and read no environment variables yet.
        unsafe { std::env::set_var("TTRPC_ADDRESS", "") };
    }
    containerd_shim::asynchronous::run::<HakoShim>(RUNTIME_ID, Some(shim_config())).await;
}
