#!/usr/bin/env bash
# The GPU round in one run (results: docs/benchmarks.md, "On a GPU"): the prefill benchmark on the
# 7B-dimension and the 0.5B-dimension bench models at 32 frames, DyCoke's decode and the decode
# paths (eager, static, CUDA graphs) on every preset on the 7B one,
# the whole request end to end (64 and 256 answer tokens) on the 7B one, then the CUDA tests (the figures first: on a lent machine with minutes to spend, they are what
# cannot be had elsewhere). Each step has its own time limit, so one that hangs costs only
# itself; about 9 minutes on an H200, the 13 GiB 7B build included (estimated: not yet run with the decode paths).
#
#   bash benchmarks/gpu_round.sh OUT_DIR      # writes a log, results JSON and plots to OUT_DIR
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

# decode is measured by decode.py: 4 tokens here keep each run short
step 200 "prefill, 7B dimensions" python3 benchmarks/prefill.py --bench-dims qwen2-7b --device cuda --frames 32 \
    --keeps 0.25 --warmup 1 --decode-tokens 4 --reference-frames 8,16 --workdir "$work" --out "$work/prefill-7b"
keep prefill-7b
step 100 "prefill, 0.5B dimensions" python3 benchmarks/prefill.py --device cuda --frames 32 --keeps 0.1,0.25 \
    --repeats 3 --warmup 1 --decode-tokens 4 --reference-frames 4,8,16 --workdir "$work" --out "$work/prefill-0.5b"
keep prefill-0.5b
step 150 "decode (DyCoke), 7B dimensions" python3 benchmarks/decode.py --bench-dims qwen2-7b --device cuda \
    --frames 32 --decode-tokens 64 --repeats 2 --warmup 1 --paths eager,graphs --workdir "$work" --out "$work/decode-7b"
keep decode-7b
# the decode paths on every preset (issue #30 item 2: >= 100 tok/s with graphs; where graphs win incl. warm-up)
step 240 "decode paths, every preset, 7B dimensions" python3 benchmarks/decode.py --bench-dims qwen2-7b \
    --device cuda --frames 32 --decode-tokens 64 --repeats 1 --warmup 1 --presets all --paths eager,static,graphs \
    --workdir "$work" --out "$work/decode-paths-7b"
keep decode-paths-7b
step 150 "end to end, 7B dimensions" python3 benchmarks/e2e.py --bench-dims qwen2-7b --device cuda --frames 32 \
    --tokens 64,256 --repeats 2 --warmup 1 --workdir "$work" --out "$work/e2e-7b"
keep e2e-7b
# the video processor on the GPU against the CPU (issue #35 item 4): the preprocessing column, 4 answer tokens
step 120 "preprocessing on the GPU and the CPU, 7B dimensions" python3 benchmarks/e2e.py --bench-dims qwen2-7b \
    --device cuda --frames 32 --tokens 4 --presets none --repeats 3 --warmup 1 --preprocess-on model,cpu \
    --workdir "$work" --out "$work/preprocess-7b"
keep preprocess-7b
step 150 "CUDA tests" python3 -m pytest -q -ra -p no:cacheprovider tests/test_cuda.py
ls -la "$out"
