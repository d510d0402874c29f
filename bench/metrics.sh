#!/bin/bash
# What metrics cost (issue 26): with P hako containers running (`ctr run -d`, sleeping),
#   1. one sandbox: S GETs of its socket's /v1/snapshot (what the monitor fetches) and of
#      /metrics (its text), each timed by curl: p50/p90 ms, bytes, and the shim's CPU per
#      request (from /proc/<shim>/stat before and after). Requests are 1.1 s apart, as
#      Prometheus' are at least 1 s apart: a shim reuses a snapshot within 1 s, and each of
#      these computes a fresh one (PSS, read at most every 15 s, is fresh in one of ~14);
#   2. the node: S GETs of `hako monitor`'s /metrics: p50/p90 ms, bytes raw and gzipped, bytes
#      per sandbox, and the CPU of the monitor and the shims per scrape;
#   3. start latency with and without the monitor being scraped every second: `ctr run --rm
#      true` N times for runc, gVisor and hako, each with the scraper off and on, interleaved
#      (runc and gVisor do not report to the monitor: their difference is the run's noise).
# A benchmark, not a test: it asserts nothing. Run as root after scripts/install.sh, with no
# other hako sandbox on the machine (the monitor scrapes every sandbox under /run/hako).
#
#   bench/metrics.sh [S [P [N]]]      (default 30 requests, 10 pods, 10 starts per runtime)
set -euo pipefail
s="${1:-30}"
pods="${2:-10}"
n="${3:-10}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_package runc runc
need_package curl curl
need_gvisor
start_containerd
image=hako.local/busybox:latest
import_image "$image"
read -r -a hako <<<"$(runtime_args hako)"

echo "bench: $pods hako containers"
for i in $(seq 1 "$pods"); do
    ctr run -d "${hako[@]}" "$image" "mx-$i" sleep 3600 >/dev/null
    cleanups+=("stop_task mx-$i")
done
socket=/run/hako/default/mx-1/metrics.sock
shim="$(pgrep -f -- "-id mx-1 -address $work/containerd.sock")"

hz="$(getconf CLK_TCK)"

# requests NAME URL [CURL ARGS...]: S GETs 1.1 s apart (pacing, as a scraper's, not waiting
# for anything), one line "ms bytes" each in $work/NAME.
requests() {
    local name="$1" url="$2"
    shift 2
    : >"$work/$name"
    for _ in $(seq 1 "$s"); do
        curl -s -o /dev/null -w '%{time_total} %{size_download}\n' "$@" "$url" |
            awk '{printf "%.3f %d\n", $1 * 1000, $2}' >>"$work/$name"
        sleep 1.1
    done
}

tsv="$out/metrics.tsv"
printf 'what\tp50_ms\tp90_ms\tbytes\tcpu_ms_per_request\n' >"$tsv"
# summarise NAME LABEL TICKS: a row of the table from $work/NAME and the CPU ticks spent.
summarise() {
    awk '{print $1}' "$work/$1" | sort -g >"$work/$1.ms"
    local bytes cpu
    bytes="$(awk '{print $2}' "$work/$1" | sort -g | sed -n "$(((s + 1) / 2))p")"
    cpu="$(awk -v t="$3" -v hz="$hz" -v n="$s" 'BEGIN {printf "%.2f", t * 1000 / hz / n}')"
    printf '%s\t%s\t%s\t%s\t%s\n' "$2" "$(pct "$work/$1.ms" 50)" "$(pct "$work/$1.ms" 90)" "$bytes" "$cpu" >>"$tsv"
}

echo "bench: one sandbox, $s requests each of /v1/snapshot and /metrics"
before="$(ticks "$shim")"
requests snapshot http://hako/v1/snapshot --unix-socket "$socket"
summarise snapshot "one sandbox: /v1/snapshot (shim CPU)" "$(($(ticks "$shim") - before))"
before="$(ticks "$shim")"
requests text http://hako/metrics --unix-socket "$socket"
summarise text "one sandbox: /metrics text (shim CPU)" "$(($(ticks "$shim") - before))"

