#!/bin/bash
# Cold start: `ctr run --rm <image> <id> /bin/true` N times per runtime, and as many runs of
# `echo` for the time to the first byte of output, with runc, gVisor (runsc through the runc
# shim, see need_gvisor in common.sh) and hako interleaved on a private containerd: hako
# starting from a template (ADR 14, in a template store of the benchmark's own, so its first
# start, which makes the template, is reported apart) and hako booting (templates off). Prints
# p50/p90/max and the ratio to runc, and hako's start phases from its own
# log: sandbox prepare, virtiofsd ready, VMM start, then the guest's boot split by its clock
# into firmware (with the kernel's decompression), kernel and agent start, the agent
# connection, container create, process start, and the sandbox's teardown.
# A benchmark, not a test: it asserts nothing. Run as root after scripts/install.sh.
#
#   bench/cold-start.sh [N [LABEL=CONFIG ...]]      (default 30; hako with its installed config)
#
# Each LABEL=CONFIG is a hako variant run with that configuration file (ctr
# --runtime-config-path), to compare configurations in one interleaved run (beside runc only;
# gVisor then runs only if asked for, as LABEL=gvisor), e.g.
#   bench/cold-start.sh 20 bzimage=/tmp/bzimage.toml pvh=/tmp/pvh.toml
# LABEL=io.containerd.<name>.v2[:CONFIG] runs another runtime by name instead, such as an
# older hako build installed as containerd-shim-<name>-v2, to compare builds.
set -euo pipefail
n="${1:-30}"
shift || true
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_package runc runc
start_containerd
image=hako.local/busybox:latest
import_image "$image"

variants=("runc=runc")
first_start=""
if (($# == 0)); then
    need_gvisor
    # hako starting from a template (ADR 14), with a template store of the benchmark's own so
    # that the first start, which makes the template, is measured too; and hako booting.
    templated="$(hako_config templated "[hypervisor]" "template_dir = \"$work/templates\"")"
    booting="$(hako_config booting "[hypervisor]" "templates = false")"
    variants+=("gvisor=gvisor" "hako=hako:$templated" "hako-boot=hako:$booting")
    read -r -a args <<<"$(runtime_args "hako:$templated")"
    start=$EPOCHREALTIME
    ctr run --rm "${args[@]}" "$image" "first-start" /bin/true
    first_start="$(ms_since "$start")"
else
    for v in "$@"; do
        [[ "${v%%=*}" =~ ^[A-Za-z0-9]+([._-][A-Za-z0-9]+)*$ ]] ||
            { echo "bench: label ${v%%=*} must be letters, digits and single . _ - inside (it names containers)" >&2; exit 2; }
        value="${v#*=}"
        if [[ $value == gvisor ]]; then
            need_gvisor
            variants+=("${v%%=*}=gvisor")
            continue
        fi
        if [[ $value == io.containerd.* ]]; then
            variants+=("${v%%=*}=$value")
            continue
        fi
        [[ -f "$value" ]] || { echo "bench: no configuration file $value" >&2; exit 2; }
        variants+=("${v%%=*}=hako:$value")
    done
fi

tsv="$out/cold-start.tsv"
printf 'label\trun\tcommand\twall_ms\tttfb_ms\n' >"$tsv"
echo "bench: cold start, $n runs of /bin/true and $n of echo per runtime: ${variants[*]}"
for i in $(seq 1 "$n"); do
    for v in "${variants[@]}"; do
        label="${v%%=*}"
        # shellcheck disable=SC2046
        read -r -a args <<<"$(runtime_args "${v#*=}")"
        start=$EPOCHREALTIME
        ctr run --rm "${args[@]}" "$image" "cs-$label-$i" /bin/true
        printf '%s\t%s\ttrue\t%s\t\n' "$label" "$i" "$(ms_since "$start")" >>"$tsv"
        start=$EPOCHREALTIME
        first="$(ctr run --rm "${args[@]}" "$image" "tt-$label-$i" echo hako |
            { IFS= read -r -n1 _ && echo "$EPOCHREALTIME"; cat >/dev/null; })"
        wall="$(ms_since "$start")"
        printf '%s\t%s\techo\t%s\t%s\n' "$label" "$i" "$wall" \
            "$(awk -v a="$start" -v b="$first" 'BEGIN {printf "%.0f", (b - a) * 1000}')" >>"$tsv"
    done
    printf '\r  %d/%d' "$i" "$n"
done
echo

# The shim's phase lines: "container cs-LABEL-I start phases: a=1.0ms b=2.0ms ..." and
# "sandbox cs-LABEL-I teardown=3.0ms".
phases="$out/cold-start-phases.tsv"
printf 'label\trun\tphase\tms\n' >"$phases"
grep -oE '(container|sandbox) cs-[^ ]+ (start phases: [^"]*|teardown=[0-9.]+ms)' "$work/containerd.log" |
    awk '{
        run = $2; sub(/.*-/, "", run); label = $2; sub(/^cs-/, "", label); sub(/-[0-9]+$/, "", label)
        for (i = 3; i <= NF; i++) if ($i ~ /=/) {
            split($i, kv, "="); sub(/ms$/, "", kv[2]); print label "\t" run "\t" kv[1] "\t" kv[2]
        }
    }' >>"$phases"

