#!/bin/bash
# File I/O on the container's root filesystem, hako beside runc (the host's own filesystem
# through overlayfs: "native") and gVisor (runsc through the runc shim, with its defaults: in
# recent runsc, `--overlay2=root:self`, the root filesystem is an overlay whose upper layer,
# where everything written goes, is a memory filesystem in the Sentry backed by a hidden file
# in the rootfs directory; the table says which mode the run had). In each configuration one
# container runs, inside itself:
#   - fio, buffered (psync, queue depth 1, one job), on a SIZE file: sequential and random
#     read and write at 4 KiB, 64 KiB and 1 MiB blocks, SECONDS each; writes end with fsync;
#   - metadata: create, stat and unlink 10,000 empty files (busybox touch, stat, rm via xargs);
#   - untar of a source tree (the kernel's UAPI headers from Debian's linux-libc-dev), then sync.
# hako runs with virtio-fs at cache never, auto and always, and with virtio-9p (QEMU's
# -fsdev local + virtio-9p-pci, msize 512000, cache=mmap), which needs a guest built from
# Debian's generic kernel (the cloud kernel has no 9p); this script builds it in
# build/guest-generic. A benchmark, not a test: it asserts nothing. Run as root after
# scripts/install.sh.
#
#   bench/file-io.sh [SECONDS [SIZE [CONFIG...]]]      (defaults: 5 s per fio job, 64m, all)
#
# CONFIGs pick some of: gvisor, "virtio-fs never", "virtio-fs auto", "virtio-fs always",
# virtio-9p (native always runs: the percentages are of it).
set -euo pipefail
secs="${1:-5}"
size="${2:-64m}"
shift 2 || shift $#
only=("$@")
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_package runc runc
need_package fio fio
start_containerd
need_gvisor
image=hako.local/fio:latest
echo "bench: building the fio image"
import_image "$image" fio

# The 9p guest: Debian's generic kernel, which has the 9p modules.
echo "bench: the guest with Debian's generic kernel, for virtio-9p"
HAKO_KERNEL_META=linux-image-amd64 "$repo/guest-image/build.sh" "$repo/build/guest-generic" | sed 's/^/  /'
generic="$(cat "$repo/build/guest-generic/kernel-release")"

# The source tree to untar, and the script the container runs, on a read-only bind mount.
data="$work/data"
mkdir -p "$data" "$repo/build/cache"
headers_deb="$(ls "$repo"/build/cache/linux-libc-dev_*.deb 2>/dev/null | head -n1 || true)"
if [[ -z "$headers_deb" ]]; then
    (cd "$repo/build/cache" && apt-get download -q -o APT::Sandbox::User=root linux-libc-dev >/dev/null) ||
        { echo "bench: apt-get download linux-libc-dev failed" >&2; exit 1; }
    headers_deb="$(ls "$repo"/build/cache/linux-libc-dev_*.deb | head -n1)"
fi
dpkg-deb -x "$headers_deb" "$work/headers"
tar -C "$work/headers/usr" -cf "$data/src.tar" include
src_files=$(tar -tf "$data/src.tar" | wc -l)
src_mib=$(du -m "$data/src.tar" | cut -f1)

{
    echo "[global]"
    echo "directory=/bench"
    echo "filename=fio.dat"
    echo "size=$size"
    echo "ioengine=psync"
    echo "direct=0"
    echo "thread"
    echo "time_based"
    echo "runtime=$secs"
    for bs in 4k 64k 1m; do
        for rw in read write randread randwrite; do
            echo "[$rw-$bs]"
            echo "stonewall"
            echo "rw=$rw"
            echo "bs=$bs"
            [[ $rw == *write ]] && echo "end_fsync=1"
        done
    done
} >"$data/io.fio"
cat >"$data/run.sh" <<'SH'
set -e
up() { cut -d' ' -f1 /proc/uptime; }
mkdir -p /bench/meta /bench/untar
fio --output-format=terse --terse-version=3 /data/io.fio | sed 's/^/FIO;/'
rm -f /bench/fio.dat
cd /bench/meta
t0=$(up); seq 10000 | xargs touch
t1=$(up); seq 10000 | xargs stat -c %s >/dev/null
t2=$(up); seq 10000 | xargs rm
t3=$(up)
echo "META create $t0 $t1"
echo "META stat $t1 $t2"
echo "META unlink $t2 $t3"
t0=$(up); tar -xf /data/src.tar -C /bench/untar; sync
echo "META untar $t0 $(up)"
SH

