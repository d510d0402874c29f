//! A benchmark's driver, not a test: CRI pod starts as kubelet makes them (RunPodSandbox,
//! CreateContainer, StartContainer of one container, then StopPodSandbox and
//! RemovePodSandbox), through each runtime handler in turn on a private containerd with CRI
//! (`hako_tests::cri::CriContainerd`). Prints one TSV row per pod:
//! handler, run, pod_ms (RunPodSandbox), container_ms (Create and Start), total_ms, teardown_ms.
//! `bench/cri-start.sh` runs it and makes the tables.
//!
//!   cri-start CONTAINERD_INSTALL RUNS HANDLER[,HANDLER...] [EXTRA_TABLES_TOML [EXTRA_KEYS]]
//!
//! With `CRI_START_LOG` set, containerd's log (the shims' lines in it) is copied there at the
//! end.

#![allow(clippy::unwrap_used, clippy::expect_used)] // A driver: a failed step ends the run loudly.

use std::path::Path;
use std::time::Instant;

use hako_tests::cri::{container_config, pod_sandbox_config, ConfigExtra, CriContainerd};
use hako_tests::IMAGE;

fn ms(since: Instant) -> String {
    format!("{:.1}", since.elapsed().as_secs_f64() * 1000.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!(
            "usage: cri-start CONTAINERD_INSTALL RUNS HANDLER[,HANDLER...] [EXTRA_CONFIG_TOML]"
        );
        std::process::exit(2);
    }
    let runs: usize = args[2].parse().expect("RUNS is a number");
    let handlers: Vec<&str> = args[3].split(',').collect();
    let extra = ConfigExtra {
        tables: args
            .get(4)
            .map(|p| std::fs::read_to_string(p).expect("the extra configuration"))
            .unwrap_or_default(),
        keys: args.get(5).map(|k| format!("  {k}\n")).unwrap_or_default(),
        env: Vec::new(),
    };
    let c = CriContainerd::start_with(Path::new(&args[1]), &extra);
    let image = c.client.image_status(IMAGE).unwrap().expect("busybox").id;
    println!("handler\trun\tpod_ms\tcontainer_ms\ttotal_ms\tteardown_ms");
    // Run 0 of each handler warms up (image unpacking, a template's first use) and is not
    // printed.
    for run in 0..=runs {
        for handler in &handlers {
            let uid = format!("bench-{handler}-{run}");
            let log_dir = c.pod_log_directory("bench", &uid, &["app"]);
            let pod_config = pod_sandbox_config("bench", &uid, &log_dir);
            let config = container_config(&pod_config, "app", &image, &["sleep", "inf"], 0);
            let started = Instant::now();
            let pod = c
                .client
                .run_pod_sandbox(&pod_config, handler)
                .unwrap_or_else(|e| panic!("{handler}: RunPodSandbox: {e:?}"));
            let pod_ms = ms(started);
            let created = Instant::now();
            let id = c
                .client
                .create_container(&pod, &config, &pod_config)
                .unwrap_or_else(|e| panic!("{handler}: CreateContainer: {e:?}"));
            c.client
                .start_container(&id)
                .unwrap_or_else(|e| panic!("{handler}: StartContainer: {e:?}"));
            let container_ms = ms(created);
            let total_ms = ms(started);
            let stopping = Instant::now();
            c.client.stop_pod_sandbox(&pod).unwrap();
            c.client.remove_pod_sandbox(&pod).unwrap();
            let teardown_ms = ms(stopping);
            if run > 0 {
                println!("{handler}\t{run}\t{pod_ms}\t{container_ms}\t{total_ms}\t{teardown_ms}");
            }
        }
        eprint!("\r  {run}/{runs}");
    }
    eprintln!();
    if let Some(path) = std::env::var_os("CRI_START_LOG") {
        std::fs::write(path, c.log()).expect("CRI_START_LOG");
    }
}
