#!/usr/bin/env bash
# The builder stage of images/cpu and images/trainer (docs/images.md, "DeepSpeed ops"): build the DeepSpeed ops
# the presets need (trainer/ds_ops.py: cpu_adam for deepspeed.offload_optimizer) once, at image-build time, so no
# pod compiles at run time. Runs as root in a throwaway stage that gets the compiler; the final stage copies only
# what this leaves in <python prefix>/share/dolly-train/torch_extensions (each op's .so and its version stamp).
#
#   images/prebuild-ds-ops.sh cpu_adam[,OP...] [OP...]
#   PYTHON_PREFIX=/home/ray/anaconda3   the base's Python (sys.prefix): where the final stage's COPY takes the ops
#   DS_OPS_MARCH=x86-64-v3              CPU target of the library (AVX2; x86-64-v4 = AVX-512, armv8-a). Empty:
#                                       the build machine's own CPU (-march=native), which nodes may lack
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: images/prebuild-ds-ops.sh OP..." >&2; exit 2; }

prefix=$(python -c 'import sys; print(sys.prefix)')
if [ -n "${PYTHON_PREFIX:-}" ] && [ "$prefix" != "$PYTHON_PREFIX" ]; then
  echo "prebuild-ds-ops: the base's Python lives in $prefix, not PYTHON_PREFIX=$PYTHON_PREFIX:" \
       "set --build-arg PYTHON_PREFIX=$prefix" >&2
  exit 1
fi

# A compiler, and Python.h for torch's cpp_extension: conda's Python (rayproject/ray) ships its headers, a
# Debian Python (the stand-in base) needs python3-dev. Only in this stage: the final image keeps no compiler.
packages=(g++)
python -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || packages+=(python3-dev)
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null

march=()
[ -z "${DS_OPS_MARCH:-}" ] || march=(--march "$DS_OPS_MARCH")
read -r -a ops <<< "${*//,/ }"
python -m trainer.ds_ops prebuild "${ops[@]}" "${march[@]}"
# Keep the libraries and their stamps only (the object files and ninja files are build leftovers).
find "$prefix/share/dolly-train/torch_extensions" -type f ! -name '*.so' ! -name 'dolly-train-stamp.json' -delete
ls -l "$prefix"/share/dolly-train/torch_extensions/*/
