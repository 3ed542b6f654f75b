"""Qwen3-VL's DeepStack features inside a pruned prefill.

Qwen3-VL adds DeepStack visual features (from intermediate vision-encoder layers) to the
OUTPUT of its first D decoder layers, at the visual rows. transformers does it inside the
decoder loop (Qwen3VLTextModel.forward: `visual_pos_masks`, `deepstack_visual_embeds`) with a
row mask and feature rows fixed for the whole forward; once an in-LLM stage at layer K < D has
dropped rows, that mask no longer matches the hidden states (or, worse, matches their count by
chance and adds features to the wrong tokens). So while stages are attached, the features are
taken out of the decoder call and added here, by forward hooks on layers 0..D-1, to the visual
rows still present: each row gets its own token's feature, and the rows follow every selection.
The addition is transformers' own arithmetic (hidden[rows] + feature), so a run that drops
nothing is bit-identical to the model's own path.

A row a stage inserts (SparseVLM's recycled merges) takes the features of the token whose
position it takes (`Selection.inserted_from`): the Selection does not carry the merge weights.
"""

from __future__ import annotations

import torch


class DeepStackRows:
    """The DeepStack features of one prefill, aligned with the current visual rows (batch 1)."""

    def __init__(self):
        self.features: list[torch.Tensor] | None = None  # per DeepStack layer, (v, hidden) in sequence order

    def take(self, kwargs: dict, visual_rows: torch.Tensor) -> bool:
        """Move the features out of the decoder's kwargs; False when the call has none.

        visual_rows: (v,) rows of the prunable visual tokens in the LLM input; they must be
        exactly the rows the model's mask marks (so feature row i belongs to the i-th of them).
        """
        features = kwargs.get("deepstack_visual_embeds")
        if not features:
            return False
        mask = kwargs.get("visual_pos_masks")
        marked = mask[0].nonzero().flatten().cpu()
        if not torch.equal(marked, visual_rows.sort().values.cpu()):
            raise RuntimeError(
                f"DeepStack features cover {len(marked)} rows that are not the {len(visual_rows)} prunable visual rows"
            )
        self.features = list(features)
        kwargs["deepstack_visual_embeds"] = None
        kwargs["visual_pos_masks"] = None
        return True

    def follow(self, keep: torch.Tensor, inserted_from: torch.Tensor | None) -> None:
        """Rows after a selection: the kept ones (keep: (k,) into the current visual rows), then
        one per inserted row (inserted_from: (m,)), the order `DecoderPruning._apply` gives them."""
        if self.features is None:
            return
        pieces = [keep] if inserted_from is None else [keep, inserted_from.to(keep.device)]
        index = torch.cat(pieces)
        self.features = [layer[index.to(layer.device)] for layer in self.features]

    def add(self, layer_index: int, hidden: torch.Tensor, visual_rows: torch.Tensor) -> torch.Tensor | None:
        """hidden (1, n, hidden) leaving `layer_index` with its DeepStack feature added at the
        current visual rows (v,) in sequence order; None past the last DeepStack layer."""
        if self.features is None or layer_index >= len(self.features):
            return None
        feature = self.features[layer_index].to(hidden.device, hidden.dtype)
        hidden = hidden.clone()
        hidden[:, visual_rows] = hidden[:, visual_rows] + feature
        return hidden
