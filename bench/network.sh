#!/bin/bash
# Network: throughput and latency between a container and the host, for runc, gVisor and hako,
# on the same machine in the same run. A benchmark, not a test: it asserts nothing. Run as root
# after scripts/install.sh.
#
#   bench/network.sh [SECONDS]      (default 10: length of each iperf3 run)
#
# Topology, the same for every runtime: a "pod" network namespace and a "host" one joined by a
# veth pair (10.98.0.2 and 10.98.0.1), as a CNI bridge plugin would leave them; the container
# joins the pod namespace with --with-ns. gVisor (runsc through the runc shim) runs with its
# default network, `--network=sandbox`: its own stack (netstack) in the Sentry takes over the
# veth. A runsc that refuses that here (older runsc, such as Debian's 20240729, decides whether
# it is in the host's root namespace by the presence of /proc/sys/net/core/rmem_default, which
# newer kernels have in every namespace: "cannot run with network enabled in root network
# namespace") is measured with `--network=host` instead, the Sentry passing socket calls to the
# pod namespace's kernel stack; the table says which. Measured from the host namespace:
#   - TCP throughput with iperf3, host to container and container to host (-R);
#   - ICMP round trip with ping (under runc, and gVisor with --network=host, the pod
#     namespace's kernel answers, under gVisor's netstack the Sentry, under hako the guest
#     kernel);
#   - an HTTP request to busybox httpd in the container, with curl (a fresh TCP connection
#     each time, and a fork in the container).
set -euo pipefail
secs="${1:-10}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_package runc runc
need_package iperf3 iperf3
need_package curl curl
start_containerd
need_gvisor
image=hako.local/netbench:latest
"$repo/tests/images/busybox-image.sh" "$work/netbench.tar" "$image" iperf3 >/dev/null
ctr image import "$work/netbench.tar" >/dev/null

pod=hkb-pod-$$ host=hkb-host-$$
ip netns add "$pod"
cleanups+=("ip netns del $pod")
ip netns add "$host"
cleanups+=("ip netns del $host")
ip link add "hkbp$$" type veth peer name "hkbh$$"
ip link set "hkbp$$" netns "$pod"
ip link set "hkbh$$" netns "$host"
ip -n "$pod" addr add 10.98.0.2/24 dev "hkbp$$"
ip -n "$host" addr add 10.98.0.1/24 dev "hkbh$$"
for ns in "$pod" "$host"; do ip -n "$ns" link set lo up; done
ip -n "$pod" link set "hkbp$$" up
ip -n "$host" link set "hkbh$$" up
on_host() { ip netns exec "$host" "$@"; }
# gVisor's netstack takes the veth's address away from the pod namespace and does not give it
# back: each runtime starts with the pod's address as a CNI plugin would have left it.
pod_address() {
    ip -n "$pod" addr replace 10.98.0.2/24 dev "hkbp$$"
    ip -n "$pod" link set "hkbp$$" up
}

# Bits per second the receiver saw in one iperf3 run. A slow server may still be finishing the
# previous run ("the server is busy"): such a run is tried again, up to three times.
iperf_bps() { # name [iperf3 args]
    local name="$1" try bps
    shift
    for try in 1 2 3; do
        on_host iperf3 -c 10.98.0.2 -t "$secs" -J "$@" >"$work/iperf-$name-$try.json" || true
        bps=$(awk -F: '/"sum_received"/ {f=1} f && /bits_per_second/ {gsub(/[ ,\t]/, "", $2); print $2; exit}' \
            "$work/iperf-$name-$try.json")
        [[ -n $bps ]] && { echo "$bps"; return; }
        sleep 1
    done
    echo "bench: iperf3 $name failed 3 times: $(grep -m1 '"error"' "$work/iperf-$name-3.json")" >&2
    echo 0
}

# serve RUNTIME LABEL: starts LABEL's container, the servers in the pod namespace; fails, with
# ctr's message in $work/start-LABEL.err and nothing left behind, if it does not start.
serve() { # runtime label
    local label="$2" id="netbench-$2"
    read -r -a args <<<"$(runtime_args "$1")"
    pod_address
    mkdir -p "$work/www-$label"
    echo "hello" >"$work/www-$label/index.html"
    cleanups+=("stop_task $id")
    ctr run -d "${args[@]}" --with-ns "network:/run/netns/$pod" \
        --mount "type=bind,src=$work/www-$label,dst=/www,options=rbind:ro" \
        "$image" "$id" sh -c 'httpd -p 80 -h /www; exec iperf3 -s' >/dev/null 2>"$work/start-$label.err" && return
    stop_task "$id"
    return 1
}

