//! containerd-shim-hako-v2: containerd's runtime shim for `io.containerd.hako.v2`.

use hako_shim::shim::{serve, shim_config, HakoShim, RUNTIME_ID};

/// What the binary says to a person who runs it by hand.
const ABOUT: &str =
    "containerd-shim-hako-v2: the shim of hako's containerd runtime, io.containerd.hako.v2,
which runs every pod in a lightweight VM.

containerd starts it; it is not run by hand. To run a container in a VM:
  ctr run --runtime io.containerd.hako.v2 IMAGE ID COMMAND
  docker run --runtime io.containerd.hako.v2 IMAGE COMMAND
and for Kubernetes a RuntimeClass with handler hako (scripts/install.sh --print-config).
The operator's tool is `hako`: hako check, hako logs, hako --help.

containerd calls it as:
  containerd-shim-hako-v2 -namespace NS -id ID -address ADDRESS [start | delete]
  containerd-shim-hako-v2 -v      the version
  containerd-shim-hako-v2 -info   the runtime's features (protobuf, for containerd)";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // Only as the first argument: containerd's calls begin with a flag, and a container may
    // well be called "help" (`-id help`).
    let asks_help = matches!(
        args.get(1).and_then(|a| a.to_str()),
        Some("-h" | "--help" | "-help" | "help")
    );
    if asks_help {
        println!("{ABOUT}");
        return Ok(());
    }
    let flags = match containerd_shim::parse(&args[1..]) {
        Ok(flags) => flags,
        Err(e) => {
            eprintln!("containerd-shim-hako-v2: {e}\n\n{ABOUT}");
            std::process::exit(2);
        }
    };
    if flags.version {
        // As containerd's own shims print it.
        println!(
            "containerd-shim-hako-v2:\n  Version:  {}\n  Runtime:  {RUNTIME_ID}",
            env!("CARGO_PKG_VERSION")
        );
        return Ok(());
    }
    // Only containerd sets TTRPC_ADDRESS: without it the server could not publish a single
    // event, and the person who ran it by hand gets told what the binary is.
    let by_hand = std::env::var_os("TTRPC_ADDRESS").is_none();
    if by_hand && flags.action.is_empty() && !flags.info {
        eprintln!("{ABOUT}");
        std::process::exit(2);
    }
    if flags.info {
        // What hako supports, for containerd (the shim crate's own answer is runc's).
        let mut options = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut options)?;
        let info = hako_shim::features::runtime_info(RUNTIME_ID, &options)?;
        std::io::Write::write_all(&mut std::io::stdout(), &info)?;
        return Ok(());
    }
    if flags.action.is_empty() && !flags.version && !flags.info {
        // The long-lived server: ours, so it can serve task API v2 and v3.
        return serve(&flags).await.map_err(Into::into);
    }
    if flags.action == "start" {
        // containerd 2.3 and later write their bootstrap parameters to `start`'s stdin, older
        // ones the runtime's options. hako needs neither there (its options arrive with
        // CreateTask), and the shim crate would parse either as runc's options, failing on the
        // first: drained here, the crate finds stdin empty and only sets the OOM score.
        std::io::copy(&mut std::io::stdin(), &mut std::io::sink())?;
    }
    // The shim crate insists on TTRPC_ADDRESS even for `delete`, which an operator may run by
    // hand after a crash; `delete` never publishes, so an empty address is enough there.
    if std::env::var_os("TTRPC_ADDRESS").is_none() && flags.action == "delete" {
        // SAFETY: the runtime's worker threads are idle and read no environment variables yet.
        unsafe { std::env::set_var("TTRPC_ADDRESS", "") };
    }
    containerd_shim::asynchronous::run::<HakoShim>(RUNTIME_ID, Some(shim_config())).await;
    Ok(())
}
