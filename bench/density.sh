#!/bin/bash
# Density: starts N pods at once (`ctr run -d ... sleep`, all in parallel) and measures the
# time until every one runs (each `ctr run -d` returns once its task started; `ctr task ls`
# then confirms they all are RUNNING), then the time to tear them all down in parallel.
# ROUNDS rounds per runtime, runc, gVisor (runsc through the runc shim) and hako in turn.
# A benchmark, not a test: it asserts nothing. Run as root after scripts/install.sh.
#
#   bench/density.sh [N [ROUNDS]]      (defaults: 10 pods, 3 rounds)
set -euo pipefail
pods="${1:-10}"
rounds="${2:-3}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_package runc runc
start_containerd
need_gvisor
image=hako.local/busybox:latest
import_image "$image"
tsv="$out/density.tsv"
printf 'runtime\tround\tall_running_ms\trunning\tall_removed_ms\n' >"$tsv"

# hako starting from templates (ADR 14; the template of the shape is made before the rounds, so
# every round measures restores) and hako booting.
booting="$(hako_config booting "[hypervisor]" "templates = false")"
runtime_of() { # label
    case "$1" in
        hako-boot) echo "hako:$booting" ;;
        *) echo "$1" ;;
    esac
}
read -r -a args <<<"$(runtime_args hako)"
ctr run --rm "${args[@]}" "$image" "dn-template" /bin/true

round() { # runtime round
    local runtime="$1" r="$2" start up down running i id ids=() pids=()
    read -r -a args <<<"$(runtime_args "$(runtime_of "$runtime")")"
    # Zero-padded: runsc finds a container by any unique prefix of its id, so with
    # dn-gvisor-2-1 and dn-gvisor-2-10 both present, starting dn-gvisor-2-1 was "ambiguous".
    for i in $(seq 1 "$pods"); do ids+=("$(printf 'dn-%s-%s-%03d' "$runtime" "$r" "$i")"); done
    for id in "${ids[@]}"; do cleanups+=("stop_task $id"); done
    start=$EPOCHREALTIME
    for id in "${ids[@]}"; do
        ctr run -d "${args[@]}" "$image" "$id" sleep 100000 >/dev/null &
        pids+=($!)
    done
    wait "${pids[@]}" || echo "bench: a $runtime pod failed to start (see $work/containerd.log)" >&2
    up=$(ms_since "$start")
    running=$(ctr task ls | awk -v p="dn-$runtime-$r-" 'index($1, p) == 1 && $3 == "RUNNING"' | wc -l)
    start=$EPOCHREALTIME
    pids=()
    for id in "${ids[@]}"; do
        stop_task "$id" &
        pids+=($!)
    done
    wait "${pids[@]}"
    down=$(ms_since "$start")
    printf '%s\t%s\t%s\t%s\t%s\n' "$runtime" "$r" "$up" "$running" "$down" >>"$tsv"
    echo "  $runtime round $r: $running/$pods running after $up ms, all removed after $down ms"
}

echo "bench: density, $pods pods started at once, $rounds rounds per runtime"
runtimes=(runc gvisor hako hako-boot)
for r in $(seq 1 "$rounds"); do
    for runtime in "${runtimes[@]}"; do round "$runtime" "$r"; done
done

md="$out/density.md"
: >"$md"
{
    echo "### Density: $pods pods started at once"
    echo
    echo "Conditions: $(conditions). $rounds rounds per runtime, in turn."
    echo
    echo "| runtime | all running, median ms | slowest round ms | running / started | all removed, median ms | vs runc |"
    echo "|---|---:|---:|---:|---:|---:|"
    for runtime in "${runtimes[@]}"; do
        column "$tsv" 1 "$runtime" 3 >"$work/up"
        column "$tsv" 1 "$runtime" 5 >"$work/down"
        column "$tsv" 1 runc 3 >"$work/runc"
        printf '| %s | %s | %s | %s / %s | %s | %s |\n' "$runtime" "$(pct "$work/up" 50)" "$(tail -n1 "$work/up")" \
            "$(column "$tsv" 1 "$runtime" 4 | head -n1)" "$pods" "$(pct "$work/down" 50)" \
            "$(ratio "$(pct "$work/up" 50)" "$(pct "$work/runc" 50)")"
    done
} | tee_md "$md"
