"""Helpers several test files share (tests/ is on pytest's pythonpath: `from helpers import ...`).

Plain functions, no fixtures (those live in conftest.py): tokens on a synthetic grid, a blank
per-request state, running one stage, an in-LLM stage's layer context, reference fixtures, one
question through the engine.
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace

import torch

from vidqa.pruning.core.decoder import LayerContext
from vidqa.pruning.core.runtime import NO_PRUNING, RequestState
from vidqa.tensors.tokens import VisualTokens

QUESTION = "what happens in this video ?"

# the settings at which each preset must change nothing: (-P overrides, keep); a preset not listed
# runs at --keep 1 (`identity_settings`). The family tests ask every preset file at them.
IDENTITY_SETTINGS = {
    "none": ([], None),
    "prunevid": (["tau=1.01", "cluster_ratio=1", "ratio=1"], None),
    "adatp": (["tau_l=1.01"], 1.0),
    "evs": (["pruning_rate=0"], None),
    "vidcom2": (["ratio=1"], None),
    "dycoke": (["merge_ratio=0", "decode_keep=1"], None),
    "visionzip": (["ratio=1", "dominant_share=1"], None),  # all dominant: every token, in order
    "holitom": (["outer.ratio=1", "outer.tau=1.01", "inner.ratio=1"], None),
}


def identity_settings(preset: str) -> tuple[list[str], float | None]:
    """(-P overrides, keep) at which `preset` keeps every token (IDENTITY_SETTINGS)."""
    return IDENTITY_SETTINGS.get(preset, ([], 1.0))


def grid_tokens(features: torch.Tensor, attention: torch.Tensor | None = None, *, rows: int | None = None,
                text_before: int = 3) -> VisualTokens:
    """The full grid of a clip's visual tokens, frame-major then row-major, as the vision
    encoder hands them over.

    features: (T, P, C). rows: each frame is `rows` x P/rows cells (default: a square, sqrt(P)
    a side). attention: (T, P) attention each token receives in the vision encoder, stored as
    meta "vision_attention", or None. text_before: text tokens before the video, so the tokens'
    positions (seq_index) are text_before, text_before + 1, ...
    """
    frames, per_frame, _ = features.shape
    rows = int(per_frame**0.5) if rows is None else rows
    tokens = VisualTokens.from_grid(features.reshape(frames * per_frame, -1), (frames, rows, per_frame // rows),
                                    torch.arange(frames * per_frame) + text_before)
    if attention is not None:
        tokens.meta["vision_attention"] = attention.reshape(-1)
    return tokens


def request_state(adapter=None, prompt=None, clip=None, question: str = "", device=None) -> RequestState:
    """A fresh RequestState: blank (no model, prompt or clip) unless given; `device` defaults to
    the adapter's model's device, else the CPU."""
    if device is None:
        device = adapter.model.device if adapter is not None else torch.device("cpu")
    return RequestState(adapter=adapter, prompt=prompt, clip=clip, question=question, device=device)


def run_stage(stage, tokens: VisualTokens) -> tuple[VisualTokens, RequestState]:
    """(tokens out, the state it wrote its details to) of a pre-LLM stage run on `tokens`."""
    state = request_state()
    return stage.apply(tokens, state), state


def layer_context(hidden: torch.Tensor, visual_rows: torch.Tensor, attention, budget: int, *,
                  text_rows: torch.Tensor | None = None, meta: dict | None = None, state=None, layer: int = 1,
                  embeddings: torch.Tensor | None = None, ratio: float | None = None) -> LayerContext:
    """What the decoder hands an in-LLM stage at `layer`, without a model.

    hidden: (1, n, C) the states entering the layer (also the layer-0 input unless `embeddings`);
    every row is its own LLM-input row. visual_rows: (v,); text_rows: the rows after the video
    (default: none). attention: query rows (r,) -> (heads, r, n) attention at the layer before.
    budget / ratio: what the stage keeps (`LayerContext`). meta: the visual rows' tables (default
    none); state: a blank RequestState unless given.
    """
    n = hidden.shape[1]
    return LayerContext(
        layer=layer, hidden=hidden, visual_rows=visual_rows,
        text_rows=torch.zeros(0, dtype=torch.long) if text_rows is None else text_rows,
        visual_meta={} if meta is None else meta, embeddings=hidden if embeddings is None else embeddings,
        row_source=torch.arange(n), budget=budget, ratio=ratio,
        state=request_state() if state is None else state, _attention=attention,
    )


def fake_adapter(num_layers: int) -> SimpleNamespace:
    """Just enough of a model adapter for PresetPruner to plan layers: a text config `num_layers` deep."""
    return SimpleNamespace(text_config=SimpleNamespace(num_hidden_layers=num_layers))


def canonical(labels: torch.Tensor | list[int]) -> list[int]:
    """Labels renumbered by first appearance: equal for two labellings of the same partition."""
    seen: dict[int, int] = {}
    return [seen.setdefault(int(label), len(seen)) for label in labels]


def numbered_cases(path: Path) -> list[dict]:
    """The cases of a reference fixture saved flat as {"cases": N, "<i>.<key>": value}: one
    dict {key: value} per case i, in order."""
    data = torch.load(path)
    return [{key.split(".", 1)[1]: value for key, value in data.items() if key.startswith(f"{index}.")}
            for index in range(int(data["cases"]))]


def answer_clip(adapter, clip, pruner=NO_PRUNING, max_new_tokens: int = 6, question: str = QUESTION):
    """The engine's Answer to `question` about `clip` under `pruner` (greedy, `max_new_tokens`)."""
    from vidqa.engine import request as engine  # here: the tensor-only helpers need no model stack

    return engine.answer(adapter, clip, question, engine.GenerationOptions(max_new_tokens=max_new_tokens), pruner=pruner)


