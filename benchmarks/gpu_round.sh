#!/usr/bin/env bash
# The GPU round in one run (results: docs/benchmarks.md, "On a GPU"), sized for one `device` call
# of at most 600 s with room left in a 15-minute lease to rerun it: the step limits add up to
# 540 s, the figures first (on a lent machine they are what cannot be had elsewhere):
#   1. issue 35's goal: whole requests with pruning before and inside the vision encoder at 7B
#      dimensions, 32 frames (TTFT at keep 0.25 against none; dedup, earlytom, dedup+earlytom);
#   2. preprocessing on the GPU against the CPU (issue 35 item 4);
#   3. the prefill benchmark on the 7B-dimension model (per-stage pruning overhead);
#   4. the decode paths (eager, static, CUDA graphs) on a few presets;
#   5. the CUDA tests.
# Each step has its own time limit, so one that hangs costs only itself. The 13 GiB 7B build (once
# per machine) falls in the first step's limit. Not yet run: estimated, no GPU was lent since.
#
#   bash benchmarks/gpu_round.sh OUT_DIR      # writes a log, results JSON and tables to OUT_DIR
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_round.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
work=${VIDQA_BENCH_DIR:-$HOME/.cache/vidqa-bench}
log="$out/gpu_round.log"

step() {  # step SECONDS NAME COMMAND...: run, log, record the exit status
    local limit=$1 name=$2; shift 2
    echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s)" | tee -a "$log"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$log"
}

keep() {  # keep NAME: copy a benchmark's results beside the log as flat files, as soon as it ends
    [ -f "$work/$1/results.json" ] && cp "$work/$1/results.json" "$out/$1.json"
    [ -f "$work/$1/table.md" ] && cp "$work/$1/table.md" "$out/$1.md"
    [ -f "$work/$1/speedup.png" ] && cp "$work/$1/speedup.png" "$out/$1.png"
    return 0
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
    nproc; uptime
} 2>&1 | tee -a "$log"

step 170 "encoder savings, 7B dimensions (issue 35)" python3 benchmarks/encoder_savings.py --bench-dims qwen2-7b \
    --device cuda --frames 32 --tokens 16 --repeats 2 --warmup 1 --clips static-shots,moving \
    --presets none,evs,earlytom,dedup,dedup+earlytom --workdir "$work" --json "$out/encoder-savings-7b.json"
# the video processor on the GPU against the CPU (issue #35 item 4): the preprocessing column, 4 answer tokens
step 60 "preprocessing on the GPU and the CPU, 7B dimensions" python3 benchmarks/e2e.py --bench-dims qwen2-7b \
    --device cuda --frames 32 --tokens 4 --presets none --repeats 3 --warmup 1 --preprocess-on model,cpu \
    --workdir "$work" --out "$work/preprocess-7b"
keep preprocess-7b
# decode is measured by decode.py: 4 tokens here keep each run short
step 120 "prefill, 7B dimensions" python3 benchmarks/prefill.py --bench-dims qwen2-7b --device cuda --frames 32 \
    --keeps 0.25 --warmup 1 --decode-tokens 4 --reference-frames 8 --workdir "$work" --out "$work/prefill-7b"
keep prefill-7b
# the decode paths (issue #30 item 2: >= 100 tok/s with graphs; where graphs win incl. warm-up)
step 100 "decode paths, 7B dimensions" python3 benchmarks/decode.py --bench-dims qwen2-7b \
    --device cuda --frames 32 --decode-tokens 64 --repeats 1 --warmup 1 --presets none,evs,fastv,dycoke \
    --paths eager,static,graphs --workdir "$work" --out "$work/decode-paths-7b"
keep decode-paths-7b
step 90 "CUDA tests" python3 -m pytest -q -ra -p no:cacheprovider tests/test_cuda.py tests/test_gpu_preprocess.py
ls -la "$out"
