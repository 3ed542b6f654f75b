"""Can the dense model's vision tower see the light? A linear probe on its light-cell tokens.

    python benchmarks/micro/light_probe.py --weights W.safetensors [--light-side 14] [--clips 40]

Counting the blinks needs the token at the light's cell to differ between frames where the light
is on and frames where it is off. This draws held-out-style dense clips (their own seed, never
trained on), runs the weights' SigLIP and connector on every frame, takes the token of the cell
holding the light's centre, and fits a logistic regression (on / off) on the first half of the
clips, scored on the second half. Two readings:
- raw: the token as it is (the light's state among everything else the token carries);
- clip-centred: minus the clip's median light-cell token (most frames are off), i.e. can a frame
  be told from the clip's other frames, which is what counting across a clip needs.
Either is compared with answering "off" every time (the share of off frames). `--light-side`
redraws the clips with another light size (the world's is dense.LIGHT_SIDE).
Prints one line per reading; CPU, one thread, about a minute for 40 clips at 16 x 36.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from microworld import dense  # noqa: E402

PROBE_SEED = 4242  # not the held-out seed, not a training stream


def light_cell_tokens(weights: Path, size: dense.DenseSize, clips: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (tokens (clips, frames, hidden), on (clips, frames) bool) at each clip's light cell."""
    from microworld.chat import conversation
    from microworld.train_smol import encode, trainable_model

    model, _, processor, _, _ = trainable_model(0, weights, image_size=size.size, lora_mlp=None)
    model.eval()
    prompt = processor.apply_chat_template(conversation([("hello", None)]), add_generation_prompt=True)
    tokens, on = [], []
    with torch.no_grad():
        for clip in dense.heldout_clips(clips, size, seed):
            pixels = encode(processor, [prompt], [clip.frames])["pixel_values"]
            features = model.model.get_image_features(pixel_values=pixels)
            features = getattr(features, "pooler_output", features)
            if isinstance(features, (list, tuple)):  # one tensor per image in some releases
                features = torch.cat(list(features))
            features = features.reshape(size.frames, size.tokens_per_frame, -1)
            x0, y0, x1, y1 = clip.light_box
            cell = (y0 + y1) // 2 // dense.CELL * size.grid + (x0 + x1) // 2 // dense.CELL
            tokens.append(features[:, cell].float().numpy())
            on.append([t in clip.blink_frames for t in range(size.frames)])
    return np.stack(tokens), np.array(on)


def probe_accuracy(features: np.ndarray, labels: np.ndarray, l2: float = 1e-2) -> float:
    """Logistic regression fitted on the first half of the rows, accuracy on the second half."""
    x = torch.tensor(features, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.float32)
    half = len(x) // 2
    mean, std = x[:half].mean(0), x[:half].std(0) + 1e-6
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=200)

    def loss():
        optimizer.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(x[:half] @ w + b, y[:half]) + l2 * (w * w).sum()
        value.backward()
        return value

    optimizer.step(loss)
    with torch.no_grad():
        return float((((x[half:] @ w + b) > 0).float() == y[half:]).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, type=Path, help="train_dense (or train_smol) weights.safetensors")
    parser.add_argument("--frames", type=int, default=dense.REDUCED.frames)
    parser.add_argument("--grid", type=int, default=dense.REDUCED.grid)
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--seed", type=int, default=PROBE_SEED)
    parser.add_argument("--light-side", type=int, default=None, help=f"px (default: the world's, {dense.LIGHT_SIDE})")
    args = parser.parse_args(argv)
    if not args.weights.is_file():
        parser.error(f"--weights {args.weights}: no such file")
    if args.light_side is not None:
        if not 2 <= args.light_side <= dense.CELL:
            parser.error(f"--light-side {args.light_side}: give 2..{dense.CELL} px")
        dense.LIGHT_SIDE = args.light_side
    torch.set_num_threads(1)
    size = dense.DenseSize(args.frames, args.grid)
    tokens, on = light_cell_tokens(args.weights, size, args.clips, args.seed)
    labels = on.reshape(-1)
    centred = tokens - np.median(tokens, axis=1, keepdims=True)
    off_share = 1 - labels[len(labels) // 2 :].mean()
    print(f"{args.weights} light {dense.LIGHT_SIDE} px, {args.clips} clips x {size.frames} frames "
          f"({labels.mean():.2f} of frames on); answering 'off' every time: {off_share:.3f}")
    print(f"raw token:          on/off probe accuracy {probe_accuracy(tokens.reshape(len(labels), -1), labels):.3f}")
    print(f"clip-centred token: on/off probe accuracy {probe_accuracy(centred.reshape(len(labels), -1), labels):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
