"""Attention received per visual token inside the vision encoder, without eager attention.

CONTRACT (what pre-LLM stages build on)
- A stage that needs vision-side saliency declares a `vision_layer` parameter (an int: >= 0 is an
  encoder layer index; negative counts back from the layer whose output feeds the projector, so
  -1 is that layer: the last SigLIP layer LLaVA-OneVision and SmolVLM2 read, Qwen2.5-VL's last
  block before the patch merger). The pruner collects it (`Pruner.vision_layer`; every stage of a
  preset that has one must agree) and the engine encodes with
  `adapter.encode_video_with_attention(prompt, layer)` instead of `adapter.encode_video(prompt)`.
  Presets without such a stage pay nothing: the encoder runs exactly as before.
- The returned `VisualTokens` then carry, aligned row for row with the LLM-level tokens (and kept
  aligned by `select()` and by stages that concatenate/replace meta):
    meta["vision_attention"]: (num_tokens,) float32, attention RECEIVED by the token in that layer:
        softmax(q k^T * scale) averaged over heads and over the queries of the token's attention
        block (its frame for SigLIP; its temporal patch or window for Qwen2.5-VL), then mapped
        to LLM tokens the way the family maps features (see below). Before mapping, each
        attention block's values sum to 1 (a mean of probability rows).
    meta["vision_keys"]: (num_tokens, head_dim) float32, that layer's keys (before RoPE for
        Qwen2.5-VL) averaged over heads, mapped the same way: VisionZip's "metric".
  `tokens.vision_layer` records the absolute layer index they come from.
- Mapping encoder patches to LLM tokens, per family (the same operation the family applies to
  features): LLaVA-OneVision bilinearly resizes the (S/p)x(S/p) patch grid to ceil(S/p/2) per
  side (27x27 -> 14x14), exactly as `apply_pooling` does to the projected features; SmolVLM2's
  pixel shuffle puts each s x s block of patches into one token (mean over the block); Qwen2.5-VL
  merges 2x2 patches (mean over the unit, after undoing the window permutation), and one token
  already covers a temporal patch of two frames, so nothing is averaged over time; Qwen3-VL the
  same without a window permutation (its blocks all attend over the whole temporal patch).
- The adapter side is ONE method, `observe_vision_layer(prompt, layer) -> VisionProbe`; a new
  family implements it with `VisionProbe(attention_module, read, to_tokens)`.

How: a forward pre-hook on the chosen layer's attention module captures its input (the normed
hidden states, and the mask / RoPE tables / segment boundaries it was given) during the normal
SDPA forward; afterwards we project q and k with the module's own weights and compute the
probabilities block by block, reducing each block to column means at once ((chunk, heads, n, n)
at most). The cost is one extra q.k^T of one layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

CHUNK_ELEMENTS = 1 << 25  # at most ~128 MB of float32 scores at once


@dataclass
class VisionAttention:
    """One encoder layer's saliency, aligned with the LLM-level tokens.

    received: (num_tokens,) float32 attention received; keys: (num_tokens, head_dim) float32.
    patch_received: the same before mapping, in the encoder's own patch order, (blocks, patches)
        for per-frame encoders or (patches,) for Qwen2.5-VL's packed sequence (window order).
    """

    received: torch.Tensor
    keys: torch.Tensor
    layer: int
    patch_received: torch.Tensor | None = None


def resolve_vision_layer(layer: int, num_layers: int, feature_layer: int | None = None) -> int:
    """Absolute encoder layer index for `layer` (>= 0: as is; < 0: counted back from the feature
    layer, the last layer whose output the projector reads; default: the last layer)."""
    from vidqa.errors import BadInput

    feature = num_layers - 1 if feature_layer is None else feature_layer
    index = layer if layer >= 0 else feature + 1 + layer
    if not 0 <= index <= feature:
        raise BadInput(
            f"vision_layer {layer} is outside this vision encoder (layers 0..{feature} feed the LLM; "
            f"-1 is layer {feature}); pick one in [{-(feature + 1)}, {feature}]"
        )
    return index


def received_attention(
    queries: torch.Tensor, keys: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over heads and queries of softmax(q k^T * scale): attention each key receives.

    queries, keys: (blocks, heads, n, d), one independent attention block per leading index.
    mask: None, or additive float / boolean (True = attend), broadcastable to (blocks, 1|heads, n, n).
    Returns (blocks, n) float32.
    """
    blocks, heads, length, _ = queries.shape
    per_block = heads * length * length
    step = max(1, CHUNK_ELEMENTS // max(per_block, 1))
    out = []
    for start in range(0, blocks, step):
        q = queries[start:start + step].float()
        k = keys[start:start + step].float()
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (b, heads, n, n)
        if mask is not None:
            part = mask if mask.shape[0] == 1 else mask[start:start + step]
            if part.dtype == torch.bool:
                scores = scores.masked_fill(~part, float("-inf"))
            else:
                scores = scores + part.float()
        probs = scores.softmax(dim=-1)
        out.append(probs.mean(dim=(1, 2)))  # (b, n)
    return torch.cat(out)


def rotate_half_rope(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as Qwen2.5-VL's vision tower applies it (float32, rotate-half).

    states: (n, heads, d); cos, sin: (n, d)."""
    states = states.float()
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    half = states.shape[-1] // 2
    rotated = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
    return states * cos + rotated * sin


# --- mapping patches to LLM tokens ---------------------------------------------------------------
def bilinear_pool(values: torch.Tensor, side: int) -> torch.Tensor:
    """LLaVA-OneVision's `apply_pooling` on per-patch values.

    values: (frames, side*side) or (frames, side*side, d). Returns (frames, out*out[, d]) with
    out = ceil(side / 2), resized bilinearly (align_corners=False) like the projected features.
    """
    squeeze = values.dim() == 2
    grid = values.unsqueeze(-1) if squeeze else values
    frames, _, dim = grid.shape
    grid = grid.reshape(frames, side, side, dim).permute(0, 3, 1, 2)
    out = -(-side // 2)
    pooled = F.interpolate(grid.float(), size=(out, out), mode="bilinear")
    pooled = pooled.permute(0, 2, 3, 1).reshape(frames, out * out, dim)
    return pooled[..., 0] if squeeze else pooled


def block_mean(values: torch.Tensor, side: int, scale: int) -> torch.Tensor:
    """SmolVLM2's pixel shuffle on per-patch values: each scale x scale block -> one token (mean).

    values: (frames, side*side[, d]) row-major patches. Returns (frames, (side/scale)^2[, d]).
    """
    squeeze = values.dim() == 2
    grid = values.unsqueeze(-1) if squeeze else values
    frames, _, dim = grid.shape
    grid = grid.reshape(frames, side, side, dim).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grid.float(), kernel_size=scale, stride=scale)
    out = side // scale
    pooled = pooled.permute(0, 2, 3, 1).reshape(frames, out * out, dim)
    return pooled[..., 0] if squeeze else pooled


def merge_unit_mean(values: torch.Tensor, window_index: torch.Tensor, unit: int) -> torch.Tensor:
    """Qwen2.5-VL's patch merger on per-patch values in the blocks' (window) order.

    values: (seq[, d]) per patch, window order; window_index: (seq/unit,) the tower's permutation of
    merge units; unit = spatial_merge_size^2. Returns (seq/unit[, d]) in LLM token order.
    """
    units = values.reshape(values.shape[0] // unit, unit, *values.shape[1:]).float().mean(dim=1)
    return units[torch.argsort(window_index.to(units.device))]


# --- the probe ---------------------------------------------------------------------------------------
class VisionProbe:
    """Captures one attention module's inputs during a forward; computes its saliency afterwards.

    module: the layer's self-attention module. read(module, args, kwargs) -> (received, keys) in the
    encoder's patch order; to_tokens(received, keys) -> (received, keys) at LLM-token granularity.
    """

    def __init__(self, module: torch.nn.Module, layer: int, read: Callable, to_tokens: Callable):
        self.module, self.layer, self.read, self.to_tokens = module, layer, read, to_tokens
        self.calls: list[tuple[tuple, dict]] = []
        self._handle = None

    def __enter__(self) -> "VisionProbe":
        def capture(module, args, kwargs):
            self.calls.append((args, dict(kwargs)))

        self._handle = self.module.register_forward_pre_hook(capture, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def result(self) -> VisionAttention:
        if len(self.calls) != 1:
            raise RuntimeError(f"vision layer {self.layer} ran {len(self.calls)} times during one encode; expected once")
        args, kwargs = self.calls[0]
        with torch.inference_mode():
            received, keys = self.read(self.module, args, kwargs)
            token_received, token_keys = self.to_tokens(received, keys)
        self.calls.clear()  # release the captured activations
        return VisionAttention(
            received=token_received.reshape(-1).float(),
            keys=token_keys.reshape(token_received.numel(), -1).float(),
            layer=self.layer,
            patch_received=received,
        )


def _argument(args: tuple, kwargs: dict, name: str, position: int):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def read_siglip_attention(module, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """SigLIP-style attention (LLaVA-OneVision, SmolVLM2): q_proj/k_proj, `scale`, optional mask.

    Returns received (frames, patches) and keys (frames, patches, head_dim) (mean over heads)."""
    hidden = _argument(args, kwargs, "hidden_states", 0)  # (frames, patches, dim)
    mask = _argument(args, kwargs, "attention_mask", 1)
    frames, length, _ = hidden.shape
    head_dim = module.head_dim
    queries = module.q_proj(hidden).view(frames, length, -1, head_dim).transpose(1, 2)
    keys = module.k_proj(hidden).view(frames, length, -1, head_dim).transpose(1, 2)
    received = received_attention(queries, keys, module.scale, mask)
    return received, keys.float().mean(dim=1)


def read_qwen_vision_attention(module, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL / Qwen3-VL vision attention: fused qkv, 2-D RoPE, block-diagonal by `cu_seqlens`
    (windows or temporal patches; Qwen3-VL: always temporal patches). Returns received (seq,) and
    pre-RoPE keys (seq, head_dim), in the tower's order (window order for Qwen2.5-VL)."""
    hidden = _argument(args, kwargs, "hidden_states", 0)  # (seq, dim)
    cu_seqlens = _argument(args, kwargs, "cu_seqlens", 1)
    cos, sin = _argument(args, kwargs, "position_embeddings", 2)
    length = hidden.shape[0]
    q, k, _ = module.qkv(hidden).reshape(length, 3, module.num_heads, -1).unbind(1)  # (seq, heads, d)
    q_rot, k_rot = rotate_half_rope(q, cos, sin), rotate_half_rope(k, cos, sin)
    bounds = cu_seqlens.tolist()
    received = torch.empty(length, dtype=torch.float32, device=hidden.device)
    by_length: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            by_length.setdefault(end - start, []).append(start)
    for size, starts in by_length.items():  # equal-sized blocks (most windows) go in one batch
        rows = (torch.tensor(starts, device=hidden.device)[:, None] + torch.arange(size, device=hidden.device)).reshape(-1)
        qs = q_rot[rows].view(len(starts), size, *q_rot.shape[1:]).transpose(1, 2)  # (b, heads, n, d)
        ks = k_rot[rows].view(len(starts), size, *k_rot.shape[1:]).transpose(1, 2)
        received[rows] = received_attention(qs, ks, module.scaling).reshape(-1)
    return received, k.float().mean(dim=1)
