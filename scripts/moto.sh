#!/usr/bin/env bash
# Put moto's S3-compatible server (`moto_server`) into its own venv DIR (default .tools/moto), for
# tests/test_object_storage.py (a real HTTP S3 endpoint on 127.0.0.1 for `checkpoint.storage_path: s3://...`).
#
#   scripts/moto.sh [DIR]
#
# Its own venv, not .venv: moto[server] brings boto3/botocore, and botocore pins python-dateutil<3 while the
# project venv has 4.x. The pin is pyproject.toml's `s3-server` extra (the one place pins live).
set -euo pipefail
case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac
cd "$(dirname "$0")/.."
dir=${1:-.tools/moto}
if [ -f "$dir/.complete" ]; then  # written last: a venv whose install was cut short is made again
  exit 0
fi
pin=$(python3 - <<'PY'
import tomllib
reqs = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["s3-server"]
print(next(r for r in reqs if r.startswith("moto")))
PY
)
echo "==> $pin into $dir"
rm -rf "$dir"
python3 -m venv "$dir"  # in place: a venv's scripts name its path, so it cannot be built aside and moved
"$dir/bin/pip" install -q "$pin"
"$dir/bin/moto_server" --help >/dev/null
touch "$dir/.complete"
