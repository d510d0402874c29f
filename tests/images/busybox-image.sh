#!/bin/bash
# Builds a tiny OCI image archive from Debian's static busybox, for `ctr image import` and
# `docker load`: no
# registry is needed. Reproducible: the same busybox gives the same digests.
#
#   tests/images/busybox-image.sh OUT.tar [REF [BINARY...]]
#
# REF defaults to hako.local/busybox:latest. Each BINARY (a host program, such as iperf3 for
# the network benchmark) is copied in with the shared libraries it loads. IMAGE_CMD, a JSON
# array, replaces the image's default command (["sh"]); the CRI test's pause image sets
# ["sleep","inf"].
set -euo pipefail
out="${1:?usage: busybox-image.sh OUT.tar [REF [BINARY...]]}"
ref="${2:-hako.local/busybox:latest}"
extra=("${@:3}")
cmd="${IMAGE_CMD:-[\"sh\"]}"
busybox=/bin/busybox
[[ -x $busybox ]] || { echo "busybox-image: $busybox missing: apt-get install busybox-static" >&2; exit 1; }
file "$busybox" 2>/dev/null | grep -q 'statically linked' ||
    { echo "busybox-image: $busybox is not static: apt-get install busybox-static" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root"/{bin,etc,tmp,proc,sys,dev,root,usr/bin,usr/sbin,sbin,var}
chmod 1777 "$root/tmp"
install -m 0755 "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list-full); do
    [[ -e "$root/$applet" ]] || ln -s /bin/busybox "$root/$applet"
done
for bin in "${extra[@]}"; do
    path="$(command -v "$bin")" || { echo "busybox-image: $bin not found" >&2; exit 1; }
    install -D -m 0755 "$path" "$root/usr/bin/$(basename "$path")"
    for lib in $(ldd "$path" | grep -o '/[^ ]*'); do
        install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
    done
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"

blobs="$work/oci/blobs/sha256"
mkdir -p "$blobs"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$root" -cf "$work/layer.tar" .
put() { # file mediatype -> prints descriptor JSON
    local digest size
    digest="$(sha256sum "$1" | cut -d' ' -f1)"
    size="$(stat -c %s "$1")"
    cp "$1" "$blobs/$digest"
    printf '{"mediaType":"%s","digest":"sha256:%s","size":%s}' "$2" "$digest" "$size"
}
layer="$(put "$work/layer.tar" application/vnd.oci.image.layer.v1.tar)"
diff_id="$(sha256sum "$work/layer.tar" | cut -d' ' -f1)"
cat >"$work/config.json" <<JSON
{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":$cmd,"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:$diff_id"]}}
JSON
config="$(put "$work/config.json" application/vnd.oci.image.config.v1+json)"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":%s,"layers":[%s]}' \
    "$config" "$layer" >"$work/manifest.json"
manifest="$(put "$work/manifest.json" application/vnd.oci.image.manifest.v1+json)"
manifest="${manifest%\}},\"platform\":{\"architecture\":\"amd64\",\"os\":\"linux\"},\"annotations\":{\"org.opencontainers.image.ref.name\":\"$ref\",\"io.containerd.image.name\":\"$ref\"}}"
printf '{"schemaVersion":2,"manifests":[%s]}' "$manifest" >"$work/oci/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' >"$work/oci/oci-layout"
# manifest.json makes the same archive loadable by `docker load` (Docker's archive format points
# at the same blobs).
digest_of() { sed -E 's/.*"digest":"sha256:([0-9a-f]+)".*/\1/' <<<"$1"; }
printf '[{"Config":"blobs/sha256/%s","RepoTags":["%s"],"Layers":["blobs/sha256/%s"]}]' \
    "$(digest_of "$config")" "$ref" "$(digest_of "$layer")" >"$work/oci/manifest.json"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work/oci" -cf "$out" \
    oci-layout index.json manifest.json blobs
echo "busybox-image: wrote $out ($ref)"
