#!/bin/bash
# Builds hako's guest kernel from Debian's kernel source package (linux-source-6.12) and the
# config fragment guest-image/kernel/hako.config, or finds it already built.
#
#   guest-image/build-kernel.sh        (guest-image/build.sh calls it)
#
# Progress goes to stderr; the last thing on stdout is the directory of the build, which holds
#   vmlinux          the ELF kernel, symbols stripped; QEMU (-kernel, through its PVH entry point)
#                    and Cloud Hypervisor boot it
#   vmlinuz          the same kernel as a bzImage, for boot loaders that want one
#   kernel-release   e.g. 6.12.117-hako
#   config           the full .config it was built with
#
# Builds are kept outside the repository clone, in $HAKO_KERNEL_CACHE (default
# /var/cache/hako/kernel; ~/.cache/hako/kernel when that is not writable), under a key hashing
# the source package's version, the fragment, this script and the compiler's version: a second
# build, or a fresh clone on the same machine (CI), reuses it at once. A build is made in a
# temporary directory there and moved into place whole, so a failed or interrupted one leaves no
# entry behind. The three most recent entries are kept.
#
# Reproducible: fixed build user, host and timestamp (the source package's date), so the same
# inputs give the same kernel.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fragment="$here/kernel/hako.config"
SOURCE_PACKAGE=linux-source-6.12
tarball="/usr/src/$SOURCE_PACKAGE.tar.xz"
KEEP_ENTRIES=3

step=0
steps=5
progress() {
    step=$((step + 1))
    echo "kernel [$step/$steps] $*" >&2
}
note() { echo "  $*" >&2; }
fail() {
    echo "kernel: error: $*" >&2
    exit 1
}

progress "checking the kernel source and build tools"
[[ -s "$fragment" ]] || fail "the config fragment $fragment is missing"
version="$(dpkg-query -W -f='${Status} ${Version}' "$SOURCE_PACKAGE" 2>/dev/null |
    awk '$3 == "installed" {print $4}')"
[[ -n "$version" && -s "$tarball" ]] ||
    fail "$SOURCE_PACKAGE is not installed (or $tarball is missing): run scripts/setup.sh, or apt-get install $SOURCE_PACKAGE"
missing=()
for tool in make gcc ld strip readelf flex bison bc tar xz lz4 flock; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
[[ -f /usr/include/gelf.h ]] || missing+=("libelf-dev (gelf.h)")
((${#missing[@]} == 0)) ||
    fail "missing to build the kernel: ${missing[*]}; run scripts/setup.sh (it installs them)"
compiler="$(gcc --version | head -n1)"
key="$( (echo "$SOURCE_PACKAGE $version"; echo "$compiler"; cat "$fragment" "${BASH_SOURCE[0]}") |
    sha256sum | cut -c1-16)"
note "$SOURCE_PACKAGE $version, $compiler, key $key"

cache="${HAKO_KERNEL_CACHE:-/var/cache/hako/kernel}"
if ! mkdir -p "$cache" 2>/dev/null || [[ ! -w "$cache" ]]; then
    [[ -z "${HAKO_KERNEL_CACHE:-}" ]] ||
        fail "cannot write to HAKO_KERNEL_CACHE=$cache: point it at a writable directory"
    cache="${XDG_CACHE_HOME:-$HOME/.cache}/hako/kernel"
    mkdir -p "$cache" || fail "cannot create the kernel cache $cache"
    note "/var/cache/hako/kernel is not writable: caching in $cache"
fi
entry="$cache/$key"
complete() { [[ -s "$1/vmlinux" && -s "$1/vmlinuz" && -s "$1/kernel-release" && -s "$1/config" ]]; }

# One build at a time per cache: a second caller waits, then finds the entry made.
exec 9>"$cache/.lock"
if ! flock -n 9; then
    note "another kernel build is running; waiting for it"
    flock 9
fi
if complete "$entry"; then
    touch "$entry"
    echo "kernel: cached build of $(cat "$entry/kernel-release") in $entry" >&2
    echo "$entry"
    exit 0
fi

# Leftovers of builds that were killed outright (no other build runs: this one holds the lock).
rm -rf "$cache"/.build.*
work="$(mktemp -d "$cache/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM HUP
src="$work/src"

progress "unpacking $SOURCE_PACKAGE $version"
mkdir -p "$src"
tar -xJf "$tarball" -C "$src" --strip-components=1 ||
    fail "unpacking $tarball failed (is the disk full? the build needs about 2 GiB in $cache)"

# Every make runs at the lowest priority: the machine stays usable during the build.
jobs="$(nproc)"
# The kernel's build stamp (uname -v) is fixed, so the same inputs give the same kernel.
export KBUILD_BUILD_USER=hako KBUILD_BUILD_HOST=hako KBUILD_BUILD_VERSION=1
KBUILD_BUILD_TIMESTAMP="$(date -u -d "@$(stat -c %Y "$tarball")" '+%Y-%m-%d')"
export KBUILD_BUILD_TIMESTAMP
kmake() { nice -n 19 make -C "$src" -s ARCH=x86_64 "$@"; }

progress "configuring: tinyconfig + kernel/hako.config"
kmake tinyconfig >/dev/null || fail "make tinyconfig failed"
# merge_config.sh warns about every value the fragment overrides; only errors matter here.
(cd "$src" && scripts/kconfig/merge_config.sh -m .config "$fragment") >"$work/merge.log" 2>&1 ||
    { cat "$work/merge.log" >&2; fail "merging $fragment failed"; }
kmake olddefconfig >/dev/null || fail "make olddefconfig failed"
# Every option the fragment sets must have survived: olddefconfig silently drops one whose
# dependencies are not met.
dropped=()
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*) sym="${line%%=*}" want="$line" ;;
        "# CONFIG_"*" is not set") sym="${line#\# }" sym="${sym%% *}" want="" ;;
        *) continue ;;
    esac
    got="$(grep -E "^$sym=" "$src/.config" || true)"
    if [[ "$got" != "$want" ]]; then
        want="${want#*=}" got="${got#*=}"
        dropped+=("$sym: wanted ${want:-off}, got ${got:-off}")
    fi
