//! containerd-shim-hako-v2: containerd's runtime shim for `io.containerd.hako.v2`.

use hako_shim::shim::{shim_config, HakoShim, RUNTIME_ID};

#[tokio::main]
async fn main() {
    containerd_shim::asynchronous::run::<HakoShim>(RUNTIME_ID, Some(shim_config())).await;
}