configs=(
    "native=runc"
    "gvisor=gvisor"
    "virtio-fs never=hako:$(hako_config never '[virtiofs]' 'cache = "never"')"
    "virtio-fs auto=hako:$(hako_config auto '[virtiofs]' 'cache = "auto"')"
    "virtio-fs always=hako:$(hako_config always '[virtiofs]' 'cache = "always"')"
    "virtio-9p=hako:$(hako_config 9p '[hypervisor]' 'shared_fs = "virtio-9p"' \
        "kernel = \"$repo/build/guest-generic/vmlinux\"" "initrd = \"$repo/build/guest-generic/initramfs.cpio\"")"
)
if ((${#only[@]})); then
    picked=("${configs[0]}")
    for entry in "${configs[@]:1}"; do
        for want in "${only[@]}"; do [[ "${entry%%=*}" == "$want" ]] && picked+=("$entry"); done
    done
    ((${#picked[@]} > ${#only[@]})) || { echo "bench: unknown configuration among: ${only[*]}" >&2; exit 2; }
    configs=("${picked[@]}")
fi
tsv="$out/file-io.tsv"
printf 'config\ttest\tmib_s\tiops\n' >"$tsv"
for entry in "${configs[@]}"; do
    label="${entry%%=*}"
    read -r -a args <<<"$(runtime_args "${entry#*=}")"
    echo "bench: $label (about $((12 * secs + 20)) s under runc, several times that in an emulated guest)"
    id="fio-${label// /-}"
    cleanups+=("stop_task $id")
    ctr run --rm "${args[@]}" --mount "type=bind,src=$data,dst=/data,options=rbind:ro" \
        "$image" "$id" sh /data/run.sh >"$work/$id.out" 2>&1 ||
        { echo "bench: $label failed: $(tail -n5 "$work/$id.out")" >&2; continue; }
    # terse v3: 3 job name, 7/8 read KiB/s and IOPS, 48/49 write KiB/s and IOPS.
    awk -F';' -v c="$label" '$1 == "FIO" {
        kib = $8 + $49; iops = $9 + $50
        printf "%s\t%s\t%.1f\t%.0f\n", c, $4, kib / 1024, iops
    }' "$work/$id.out" >>"$tsv"
    awk -v c="$label" '$1 == "META" {printf "%s\t%s\t%.2f\t\n", c, $2, $4 - $3}' "$work/$id.out" >>"$tsv"
done

# gVisor's file system defaults, as this runsc states them.
gvisor_fs="gvisor runs with runsc's defaults: \`--overlay2=$(gvisor_default overlay2)\`, \`--directfs=$(gvisor_default directfs)\`"
if [[ "$(gvisor_default overlay2)" == root:self ]]; then
    gvisor_fs+=" (the root filesystem is an overlay: its lower layer is the image's files on the host, which the Sentry opens itself; its upper layer, which holds everything the container writes, fio's file and the metadata and untar trees included, is a memory filesystem in the Sentry backed by one hidden file, .gvisor.filestore.<id>, in the container's rootfs directory on the host)"
fi

md="$out/file-io.md"
: >"$md"
value() { awk -F'\t' -v c="$1" -v t="$2" -v col="$3" '$1 == c && $2 == t {print $col}' "$tsv"; }
labels=()
for entry in "${configs[@]}"; do labels+=("${entry%%=*}"); done
# The columns' headings: gVisor's says its root filesystem's mode.
headings=()
for label in "${labels[@]}"; do
    if [[ $label == gvisor ]]; then headings+=("gvisor, overlay2 $(gvisor_default overlay2)"); else headings+=("$label"); fi
done
{
    echo "### File I/O on the container's root filesystem"
    echo
    echo "Conditions: $(conditions "1 vCPU, 512 MiB guest"). fio $(fio --version | tr -d 'fio-'), buffered psync, one job, queue depth 1, a $size file, $secs s per test, writes end with fsync. \"native\" is runc on the host's overlayfs ($(df -T "$work" | awk 'NR == 2 {print $2}') underneath). virtio-9p runs Debian's generic kernel ($generic); the rest the installed guest ($(cat /usr/share/hako/guest/kernel-release)). $gvisor_fs."
    echo
    printf '| test, MiB/s (%% of native) |'; printf ' %s |' "${headings[@]}"; echo
    printf '|---|'; printf -- '---:|%.0s' "${labels[@]}"; echo
    for bs in 4k 64k 1m; do
        for rw in read write randread randwrite; do
            test="$rw-$bs"
            printf '| %s |' "$test"
            native="$(value native "$test" 3)"
            for label in "${labels[@]}"; do
                v="$(value "$label" "$test" 3)"
                if [[ -z "$v" ]]; then printf ' - |'
                elif [[ $label == native ]]; then printf ' %s |' "$v"
                else printf ' %s (%s%%) |' "$v" "$(awk -v a="$v" -v b="$native" 'BEGIN {printf "%.0f", (b > 0 ? 100 * a / b : 0)}')"
                fi
            done
            echo
        done
    done
    echo
    printf '| metadata, seconds (x native) |'; printf ' %s |' "${headings[@]}"; echo
    printf '|---|'; printf -- '---:|%.0s' "${labels[@]}"; echo
    for test in create stat unlink untar; do
        case $test in
            untar) printf '| untar %s files, %s MiB, and sync |' "$src_files" "$src_mib" ;;
            *) printf '| %s 10,000 files |' "$test" ;;
        esac
        native="$(value native "$test" 3)"
        for label in "${labels[@]}"; do
            v="$(value "$label" "$test" 3)"
            if [[ -z "$v" ]]; then printf ' - |'
            elif [[ $label == native ]]; then printf ' %s |' "$v"
            else printf ' %s (%s) |' "$v" "$(ratio "$v" "$native")"
            fi
        done
        echo
    done
} | tee_md "$md"

# Plot: throughput as a percentage of native, per test and configuration.
{
    printf 'test'; printf ' "%s"' "${headings[@]:1}"; echo
    for bs in 4k 64k 1m; do
        for rw in read write randread randwrite; do
            printf '%s' "$rw-$bs"
            native="$(value native "$rw-$bs" 3)"
            for label in "${labels[@]:1}"; do
                awk -v a="$(value "$label" "$rw-$bs" 3)" -v b="$native" 'BEGIN {printf " %.1f", (a != "" && b > 0) ? 100 * a / b : 0}'
            done
            echo
        done
    done
} >"$out/file-io.dat"
cat >"$out/file-io.gp" <<GP
set title "Buffered file I/O on the container's rootfs, % of native (runc); $(conditions | cut -d';' -f1-2 | tr -d '"')"
set style data histograms; set style histogram clustered gap 1; set style fill solid 0.8 border -1
set key top right; set grid ytics; set ylabel '% of native'; set xtics rotate by -30
set yrange [0:*]
plot for [i=2:$(( ${#labels[@]} ))] 'file-io.dat' using i:xtic(1) title columnheader(i)
GP
plot file-io