done <"$fragment"
if ((${#dropped[@]})); then
    printf '  %s\n' "${dropped[@]}" >&2
    fail "${#dropped[@]} option(s) of $fragment did not survive olddefconfig (a missing dependency, or a default that selects them): fix the fragment"
fi
note "configuration checked: $(grep -c '^CONFIG_.*=' "$src/.config") options set"

progress "compiling with make -j$jobs (about 15 CPU-minutes: 7 minutes on 2 idle cores)"
started=$SECONDS
note "preparing headers and build tools"
kmake -j"$jobs" prepare >&2 || fail "make prepare failed (see above)"
release="$(kmake kernelrelease)"
[[ "$release" == *-hako ]] || fail "the kernel release is $release; CONFIG_LOCALVERSION=\"-hako\" did not apply"
note "compiling and linking vmlinux $release"
kmake -j"$jobs" vmlinux >&2 || fail "compiling the kernel failed (see above)"
note "making the bzImage"
kmake -j"$jobs" bzImage >&2 || fail "making the bzImage failed (see above)"
note "compiled in $((SECONDS - started)) s"

progress "storing the build in $entry"
out="$work/entry"
mkdir -p "$out"
# Without its symbol table the ELF keeps what a loader needs, PVH note included.
strip -o "$out/vmlinux" "$src/vmlinux" || fail "strip failed on vmlinux"
[[ "$(od -An -c -N4 "$out/vmlinux" | tr -d ' ')" == '177ELF' ]] || fail "vmlinux is not an ELF file"
readelf -n "$out/vmlinux" 2>/dev/null | grep -q 'Xen' ||
    fail "vmlinux has no PVH (Xen ELF) note: CONFIG_PVH must be set"
install -m 0644 "$src/arch/x86/boot/bzImage" "$out/vmlinuz"
install -m 0644 "$src/.config" "$out/config"
echo "$release" >"$out/kernel-release"
chmod 0644 "$out/vmlinux"
mv -T "$out" "$entry" || fail "could not move the build into $entry"
# Older entries go, all but the most recent few.
{ ls -1dt "$cache"/*/ 2>/dev/null || true; } | tail -n +$((KEEP_ENTRIES + 1)) | xargs -r rm -rf
ls -l "$entry/vmlinux" "$entry/vmlinuz" | awk '{printf "  %-50s %6.1f MiB\n", $NF, $5/1048576}' >&2
echo "kernel: built $release in $entry" >&2
echo "$entry"
