#!/usr/bin/env bash
# Every GPU check of the project in one prepared run (a lent H100/H200 with no package index):
#   1. bench/gpu.sh: decoder speed on a random-weight LLaDA-8B-shaped model (bf16),
#   2. bench/qlora_gpu.py: QLoRA steps with gradient checkpointing at sequence 1024 (peak memory, step time),
#   3. the CUDA-only tests (QLoRA through `difflm sft` with 8-bit AdamW, save, reload, resume).
# Wheels the machine lacks travel in .whl/ (transformers 5.24, peft, bitsandbytes, datasets, dill,
# multiprocess): see bench/README.md. Results and logs go to $OUT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/bench/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD" || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH="${PYTHONPATH:-$PWD}"
PY=python3
echo "== $(date -u +%T) part 1: decoders"
BENCH_BUDGET_S="${BENCH_BUDGET_S:-210}" BENCH_TIMEOUT_S="${BENCH_TIMEOUT_S:-270}" PYTHON=$PY bash bench/gpu.sh || echo "gpu.sh exit $?"
echo "== $(date -u +%T) part 2: QLoRA"
timeout -k 10 "${QLORA_TIMEOUT_S:-170}" $PY bench/qlora_gpu.py 2>&1 | tee "$OUT/qlora.log" || echo "qlora exit $?"
echo "== $(date -u +%T) part 3: CUDA tests"
timeout -k 10 "${TEST_TIMEOUT_S:-100}" $PY -m pytest -q -p no:cacheprovider tests/test_training_loop.py -k qlora \
2>&1 | tail -15 | tee "$OUT/cuda-tests.log" || echo "tests exit $?"
echo "== $(date -u +%T) done"
