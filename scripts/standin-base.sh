#!/usr/bin/env bash
# Build (once, then cached) a local stand-in for an upstream base image, for machines that reach no container
# registry (tests/test_images.py). Prints the stand-in's image reference as its last line.
#
#   scripts/standin-base.sh ray      # stand-in for rayproject/ray:<ray pin>-py311-cpu (images/standin/ray.Dockerfile)
#   scripts/standin-base.sh vllm     # stand-in for vllm/vllm-openai (images/standin/vllm.Dockerfile)
#
# A stand-in is NOT the upstream image: a Debian root filesystem made by debootstrap (Python 3.11), plus what
# images/*/Dockerfile rely on from the real base (the header of each images/standin/*.Dockerfile lists it).
# Needs root (debootstrap), buildah and debootstrap; uses the storage that CONTAINERS_STORAGE_CONF names.
#
# Cache (docs/images.md): the debootstrap tree is kept as a tar under $DOLLY_IMAGES_CACHE (default
# ~/.cache/dolly-train/images), keyed by suite, package list and mirror; the images are tagged with a hash of
# their inputs (that tar's key, the stand-in's Dockerfile, the pins), so a rerun finds them and builds nothing,
# and any change to an input builds afresh. `rm -rf ~/.cache/dolly-train/images` forgets everything.
#   DEBIAN_MIRROR=URL     the Debian mirror (default: the first one apt is configured with, else deb.debian.org)
#   STANDIN_BUILD_OPTS    extra `buildah build` options (e.g. the CA-bundle mount and PIP_CERT for pip)
set -euo pipefail
cd "$(dirname "$0")/.."

name=${1:?usage: scripts/standin-base.sh ray|vllm}
dockerfile=images/standin/$name.Dockerfile
[ -f "$dockerfile" ] || { echo "standin-base: no $dockerfile (known: ray, vllm)" >&2; exit 2; }
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "standin-base: '$tool' not found (apt-get install -y buildah debootstrap)" >&2; exit 2; }
done
cache=${DOLLY_IMAGES_CACHE:-$HOME/.cache/dolly-train/images}
mkdir -p "$cache"

suite=bookworm
packages=python3,python3-venv,ca-certificates
mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(sed -n 's/^URIs: *\([^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 || true)
  [ -n "$mirror" ] || mirror=$(sed -n 's/^deb \(http[^ ]*\/debian\) .*/\1/p' /etc/apt/sources.list 2>/dev/null | head -n1 || true)
  [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
fi
hash() { sha256sum | cut -c1-12; }
rootfs_key=$(printf '%s\n' "$suite" "$packages" "$mirror" minbase | hash)
rootfs_tar=$cache/rootfs-$suite-$rootfs_key.tar
rootfs_ref=localhost/dolly-standin/rootfs:$suite-$rootfs_key

exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }

if ! exists "$rootfs_ref"; then
  if [ ! -f "$rootfs_tar" ]; then
    echo "==> debootstrap $suite ($packages) from $mirror" >&2
    tree=$(mktemp -d "$cache/rootfs.XXXXXX")
    trap 'rm -rf "$tree"' EXIT
    debootstrap --variant=minbase --include="$packages" "$suite" "$tree" "$mirror" >&2
    rm -rf "$tree"/var/cache/apt/archives/*.deb "$tree"/var/lib/apt/lists/*
    tar -C "$tree" --exclude=./proc --exclude=./sys --exclude=./dev -cf "$rootfs_tar.partial" .
    mv "$rootfs_tar.partial" "$rootfs_tar"
    rm -rf "$tree"
    trap - EXIT
  fi
  echo "==> import $rootfs_tar as $rootfs_ref" >&2
  ctr=$(buildah from scratch)
  buildah add --quiet "$ctr" "$rootfs_tar" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
  buildah commit --quiet "$ctr" "$rootfs_ref" >/dev/null
  buildah rm "$ctr" >/dev/null
fi

ray_pin=$(sed -n 's/.*"ray\[[^]]*\]==\([0-9.]*\)".*/\1/p' pyproject.toml | head -n1)
[ -n "$ray_pin" ] || { echo "standin-base: no ray pin in pyproject.toml" >&2; exit 1; }
key=$( { echo "$rootfs_key $ray_pin"; cat "$dockerfile"; } | hash)
case "$name" in
  ray) ref=localhost/dolly-standin/ray:$ray_pin-py311-cpu-$key ;;
  vllm) ref=localhost/dolly-standin/vllm-openai:$key ;;
esac
if ! exists "$ref"; then
  echo "==> build $ref ($dockerfile)" >&2
  read -r -a extra <<< "${STANDIN_BUILD_OPTS:-}"
  buildah build --format docker --layers --file "$dockerfile" --tag "$ref" \
    --build-arg "ROOTFS=$rootfs_ref" --build-arg "RAY_VERSION=$ray_pin" "${extra[@]}" images/standin >&2
fi
echo "$ref"
