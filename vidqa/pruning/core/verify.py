"""After every prefill, check that the LLM did what the preset planned.

Pruning rests on transformers internals: decoder-layer hooks and their keyword arguments, the
layout of the KV cache, how `generate` hands position ids and precomputed visual features to the
model. When one of those changes, nothing crashes: the hooks stop firing or their edits are
ignored, and the full model runs under a "pruned" label. `PrefillCheck` watches the prefill with
cheap hooks of its own and stops the request before the first token is streamed when:

- the LLM input is not what the pre-LLM stages left: its length, or the features at the rows
  planned for the visual tokens (they are scattered in by the model, not by vidqa);
- the position ids the LLM received are not the planned ones (Qwen's M-RoPE positions are the
  full prompt's, gathered at the kept rows; a model that recomputes them from the pruned ids
  silently falls back to other positions);
- an in-LLM stage did not run, or kept another number of tokens than its budget (stages whose
  budget depends on the clip, `unsolvable` for --keep, are exempt from the budget check);
- a decoder layer received another number of rows than the text rows plus the visual tokens
  planned for it, or rotary tables / position ids that are not layer 0's gathered at the rows it
  holds;
- after prefill, a layer's KV cache holds another number of entries than the rows that layer
  processed (with `prune_cache`, the layers before the stage hold only the surviving rows).
  Linear-attention layers (`layer_types` "linear_attention": Qwen3.5's Gated DeltaNet) cache a
  fixed-size recurrent state with no entry per row, so there is nothing to count: they are
  skipped, after checking that exactly the layers the config calls linear hold such a state
  (their rows were checked on the way in, as every layer's).
A stage inside the vision encoder is checked when the clip is encoded (pruning/core/encoder.py:
the frames entering every encoder layer against its plan); the record then lists `vision_encoder`.

Cost: a forward hook per decoder layer that reads shapes; tensors are compared only when a
layer receives a new rotary table (after a stage), plus one comparison of the visual rows of the
LLM input. Decode steps return at once.
"""

from __future__ import annotations

import torch

from vidqa.pruning.core.compat import PruningMismatch, cache_argument, transformers_version
from vidqa.pruning.core.decoder import DecoderPruning

try:  # the cache layers of linear-attention models (Qwen3.5)
    from transformers.cache_utils import CacheLayerMixin, LinearAttentionCacheLayerMixin
except ImportError:  # a release without them
    CacheLayerMixin = LinearAttentionCacheLayerMixin = None

CHECKS = ("llm_input", "visual_features", "positions", "stages", "layer_tokens", "kv_cache")
# checked before the prefill, when a preset acts inside the vision encoder (pruning/core/encoder.py)
ENCODER_CHECK = "vision_encoder"
ORDER = (ENCODER_CHECK, *CHECKS)


