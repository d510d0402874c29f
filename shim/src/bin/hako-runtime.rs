//! hako-runtime: hako as an OCI runtime command line, for podman and conmon.

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = hako_shim::oci_runtime::main(&args).await;
    std::process::exit(code);
}
