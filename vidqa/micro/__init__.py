"""The bundled micro video LLM (`--model micro`): its trained checkpoint ships inside the package.

Its world and training live outside the installed package, in the repository's microworld/.
"""

from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"
FRAMES = 8  # the clip length it was trained on (microworld.world.NUM_FRAMES)
