#!/bin/bash
# Output throughput: a container `cat`s a file from a read-only volume to its stdout, which
# `ctr run` copies to a reader on the host, for runc, gVisor and hako on the same machine in the
# same run. A benchmark, not a test: it asserts nothing (the stream tests check the bytes).
# Run as root after scripts/install.sh.
#
#   bench/stream.sh [RUNS] [SIZE_MIB]      (default 5 runs of 64 MiB)
#
# The reader stamps the first and the last byte: MB/s is the size over that span, so the
# runtime's start and teardown are left out (cold-start.sh measures those).
set -euo pipefail
runs="${1:-5}"
mib="${2:-64}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_package runc runc
need_package python3 python3
start_containerd
need_gvisor
import_image hako.local/busybox:latest
mkdir -p "$work/data"
head -c "$((mib * 1024 * 1024))" /dev/urandom >"$work/data/file"
want=$((mib * 1024 * 1024))

# Reads stdin to its end; prints the bytes read and the seconds between first and last byte.
reader='
import sys, time
first = last = None
total = 0
while True:
    chunk = sys.stdin.buffer.read1(1 << 20)
    if not chunk:
        break
    now = time.monotonic()
    first = first or now
    last = now
    total += len(chunk)
print(total, (last - first) if first else 0)
'

results="$out/stream.tsv"
printf 'runtime\trun\tbytes\tseconds\tMBps\n' >"$results"
echo "bench: stream, $runs runs of $mib MiB each, runtimes interleaved"
for run in $(seq 1 "$runs"); do
    for runtime in runc gvisor hako; do
        read -r -a args <<<"$(runtime_args "$runtime")"
        id="stream-$runtime-$run"
        read -r bytes secs < <(ctr run --rm "${args[@]}" \
            --mount "type=bind,src=$work/data,dst=/data,options=rbind:ro" \
            hako.local/busybox:latest "$id" cat /data/file | python3 -c "$reader")
        [[ $bytes == "$want" ]] || echo "bench: $runtime run $run delivered $bytes of $want bytes" >&2
        mbps=$(awk -v b="$bytes" -v s="$secs" 'BEGIN { if (s > 0) printf "%.1f", b / s / 1e6; else print 0 }')
        printf '%s\t%s\t%s\t%s\t%s\n' "$runtime" "$run" "$bytes" "$secs" "$mbps" >>"$results"
    done
done

md="$out/stream.md"
{
    echo
    echo "### Output throughput: \`cat\` of a $mib MiB file to stdout through \`ctr run\`"
    echo
    echo "Conditions: $(conditions)."
    echo "$runs runs per runtime, interleaved; MB/s from the first to the last byte the host read."
    echo
    echo "| runtime | MB/s p50 | MB/s min | MB/s max | of runc |"
    echo "|---|---:|---:|---:|---:|"
    runc_p50=$(column "$results" 1 runc 5 >"$work/runc" && pct "$work/runc" 50)
    for runtime in runc gvisor hako; do
        column "$results" 1 "$runtime" 5 >"$work/$runtime"
        p50=$(pct "$work/$runtime" 50)
        printf '| %s | %s | %s | %s | %s |\n' "$runtime" "$p50" "$(head -n1 "$work/$runtime")" \
            "$(tail -n1 "$work/$runtime")" "$(ratio "$p50" "$runc_p50")"
    done
} | tee_md "$md"
