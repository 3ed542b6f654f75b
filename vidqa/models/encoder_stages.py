"""Stages inside the vision encoder: hooks that let a pruning stage merge or drop whole frames
after encoder layer k, so the remaining layers, the projector and the LLM see fewer frames.

CONTRACT (what a pruner hands to `ModelAdapter.encode_video_inside`; duck-typed, since models/
does not import pruning/):
    plan.layers(depth) -> list[int]: the encoder layers (0-based, sorted, < depth) after which
        the plan runs; depth = the layers whose output can reach the projector;
    plan.carries_attention -> bool: whether the attention RECEIVED in the plan's last layer
        (mean over heads and queries, per patch) is wanted out of the encoder, merged with the
        frames from then on, as (frames, patches) float32;
    plan.after_layer(hidden, layer) -> FrameMerge | None: hidden (frames, patches, dim) is that
        layer's output; None leaves the frames as they are.

The unit is a whole frame (one attention block of a per-frame encoder: SigLIP in LLaVA-OneVision
and SmolVLM2): pooling and pixel shuffle after the encoder need a frame's whole patch grid, so a
frame is kept, dropped or mixed with others as a whole.

How: a forward hook on each plan layer applies the merge to the layer's output (the next layer
then receives fewer frames); forward pre-hooks on every layer count the frames entering it (the
trace the pruner checks against its plan) and, where an encoder hands every layer a per-frame
attention mask, keep only the rows of the frames still there. The attention is recomputed from
the captured input of the layer's attention module (`VisionProbe`), SDPA kept. Nothing is forked
or patched, and every hook is removed on exit, even after an error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vidqa.models.vision_attention import VisionProbe
from vidqa.tensors.frames import EncoderTrace, FrameTrack


def _hidden_of(output):
    return output if isinstance(output, Tensor) else output[0]


def _with_hidden(output, hidden: Tensor):
    if isinstance(output, Tensor):
        return hidden
    return (hidden, *output[1:])


class FrameStageRun:
    """Context manager around one encoder forward of `num_frames` frames.

    layers: the encoder's layer list; depth: how many first layers feed the projector (the plan's
    layers are resolved against it); feature_layer: a layer whose (merged) output to keep as
    `features`, or None when the encoder's own output is read; read: `read(module, args, kwargs)
    -> (received (frames, patches), keys)` for a layer's `self_attn` (vision_attention.py).
    After the forward: `features`, `track` (FrameTrack), `received` (frames, patches) float32
    or None, and `trace()`.
    """

    def __init__(self, layers: torch.nn.ModuleList, plan, num_frames: int, depth: int,
                 feature_layer: int | None = None, read: Callable | None = None):
        self.layers, self.plan, self.num_frames = layers, plan, num_frames
        self.depth, self.feature_layer, self.read = depth, feature_layer, read
        self.features: Tensor | None = None
        self.received: Tensor | None = None
        self.track: FrameTrack | None = None
        self._entering: dict[int, int] = {}
        self._fired: list[int] = []
        self._handles: list = []
        self._probe: VisionProbe | None = None

    def __enter__(self) -> FrameStageRun:
        self.plan_layers = [int(layer) for layer in self.plan.layers(self.depth)]
        self.attention_layer = self.plan_layers[-1] if self.plan.carries_attention and self.plan_layers else None
        self.track = FrameTrack.start(self.num_frames)
        try:
            for index, layer in enumerate(self.layers):
                self._handles.append(layer.register_forward_pre_hook(self._entering_hook(index), with_kwargs=True))
            hooked = set(self.plan_layers) | ({self.feature_layer} if self.feature_layer is not None else set())
            for index in sorted(hooked):
                self._handles.append(self.layers[index].register_forward_hook(self._after_hook(index)))
            if self.attention_layer is not None:
                self._probe = VisionProbe(self.layers[self.attention_layer].self_attn, self.attention_layer,
                                          self.read, lambda received, keys: (received, keys)).__enter__()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._probe is not None:
            self._probe.__exit__(None, None, None)
            self._probe.calls.clear()

    def trace(self, frames_out: int) -> EncoderTrace:
        """The frames entering each layer as observed (-1: the layer never ran), then `frames_out`."""
        entering = [self._entering.get(index, -1) for index in range(len(self.layers))]
        return EncoderTrace(frames_per_layer=entering + [int(frames_out)], fired=list(self._fired))

    # -- hooks --------------------------------------------------------------------------------
    def _entering_hook(self, index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self._entering.setdefault(index, int(hidden.shape[0]))
            if hidden.shape[0] == self.num_frames:
                return None
            # a per-frame mask (batch-first) made for the unmerged batch: its rows of the frames left
            frames = self.track.representative
            if len(args) > 1 and isinstance(args[1], Tensor) and args[1].shape[0] == self.num_frames:
                return (args[0], args[1].index_select(0, frames.to(args[1].device)), *args[2:]), kwargs
            mask = kwargs.get("attention_mask")
            if isinstance(mask, Tensor) and mask.shape[0] == self.num_frames:
                return args, {**kwargs, "attention_mask": mask.index_select(0, frames.to(mask.device))}
            return None

        return hook

    def _after_hook(self, index: int):
        def hook(module, args, output):
            hidden = _hidden_of(output)
            changed = False
            if index == self.attention_layer:
                self.received = self._probe.result().patch_received.float()  # (frames, patches)
            if index in self.plan_layers:
                self._fired.append(index)
                merge = self.plan.after_layer(hidden, index)
                if merge is not None:
                    hidden, changed = merge.apply(hidden), True
                    if self.received is not None:
                        self.received = merge.apply(self.received)
                    self.track = self.track.after(merge)
            if index == self.feature_layer:
                self.features = hidden
            return _with_hidden(output, hidden) if changed else None

        return hook
