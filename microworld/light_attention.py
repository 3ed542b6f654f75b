"""Telling the model where to look for the light: an auxiliary loss on one decoder layer's
attention (train_dense --light-attention LAYER=WEIGHT).

Why: the blinks are the one type the dense model does not learn, and a probe shows the count never
reaches the answer position: the answer's attention does not gather the light over the frames
(benchmarks/micro/README.md, sessions 13-14). The answer loss alone has not taught that in ~2,000
CPU steps. This loss does it directly: at the answer position of every light question (the count
and the stepping stones), one head of layer LAYER should spread its attention evenly over the
light's tokens, in every frame, lit or not, so what it reads is the share of lit frames. The loss
is the KL divergence from that even spread to the head's attention (0 when it is exactly that),
on the head that already puts the most mass on the light: the run picks the head, the others stay
free. (A first form, -log of the head's mass on the light, was met in 20 steps with the mass on one
or two frames' light: a count cannot be read from that; benchmarks/micro/README.md.)

The mass is recomputed from the layer's inputs for the few answer rows only (a forward pre-hook
on the attention module: the same q / k projections, rotary embedding and scaling as the layer),
so the model keeps SDPA and no (batch, heads, S, S) matrix is kept.
"""

from __future__ import annotations

import torch

from microworld import dense

CELL = 28  # px a visual token covers (SigLIP patch 14 x pixel shuffle 2)
# the questions whose answer needs the light in every frame (the count and its stepping stones)
LIGHT_KINDS = ("blinks",) + tuple(dense.LIGHT_STONES)


def light_cells(light_box: tuple[int, int, int, int], grid: int) -> list[int]:
    """Row-major cells (of a grid x grid frame) the light's box covers."""
    x0, y0, x1, y1 = light_box
    return [r * grid + c for r in range(y0 // CELL, min(grid - 1, (y1 - 1) // CELL) + 1)
            for c in range(x0 // CELL, min(grid - 1, (x1 - 1) // CELL) + 1)]


def light_targets(input_ids: torch.Tensor, labels: torch.Tensor, kinds: list[list[str]],
                  light_boxes: list, image_token_id: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (queries (n, 2) long [row, position], keys (B, S) bool).

    queries: the answer position (the token that predicts the first answer token) of each turn of
    a LIGHT_KINDS kind; kinds[row] are the row's turns in order. keys: the image tokens of the
    light's cells in every frame (image tokens are frame-major, grid^2 a frame, row-major)."""
    queries, keys = [], torch.zeros(input_ids.shape, dtype=torch.bool)
    for row in range(input_ids.shape[0]):
        labelled = (labels[row] != -100).tolist()
        starts = [j for j, inside in enumerate(labelled) if inside and (j == 0 or not labelled[j - 1])]
        if len(starts) != len(kinds[row]):
            raise ValueError(f"row {row}: {len(starts)} replies labelled, {len(kinds[row])} turns given")
        queries += [[row, start - 1] for start, kind in zip(starts, kinds[row]) if kind in LIGHT_KINDS]
        images = (input_ids[row] == image_token_id).nonzero().flatten()
        per_frame = grid * grid
        cells = torch.tensor(light_cells(light_boxes[row], grid))
        frames = torch.arange(len(images) // per_frame)
        keys[row, images[(frames[:, None] * per_frame + cells[None, :]).flatten()]] = True
    return torch.tensor(queries, dtype=torch.long).reshape(-1, 2), keys


def attention_mass(attention, hidden: torch.Tensor, position_embeddings, attention_mask: torch.Tensor,
                   queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(n, heads): each head's attention probability mass on `keys` from each query row, as the
    layer `attention` (a Llama attention module) computes it from its input `hidden` (B, S, D)."""
    log_p = attention_log_probabilities(attention, hidden, position_embeddings, attention_mask, queries)
    return key_mass(log_p, keys[queries[:, 0]])


def key_mass(log_p: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(n, heads) each head's probability mass on each row's keys. log_p: (n, heads, S); keys: (n, S)."""
    return (log_p.exp() * keys[:, None, :].float()).sum(-1)


def attention_log_probabilities(attention, hidden: torch.Tensor, position_embeddings, attention_mask: torch.Tensor,
                                queries: torch.Tensor) -> torch.Tensor:
    """(n, heads, S) float32 log attention probabilities of each query row (-inf where masked)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    rows, positions = queries[:, 0], queries[:, 1]
    head_dim = attention.head_dim
    cos, sin = (t.expand(hidden.shape[0], -1, -1) for t in position_embeddings)  # (1, S, d) when shared
    q = attention.q_proj(hidden[rows, positions]).view(len(rows), -1, 1, head_dim)  # (n, H, 1, d)
    k = attention.k_proj(hidden[rows]).view(len(rows), hidden.shape[1], -1, head_dim).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q, cos[rows, positions][:, None], sin[rows, positions][:, None])
    _, k = apply_rotary_pos_emb(k, k, cos[rows], sin[rows])
    k = repeat_kv(k, q.shape[1] // k.shape[1])  # (n, H, S, d)
    scores = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * attention.scaling  # (n, H, S)
    span = torch.arange(hidden.shape[1], device=hidden.device)
    visible = (span[None, :] <= positions[:, None]) & attention_mask[rows].bool()
    return scores.masked_fill(~visible[:, None, :], float("-inf")).log_softmax(dim=-1)


def spread_loss(log_p: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Mean over query rows of KL(even spread over the row's keys || the head's attention), on the
    head with the most mass on the keys (keys a row cannot see, after it or padding, do not count).
    log_p: (n, heads, S); keys: (n, S) bool."""
    head = key_mass(log_p.detach(), keys).argmax(dim=1)  # (n,)
    chosen = log_p[torch.arange(len(head)), head]  # (n, S)
    keys = keys & torch.isfinite(chosen)
    count = keys.sum(-1).clamp(min=1)
    mean_log_p = torch.where(keys, chosen, torch.zeros_like(chosen)).sum(-1) / count
    return (-mean_log_p - count.float().log()).mean()


class LightAttentionLoss:
    """While entered, layer `layer`'s attention module records, on the first forward after
    `targets`, the log attention probabilities of the query rows; `mass` is each head's mass on
    the light's tokens, `loss()` the spread loss. Later forwards (an evaluation's) record nothing."""

    def __init__(self, layers, layer: int):
        self.attention = layers[layer].self_attn
        self.batch: tuple | None = None
        self.log_p: torch.Tensor | None = None  # (n, heads, S) of the last supervised forward
        self.keys: torch.Tensor | None = None  # (n, S) the light's tokens of each query row
        self._handle = None

    def targets(self, queries: torch.Tensor, keys: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.batch, self.log_p = (queries, keys, attention_mask), None

    def _hook(self, module, args, kwargs):
        if self.batch is None:
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        queries, keys, mask = (t.to(hidden.device) for t in self.batch)
        self.batch = None  # one forward a batch
        if len(queries):
            self.log_p = attention_log_probabilities(module, hidden, kwargs["position_embeddings"], mask, queries)
            self.keys = keys[queries[:, 0]]

    @property
    def mass(self) -> torch.Tensor | None:
        """(n, heads) each head's attention mass on the light's tokens (None: no light question)."""
        return None if self.log_p is None else key_mass(self.log_p, self.keys)

    def loss(self) -> torch.Tensor:
        """Of the last supervised forward (0 when it asked no light question)."""
        return torch.zeros(()) if self.log_p is None else spread_loss(self.log_p, self.keys)

    def __enter__(self):
        self._handle = self.attention.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        self.batch = None
