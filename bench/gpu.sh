#!/usr/bin/env bash
# One-shot GPU benchmark of difflm's decoders on a random-weight LLaDA-8B-shaped model (bf16), on one
# H100/H200, offline. From the repository root:
#
#     OUT=/path/to/results bash bench/gpu.sh
#
# Writes $OUT/gpu-llada-8b.json (rewritten after every decoder, so a killed run keeps what it measured) and
# $OUT/gpu-bench.log, and prints the tables and a compact summary. Sized for ~7 minutes wall time in all:
# model init (~1 min), the GEMM rate, then the cells (gen_length x batch) most important first:
# 256x1, 256x16, 512x1, 512x16; nothing new starts after BENCH_BUDGET_S seconds (default 330), and the
# whole bench is killed after BENCH_TIMEOUT_S (default 400). Each decoder times its first 32 steps
# (BENCH_MAX_STEPS) after a 2-step warm-up and extrapolates to its full NFE (marked in the output).
# Installs nothing: needs torch (CUDA) and transformers 5.x importable by `python`/`python3` (or $PYTHON).
# BENCH_EXTRA_ARGS is appended to bench.py's options (later options win), e.g. to rehearse on a CPU:
#   OUT=/tmp/g PYTHON=.venv/bin/python BENCH_EXTRA_ARGS="--device cpu --scale-down --max-steps 3" bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT="${OUT:-$PWD/bench/results}"
mkdir -p "$OUT"
BUDGET="${BENCH_BUDGET_S:-330}"
HARD="${BENCH_TIMEOUT_S:-400}"
MAX_STEPS="${BENCH_MAX_STEPS:-32}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
NAME=gpu-llada-8b

main() {
  echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) difflm GPU bench: budget ${BUDGET} s, hard limit ${HARD} s, out ${OUT}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi failed"
  "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")'
  local rc=0
  timeout -k 15 "$HARD" "$PY" bench/bench.py --preset llada-8b --device cuda --dtype bfloat16 \
    --gen-length 256 512 --batch 1 16 --methods ref-llada llada conv threshold llada-dual ref-conv threshold-dual \
    --max-steps "$MAX_STEPS" --repeats 1 --matmul --gsm8k --budget-s "$BUDGET" --plain \
    --name "$NAME" --out-dir "$OUT" ${BENCH_EXTRA_ARGS:-} || rc=$?
  echo "== bench.py exit status $rc (124: killed at the hard limit; 1: a decoder failed, see its row)"
  if [ -f "$OUT/$NAME.json" ]; then
    echo "== summary"
    "$PY" bench/bench.py --summary "$OUT/$NAME.json" || true
  fi
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
  return "$rc"
}

main 2>&1 | tee "$OUT/gpu-bench.log"
