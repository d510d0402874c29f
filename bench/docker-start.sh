#!/bin/bash
# Cold start through Docker with its default bridge network: `docker run --rm <image> /bin/true`
# N times per runtime, runc and hako interleaved, on each Docker Engine build under
# /opt/hako/docker (Debian 13's 26 networks the container in a prestart hook, so hako boots the
# VM with its NIC; 28 and later network it after Create, so hako hot-plugs the NIC at Start).
# Prints p50/p90/max and the ratio to runc per Docker version, and hako's process start (where
# the hot-plug happens) and Create time from its own log.
# A benchmark, not a test: it asserts nothing. Run as root after scripts/install.sh.
#
#   bench/docker-start.sh [N]      (default 20)
set -euo pipefail
n="${1:-20}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_package runc runc
start_containerd
image=hako.local/busybox:latest

# start_dockerd INSTALL: a dockerd in a network namespace of its own (its bridge and veths stay
# there), on the benchmark's containerd; sets $docker_sock.
start_dockerd() {
    local install="$1" name
    name="hkb-$(basename "$install" | tr -dc '0-9' | head -c 6)-$$"
    ip netns add "$name"
    cleanups+=("ip netns del $name")
    ip -n "$name" link set lo up
    local dir="$work/docker-$name"
    mkdir -p "$dir"
    docker_sock="$dir/docker.sock"
    # hako booting (templates off), by its configuration as runtime options.
    printf '{"runtimes": {"hako-boot": {"runtimeType": "io.containerd.hako.v2", "options": {"ConfigPath": "%s"}}}}\n' \
        "$booting" >"$dir/daemon.json"
    PATH="$install/usr/sbin:$install/usr/bin:/usr/local/bin:$PATH" nsenter --net="/run/netns/$name" \
        "$install/usr/sbin/dockerd" --containerd "$work/containerd.sock" --data-root "$dir/root" \
        --exec-root "$dir/exec" --pidfile "$dir/dockerd.pid" --host "unix://$docker_sock" \
        --config-file "$dir/daemon.json" \
        --iptables=false --ip6tables=false >"$dir/dockerd.log" 2>&1 &
    local pid=$!
    cleanups+=("kill $pid 2>/dev/null; wait $pid 2>/dev/null; umount -R $dir/root $dir/exec 2>/dev/null")
    for _ in $(seq 1 300); do docker version >/dev/null 2>&1 && break; sleep 0.1; done
    docker version >/dev/null 2>&1 || { echo "bench: dockerd did not start: $(tail -n5 "$dir/dockerd.log")" >&2; exit 1; }
    "$repo/tests/images/busybox-image.sh" "$work/image.tar" "$image" >/dev/null
    docker load -i "$work/image.tar" >/dev/null
}
docker() { "$docker_install/usr/bin/docker" --host "unix://$docker_sock" "$@"; }

booting="$(hako_config booting "[hypervisor]" "templates = false")"
tsv="$out/docker-start.tsv"
printf 'docker\truntime\trun\twall_ms\n' >"$tsv"
installs=()
for d in /opt/hako/docker/*/; do [[ -x $d/usr/sbin/dockerd ]] && installs+=("${d%/}"); done
((${#installs[@]})) || { echo "bench: no Docker Engine under /opt/hako/docker: run scripts/setup.sh" >&2; exit 1; }
for docker_install in "${installs[@]}"; do
    version="$(basename "$docker_install" | cut -d+ -f1)"
    start_dockerd "$docker_install"
    echo "bench: docker $version, $n runs of docker run --rm $image /bin/true per runtime"
    for i in $(seq 1 "$n"); do
        for runtime in runc hako hako-boot; do
            start=$EPOCHREALTIME
            case $runtime in
                hako-boot) by=hako-boot ;;
                *) by="io.containerd.$runtime.v2" ;;
            esac
            docker run --rm --runtime "$by" "$image" /bin/true
            printf '%s\t%s\t%s\t%s\n' "$version" "$runtime" "$i" "$(ms_since "$start")" >>"$tsv"
        done
        printf '\r  %d/%d' "$i" "$n"
    done
    echo
    # Mark where this version's log lines end, to split the shim's phase lines by version.
    echo "bench-docker-done $version" >>"$work/containerd.log"
done

# hako's phases per Docker version: the shim logs "container <id> start phases: total=..." at
# Create (with vmm_started.restore= when the VM was restored from a template: hako, not
# hako-boot) and "... start phases: process_started=..." at Start.
phases="$out/docker-start-phases.tsv"
printf 'docker\truntime\tphase\tms\n' >"$phases"
awk '/bench-docker-done/ {version = $2; for (i = 0; i < n; i++) print version "\t" lines[i]; n = 0; next}
     /start phases: / {
         if (match($0, /container [^ ]+ start/)) { id = substr($0, RSTART + 10, RLENGTH - 16) }
         if ($0 ~ /total=/) { kind[id] = ($0 ~ /vmm_started.restore=/) ? "hako" : "hako-boot" }
         for (i = 1; i <= NF; i++) if ($i ~ /^(total|process_started)=/) {
             split($i, kv, "="); sub(/ms.*$/, "", kv[2]); lines[n++] = kind[id] "\t" kv[1] "\t" kv[2]
         }
     }' "$work/containerd.log" >>"$phases"

md="$out/docker-start.md"
: >"$md"
{
    echo "### Cold start through Docker (default bridge network)"
    echo
    echo "Conditions: $(conditions). \`docker run --rm $image /bin/true\`, $n runs per runtime and Docker version, interleaved; dockerd with \`--iptables=false\` in a network namespace of its own."
    echo
    echo "| Docker | runtime | p50 ms | p90 ms | max ms | p50 vs runc | hako Create p50 ms | hako Start p50 ms |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|"
} | tee_md "$md"
for docker_install in "${installs[@]}"; do
    version="$(basename "$docker_install" | cut -d+ -f1)"
    awk -F'\t' -v d="$version" '$1 == d && $2 == "runc" {print $4}' "$tsv" | sort -g >"$work/runc"
    for runtime in runc hako hako-boot; do
        awk -F'\t' -v d="$version" -v r="$runtime" '$1 == d && $2 == r {print $4}' "$tsv" | sort -g >"$work/wall"
        create="-" start="-"
        if [[ $runtime != runc ]]; then
            awk -F'\t' -v d="$version" -v r="$runtime" '$1 == d && $2 == r && $3 == "total" {print $4}' "$phases" | sort -g >"$work/p"
            create="$(pct "$work/p" 50)"
            awk -F'\t' -v d="$version" -v r="$runtime" '$1 == d && $2 == r && $3 == "process_started" {print $4}' "$phases" | sort -g >"$work/p"
            start="$(pct "$work/p" 50)"
        fi
        p50="$(pct "$work/wall" 50)"
        printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$version" "$runtime" "$p50" "$(pct "$work/wall" 90)" \
            "$(tail -n1 "$work/wall")" "$(ratio "$p50" "$(pct "$work/runc" 50)")" "$create" "$start"
    done
done | tee_md "$md"
echo | tee_md "$md"
echo "hako starts from a template (ADR 14), hako-boot boots (templates off). hako's Start includes the NIC's hot-plug with Docker 28 and later (tap, QMP, the guest's PCI probe and its network configuration); with Docker 26 the NIC is there at Create (hot-plugged after the restore, or at boot)." | tee_md "$md"
