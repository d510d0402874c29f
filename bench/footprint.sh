#!/bin/bash
# Footprint, idle CPU and teardown of idle pods, hako beside runc and gVisor: for each pod
# count, starts that many idle pods (`sleep`) one after another, lets them settle, then reports
# per pod
#   - RSS and PSS of each host process of a pod (shim, virtiofsd, hako-vsock, QEMU;
#     for runc its shim and the container's process; for gVisor its shim (containerd's runc
#     shim) and runsc's two processes, runsc-gofer and runsc-sandbox, the latter with the
#     systrap stub processes the application runs in);
#   - the drop in the host's MemAvailable;
#   - the CPU the pods' host processes use while idle for IDLE_SECONDS;
# and then the teardown time of each pod (kill, delete of task and container).
# A benchmark, not a test: it asserts nothing. Run as root after scripts/install.sh.
#
#   bench/footprint.sh [IDLE_SECONDS [PODS...]]      (defaults: 30 s, 1 and 10 pods)
set -euo pipefail
idle="${1:-30}"
shift || true
counts=("$@")
((${#counts[@]})) || counts=(1 10)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_package runc runc
start_containerd
need_gvisor
image=hako.local/busybox:latest
import_image "$image"
hz=$(getconf CLK_TCK)
tsv="$out/footprint.tsv"
teardown_tsv="$out/teardown.tsv"
printf 'runtime\tpods\twhat\trss_mib\tpss_mib\n' >"$tsv"
printf 'runtime\tpods\tpod\tms\n' >"$teardown_tsv"
per_pod() { awk -v k="$1" -v n="$2" 'BEGIN {printf "%.1f", k / 1024 / n}'; }

measure() { # runtime pods
    local runtime="$1" pods="$2" i before after t0 t1 all start
    read -r -a args <<<"$(runtime_args "$runtime")"
    echo "bench: $pods idle $runtime pod(s)"
    sync
    echo 3 >/proc/sys/vm/drop_caches
    before=$(mem_available_kib)
    for i in $(seq 1 "$pods"); do
        ctr run -d "${args[@]}" "$image" "fp-$runtime-$i" sleep 100000 >/dev/null
        cleanups+=("stop_task fp-$runtime-$i")
    done
    # Boot-time work done (guest kernel threads, page cache) before the idle state is measured.
    sleep 5
    declare -A groups=()
    if [[ $runtime == hako ]]; then
        groups=([shim]="$(hako_shims)" [virtiofsd]="$(pids_of virtiofsd)"
            [hako-vsock]="$(pids_of hako-vsock)" [qemu]="$(pids_of qemu-system-x86)")
    elif [[ $runtime == gvisor ]]; then
        # Below each pod's shim: runsc-gofer, and runsc-sandbox (the Sentry) with its systrap
        # stubs (no argv, the application's address spaces). runsc's processes are all "exe" to
        # the kernel (it re-executes itself); their argv[0] tells them apart.
        local shims p name gofers="" sandboxes=""
        shims="$(shims_of "fp-$runtime-")"
        # shellcheck disable=SC2086
        for p in $(descendants $shims); do
            name="$(argv0 "$p")"
            case "$name" in
                runsc-gofer) gofers+=" $p" ;;
                runsc-sandbox | "") sandboxes+=" $p" ;;
            esac
        done
        groups=([shim]="$shims" [runsc-gofer]="$gofers" [runsc-sandbox]="$sandboxes")
    else
        groups=([shim]="$(shims_of "fp-$runtime-")" [container]="$(ctr task ls | awk '$1 ~ /^fp-runc-/ {print $2}')")
    fi
    all="${groups[*]}"
    # shellcheck disable=SC2086
    t0=$(ticks $all)
    sleep "$idle"
    # shellcheck disable=SC2086
    t1=$(ticks $all)
    after=$(mem_available_kib)
    local helpers_rss=0 helpers_pss=0
    for what in "${!groups[@]}"; do
        # shellcheck disable=SC2086
        rss=$(smaps Rss ${groups[$what]}) pss=$(smaps Pss ${groups[$what]})
        printf '%s\t%s\t%s\t%s\t%s\n' "$runtime" "$pods" "$what" "$(per_pod "$rss" "$pods")" "$(per_pod "$pss" "$pods")" >>"$tsv"
        if [[ $what != qemu && $what != container && $what != runsc-sandbox ]]; then
            helpers_rss=$((helpers_rss + rss)) helpers_pss=$((helpers_pss + pss))
        fi
    done
    # shellcheck disable=SC2086
    printf '%s\t%s\t%s\t%s\t%s\n' "$runtime" "$pods" "host helpers" "$(per_pod "$helpers_rss" "$pods")" "$(per_pod "$helpers_pss" "$pods")" >>"$tsv"
    # shellcheck disable=SC2086
    printf '%s\t%s\t%s\t%s\t%s\n' "$runtime" "$pods" "all" "$(per_pod "$(smaps Rss $all)" "$pods")" "$(per_pod "$(smaps Pss $all)" "$pods")" >>"$tsv"
    printf '%s\t%s\tMemAvailable drop\t%s\t\n' "$runtime" "$pods" "$(per_pod $((before - after)) "$pods")" >>"$tsv"
    printf '%s\t%s\tidle CPU millicores\t%s\t\n' "$runtime" "$pods" \
        "$(awk -v d="$((t1 - t0))" -v hz="$hz" -v s="$idle" -v n="$pods" 'BEGIN {printf "%.1f", d / hz / s * 1000 / n}')" >>"$tsv"
    for i in $(seq 1 "$pods"); do
        start=$EPOCHREALTIME
        stop_task "fp-$runtime-$i"
        printf '%s\t%s\t%s\t%s\n' "$runtime" "$pods" "$i" "$(ms_since "$start")" >>"$teardown_tsv"
    done
}

runtimes=(runc gvisor hako)
for pods in "${counts[@]}"; do
    for runtime in "${runtimes[@]}"; do measure "$runtime" "$pods"; done
done

md="$out/footprint.md"
: >"$md"
value() { # runtime pods what column(4 rss, 5 pss)
    awk -F'\t' -v r="$1" -v p="$2" -v w="$3" -v c="$4" '$1 == r && $2 == p && $3 == w {print $c}' "$tsv"
}
{
    echo "### Footprint of idle pods"
    echo
    echo "Conditions: $(conditions). Idle pods running \`sleep\`, measured 5 s after the last started, CPU over ${idle} s idle; figures per pod. Host helpers: hako's shim, virtiofsd and hako-vsock; gVisor's shim and runsc-gofer (runsc-sandbox, the Sentry with the application's systrap stubs, stands where hako's QEMU does)."
    echo
    printf '| process |'
    for pods in "${counts[@]}"; do printf ' RSS MiB, %s pod(s) | PSS MiB, %s pod(s) |' "$pods" "$pods"; done
    echo
    printf '|---|'; for _ in "${counts[@]}"; do printf -- '---:|---:|'; done; echo
    for row in "hako:shim" "hako:virtiofsd" "hako:hako-vsock" "hako:host helpers" "hako:qemu" "hako:all" \
        "gvisor:shim" "gvisor:runsc-gofer" "gvisor:host helpers" "gvisor:runsc-sandbox" "gvisor:all" \
        "runc:shim" "runc:container" "runc:all"; do
        printf '| %s %s |' "${row%%:*}" "${row#*:}"
        for pods in "${counts[@]}"; do
            printf ' %s | %s |' "$(value "${row%%:*}" "$pods" "${row#*:}" 4)" "$(value "${row%%:*}" "$pods" "${row#*:}" 5)"
        done
        echo
    done
    echo
    printf '| per pod |'
    for pods in "${counts[@]}"; do for runtime in "${runtimes[@]}"; do printf ' %s, %s |' "$runtime" "$pods"; done; done
    echo
    printf '|---|'; for _ in "${counts[@]}"; do printf -- '---:|%.0s' "${runtimes[@]}"; done; echo
    for what in "MemAvailable drop" "idle CPU millicores"; do
        unit="MiB"; [[ $what == idle* ]] && unit=""
        printf '| %s %s |' "$what" "$unit"
        for pods in "${counts[@]}"; do
            for runtime in "${runtimes[@]}"; do printf ' %s |' "$(value "$runtime" "$pods" "$what" 4)"; done
        done
        echo
    done
    printf '| teardown p50 / max ms |'
    for pods in "${counts[@]}"; do
        for runtime in "${runtimes[@]}"; do
            awk -F'\t' -v r="$runtime" -v p="$pods" '$1 == r && $2 == p {print $4}' "$teardown_tsv" | sort -g >"$work/t"
            printf ' %s / %s |' "$(pct "$work/t" 50)" "$(tail -n1 "$work/t")"
        done
    done
    echo
} | tee_md "$md"

# Plot: PSS per pod by process, stacked, for each runtime and pod count.
{
    for pods in "${counts[@]}"; do
        printf 'runc-%s %s %s 0 0 0 0 0\n' "$pods" "$(value runc "$pods" shim 5)" "$(value runc "$pods" container 5)"
        printf 'gvisor-%s %s 0 %s %s 0 0 0\n' "$pods" "$(value gvisor "$pods" shim 5)" "$(value gvisor "$pods" runsc-gofer 5)" \
            "$(value gvisor "$pods" runsc-sandbox 5)"
        printf 'hako-%s %s 0 0 0 %s %s %s\n' "$pods" "$(value hako "$pods" shim 5)" "$(value hako "$pods" virtiofsd 5)" \
            "$(value hako "$pods" hako-vsock 5)" "$(value hako "$pods" qemu 5)"
    done
} >"$out/footprint.dat"
cat >"$out/footprint.gp" <<GP
set title "PSS per idle pod (MiB); $(conditions | cut -d';' -f1-2 | tr -d '"')"
set style data histograms; set style histogram rowstacked; set style fill solid 0.8 border -1
set boxwidth 0.6; set key outside right; set grid ytics; set ylabel 'MiB'; set xlabel 'runtime-pods'
plot 'footprint.dat' using 2:xtic(1) title 'shim', '' using 3 title 'container (runc)', \
    '' using 4 title 'runsc-gofer (gVisor)', '' using 5 title 'runsc-sandbox (gVisor, application included)', \
    '' using 6 title 'virtiofsd', '' using 7 title 'hako-vsock', '' using 8 title 'QEMU (guest memory included)'
GP
plot footprint
