#!/usr/bin/env bash
# Build the container images (`make images`). Needs docker (or podman: ENGINE=podman) with buildx-style
# `build`; the build machines have none, so CI lints the Dockerfiles (tests/test_images.py) instead.
#
#   scripts/build-images.sh                 # trainer, evaluator and cpu
#   scripts/build-images.sh cpu             # only the CPU image (kind smoke test)
#   PUSH=1 scripts/build-images.sh          # also push to the registry
#   DRY_RUN=1 scripts/build-images.sh       # print the build commands only
#   REGISTRY=ghcr.io/dolly-train TAG=0.1.0  # defaults: this registry, the version in pyproject.toml
set -euo pipefail
cd "$(dirname "$0")/.."

engine=${ENGINE:-docker}
registry=${REGISTRY:-ghcr.io/dolly-train}
version=$(sed -n 's/^version = "\([^"]*\)"/\1/p' pyproject.toml | head -n1)
[ -n "$version" ] || { echo "build-images: no version found in pyproject.toml" >&2; exit 1; }
tag=${TAG:-$version}
revision=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
created=$(date -u +%Y-%m-%dT%H:%M:%SZ)

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
  echo "build-images: '$engine' not found (set ENGINE=podman to use podman)" >&2
  exit 2
fi

for name in "${images[@]}"; do
  dockerfile=images/$name/Dockerfile
  [ -f "$dockerfile" ] || { echo "build-images: no $dockerfile (known: trainer, evaluator, cpu)" >&2; exit 2; }
  ref=$registry/$name:$tag
  echo "==> $ref ($dockerfile)"
  run "$engine" build \
    --file "$dockerfile" \
    --tag "$ref" \
    --build-arg "VERSION=$version" \
    --build-arg "VCS_REF=$revision" \
    --build-arg "BUILD_DATE=$created" \
    .
  if [ "${PUSH:-0}" = "1" ]; then
    run "$engine" push "$ref"
  fi
done