md="$out/cold-start.md"
: >"$md"
{
    echo "### Cold start"
    echo
    echo "Conditions: $(conditions). $n runs of each, interleaved."
    echo
    echo "| runtime | command | p50 ms | p90 ms | max ms | p50 vs runc | first byte p50 ms | first byte p90 ms |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|"
} | tee_md "$md"
if [[ -n $first_start ]]; then
    printf '| hako, first start of the shape (makes the template) | `true` | %s | | | %s | | |\n' \
        "$first_start" "$(ratio "$first_start" "$(awk -F'\t' '$1 == "runc" && $3 == "true" {print $4}' "$tsv" | sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}')")" | tee_md "$md"
fi
for v in "${variants[@]}"; do
    label="${v%%=*}"
    for cmd in true echo; do
        awk -F'\t' -v l="$label" -v c="$cmd" '$1 == l && $3 == c {print $4}' "$tsv" | sort -g >"$work/wall"
        awk -F'\t' -v c="$cmd" '$1 == "runc" && $3 == c {print $4}' "$tsv" | sort -g >"$work/runc"
        awk -F'\t' -v l="$label" -v c="$cmd" '$1 == l && $3 == c && $5 != "" {print $5}' "$tsv" | sort -g >"$work/ttfb"
        p50=$(pct "$work/wall" 50)
        printf '| %s | `%s` | %s | %s | %s | %s | %s | %s |\n' "$label" "$cmd" "$p50" "$(pct "$work/wall" 90)" \
            "$(tail -n1 "$work/wall")" "$(ratio "$p50" "$(pct "$work/runc" 50)")" \
            "$(pct "$work/ttfb" 50)" "$(pct "$work/ttfb" 90)"
    done
done | tee_md "$md"

order="sandbox_prepare virtiofsd_ready vmm_started vmm_started.restore vmm_started.hotplug agent_ready agent_ready.firmware agent_ready.kernel agent_ready.agent agent_connected container_created guest.create_sandbox guest.create_container total process_started teardown"
hakos=()
for v in "${variants[@]}"; do [[ ${v#*=} == runc || ${v#*=} == gvisor ]] || hakos+=("${v%%=*}"); done
{
    echo
    echo "hako's start phases, median ms of the $((2 * n)) starts of each (\`agent_ready\` is split by the guest's clock; \`guest.*\` are the agent calls inside \`container_created\`; \`total\` is Create's, without process start and teardown; host orchestration is \`total\` less the guest's boot and its calls):"
    echo
    printf '| phase |'; printf ' %s |' "${hakos[@]}"; echo
    printf '|---|'; printf -- '---:|%.0s' "${hakos[@]}"; echo
    orchestration=()
    for phase in $order; do
        printf '| %s |' "$phase"
        for label in "${hakos[@]}"; do
            awk -F'\t' -v l="$label" -v p="$phase" '$1 == l && $3 == p {print $4}' "$phases" | sort -g >"$work/p"
            printf ' %s |' "$(pct "$work/p" 50)"
        done
        echo
    done
    # Host-side orchestration: Create's total without the guest's boot and its two calls.
    printf '| **host orchestration** |'
    for label in "${hakos[@]}"; do
        awk -F'\t' -v l="$label" '$1 == l && $3 == "total" {s[$2] += $4}
            $1 == l && ($3 == "agent_ready" || $3 ~ /^guest\./) {s[$2] -= $4}
            END {for (r in s) print s[r]}' "$phases" | sort -g >"$work/p"
        printf ' **%s** |' "$(pct "$work/p" 50)"
    done
    echo
} | tee_md "$md"

# Plot: the distribution of wall times per runtime (gVisor's included), and the median phases of
# each hako variant.
{
    echo "set multiplot layout 1,2 title 'Cold start, $(conditions | cut -d';' -f1-2 | tr -d "'")'"
    echo "set style fill solid 0.8 border -1; set grid ytics; set key top left"
    echo "set title 'ctr run --rm ... /bin/true (ms)'; set ylabel 'ms'; set xlabel 'runs, sorted by time'"
    printf "plot "
    sep=""
    for v in "${variants[@]}"; do
        label="${v%%=*}"
        awk -F'\t' -v l="$label" '$1 == l && $3 == "true" {print $4}' "$tsv" | sort -g >"$out/cold-start-$label.dat"
        printf "%s'cold-start-%s.dat' using (\$0 + 1):1 with linespoints title '%s'" "$sep" "$label" "$label"
        sep=", "
    done
    echo
    echo "set title 'hako start phases, median (ms)'; set xlabel ''; set style data histograms; set style histogram rowstacked; set boxwidth 0.6; set key outside right; unset grid"
    for label in "${hakos[@]}"; do
        for phase in sandbox_prepare virtiofsd_ready vmm_started agent_ready agent_connected container_created process_started teardown; do
            awk -F'\t' -v l="$label" -v p="$phase" '$1 == l && $3 == p {print $4}' "$phases" | sort -g >"$work/p"
            printf '%s ' "$(pct "$work/p" 50)"
        done
        echo "$label"
    done >"$out/cold-start-phases.dat"
    printf "plot 'cold-start-phases.dat' using 1:xtic(9) title 'sandbox prepare' lc rgb '#1b9e77'"
    col=2
    for what in "virtiofsd ready:#d95f02" "VMM start or restore:#7570b3" "boot or hot-plug to agent:#66a61e" \
        "agent connect:#a6761d" "container create:#666666" "process start:#1f78b4" "teardown:#b2df8a"; do
        printf ", '' using %d title '%s' lc rgb '%s'" "$col" "${what%:*}" "${what##*:}"
        col=$((col + 1))
    done
    echo
    echo "unset multiplot"
} >"$out/cold-start.gp"
plot cold-start
