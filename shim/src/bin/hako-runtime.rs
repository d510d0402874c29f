//! hako-runtime: hako as an OCI runtime command line, for podman and conmon.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // A keeper forks before any runtime thread exists.
    hako_shim::oci_runtime::before_threads(&args);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("hako-runtime: starting the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(hako_shim::oci_runtime::main(&args));
    // Exits without waiting for copies still blocked on a descriptor (a keeper's stdin).
    std::process::exit(code);
}
