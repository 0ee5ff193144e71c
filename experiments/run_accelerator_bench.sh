#!/usr/bin/env bash
# The H200 run of experiments/bench_accelerator.py, prepared here and run there in one command.
#
#   bash experiments/run_accelerator_bench.sh prepare   # here (pip reaches PyPI): wheels -> .whl/
#   bash experiments/run_accelerator_bench.sh run       # there: the device tool's `run` with
#                                                       # carry [".whl"] and timeout_s 600
#
# The H200 image has jax/jaxlib 0.11.x, flax, optax, orbax, torch, absl, tqdm, pyyaml (KINDS.md)
# and no registry; what our code imports beyond those travels as wheels in .whl/ (git-ignored),
# installed there with --no-deps --no-index. `run` writes accelerator.json, accelerator.md,
# log.txt, nvidia_smi.txt and versions.txt to $OUT; the bench's own guard ends it at 450 s.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=.whl
# Versions as pyproject.toml pins them; grain's array-record and portpicker come with it.
BINARY="ml-collections==1.1.0 braceexpand==0.1.7 grain==0.2.18 array-record==0.8.6"
BINARY="$BINARY portpicker==1.6.0"
# OpenAI's dVAE (the dvae part's peer) is published as a source archive only: built here.
SOURCE="DALL-E==0.1"

prepare() {
  local python=${PYTHON:-.venv/bin/python}
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any -d "$WHEELS" $BINARY
  "$python" -m pip wheel -q --no-deps -w "$WHEELS" $SOURCE
  ls -l "$WHEELS"
  du -sh "$WHEELS"
}

run() {
  local out=${OUT:-accelerator_out}
  mkdir -p "$out"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
  # Allocate as needed, up to 92% of the GPU: PyTorch (the dVAE's peer) takes its memory beside.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
  nvidia-smi >"$out/nvidia_smi.txt" 2>&1 || true
  local names='jax|jaxlib|jax-cuda.*|flax|optax|orbax-checkpoint|torch|numpy|grain|ml.collections'
  python3 -m pip list 2>/dev/null | grep -iE "^($names) " >"$out/versions.txt" || true
  set +e
  timeout 570 python3 experiments/bench_accelerator.py --json_out="$out/accelerator.json" \
    --markdown_out="$out/accelerator.md" --nominal_bandwidth_tb_s=4.8 "$@" 2>&1 | tee "$out/log.txt"
  local status=${PIPESTATUS[0]}
  set -e
  echo "bench_accelerator exited with $status"
  return "$status"
}

case "${1:-}" in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 prepare | run [bench_accelerator flags]" >&2; exit 2 ;;
esac
