"""Dropping visual tokens inside the decoder during prefill, with hooks that are always removed.

How it works (docs/design.md, "Inside the decoder"), for a stage acting at layer K:
- a forward pre-hook on layer K-1's attention keeps its normed input and rotary tables, so the
  stage can recompute the attention rows it needs (pruning/core/attention.py) from the post-RoPE keys
  the layer just wrote to the KV cache;
- a forward pre-hook on layer K runs the stage and slices the hidden states; pre-hooks on every
  layer >= K swap in the matching rows of (cos, sin), position ids and any 4-D mask, because the
  decoder computes those once for the full sequence and hands the same tensors to every layer.
Kept tokens keep their ORIGINAL positions: their keys in layers < K already carry that RoPE
phase. After prefill, layers < K hold N cache entries and layers >= K fewer; `generate` and
DynamicCache work unchanged (decode positions come from generate's own position_ids). Batch 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.profiler import record_function

from vidqa.pruning.core.attention import attention_rows, project_keys
from vidqa.pruning.core.compat import DecoderMismatch, cache_argument
from vidqa.pruning.core.deepstack import DeepStackRows
from vidqa.pruning.core.runtime import STAGE_RANGE, stage_threads
from vidqa.tensors.device import synchronize


@dataclass
class Selection:
    """What an in-LLM stage decided at its layer.

    keep: (k,) sorted indices into the current visual rows that survive.
    inserted: (m, hidden) new rows placed right after the kept visual rows (e.g. recycled
        merges), or None; inserted_from: (m,) indices into the current visual rows whose position
        (and grid coordinates) each inserted row takes.
    inserted_members: (v,) long or None, for token provenance: the inserted row each current
        visual row was merged into, -1 for none (recorded with `RequestState.record_merge`).
    """

    keep: torch.Tensor
    inserted: torch.Tensor | None = None
    inserted_from: torch.Tensor | None = None
    inserted_members: torch.Tensor | None = None
    kept_hidden: torch.Tensor | None = None  # (k, hidden) new states of the kept rows (HoliTom's merge)


@dataclass
class LayerContext:
    """What an in-LLM stage sees at layer K during prefill (batch size 1)."""

    layer: int
    hidden: torch.Tensor  # (1, n, hidden) entering layer K
    visual_rows: torch.Tensor  # (v,) rows of the prunable visual tokens, in sequence order
    text_rows: torch.Tensor  # rows after the last visual row: question + chat template
    visual_meta: dict[str, torch.Tensor]  # frame, row, col, ... each (v,)
    embeddings: torch.Tensor  # (1, n0, hidden) the layer-0 input (SparseVLM raters), original rows
    row_source: torch.Tensor  # (n,) each current row's index in the LLM input sequence
    budget: int  # visual tokens this stage should leave (including any it inserts)
    state: Any
    # the ratio `budget` was planned from (the stage's own, or the one --keep/--flops solved;
    # `InsideLLM.kept_at_ratio`), set by the pruner's BoundStage; None for a stage called bare
    # (tests' probes), which then runs at its own ratio
    ratio: float | None = None
    _attention: Any = None

    def attention(self, query_rows: torch.Tensor) -> torch.Tensor:
        """(heads, r, n) attention probabilities of `query_rows` at layer K-1 (recomputed)."""
        return self._attention(query_rows)

    def last_row(self) -> torch.Tensor:
        """(1,) long: the last prompt row. Made as an integer tensor, never from `hidden`: in
        bf16 a row number above 256 rounds (6294 -> 6304), an index past the end on a GPU."""
        return torch.tensor([self.hidden.shape[1] - 1], device=self.hidden.device)


@dataclass
class Prefill:
    """Bookkeeping for the rows of the current (shrinking) sequence during one prefill."""

    row_source: torch.Tensor  # (n,) index into the LLM input of each current row
    is_visual: torch.Tensor  # (n,) bool
    visual_meta: dict[str, torch.Tensor]  # aligned with the visual rows, in order
    full_position_embeddings: tuple | None = None
    full_position_ids: torch.Tensor | None = None
    position_embeddings: tuple | None = None
    position_ids: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    attention_inputs: dict[int, tuple] = field(default_factory=dict)
    deepstack: DeepStackRows = field(default_factory=DeepStackRows)  # Qwen3-VL only (pruning/core/deepstack.py)

    def follow(self, device: torch.device) -> None:
        """Move the per-row tables to `device`: on a model sharded over devices (accelerate's
        device_map) the hidden states reach a stage on the device of the layer before it."""
        if self.row_source.device == device:
            return
        self.row_source, self.is_visual = self.row_source.to(device), self.is_visual.to(device)
        self.visual_meta = {name: values.to(device) for name, values in self.visual_meta.items()}
        if self.embeddings is not None:
            self.embeddings = self.embeddings.to(device)
        for name in ("full_position_embeddings", "position_embeddings"):
            table = getattr(self, name)
            if table is not None:
                setattr(self, name, tuple(part.to(device) for part in table))
        for name in ("full_position_ids", "position_ids"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))


class DecoderPruning:
    """Context manager: attach in-LLM stages to a model for one `generate` call.

    stages: objects with an absolute decoder `layer` and `select(LayerContext) -> Selection`
    (the pruner's BoundStage); budgets: layer -> visual tokens its stage leaves (`context.budget`).
    """

    def __init__(self, adapter, stages, budgets: dict[int, int], inputs, visual_meta, state, prune_cache=False,
                 names: dict[int, str] | None = None):
        self.adapter, self.stages, self.budgets, self.state = adapter, sorted(stages, key=lambda s: s.layer), budgets, state
        self.names = names or {}  # layer -> the preset's stage name (profiler ranges)
        self.inputs, self.prune_cache = inputs, prune_cache
        self.visual_meta = visual_meta
        self._handles: list = []
        self._forward_calls = 0

    # -- attach / detach -------------------------------------------------------------------
    def __enter__(self):
        if not self.stages:
            return self
        layers = self.adapter.decoder_layers
        first = self.stages[0].layer
        if not 1 <= first < len(layers):
            raise ValueError(f"pruning layer {first} is outside 1..{len(layers) - 1}")
        language_model = self.adapter.language_model
        self._handles.append(language_model.register_forward_pre_hook(self._count_forward, with_kwargs=True))
        self._handles.append(language_model.register_forward_hook(self._after_forward, with_kwargs=True))
        for stage in self.stages:
            attention = layers[stage.layer - 1].self_attn
            handle = attention.register_forward_pre_hook(self._capture(stage.layer - 1), with_kwargs=True)
            self._handles.append(handle)
        for index in range(first, len(layers)):
            handle = layers[index].register_forward_pre_hook(self._before_layer(index), with_kwargs=True)
            self._handles.append(handle)
        for index in range(self.adapter.deepstack_layers):  # Qwen3-VL's DeepStack
            self._handles.append(layers[index].register_forward_hook(self._add_deepstack(index)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False

    # -- hooks -----------------------------------------------------------------------------
    def _count_forward(self, module, args, kwargs):
        self._forward_calls += 1
        if self._forward_calls == 1:
            rows = self.inputs.kwargs["input_ids"].shape[1]
            is_visual = torch.zeros(rows, dtype=torch.bool)
            is_visual[self.inputs.visual_rows] = True
            # the meta follows the tokens handed to the LLM; the stages see the rows in sequence order
            in_sequence = torch.argsort(self.inputs.visual_rows)
            device = self.adapter.model.device
            self._prefill = Prefill(
                row_source=torch.arange(rows, device=device),
                is_visual=is_visual.to(device),
                visual_meta={name: values[in_sequence.to(values.device)].to(device)
                             for name, values in self.visual_meta.items()},
                embeddings=self._layer0_input(module, args, kwargs),
            )
            if self._prefill.deepstack.take(kwargs, self.inputs.visual_rows):  # added by _add_deepstack instead
                return args, kwargs
        return None

    @staticmethod
    def _layer0_input(language_model, args, kwargs) -> torch.Tensor:
        """(1, n, hidden) what layer 0 receives: VLMs embed the ids and scatter the visual
        features themselves and pass inputs_embeds; a bare LM given ids embeds them here."""
        embeddings = kwargs.get("inputs_embeds")
        if embeddings is None:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            embeddings = language_model.get_input_embeddings()(input_ids)
        return embeddings

    def _capture(self, layer_index: int):
        def hook(module, args, kwargs):
            if self._forward_calls == 1:
                hidden = args[0] if args else kwargs["hidden_states"]
                self._prefill.attention_inputs[layer_index] = (
                    hidden, _position_embeddings(kwargs, layer_index), cache_argument(kwargs))
        return hook

    def _before_layer(self, layer_index: int):
        stage = next((s for s in self.stages if s.layer == layer_index), None)

        def hook(module, args, kwargs):
            if self._forward_calls != 1:
                return self._decode_mask(layer_index, args, kwargs)
            prefill = self._prefill
            if prefill.full_position_embeddings is None:
                prefill.full_position_embeddings = _position_embeddings(kwargs, layer_index)
                prefill.full_position_ids = kwargs.get("position_ids")
                prefill.position_embeddings = prefill.full_position_embeddings
                prefill.position_ids = kwargs.get("position_ids")
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if stage is not None:
                hidden = self._run_stage(stage, hidden)
            kwargs["position_embeddings"] = prefill.position_embeddings
            if "position_ids" in kwargs:
                kwargs["position_ids"] = prefill.position_ids
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.shape[-1] != hidden.shape[1]:
                kwargs["attention_mask"] = _causal_like(mask, hidden.shape[1])
            return (hidden, *args[1:]), kwargs

        return hook

    def _decode_mask(self, layer_index, args, kwargs):
        """Decode step: a 4-D mask built for layer 0's cache length must match this layer's."""
        mask = kwargs.get("attention_mask")
        cache = cache_argument(kwargs)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or not hasattr(cache, "layers"):
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        length = cache.layers[layer_index].get_seq_length() + hidden.shape[1]
        if mask.shape[-1] != length:
            kwargs["attention_mask"] = mask[..., -length:]
            return args, kwargs
        return None

    def _after_forward(self, module, args, kwargs, output):
        if self._forward_calls == 1 and self.prune_cache:
            self._slice_early_caches(cache_argument(kwargs))
        if self._forward_calls == 1:
            self._prefill.attention_inputs.clear()  # drop references to activations
            self._prefill.embeddings = None

    # -- the work --------------------------------------------------------------------------
    def _run_stage(self, stage, hidden: torch.Tensor) -> torch.Tensor:
        prefill, device = self._prefill, hidden.device
        synchronize(device)
        started = time.perf_counter()
        with record_function(STAGE_RANGE + self.names.get(stage.layer, f"layer {stage.layer}")):
            hidden = self._select_rows(stage, hidden, prefill, device)
        synchronize(device)
        self.state.in_llm_seconds += time.perf_counter() - started
        return hidden

    def _select_rows(self, stage, hidden, prefill, device):
        """One stage at its layer: its context, its selection, the hidden states it leaves."""
        prefill.follow(device)
        visual_rows = prefill.is_visual.nonzero().flatten()
        # text rows are never pruned and nothing is inserted after them: always the last rows
        # (an arange, not a nonzero, which would sync with the device)
        num_text = self.inputs.kwargs["input_ids"].shape[1] - self.inputs.text_start
        text_rows = torch.arange(hidden.shape[1] - num_text, hidden.shape[1], device=prefill.row_source.device)
        context = LayerContext(
            layer=stage.layer, hidden=hidden, visual_rows=visual_rows, text_rows=text_rows,
            visual_meta=prefill.visual_meta, embeddings=prefill.embeddings, row_source=prefill.row_source,
            budget=self.budgets[stage.layer], state=self.state,
            _attention=lambda rows: self._attention_rows(stage.layer - 1, rows),
        )
        with stage_threads(device):  # small ops: one thread, no barrier stalls on a busy CPU
            selection = stage.select(context)
            self._record_merges(stage.layer, selection, visual_rows)
            hidden = self._apply(selection, hidden, visual_rows)
        self.state.record_layer(stage.layer, int(prefill.is_visual.sum()), rows=prefill.row_source)
        return hidden

    def _attention_rows(self, layer_index: int, query_rows: torch.Tensor) -> torch.Tensor:
        normed, position_embeddings, cache = self._prefill.attention_inputs[layer_index]
        attention = self.adapter.decoder_layers[layer_index].self_attn
        keys = None
        if cache is not None and len(cache.layers) > layer_index:
            keys = cache.layers[layer_index].keys
        if keys is None or keys.shape[2] != normed.shape[1]:
            keys = project_keys(attention, normed, position_embeddings, self.adapter.apply_rotary)
        return attention_rows(attention, normed, position_embeddings, keys, query_rows, self.adapter.apply_rotary)

    def _record_merges(self, layer: int, selection: Selection, visual_rows: torch.Tensor) -> None:
        """Provenance: which LLM-input rows went into which inserted row (its source row)."""
        if selection.inserted_members is None or selection.inserted_from is None:
            return
        members = selection.inserted_members.to(visual_rows.device)
        joined = (members >= 0).nonzero().flatten()
        sources = self._prefill.row_source[visual_rows]  # (v,) LLM-input row of each visual row
        into = sources[selection.inserted_from.to(visual_rows.device)[members[joined]]]
        self.state.record_merge(layer, sources[joined].cpu(), into.cpu())

    def _apply(self, selection: Selection, hidden: torch.Tensor, visual_rows: torch.Tensor) -> torch.Tensor:
        """Slice the hidden states and every per-row table to the kept (and inserted) rows."""
        prefill, device = self._prefill, hidden.device
        if selection.kept_hidden is not None:
            hidden = hidden.clone()
            hidden[0, visual_rows[selection.keep.to(device)]] = selection.kept_hidden.to(hidden)
        keep_rows = torch.ones(hidden.shape[1], dtype=torch.bool, device=device)
        keep_rows[visual_rows] = False
        kept_visual_rows = visual_rows[selection.keep.to(device)]
        keep_rows[kept_visual_rows] = True
        order = keep_rows.nonzero().flatten()  # current rows that survive, in order
        meta = {name: values[selection.keep.to(device)] for name, values in prefill.visual_meta.items()}
        row_source = prefill.row_source[order]
        is_visual = prefill.is_visual[order]
        new_hidden = hidden[:, order]
        if selection.inserted is not None and len(selection.inserted):
            # insert after the last kept visual row
            at = int((order <= (kept_visual_rows.max() if len(kept_visual_rows) else visual_rows.min() - 1)).sum())
            sources = prefill.row_source[visual_rows[selection.inserted_from.to(device)]]
            new_hidden = torch.cat([new_hidden[:, :at], selection.inserted[None].to(hidden), new_hidden[:, at:]], dim=1)
            row_source = torch.cat([row_source[:at], sources, row_source[at:]])
            is_visual = torch.cat([is_visual[:at], torch.ones(len(sources), dtype=torch.bool, device=device), is_visual[at:]])
            meta = {name: torch.cat([meta[name], values[selection.inserted_from.to(device)]])
                    for name, values in prefill.visual_meta.items()}
        prefill.row_source, prefill.is_visual, prefill.visual_meta = row_source, is_visual, meta
        inserted = selection.inserted is not None and len(selection.inserted)
        prefill.deepstack.follow(selection.keep.to(device), selection.inserted_from if inserted else None)
        cos, sin = prefill.full_position_embeddings
        prefill.position_embeddings = (cos[:, row_source], sin[:, row_source])
        if prefill.full_position_ids is not None:
            prefill.position_ids = prefill.full_position_ids[..., row_source]
        return new_hidden

    def _add_deepstack(self, layer_index: int):
        """Forward hook on a DeepStack layer: its feature added to the visual rows still present."""
        def hook(module, args, output):
            if self._forward_calls != 1:
                return None
            return self._prefill.deepstack.add(layer_index, output, self._prefill.is_visual.nonzero().flatten())
        return hook

    def _slice_early_caches(self, cache) -> None:
        """PruneVid's option: layers before the (single) stage keep only the surviving rows."""
        if not hasattr(cache, "layers"):
            return  # an unknown cache layout: the prefill check reports it
        rows = self._prefill.row_source
        for layer_index in range(self.stages[0].layer):
            layer = cache.layers[layer_index]
            layer_rows = rows.to(layer.keys.device)  # a sharded model keeps each layer's cache on its device
            layer.keys = layer.keys[:, :, layer_rows]
            layer.values = layer.values[:, :, layer_rows]


def _position_embeddings(kwargs: dict, layer_index: int) -> tuple:
    """The (cos, sin) the decoder hands every layer; the hooks cannot work without them."""
    tables = kwargs.get("position_embeddings")
    if not isinstance(tables, (tuple, list)) or len(tables) != 2:
        raise DecoderMismatch(f"decoder layer {layer_index} was called without the (cos, sin) 'position_embeddings' the hooks slice")
    return tables


def _causal_like(mask: torch.Tensor, length: int) -> torch.Tensor:
    """A causal (1, 1, length, length) mask of the same kind (bool or additive float) as `mask`."""
    allowed = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return allowed[None, None]
    blocked = torch.finfo(mask.dtype).min
    return torch.zeros(length, length, dtype=mask.dtype, device=mask.device).masked_fill(~allowed, blocked)[None, None]