class PrefillCheck:
    """Context manager around one `generate` call: hooks that observe the prefill and raise
    `PruningMismatch` at its end, before any token is streamed.

    inputs: the engine's GenerationInputs; state: the RequestState (llm_tokens = the VisualTokens
    handed to the LLM, layer_counts / kept_rows recorded by DecoderPruning); pruning: what
    `pruner.inside_llm` returned (a DecoderPruning when the preset acts inside the LLM).
    """

    def __init__(self, adapter, inputs, state, pruning=None, preset: str = "none"):
        self.adapter, self.inputs, self.state, self.preset = adapter, inputs, state, preset
        self.stages = list(pruning.stages) if isinstance(pruning, DecoderPruning) else []
        self.budgets = dict(pruning.budgets) if self.stages else {}
        self.prune_cache = bool(self.stages) and pruning.prune_cache
        self.num_layers = len(adapter.decoder_layers)
        layer_types = getattr(adapter.text_config, "layer_types", None) or ()
        self.recurrent = {index for index, kind in enumerate(layer_types) if kind == "linear_attention"}
        self.visual_in = len(state.llm_tokens)  # visual tokens entering layer 0
        self.llm_rows = int(inputs.kwargs["input_ids"].shape[1])
        self.text_rows = self.llm_rows - self.visual_in  # rows no stage touches
        self.checked: list[str] = []
        self._calls = 0  # forwards of the language model (1 = the prefill)
        self._model_calls = 0
        self._handles: list = []
        self._layer_rows: dict[int, int] = {}
        self._layer0: dict = {}
        self._last_checked: dict[str, object] = {}
        if getattr(state, "encoder_frames", None):  # an in-encoder stage's frames were checked when encoding
            self._note(ENCODER_CHECK)

    # -- attach / detach -------------------------------------------------------------------
    def __enter__(self):
        language_model = self.adapter.language_model
        self._handles.append(self.adapter.model.register_forward_hook(self._after_model))
        self._handles.append(language_model.register_forward_pre_hook(self._before_llm, with_kwargs=True))
        self._handles.append(language_model.register_forward_hook(self._after_llm, with_kwargs=True))
        for index, layer in enumerate(self.adapter.decoder_layers):
            self._handles.append(layer.register_forward_hook(self._after_layer(index), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._layer0.clear()
        return False

    def finish(self) -> dict:
        """After `generate`: the `verified` record of --json."""
        self._require_observed()
        return {"transformers": transformers_version(), "checks": list(self.checked), "layers": len(self._layer_rows)}

    def _after_model(self, module, args, output):
        """End of the whole model's first forward (the prefill, before its token is streamed)."""
        if not self._model_calls:
            self._model_calls = 1
            self._require_observed()

    def _require_observed(self) -> None:
        if self._calls == 0 or "layer_tokens" not in self.checked:
            self._fail("the decoder modules vidqa hooks were not the ones the model ran")

    def _fail(self, what: str):
        raise PruningMismatch(what, self.preset)

    # -- the LLM input -----------------------------------------------------------------------
    def _before_llm(self, module, args, kwargs):
        self._calls += 1
        if self._calls != 1:
            return
        embeddings = DecoderPruning._layer0_input(module, args, kwargs)  # (1, n, hidden)
        rows = embeddings.shape[1]
        if rows != self.llm_rows:
            self._fail(f"the LLM received {rows} input rows, planned {self.llm_rows} after the pre-LLM stages")
        self._check_features(embeddings)
        planned = self.inputs.kwargs.get("position_ids")
        received = kwargs.get("position_ids")
        if planned is not None:
            if received is None or not torch.equal(received.to(planned.device), planned):
                self._fail("the LLM did not receive the planned position ids (it computed its own from the pruned prompt)")
            self._note("positions")
        self._note("llm_input")

    def _check_features(self, embeddings: torch.Tensor) -> None:
        """The visual rows of the LLM input hold the features the pre-LLM stages produced."""
        rows = self.inputs.visual_rows.to(embeddings.device)
        planned = self.state.llm_tokens.features.to(embeddings.device, embeddings.dtype)
        received = embeddings[0, rows]  # (v, hidden); the model scatters the cast features unchanged
        if received.shape != planned.shape or not (
                torch.equal(received, planned) or torch.allclose(received, planned, rtol=1e-3, atol=1e-5)):
            self._fail("the visual features were not inserted at the planned rows of the LLM input")
        self._note("visual_features")

    # -- every decoder layer -----------------------------------------------------------------
    def _after_layer(self, index: int):
        def hook(module, args, kwargs, output):
            if self._calls != 1:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            rows = hidden.shape[1]
            self._layer_rows[index] = rows
            planned = self.text_rows + self._planned_visual(index)
            if rows != planned:
                self._fail(
                    f"decoder layer {index} received {rows} rows, planned {planned} "
                    f"({self._planned_visual(index)} visual tokens)"
                )
            self._check_positions(index, kwargs, rows)

        return hook

    def _latest_stage(self, layer: int):
        """The last in-LLM stage acting at or before `layer` (None before the first)."""
        before = [bound for bound in self.stages if bound.layer <= layer]
        return before[-1] if before else None

    def _planned_visual(self, layer: int) -> int:
        """Visual tokens planned to enter `layer`: each stage's budget (its own decision for a
        stage whose budget depends on the clip); a stage that never ran is a failure."""
        count = self.visual_in
        for bound in self.stages:
            if bound.layer > layer:
                break
            decided = self.state.layer_counts.get(bound.layer)
            if decided is None:
                self._fail(f"the in-LLM stage at decoder layer {bound.layer} never ran (its hook did not fire)")
            budget = self.budgets.get(bound.layer)
            if bound.stage.unsolvable is None and budget is not None and decided != budget:
                self._fail(f"the in-LLM stage at decoder layer {bound.layer} kept {decided} visual tokens, planned {budget}")
            count = decided
        if self.stages:
            self._note("stages")
        return count

    def _check_positions(self, index: int, kwargs: dict, rows: int) -> None:
        """Rotary tables and position ids of this layer = layer 0's, gathered at the rows it holds."""
        position_embeddings = kwargs.get("position_embeddings")
        position_ids = kwargs.get("position_ids")
        if index == 0:
            self._layer0 = {"position_embeddings": position_embeddings, "position_ids": position_ids}
        stage = self._latest_stage(index)
        kept = None if stage is None else self.state.kept_rows.get(stage.layer)
        if position_embeddings is not None:
            for table, full in zip(position_embeddings, self._layer0["position_embeddings"] or ()):
                self._check_gathered("rotary tables", index, table, full, kept, rows)
        if position_ids is not None and self._layer0.get("position_ids") is not None:
            self._check_gathered("position ids", index, position_ids, self._layer0["position_ids"], kept, rows)

    def _check_gathered(self, what, index, tensor, full, kept, rows) -> None:
        dim = -2 if what == "rotary tables" else -1  # cos/sin: (1, n, head_dim); position ids: (..., n)
        if tensor.shape[dim] != rows:
            self._fail(f"decoder layer {index} received {what} for another number of rows than the {rows} it holds")
        if self._last_checked.get(what) is tensor:  # the same table as the previous layer: already compared
            return
        expected = full if kept is None else full.index_select(dim, kept.to(full.device))
        if not torch.equal(tensor, expected):
            self._fail(f"decoder layer {index} received {what} that are not the kept rows' original ones")
        self._last_checked[what] = tensor
        if self.stages:
            self._note("positions")

    # -- after the prefill: the KV cache -----------------------------------------------------
    def _after_llm(self, module, args, kwargs, output):
        if self._calls != 1:
            return
        missing = [index for index in range(self.num_layers) if index not in self._layer_rows]
        if missing:
            self._fail(f"decoder layers {missing[:3]}{'...' if len(missing) > 3 else ''} were not observed during the prefill")
        for bound in self.stages:
            if bound.layer not in self.state.layer_counts:
                self._fail(f"the in-LLM stage at decoder layer {bound.layer} never ran (its hook did not fire)")
        self._note("layer_tokens")
        cache = cache_argument(kwargs)
        if cache is None:
            cache = getattr(output, "past_key_values", None)
        self._check_cache(cache)
        self._layer0.clear()
        self._last_checked.clear()

    def _check_cache(self, cache) -> None:
        lengths = cache_lengths(cache, self.num_layers)
        if lengths is None:
            if self.stages:  # in-LLM pruning must be visible in the cache
                self._fail("the KV cache could not be read after the prefill")
            return
        first = self.stages[0].layer if self.stages else self.num_layers
        final_rows = self._layer_rows[self.num_layers - 1]
        for index, length in enumerate(lengths):
            if (length is None) != (index in self.recurrent):
                held = "a recurrent state" if length is None else f"{length} KV entries"
                kind = "linear" if index in self.recurrent else "full"
                self._fail(f"after the prefill decoder layer {index}'s cache holds {held}, but the config makes it a {kind}-attention layer")
            if length is None:  # linear attention: a fixed-size state, no entry per row to count
                continue
            planned = final_rows if self.prune_cache and index < first else self._layer_rows[index]
            if length != planned:
                self._fail(f"after the prefill decoder layer {index}'s KV cache holds {length} entries, planned {planned}")
        self._note("kv_cache")

    def _note(self, check: str) -> None:
        if check not in self.checked:
            self.checked.append(check)
            self.checked.sort(key=ORDER.index)


def cache_lengths(cache, num_layers: int) -> list[int | None] | None:
    """Entries held by each layer of a DynamicCache-like cache (None when it cannot be read); a
    linear-attention layer's entry is None: its cache is a recurrent state, not entries per row."""
    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) != num_layers:
        return None
    lengths = []
    for layer in layers:
        if _is_recurrent(layer):
            lengths.append(None)
            continue
        keys = getattr(layer, "keys", None)
        if not isinstance(keys, torch.Tensor) or keys.dim() < 2:
            return None
        lengths.append(int(keys.shape[-2]))
    return lengths


def _is_recurrent(layer) -> bool:
    """Whether a cache layer holds only a linear-attention state (conv + recurrent), no keys:
    transformers' own test (`Cache.is_linear`)."""
    if LinearAttentionCacheLayerMixin is None:
        return False
    return isinstance(layer, LinearAttentionCacheLayerMixin) and not isinstance(layer, CacheLayerMixin)
