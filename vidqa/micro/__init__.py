"""The micro video LLM: a synthetic world (world), the model (model) and its training (train).

The trained checkpoint ships inside the package (checkpoint/, 2.6 MB) and loads as `--model micro`.
"""

from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"
FRAMES = 8  # the clip length it was trained on (world.NUM_FRAMES)
