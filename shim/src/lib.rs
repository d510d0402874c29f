//! hako-shim: the `containerd-shim-hako-v2` runtime shim and the `hako` CLI.
//!
//! The path of one container: `shim` (containerd's entry points) → `task` (the Task service)
//! → `sandbox` (dirs, mounts, teardown) → `fs` (virtiofsd) + `vmm` (QEMU) → `agent_client`
//! (hybrid vsock + ttrpc to the guest agent).

pub mod agent_client;
pub mod cgroup;
pub mod config;
pub mod daemon;
pub mod features;
pub mod hooks;
pub mod ids;
pub mod logs;
pub mod metrics;
pub mod monitor;
pub mod net;
pub mod oci_runtime;
pub mod rate_limit;
pub mod sandbox;
pub mod sandboxer;
pub mod shim;
pub mod task;
pub mod timing;
pub mod vmm;
