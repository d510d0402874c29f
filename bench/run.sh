#!/bin/bash
# The whole benchmark suite on this machine: cold start through ctr, footprint and idle CPU
# with teardown, density, file I/O, network and output throughput, each with runc, gVisor (Debian's runsc, fetched
# into /opt/hako/gvisor on first use and run through containerd's runc shim, see need_gvisor in
# common.sh) and hako in one run; cold start through each Docker version (runc and hako); and
# pod start through CRI on containerd 2.x (runc, gVisor, hako and hako-sandbox); and what
# metrics cost (a sandbox's and the node's scrape, start latency with the monitor scraped).
# Each part prints its tables; all of them (with the run's conditions) end up in one markdown
# file, next to the raw figures (.tsv) and the plots (.png):
#
#   bench/run.sh [--quick] [OUT_DIR]      (default OUT_DIR: build/bench/<date>-<time>)
#
# --quick runs each part briefly, to check the suite works; its figures are not worth quoting.
# The full run took about 20 minutes under TCG before gVisor joined; its parts add roughly 4. Run as root after scripts/install.sh; the
# machine should be otherwise idle. On a host with hardware virtualisation hako uses KVM by
# itself, and every table says which accelerator it ran under.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
quick=0
if [[ "${1:-}" == --quick ]]; then quick=1; shift; fi
export HAKO_BENCH_OUT="${1:-$here/../build/bench/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$HAKO_BENCH_OUT"
HAKO_BENCH_OUT="$(cd "$HAKO_BENCH_OUT" && pwd)"

if ((quick)); then
    parts=("cold-start.sh 3" "docker-start.sh 2" "podman-start.sh 2" "cri-start.sh 2" "footprint.sh 5 1 2" "density.sh 3 1" "file-io.sh 1 8m" "network.sh 2" "stream.sh 1 8" "metrics.sh 3 2 1")
else
    parts=("cold-start.sh 30" "docker-start.sh 20" "podman-start.sh 20" "cri-start.sh 20" "footprint.sh 30 1 10" "density.sh 10 3" "file-io.sh 5 64m" "network.sh 10" "stream.sh 5 64" "metrics.sh 30 10 10")
fi
started=$SECONDS
for part in "${parts[@]}"; do
    echo
    echo "=== bench/$part ($(((SECONDS - started) / 60)) min in)"
    # shellcheck disable=SC2086
    "$here/"$part
done

summary="$HAKO_BENCH_OUT/summary.md"
{
    echo "## Benchmarks, $(date -u +%Y-%m-%d)"
    for part in cold-start docker-start podman-start cri-start footprint density file-io network stream metrics; do
        [[ -f "$HAKO_BENCH_OUT/$part.md" ]] && { echo; cat "$HAKO_BENCH_OUT/$part.md"; }
    done
} >"$summary"
echo
echo "bench: done in $(((SECONDS - started) / 60)) min; tables in $summary; plots:"
ls "$HAKO_BENCH_OUT"/*.png | sed 's/^/  /'