port=18095
/usr/local/bin/hako monitor --listen "127.0.0.1:$port" --sandbox-root /run/hako 2>"$work/monitor.log" &
monitor=$!
cleanups+=("kill $monitor 2>/dev/null; wait $monitor 2>/dev/null")
for _ in $(seq 1 100); do curl -sf "127.0.0.1:$port/-/healthy" >/dev/null && break; sleep 0.1; done
read -r -a shims <<<"$(shims_of mx- | tr '\n' ' ')"
echo "bench: the node ($pods sandboxes), $s scrapes of the monitor"
before_monitor="$(ticks "$monitor")"
before_shims="$(ticks "${shims[@]}")"
requests node "http://127.0.0.1:$port/metrics"
summarise node "node of $pods: monitor /metrics (monitor CPU)" "$(($(ticks "$monitor") - before_monitor))"
shim_cpu="$(awk -v t="$(($(ticks "${shims[@]}") - before_shims))" -v hz="$hz" -v n="$s" 'BEGIN {printf "%.2f", t * 1000 / hz / n}')"
node_text="$(curl -s "127.0.0.1:$port/metrics")"
gzipped="$(printf '%s' "$node_text" | gzip -c | wc -c)"
series="$(printf '%s\n' "$node_text" | grep -vc '^#')"

echo "bench: start latency, $n runs per runtime with the monitor scraped every second and not"
scraper() {
    while [[ -e "$work/scrape" ]]; do
        curl -s -o /dev/null "127.0.0.1:$port/metrics"
        sleep 1
    done
}
starts="$out/metrics-starts.tsv"
printf 'runtime\tmonitor\trun\tms\n' >"$starts"
for i in $(seq 1 "$n"); do
    for scraped in off on; do
        if [[ $scraped == on ]]; then
            touch "$work/scrape"
            scraper &
            scraper_pid=$!
        fi
        for runtime in runc gvisor hako; do
            read -r -a args <<<"$(runtime_args "$runtime")"
            start=$EPOCHREALTIME
            ctr run --rm "${args[@]}" "$image" "ms-$runtime-$scraped-$i" /bin/true
            printf '%s\t%s\t%s\t%s\n' "$runtime" "$scraped" "$i" "$(ms_since "$start")" >>"$starts"
        done
        if [[ $scraped == on ]]; then
            rm -f "$work/scrape"
            wait "$scraper_pid"
        fi
    done
    printf '\r  %d/%d' "$i" "$n"
done
echo

md="$out/metrics.md"
: >"$md"
{
    echo "### What metrics cost"
    echo
    echo "Conditions: $(conditions). $pods hako containers running (\`sleep\`), $s requests each, 1.1 s apart; the monitor's per-sandbox deadline 1 s; CPU from /proc in 10 ms ticks, so a figure below 10/$s ms is noise."
    echo
    echo "| request | p50 ms | p90 ms | bytes | CPU ms per request |"
    echo "|---|---:|---:|---:|---:|"
    awk -F'\t' 'NR > 1 {printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5}' "$tsv"
    echo
    echo "The node's text: $series series; $(printf '%s' "$node_text" | wc -c) bytes, $gzipped gzipped, $(( $(printf '%s' "$node_text" | wc -c) / pods )) bytes per sandbox. The shims' CPU per node scrape, all $pods together: $shim_cpu ms."
    echo
    echo "Start latency (\`ctr run --rm true\`), with the monitor scraped every second and without, interleaved:"
    echo
    echo "| runtime | p50 ms, monitor off | p50 ms, monitor on | p50 on vs off | p90 off | p90 on |"
    echo "|---|---:|---:|---:|---:|---:|"
    for runtime in runc gvisor hako; do
        awk -F'\t' -v r="$runtime" '$1 == r && $2 == "off" {print $4}' "$starts" | sort -g >"$work/off"
        awk -F'\t' -v r="$runtime" '$1 == r && $2 == "on" {print $4}' "$starts" | sort -g >"$work/on"
        printf '| %s | %s | %s | %s | %s | %s |\n' "$runtime" "$(pct "$work/off" 50)" "$(pct "$work/on" 50)" \
            "$(awk -v a="$(pct "$work/on" 50)" -v b="$(pct "$work/off" 50)" 'BEGIN {printf "%+.0f%%", (a - b) * 100 / b}')" \
            "$(pct "$work/off" 90)" "$(pct "$work/on" 90)"
    done
} | tee_md "$md"
