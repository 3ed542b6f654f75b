"""Where the question's attention over the video goes, per layer, on the SmolLM2 benchmark model:
the measurement that motivates AdaTP (docs/methods.md, AdaTP), on a pretrained LLM.

    python benchmarks/micro/attention_bias.py                    # 8 held-out clips x 9 questions
    python benchmarks/micro/attention_bias.py --clips 20 --model DIR

For each held-out clip (world extras, 8 frames, in memory) and each question, the prompt is the
one `vidqa ask` builds (the SmolVLM2 adapter), run once through the model with eager attention.
Per layer l in --layers: score every visual token by the attention it receives from the question
rows (every row after the last frame token: the question and the template), mean over heads and
rows; take the top 10% of the 128 visual tokens and count which eighth of the visual sequence
(16 tokens = one frame at 8 frames) each falls in. "debiased" does the same after AdaTP's
global score debiasing (each score divided by the mean score of its frame,
vidqa.pruning.methods.adatp.frame_debiased_scores). Shares are over all (clip, question) pairs;
uniform is 12.5% per eighth.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
LAYERS = (1, 2, 5, 10, 20, 29)
EIGHTHS = 8
TOP = 0.10


def top_eighths(scores, top: float = TOP, parts: int = EIGHTHS) -> np.ndarray:
    """scores: (n,) -> counts (parts,) of the top ceil(top * n) tokens per 1/parts of the sequence."""
    import torch

    n = scores.shape[0]
    k = max(1, int(np.ceil(top * n)))
    chosen = torch.topk(scores, k).indices.cpu().numpy()
    return np.bincount(chosen * parts // n, minlength=parts)


def measure(model_dir: str, clips: int = 8, layers=LAYERS, seed: int | None = None, threads: int = 2) -> dict:
    import torch

    from microworld import world
    from microworld.smol import FRAMES
    from vidqa.models import load_model
    from vidqa.pruning.methods.adatp import frame_debiased_scores

    torch.set_num_threads(threads)
    adapter = load_model(model_dir, device="cpu", dtype="float32")
    model = adapter.model
    model.set_attn_implementation("eager")
    seed = world.HELDOUT_SEED if seed is None else seed
    raw = {l: np.zeros(EIGHTHS, int) for l in layers}
    debiased = {l: np.zeros(EIGHTHS, int) for l in layers}
    pairs = 0
    types = world.QUESTION_TYPES + world.EXTRA_QUESTION_TYPES
    for index in range(clips):
        clip = world.heldout_clip(index, seed, FRAMES, extras=True)
        timestamps = np.arange(FRAMES) / 4.0  # as decoded from the 4 fps held-out mp4
        for kind in types:
            prompt = adapter.build_prompt(clip.frames, timestamps, world.SMOL_QUESTIONS[kind], duration=FRAMES / 4.0)
            inputs = {k: v for k, v in prompt.inputs.items()}
            with torch.no_grad():
                out = model(**inputs, output_attentions=True, use_cache=False)
            visual = prompt.visual_index
            question = torch.arange(int(visual[-1]) + 1, inputs["input_ids"].shape[1])
            frame = torch.arange(len(visual)) // (len(visual) // FRAMES)
            for l in layers:
                attn = out.attentions[l][0]  # (heads, seq, seq)
                scores = attn[:, question][:, :, visual].float().mean(dim=(0, 1))  # (n_visual,)
                raw[l] += top_eighths(scores)
                debiased[l] += top_eighths(frame_debiased_scores(scores, frame))
            pairs += 1
    share = lambda counts: {l: (100.0 * c / c.sum()).round(1).tolist() for l, c in counts.items()}  # noqa: E731
    return {"clips": clips, "pairs": pairs, "layers": list(layers), "raw": share(raw), "debiased": share(debiased)}


def markdown(result: dict) -> str:
    head = "| layer | " + " | ".join(f"{i + 1}/8" for i in range(EIGHTHS)) + " |"
    rule = "|---|" + "---:|" * EIGHTHS
    lines = [f"Share (%) of the top-10% question->visual attention in each eighth of the visual sequence "
             f"({result['pairs']} (clip, question) pairs, {result['clips']} clips; uniform = 12.5%).", ""]
    for name in ("raw", "debiased"):
        lines += [f"**{name}**" + (" (AdaTP: score / mean score of its frame)" if name == "debiased" else ""), "",
                  head, rule]
        for l in result["layers"]:
            lines.append(f"| {l} | " + " | ".join(f"{v:.1f}" for v in result[name][l]) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/micro/attention_bias.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the assembled SmolLM2 model)")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--seed", type=int, default=None, help="held-out seed (default 1000)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    model = args.model
    if model is None:
        from microworld.assemble import assemble

        model = str(assemble())
    result = measure(model, args.clips, seed=args.seed, threads=args.threads)
    print(markdown(result))
    if args.json:
        import json

        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))
    sys.exit(main())
