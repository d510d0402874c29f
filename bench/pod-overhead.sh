#!/bin/bash
# Pod overhead: what one idle hako pod costs the host beyond its containers, for the
# RuntimeClass's overhead.podFixed. Starts N idle pods (`sleep`), waits for them to run, then
# reports the drop in MemAvailable per pod, the PSS of each host process of a pod, and the CPU
# the pod's host processes use while idle. A benchmark, not a test: it asserts nothing.
#
#   bench/pod-overhead.sh [PODS] [IDLE_SECONDS]      (defaults: 1 pod, 30 s)
set -euo pipefail
pods="${1:-1}"
idle="${2:-30}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
start_containerd
"$repo/tests/images/busybox-image.sh" "$work/busybox.tar" >/dev/null
ctr image import "$work/busybox.tar" >/dev/null

mem_available() { awk '/^MemAvailable:/ {print $2}' /proc/meminfo; }
sync
echo 3 >/proc/sys/vm/drop_caches
before=$(mem_available)
for i in $(seq 1 "$pods"); do
    ctr run -d --runtime io.containerd.hako.v2 hako.local/busybox:latest "idle-$i" sleep 100000 >/dev/null
    cleanups+=("ctr task kill -s KILL idle-$i >/dev/null 2>&1; for _ in \$(seq 50); do ctr task delete idle-$i >/dev/null 2>&1 && break; sleep 0.1; done; ctr container delete idle-$i >/dev/null 2>&1")
done
# Let the guests settle (boot-time work done) before measuring the idle state.
sleep 5
pids_of() { # comm-prefix
    local p
    for p in /proc/[0-9]*; do
        if [[ "$(cat "$p/comm" 2>/dev/null)" == "$1"* ]]; then echo "${p#/proc/}"; fi
    done
}
ticks() { # pids... -> utime+stime in clock ticks
    local total=0 p
    for p in "$@"; do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}
shims=$(for p in $(pids_of containerd-shim); do if grep -q hako "/proc/$p/cmdline"; then echo "$p"; fi; done)
all="$shims $(pids_of virtiofsd) $(pids_of vhost-device-vs) $(pids_of qemu-system-x86)"
t0=$(ticks $all)
sleep "$idle"
t1=$(ticks $all)
after=$(mem_available)
hz=$(getconf CLK_TCK)

pss() { # pids... -> total PSS in KiB
    local total=0 p
    for p in "$@"; do
        total=$((total + $(awk '/^Pss:/ {print $2}' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0)))
    done
    echo "$total"
}
accel="$(grep -o 'qemu pid [0-9]* ([A-Z]*' "$work/containerd.log" | head -n1 | awk '{print $4}' | tr -d '(')"
echo "bench: $pods idle pod(s), ${idle}s idle; hako: QEMU ${accel:-?}, 1 vCPU, 512 MiB guest; $(nproc) cores"
printf '\n%-22s %12s\n' "per pod" "PSS MiB"
for what in "shim:$shims" "virtiofsd:$(pids_of virtiofsd)" "vhost-device-vsock:$(pids_of vhost-device-vs)" "qemu:$(pids_of qemu-system-x86)"; do
    name="${what%%:*}"
    list="${what#*:}"
    # shellcheck disable=SC2086
    printf '%-22s %12.1f\n' "$name" "$(awk -v k="$(pss $list)" -v n="$pods" 'BEGIN {print k / 1024 / n}')"
done
# shellcheck disable=SC2086
printf '%-22s %12.1f\n' "all" "$(awk -v k="$(pss $all)" -v n="$pods" 'BEGIN {print k / 1024 / n}')"
printf '\n%-40s %8.1f MiB\n' "MemAvailable drop per pod" "$(awk -v a="$before" -v b="$after" -v n="$pods" 'BEGIN {print (a - b) / 1024 / n}')"
printf '%-40s %8.1f millicores\n' "idle CPU per pod (host processes)" \
    "$(awk -v d="$((t1 - t0))" -v hz="$hz" -v s="$idle" -v n="$pods" 'BEGIN {print d / hz / s * 1000 / n}')"
