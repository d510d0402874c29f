#!/bin/bash
# Cold start: `ctr run --rm <image> <id> true` N times with hako and with runc, on a private
# containerd, then a table of wall times (p50/p90/max) and hako's own start phases.
# A benchmark, not a test: it asserts nothing. Run as root after scripts/install.sh.
#
#   bench/cold-start.sh [N]        (default 30)
set -euo pipefail
n="${1:-30}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_package runc runc
start_containerd
"$repo/tests/images/busybox-image.sh" "$work/busybox.tar" >/dev/null
ctr image import "$work/busybox.tar" >/dev/null

measure() { # runtime label
    local runtime="$1" label="$2" times=()
    for i in $(seq 1 "$n"); do
        local start end
        start=$(date +%s%N)
        ctr run --rm --runtime "$runtime" hako.local/busybox:latest "bench-$label-$i" true
        end=$(date +%s%N)
        times+=("$(( (end - start) / 1000000 ))")
    done
    printf '%s\n' "${times[@]}" | sort -n >"$work/$label.ms"
}

echo "bench: $n cold starts each (containerd $(containerd_version), $(nproc) cores)"
measure io.containerd.runc.v2 runc
measure io.containerd.hako.v2 hako

accel="$(grep -o 'qemu pid [0-9]* ([A-Z]*' "$work/containerd.log" | head -n1 | awk '{print $4}' | tr -d '(')"
printf '\n%-8s %8s %8s %8s %10s\n' runtime p50_ms p90_ms max_ms vs_runc_p50
for label in runc hako; do
    p50=$(pct "$work/$label.ms" 50)
    printf '%-8s %8s %8s %8s %10s\n' "$label" "$p50" "$(pct "$work/$label.ms" 90)" "$(tail -n1 "$work/$label.ms")" \
        "$(awk -v a="$p50" -v b="$(pct "$work/runc.ms" 50)" 'BEGIN {printf "%.1fx", a / b}')"
done
echo
echo "hako start phases (ms, median of $n; accelerator ${accel:-unknown}, 1 vCPU, 512 MiB, virtiofs cache auto):"
grep -o 'start phases: [^"]*' "$work/containerd.log" | tr ' ' '\n' | grep '=' | sed 's/ms$//' >"$work/phases"
for phase in $(cut -d= -f1 "$work/phases" | sort -u); do
    grep "^$phase=" "$work/phases" | cut -d= -f2 | sort -n >"$work/phase.values"
    printf '  %-18s %8s\n' "$phase" "$(pct "$work/phase.values" 50)"
done
