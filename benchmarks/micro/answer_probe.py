"""Does the answer reach the answer position? A linear probe on the dense model's hidden states.

    python benchmarks/micro/answer_probe.py --weights W.safetensors --type blinks [--clips 240] \
        [--layers 12,20,30] [--frames 16] [--grid 6]

For one question type this draws dense clips of their own seed (never trained on, not the held-out
set), asks the question, and takes the hidden state of the last prompt token (where the answer's
first token is predicted) after the given decoder layers. A logistic regression on the first half
of the clips, scored on the second, says whether the answer is linearly readable there. A type
the model answers (the ball) reads at 1.00 after the last layer; one it does not (the blinks)
tells whether the evidence arrives and is misread (readable) or never arrives (chance).
Prints the share of the most common answer and one line per layer; CPU, 2 threads, about 3 min
for 240 clips at 16 x 36. Needs scikit-learn (the [bench] extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from microworld import dense  # noqa: E402

PROBE_SEED = 777  # not the held-out seed, not a training stream, not light_probe's


def held_out_accuracy(features: np.ndarray, labels: np.ndarray, strength: float = 0.01) -> float:
    """Fit a standardised logistic regression on the first half of the rows, score the second."""
    from sklearn.linear_model import LogisticRegression

    half = len(labels) // 2
    mean, spread = features[:half].mean(0), features[:half].std(0) + 1e-6
    scaled = (features - mean) / spread
    model = LogisticRegression(C=strength, max_iter=2000).fit(scaled[:half], labels[:half])
    return float(model.score(scaled[half:], labels[half:]))


def answer_states(weights: Path, kind: str, size: dense.DenseSize, clips: int, layers: list[int]):
    """-> ({layer: (clips, hidden)}, answer index (clips,)) at the last prompt token."""
    import torch

    from microworld.chat import conversation
    from microworld.train_smol import encode, trainable_model

    model, _, processor, _, _ = trainable_model(0, weights, image_size=size.size, lora_mlp=None)
    model.eval()
    prompt = processor.apply_chat_template(conversation([(dense.DENSE_QUESTIONS[kind], None)]),
                                           add_generation_prompt=True)
    drawn = [dense.make_clip(np.random.default_rng([PROBE_SEED, i]), size) for i in range(clips)]
    states: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    with torch.no_grad():
        for start in range(0, clips, 4):
            batch = drawn[start:start + 4]
            inputs = encode(processor, [prompt] * len(batch), [clip.frames for clip in batch])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                  pixel_values=inputs["pixel_values"], use_cache=False, output_hidden_states=True)
            for layer in layers:
                states[layer].append(out.hidden_states[layer][:, -1].float().numpy())
    answers = np.array([dense.DENSE_ANSWERS[kind].index(clip.answers[kind]) for clip in drawn])
    return {layer: np.concatenate(parts) for layer, parts in states.items()}, answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, type=Path)
    parser.add_argument("--type", required=True, choices=dense.DENSE_QUESTION_TYPES)
    parser.add_argument("--clips", type=int, default=240)
    parser.add_argument("--layers", default="12,20,30", help="decoder layers (0: the embeddings, 30: the last)")
    parser.add_argument("--frames", type=int, default=dense.REDUCED.frames)
    parser.add_argument("--grid", type=int, default=dense.REDUCED.grid)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    layers = [int(part) for part in args.layers.split(",")]
    states, answers = answer_states(args.weights, args.type, dense.DenseSize(args.frames, args.grid), args.clips, layers)
    second = answers[len(answers) // 2:]
    print(f"{args.type}: {args.clips} clips; the most common answer is {np.bincount(second).max() / len(second):.2f} "
          "of the scored half")
    for layer in layers:
        print(f"after layer {layer}: held-out {held_out_accuracy(states[layer], answers):.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
