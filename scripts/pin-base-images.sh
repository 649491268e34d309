#!/usr/bin/env bash
# Pin the upstream base of each images/*/Dockerfile by digest (docs/images.md). For every
# `ARG BASE_IMAGE=<name>:<tag>[@sha256:...]` default it asks the registry for the digest the tag points at now
# (the multi-arch index) and rewrites the default as `<name>:<tag>@sha256:<digest>`: the tag says what it is,
# the digest fixes it. Run it on a machine that reaches Docker Hub after changing a version (RAY_VERSION,
# VLLM_VERSION, ...) and commit the result; the build machines reach no registry, so they cannot.
#
#   scripts/pin-base-images.sh                  # trainer, evaluator, cpu
#   scripts/pin-base-images.sh cpu              # one image
#   RESOLVER=crane|docker|skopeo                # default: the first one installed
#   DRY_RUN=1                                   # print the new defaults, change nothing
set -euo pipefail
cd "$(dirname "$0")/.."

resolver=${RESOLVER:-}
if [ -z "$resolver" ]; then
  for r in crane docker skopeo; do command -v "$r" >/dev/null && { resolver=$r; break; }; done
fi
digest_of() {
  case "$resolver" in
    crane) crane digest "$1" ;;
    docker) docker buildx imagetools inspect "$1" --format '{{.Manifest.Digest}}' ;;
    skopeo) echo "sha256:$(skopeo inspect --raw "docker://$1" | sha256sum | cut -d' ' -f1)" ;;
    *) echo "pin-base-images: no resolver (install crane, docker buildx or skopeo; or set RESOLVER)" >&2; return 2 ;;
  esac
}

images=("$@")
[ ${#images[@]} -gt 0 ] || images=(trainer evaluator cpu)
for name in "${images[@]}"; do
  file=images/$name/Dockerfile
  [ -f "$file" ] || { echo "pin-base-images: no $file" >&2; exit 2; }
  # The ARG defaults above BASE_IMAGE, to expand ${RAY_VERSION} and the like.
  template=$(sed -n 's/^ARG BASE_IMAGE=\(.*\)$/\1/p' "$file" | head -n1)
  [ -n "$template" ] || { echo "pin-base-images: $file has no 'ARG BASE_IMAGE=' default" >&2; exit 1; }
  template=${template%@sha256:*}
  ref=$template
  while read -r key value; do
    ref=${ref//\$\{$key\}/$value}
  done < <(sed -n 's/^ARG \([A-Z_]*\)=\(.*\)$/\1 \2/p' "$file")
  digest=$(digest_of "$ref")
  [[ $digest =~ ^sha256:[0-9a-f]{64}$ ]] || { echo "pin-base-images: $ref: got '$digest', not a digest" >&2; exit 1; }
  echo "$file: $ref@$digest"
  if [ "${DRY_RUN:-0}" != "1" ]; then
    sed -i "s|^ARG BASE_IMAGE=.*$|ARG BASE_IMAGE=$template@$digest|" "$file"
  fi
done