def eager_attention_calls(module_path: str, monkeypatch) -> list:
    """Record (test-only) every call of a transformers modeling module's eager attention: the
    list fills with (attention module, weights) per call while the patch holds."""
    import importlib

    module = importlib.import_module(module_path)
    recorded = []
    original = module.eager_attention_forward

    def recording(attention, *args, **kwargs):
        output, weights = original(attention, *args, **kwargs)
        recorded.append((attention, weights))
        return output, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    return recorded


def tower_block_attention(recorded: list, block) -> list[torch.Tensor]:
    """Per recorded call of the vision block's attention `block`: the attention each key received,
    averaged over heads and queries (the probes' convention)."""
    return [weights[0].mean(dim=(0, 1)) for module, weights in recorded if module is block]


def recomputed_and_eager_rows(adapter, eager, inputs, state, visual_meta: dict, budget: int):
    """(recomputed, reference): the attention an in-LLM stage at layer 2 reads for four rows of
    its context (first, 7th, middle, last), and eager attention's at layer 1 for the same rows,
    each (heads, rows, keys). `eager` is the same checkpoint loaded with attn="eager"."""
    from vidqa.pruning.core.decoder import DecoderPruning, Selection

    seen = {}

    class Probe:
        layer = 2

        def select(self, context):
            rows = torch.tensor([0, 7, len(context.hidden[0]) // 2, len(context.hidden[0]) - 1])
            seen["rows"], seen["probs"] = rows, context.attention(rows)
            return Selection(keep=torch.arange(len(context.visual_rows)))

    with torch.no_grad(), DecoderPruning(adapter, [Probe()], {2: budget}, inputs, visual_meta, state):
        adapter.model(**inputs.kwargs)
    with torch.no_grad():
        reference = eager.model(**inputs.kwargs, output_attentions=True).attentions[1][0]  # layer K-1 = 1
    return seen["probs"], reference[:, seen["rows"]].float()


def default_sigint() -> None:
    """The child's SIGINT back to its default action before exec: a test runner started in the
    background (`cmd &` in a script) ignores SIGINT, children inherit that, and Python then never
    installs its Ctrl-C handler, so the signal under test would be dropped before vidqa sees it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
