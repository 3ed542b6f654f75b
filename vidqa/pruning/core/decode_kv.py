"""Decode-time KV selection (DyCoke's dynamic KV-cache pruning), with hooks that are always removed.

At every decoding step (every forward after the prefill, one new token):
- a forward hook on layer L-1's attention recomputes the new token's attention over that
  layer's cached keys (q from the layer's own projections, post-RoPE keys from the cache, as
  pruning/core/attention.py does), averages it over heads and keeps the top `keep` visual entries;
- a forward pre-hook on the attention of every layer >= L swaps that layer's cache entries for
  the gathered ones (every non-visual entry + the selected visual entries, in order) so SDPA
  runs over fewer keys, and a forward hook puts the full entries back with the new token's
  entry appended. Nothing is deleted: an entry skipped at one step can be chosen at the next.
Exact: attention over the gathered keys equals attention over the full cache with the skipped
entries masked out. Prefill is untouched. Batch 1, DynamicCache-style layers (`keys`/`values`).

The static decode path (engine/decode.py) runs the same selection in fixed shape, without
these hooks: `attended_entries` gives the entries as a mask over a padded cache, which that
path ANDs into the attention mask of layers >= L (the masked form of the gather above).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from vidqa.pruning.core.attention import repeat_kv
from vidqa.pruning.core.compat import cache_argument
from vidqa.pruning.core.runtime import STAGE_RANGE


def decode_attention(attention: torch.nn.Module, normed_hidden: torch.Tensor, position_embeddings, keys: torch.Tensor,
                     apply_rotary, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(heads, n) softmax attention of the one new token over all n cached keys of a layer.

    normed_hidden: (1, 1, hidden) the layer's input after input_layernorm.
    position_embeddings: (cos, sin), each (1, 1, head_dim), the new token's rotary tables.
    keys: (1, kv_heads, n, head_dim) post-RoPE keys, the new token's last.
    valid: (n,) bool or None: the entries that hold keys (a padded cache's unused slots are
        False and get probability 0); None = all n.
    """
    head_dim = attention.head_dim
    queries = attention.q_proj(normed_hidden).view(1, 1, -1, head_dim)
    if getattr(attention, "q_norm", None) is not None:
        queries = attention.q_norm(queries)
    cos, sin = position_embeddings
    queries = apply_rotary(queries.transpose(1, 2), cos, sin)  # (1, heads, 1, d)
    keys = repeat_kv(keys, queries.shape[1] // keys.shape[1])  # (1, heads, n, d)
    scores = torch.matmul(queries.float(), keys.float().transpose(-1, -2)) * attention.scaling  # (1, heads, 1, n)
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    return scores.softmax(dim=-1)[0, :, 0]


def top_visual_entries(probabilities: torch.Tensor, visual_rows: torch.Tensor, count: int) -> torch.Tensor:
    """(count,) sorted cache rows of the visual entries with the highest head-mean attention.

    probabilities: (heads, n); visual_rows: (v,) sorted cache rows of the visual tokens.
    Ties go to the lower row.
    """
    scores = probabilities.mean(dim=0)[visual_rows]  # (v,)
    order = torch.argsort(scores, descending=True, stable=True)[:count]
    return visual_rows[order].sort().values


@dataclass
class DecodeStats:
    steps: int = 0
    attended: list[int] = field(default_factory=list)  # visual entries attended per step
    restricted: int = 0  # steps whose later layers attended to a gathered subset of the cache


class DecodeKVSelection:
    """Context manager: attend only to the top `keep` visual KV entries at each decode step.

    layer: first layer (absolute, >= 1) whose attention is restricted; scores come from layer-1.
    visual_rows: (v,) rows of the visual tokens in the LLM input (= their KV-cache rows).
    """

    def __init__(self, adapter, layer: int, keep: float, visual_rows: torch.Tensor, state=None, name: str = "decode"):
        self.adapter, self.layer, self.keep, self.state = adapter, layer, keep, state
        self.range_name = STAGE_RANGE + name  # profiler range around each step's selection
        self.visual_rows = visual_rows.sort().values
        self.count = int(keep * len(visual_rows))  # int() as the released code's num_keep
        self.stats = DecodeStats()
        self._handles: list = []
        self._forwards = 0
        self._captured = None
        self._attend: torch.Tensor | None = None  # (m,) cache rows attended in layers >= L this step
        self._saved: dict[int, tuple] = {}

    def __enter__(self):
        layers = self.adapter.decoder_layers
        if not 1 <= self.layer < len(layers):
            raise ValueError(f"decode KV layer {self.layer} is outside 1..{len(layers) - 1}")
        model = self.adapter.language_model
        self._handles.append(model.register_forward_pre_hook(self._count))
        scorer = layers[self.layer - 1].self_attn
        self._handles.append(scorer.register_forward_pre_hook(self._capture, with_kwargs=True))
        self._handles.append(scorer.register_forward_hook(self._select, with_kwargs=True))
        for index in range(self.layer, len(layers)):
            attention = layers[index].self_attn
            self._handles.append(attention.register_forward_pre_hook(self._gather(index), with_kwargs=True))
            self._handles.append(attention.register_forward_hook(self._restore(index), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._restore_all()
        self.publish()
        return False

    def publish(self) -> None:
        """Record `summary()` in the request's details (--json "pruning")."""
        if self.state is not None:
            self.state.details.setdefault("dycoke", {})["decode"] = self.summary()

    # -- the fixed-shape form (engine/decode.py) ---------------------------------------------
    @property
    def restricts(self) -> bool:
        """Whether a step attends to fewer visual entries than the cache holds."""
        return self.count < len(self.visual_rows)

    def count_step(self) -> None:
        """Record one decode step that the fixed-shape form ran (its stats, as the hooks count them)."""
        self.stats.steps += 1
        self.stats.attended.append(self.count if self.restricts else int(len(self.visual_rows)))
        self.stats.restricted += int(self.restricts)

    def attended_entries(self, attention, normed_hidden, position_embeddings, keys: torch.Tensor,
                         valid: torch.Tensor) -> torch.Tensor:
        """(n,) bool: the entries of a padded cache that layers >= L attend to at this step: every
        non-visual entry and the `count` visual entries the new token attends to most at layer L-1
        (the hooks' `_select_step` as a mask; no host sync, so a CUDA graph can hold it).

        attention: layer L-1's attention module; normed_hidden (1, 1, hidden), position_embeddings
        as `decode_attention`; keys: (1, kv_heads, n, head_dim) layer L-1's padded cache, the new
        token's entry written; valid: (n,) bool, the slots that hold entries (the new one included).
        """
        if self.visual_rows.device != keys.device:  # moved once, before a CUDA graph captures a step
            self.visual_rows = self.visual_rows.to(keys.device)
        visual_rows = self.visual_rows
        attend = torch.ones(keys.shape[2], dtype=torch.bool, device=keys.device)
        if not self.restricts:
            return attend
        probabilities = decode_attention(attention, normed_hidden, position_embeddings, keys, self.adapter.apply_rotary,
                                         valid=valid)
        attend[visual_rows] = False
        attend[top_visual_entries(probabilities, visual_rows, self.count)] = True
        return attend

    def summary(self) -> dict:
        attended = self.stats.attended
        return {
            "from_layer": self.layer,
            "visual_kv_entries": int(len(self.visual_rows)),
            "attended_per_step": round(sum(attended) / len(attended), 3) if attended else None,
            "decode_steps": self.stats.steps,
            "restricted_steps": self.stats.restricted,
        }

    # -- hooks -----------------------------------------------------------------------------
    def _decoding(self) -> bool:
        return self._forwards > 1

    def _count(self, module, args):
        self._forwards += 1
        self._attend = None

    def _capture(self, module, args, kwargs):
        if self._decoding():
            hidden = args[0] if args else kwargs["hidden_states"]
            self._captured = (hidden, kwargs["position_embeddings"], cache_argument(kwargs))

    def _select(self, module, args, kwargs, output):
        with record_function(self.range_name):
            return self._select_step(module, args, kwargs, output)

    def _select_step(self, module, args, kwargs, output):
        if not self._decoding() or self._captured is None:
            return None
        hidden, position_embeddings, cache = self._captured
        self._captured = None
        if cache is None or hidden.shape[1] != 1:
            return None
        if self.count >= len(self.visual_rows):
            # keep 1 attends to every entry: neither scoring nor a gather would change anything
            self.stats.steps += 1
            self.stats.attended.append(int(len(self.visual_rows)))
            return None
        keys = cache.layers[self.layer - 1].keys  # (1, kv_heads, n + 1, d): the new token's entry last
        probabilities = decode_attention(module, hidden, position_embeddings, keys, self.adapter.apply_rotary)
        if self.visual_rows.device != keys.device:  # moved once: a blocking copy per step would wait for the queue
            self.visual_rows = self.visual_rows.to(keys.device)
        visual_rows = self.visual_rows
        chosen = top_visual_entries(probabilities, visual_rows, self.count)
        past = keys.shape[2] - 1
        attend = torch.ones(past, dtype=torch.bool, device=keys.device)
        attend[visual_rows] = False
        attend[chosen] = True
        # the attended rows, increasing: their count is known, so a sort finds them without the
        # host sync of a nonzero
        rows = torch.arange(past, device=keys.device)
        self._attend = torch.where(attend, rows, past).sort().values[: past - len(visual_rows) + len(chosen)]
        self.stats.steps += 1
        self.stats.restricted += 1
        self.stats.attended.append(int(len(chosen)))
        return None

    def _gather(self, index: int):
        def hook(module, args, kwargs):
            cache = cache_argument(kwargs)
            if self._attend is None or cache is None:
                return None
            layer = cache.layers[index]
            past = layer.keys.shape[2]
            self._saved[index] = (layer, layer.keys, layer.values)
            layer.keys = layer.keys[:, :, self._attend]
            layer.values = layer.values[:, :, self._attend]
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 4:
                columns = torch.cat([self._attend, torch.arange(past, mask.shape[-1], device=mask.device)])
                kwargs["attention_mask"] = mask[..., columns]
                return args, kwargs
            return None
        return hook

    def _restore(self, index: int):
        def hook(module, args, kwargs, output):
            saved = self._saved.pop(index, None)
            if saved is None:
                return None
            layer, keys, values = saved
            new = layer.keys.shape[2] - len(self._attend)  # entries this step appended
            layer.keys = torch.cat([keys, layer.keys[:, :, -new:]], dim=2)
            layer.values = torch.cat([values, layer.values[:, :, -new:]], dim=2)
            return None
        return hook

    def _restore_all(self) -> None:
        """An exception mid-step leaves gathered entries in place: put the full ones back."""
        for layer, keys, values in self._saved.values():
            layer.keys, layer.values = keys, values
        self._saved.clear()
