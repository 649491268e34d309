#!/usr/bin/env bash
# Build the container images (`make images`) with docker, podman or buildah, whichever is present.
#
#   scripts/build-images.sh                 # trainer, evaluator and cpu
#   scripts/build-images.sh cpu             # only the CPU image (kind smoke test)
#   ENGINE=buildah scripts/build-images.sh  # pick the engine (default: docker with a reachable daemon, else
#                                           # buildah, else podman)
#   BASE_IMAGE=REF scripts/build-images.sh cpu   # another base than the Dockerfile's pinned upstream default
#   BUILD_OPTS="--volume A:B:ro --build-arg PIP_CERT=B"   # extra options for the engine's build (word-split)
#   PUSH=1 scripts/build-images.sh          # also push to the registry
#   DRY_RUN=1 scripts/build-images.sh       # print the build commands only
#   REGISTRY=ghcr.io/dolly-train TAG=0.1.0  # defaults: this registry, the version in pyproject.toml
# buildah and podman honour BUILDAH_ISOLATION (chroot on machines without a working OCI runtime) and
# CONTAINERS_STORAGE_CONF (tests/test_images.py keeps its storage under ~/.cache/dolly-train/images).
set -euo pipefail
cd "$(dirname "$0")/.."

pick_engine() {
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then echo docker
  elif command -v buildah >/dev/null; then echo buildah
  elif command -v podman >/dev/null; then echo podman
  else echo docker  # reported as missing below
  fi
}
engine=${ENGINE:-}
[ -n "$engine" ] || engine=$(pick_engine)
case "$engine" in
  docker|podman|buildah) ;;
  *) echo "build-images: ENGINE=$engine is not one of docker, podman, buildah" >&2; exit 2 ;;
esac
registry=${REGISTRY:-ghcr.io/dolly-train}
version=$(sed -n 's/^version = "\([^"]*\)"/\1/p' pyproject.toml | head -n1)
[ -n "$version" ] || { echo "build-images: no version found in pyproject.toml" >&2; exit 1; }
tag=${TAG:-$version}
revision=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
created=$(date -u +%Y-%m-%dT%H:%M:%SZ)
read -r -a extra <<< "${BUILD_OPTS:-}"

images=("$@")
[ ${#images[@]} -gt 0 ] || images=(trainer evaluator cpu)

run() {
  if [ "${DRY_RUN:-0}" = "1" ]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

if [ "${DRY_RUN:-0}" != "1" ] && ! command -v "$engine" >/dev/null; then
  echo "build-images: no container engine found (docker with a daemon, buildah or podman); set ENGINE=" >&2
  exit 2
fi

# docker builds with its own format; buildah/podman default to OCI, which drops SHELL (pipefail): ask for docker's.
format=()
[ "$engine" = docker ] || format=(--format docker --layers)

for name in "${images[@]}"; do
  dockerfile=images/$name/Dockerfile
  [ -f "$dockerfile" ] || { echo "build-images: no $dockerfile (known: trainer, evaluator, cpu)" >&2; exit 2; }
  ref=$registry/$name:$tag
  base=()
  [ -z "${BASE_IMAGE:-}" ] || base=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  echo "==> $ref ($dockerfile, $engine)"
  run "$engine" build \
    "${format[@]}" \
    --file "$dockerfile" \
    --tag "$ref" \
    --build-arg "VERSION=$version" \
    --build-arg "VCS_REF=$revision" \
    --build-arg "BUILD_DATE=$created" \
    "${base[@]}" \
    "${extra[@]}" \
    .
  if [ "${PUSH:-0}" = "1" ]; then
    run "$engine" push "$ref"
  fi
done
