#!/bin/bash
# Pod start through CRI, as kubelet makes a pod: RunPodSandbox, then CreateContainer and
# StartContainer of its one container (the time to the first container running), then
# StopPodSandbox and RemovePodSandbox. N pods per handler, interleaved, on containerd 2.x with
# its CRI plugin (the tests' harness, driven by tests/src/bin/cri-start.rs): runc, hako (a
# pause container, then the pod's container, in one VM) and hako-sandbox (the Sandbox API: the
# VM is the pod, no pause container; ADR 16); gVisor on request (see below). Prints p50/p90/max per step and the ratio to
# runc. A benchmark, not a test: it asserts nothing. Run as root after scripts/install.sh.
#
#   bench/cri-start.sh [N]      (default 20)
set -euo pipefail
n="${1:-20}"
export HAKO_BENCH_CONTAINERD="${HAKO_BENCH_CONTAINERD:-2}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_package runc runc
# gVisor is not in the default set: on this machine (Debian trixie's runsc 20240729 through
# containerd 2.1's runc shim) the pod's container's StartContainer never answers, whatever
# runsc's network mode (--network=sandbox even refuses CRI's pod namespace as the root one).
# gVisor's start is compared through ctr in cold-start.sh. HAKO_BENCH_CRI_HANDLERS=...,gvisor
# tries it.
handlers="${HAKO_BENCH_CRI_HANDLERS:-runc,hako,hako-sandbox}"
[[ ,$handlers, == *,gvisor,* ]] && need_gvisor
[[ $(containerd_version) == 1.* ]] && { echo "bench: cri-start needs containerd 2.x (the Sandbox API)" >&2; exit 1; }

echo "bench: building the CRI driver (tests/src/bin/cri-start.rs)"
(cd "$repo" && cargo build --locked -q -p hako-tests --bin cri-start)
driver="$repo/target/debug/cri-start"

cat >"$work/extra.toml" <<TOML

  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"

  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.gvisor]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.gvisor.options]
      BinaryName = "$work/runsc-none"
TOML

tsv="$out/cri-start.tsv"
echo "bench: $n pods per handler ($handlers), interleaved, after one warm-up each"
# Where the host does not let root lower a process's oom_score_adj (some sandboxes), runc cannot
# give the pause container kubelet's -998; containerd then keeps it at its own.
restrict=""
if ! (echo -999 >/proc/self/oom_score_adj) 2>/dev/null; then
    restrict="restrict_oom_score_adj = true"
    echo "bench: this host does not let root lower oom_score_adj: restrict_oom_score_adj = true"
fi
CRI_START_LOG="$work/containerd.log" "$driver" "$containerd_dir" "$n" "$handlers" "$work/extra.toml" "$restrict" >"$tsv"

md="$out/cri-start.md"
: >"$md"
{
    echo "### Pod start through CRI (RunPodSandbox to the first container running)"
    echo
    echo "Conditions: $(conditions "1 vCPU, 512 MiB guest, virtio-fs cache auto, from a template" "no network (\`--network=none\`)"). $n pods per handler, interleaved, one warm-up each; a CNI bridge with host-local addresses in a namespace of the run's own; the pod's one container is busybox \`sleep inf\`."
    echo
    echo "| handler | RunPodSandbox p50 ms | container Create+Start p50 ms | to running p50 ms | p90 ms | max ms | p50 vs runc | teardown p50 ms |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
} | tee_md "$md"
column "$tsv" 1 runc 5 >"$work/runc"
for handler in ${handlers//,/ }; do
    column "$tsv" 1 "$handler" 3 >"$work/pod"
    column "$tsv" 1 "$handler" 4 >"$work/container"
    column "$tsv" 1 "$handler" 5 >"$work/total"
    column "$tsv" 1 "$handler" 6 >"$work/teardown"
    p50="$(pct "$work/total" 50)"
    printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$handler" "$(pct "$work/pod" 50)" \
        "$(pct "$work/container" 50)" "$p50" "$(pct "$work/total" 90)" "$(tail -n1 "$work/total")" \
        "$(ratio "$p50" "$(pct "$work/runc" 50)")" "$(pct "$work/teardown" 50)"
done | tee_md "$md"
echo | tee_md "$md"
echo "hako's RunPodSandbox includes the VM (restored from a template) and, through \`hako\`, the pause container's CreateContainer in the guest; \`hako-sandbox\` makes no pause container." | tee_md "$md"
