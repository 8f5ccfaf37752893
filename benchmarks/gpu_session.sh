#!/usr/bin/env bash
# One GPU session, in priority order, each step bounded: CUDA tests, runtime benchmark, distributed
# fit over NCCL, full-size fit. Results and logs go to $OUT (default benchmarks/results/gpu).
# Usage (on the GPU machine, repo root): bash benchmarks/gpu_session.sh [part ...]
#   parts: setup tests runtime dist fullsize   (default: setup tests runtime dist)
# Wheels for packages the GPU image lacks (entmax, hydra-core, omegaconf, antlr4) are taken from .whl/.
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
parts=${*:-setup tests runtime dist}
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/session.log"; }

for part in $parts; do
  case $part in
    setup)
      if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      fi
      stamp "setup: $(python3 -c 'import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())')"
      nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1 ;;
    tests)
      stamp "tests"
      timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_runtime_kernels.py \
        > "$OUT/test_gpu.txt" 2>&1; stamp "tests rc=$? $(tail -1 "$OUT/test_gpu.txt")" ;;
    runtime)
      stamp "runtime"
      timeout 300 python3 benchmarks/bench_runtime.py --device cuda --layers 2 --rounds 3 --decode-tokens 32 \
        --prefill-tokens 512 --decode-batch 1 32 --skip memory hit_rate --out "$OUT/runtime_gpu.json" \
        > "$OUT/runtime_gpu.log" 2>&1; stamp "runtime rc=$?" ;;
    dist)
      stamp "dist"
      if [ -f benchmarks/bench_distributed.py ]; then
        timeout 150 python3 benchmarks/bench_distributed.py --device cuda --ranks 1 --out "$OUT/distributed_gpu.json" \
          > "$OUT/distributed_gpu.log" 2>&1; stamp "dist rc=$?"
      fi ;;
    fullsize)
      stamp "fullsize checkpoint"
      timeout 240 python3 benchmarks/make_fullsize_checkpoint.py --out /tmp/qwen15-fullsize --device cuda \
        > "$OUT/fullsize_ckpt.log" 2>&1; stamp "checkpoint rc=$?"
      stamp "fullsize fit"
      timeout "${FIT_TIMEOUT:-330}" python3 -m globe.cli.main fit model.path=/tmp/qwen15-fullsize output_dir=/tmp/fit \
        bank.m_up=128 bank.m_gate=128 bank.r_frac=0.5 sparsity.target_support=12 train.batch_size=16 \
        train.steps="${FIT_STEPS:-1000}" train.eval_every="${FIT_EVAL_EVERY:-250}" train.log_every=50 \
        train.checkpoint_every=100000 train.device=cuda > "$OUT/fullsize_fit.log" 2>&1
      stamp "fit rc=$?"
      cp /tmp/fit/summary.json "$OUT/fullsize_gpu_summary.json" 2>/dev/null
      cp /tmp/fit/metrics.jsonl "$OUT/fullsize_gpu_metrics.jsonl" 2>/dev/null ;;
  esac
done
stamp "done"
