#!/bin/bash
# Cold start through podman: `podman run --rm <image> /bin/true` N times per runtime, with
# runc, gVisor (runsc as podman's OCI runtime, with `--network=host`: the host kernel's stack in
# the container's namespace; its default netstack refuses podman's namespace here) and hako-runtime
# interleaved, and as many runs of `echo` for the time to the first byte of output. podman
# runs with a storage of the benchmark's own, in a network namespace of its own (its bridge
# and firewall rules stay there; nsenter, not `ip netns exec`, which would remount /sys without
# the host's cgroup mounts), with netavark's default network. Prints p50/p90/max and the
# ratio to runc. A benchmark, not a test: it asserts nothing. Run as root after
# scripts/install.sh, with podman installed (scripts/setup.sh).
#
#   bench/podman-start.sh [N]      (default 20)
set -euo pipefail
n="${1:-20}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_package runc runc
command -v podman >/dev/null || { echo "bench: podman is not installed: run scripts/setup.sh" >&2; exit 1; }
[[ -x /usr/local/bin/hako-runtime ]] || { echo "bench: no /usr/local/bin/hako-runtime: run scripts/install.sh" >&2; exit 1; }
need_gvisor
image=hako.local/busybox:latest

netns="hkb-podman-$$"
ip netns add "$netns"
cleanups+=("ip netns del $netns")
ip -n "$netns" link set lo up
# This host's runc cannot raise rlimits past its own hard limits, which podman's defaults do.
printf '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n' >"$work/containers.conf"
pod() {
    CONTAINERS_CONF="$work/containers.conf" nsenter --net="/run/netns/$netns" podman --root "$work/podman/root" \
        --runroot "$work/podman/run" --tmpdir "$work/podman/tmp" "$@"
}
cleanups+=("pod rm -af -t 0 >/dev/null 2>&1; pod rmi -af >/dev/null 2>&1; umount -R $work/podman/root 2>/dev/null")
"$repo/tests/images/busybox-image.sh" "$work/image.tar" "$image" >/dev/null
pod load -i "$work/image.tar" >/dev/null

runtime_flags() {
    case "$1" in
        runc) echo "--runtime /usr/bin/runc" ;;
        gvisor) echo "--runtime $work/runsc-host" ;;
        hako) echo "--runtime /usr/local/bin/hako-runtime" ;;
    esac
}
tsv="$out/podman-start.tsv"
printf 'runtime\tcommand\trun\tms\n' >"$tsv"
# hako's first start may make its VM template (ADR 14): measured apart.
start=$EPOCHREALTIME
# shellcheck disable=SC2046
pod $(runtime_flags hako) run --rm "$image" /bin/true
first_start="$(ms_since "$start")"
echo "bench: podman, $n runs of run --rm $image /bin/true and of echo per runtime"
for i in $(seq 1 "$n"); do
    for runtime in runc gvisor hako; do
        read -r -a flags <<<"$(runtime_flags "$runtime")"
        start=$EPOCHREALTIME
        pod "${flags[@]}" run --rm "$image" /bin/true
        printf '%s\ttrue\t%s\t%s\n' "$runtime" "$i" "$(ms_since "$start")" >>"$tsv"
        start=$EPOCHREALTIME
        pod "${flags[@]}" run --rm "$image" echo x | head -c 1 >/dev/null
        printf '%s\techo\t%s\t%s\n' "$runtime" "$i" "$(ms_since "$start")" >>"$tsv"
    done
    printf '\r  %d/%d' "$i" "$n"
done
echo

md="$out/podman-start.md"
: >"$md"
{
    echo "### Cold start through podman"
    echo
    echo "Conditions: $(date -u +%Y-%m-%d); $(nproc) cores, $(podman --version), $(conmon --version | head -n1), netavark's default network in a namespace of the benchmark's own; runc $(runc --version | awk 'NR == 1 {print $3}'); gVisor $gvisor_package as podman's runtime (\`--network=host\`); hako-runtime: QEMU $(qemu-system-x86_64 --version | awk 'NR == 1 {print $4}'), 1 vCPU, 512 MiB, from a template. $n runs per runtime, interleaved. hako's first start (which may make the template): $first_start ms."
    echo
    echo "| runtime | \`true\` p50 ms | p90 ms | max ms | p50 vs runc | \`echo\` p50 ms | vs runc |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
} | tee_md "$md"
awk -F'\t' '$1 == "runc" && $2 == "true" {print $4}' "$tsv" | sort -g >"$work/runc-true"
awk -F'\t' '$1 == "runc" && $2 == "echo" {print $4}' "$tsv" | sort -g >"$work/runc-echo"
for runtime in runc gvisor hako; do
    awk -F'\t' -v r="$runtime" '$1 == r && $2 == "true" {print $4}' "$tsv" | sort -g >"$work/true"
    awk -F'\t' -v r="$runtime" '$1 == r && $2 == "echo" {print $4}' "$tsv" | sort -g >"$work/echo"
    p50="$(pct "$work/true" 50)"
    e50="$(pct "$work/echo" 50)"
    printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$runtime" "$p50" "$(pct "$work/true" 90)" \
        "$(tail -n1 "$work/true")" "$(ratio "$p50" "$(pct "$work/runc-true" 50)")" "$e50" \
        "$(ratio "$e50" "$(pct "$work/runc-echo" 50)")"
done | tee_md "$md"
echo "bench: results in $out"