not_started() { # label
    echo "bench: $1 did not start: $(cat "$work/start-$1.err")" >&2
    exit 1
}

measure() { # label (its container serving)
    local label="$1" id="netbench-$1"
    # The servers listen a moment after the task starts; nothing announces it.
    for _ in $(seq 1 100); do on_host curl -s -o /dev/null -m 2 http://10.98.0.2/ && break; sleep 0.2; done
    for _ in $(seq 1 50); do on_host iperf3 -c 10.98.0.2 -t 1 >/dev/null 2>&1 && break; sleep 0.2; done

    local up down
    up=$(iperf_bps "$label-up")
    down=$(iperf_bps "$label-down" -R)
    local ping
    ping=$(on_host busybox ping -q -c 50 -i 0.05 10.98.0.2 | awk -F'[/ ]+' '/^round-trip/ {print $6 " " $7 " " $8}')
    for _ in $(seq 1 50); do
        on_host curl -s -o /dev/null -w '%{time_total}\n' http://10.98.0.2/
    done | awk '{printf "%.3f\n", $1 * 1000}' | sort -n >"$work/http-$label"
    stop_task "$id"
    printf '%s %s %s %s %s\n' "$label" "$up" "$down" "$ping" "$(pct "$work/http-$label" 50) $(pct "$work/http-$label" 90)" >>"$work/results"
}

echo "bench: network, ${secs}s per iperf3 run"
serve runc runc || not_started runc
measure runc
# gVisor's own stack, or, where this runsc refuses it, the host's (a container of its own id:
# one started under the id of the failed one did not come up).
gvisor=gvisor-netstack
gvisor_net="gVisor's netstack (\`--network=sandbox\`, runsc's default) on the pod's veth"
if ! serve gvisor:sandbox "$gvisor"; then
    grep -q 'cannot run with network enabled in root network namespace' "$work/start-$gvisor.err" || not_started "$gvisor"
    echo "bench: this runsc refuses its own network stack on this kernel (its check for the host's root namespace, /proc/sys/net/core/rmem_default, misfires on kernels that have that file in every namespace); measuring gVisor with --network=host instead"
    gvisor=gvisor-host
    gvisor_net="\`--network=host\` (this runsc's netstack, its default, refuses to start on this kernel: \"cannot run with network enabled in root network namespace\", its check for the host's namespace misfiring): the Sentry passes socket calls to the pod namespace's kernel stack"
    serve gvisor:host "$gvisor" || not_started "$gvisor"
fi
measure "$gvisor"
serve hako hako || not_started hako
measure hako
vhost="userspace virtio-net"
[[ -e /dev/vhost-net ]] && vhost="vhost-net"

md="$out/network.md"
: >"$md"
{
    echo "### Network"
    echo
    echo "Conditions: $(conditions "1 vCPU, 512 MiB guest, tap + tc mirred, $vhost" "network: $gvisor_net"). iperf3 ${secs} s each way, 50 pings, 50 HTTP GETs (a new connection each) from the \"host\" namespace to the container's."
    echo
    echo "| runtime | host→ctr Mbit/s | ctr→host Mbit/s | host→ctr, % of runc | ping avg ms | ping max ms | HTTP p50 ms | HTTP p90 ms |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    runc_up=$(awk '$1 == "runc" {print $2}' "$work/results")
    while read -r label up down _pmin pavg pmax hp50 hp90; do
        case $label in
            gvisor-netstack) label="gvisor, netstack" ;;
            gvisor-host) label="gvisor, --network=host" ;;
        esac
        printf '| %s | %.0f | %.0f | %s | %s | %s | %s | %s |\n' "$label" "$(awk -v b="$up" 'BEGIN {print b / 1e6}')" \
            "$(awk -v b="$down" 'BEGIN {print b / 1e6}')" "$(awk -v a="$up" -v b="$runc_up" 'BEGIN {printf "%.1f%%", 100 * a / b}')" "$pavg" "$pmax" "$hp50" "$hp90"
    done <"$work/results"
} | tee_md "$md"
