"""Attention probabilities for a few query rows, without eager attention.

SDPA and flash attention return no weights, and switching the model to eager attention would
materialise (heads, n, n) in every layer. The methods only need a few rows (the last token, the
question tokens), so we recompute them from the layer's own projections: r x n per head.
"""

from __future__ import annotations

import torch


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, kv_heads, n, d) -> (batch, kv_heads * groups, n, d), as GQA attention expands keys."""
    if groups == 1:
        return states
    batch, kv_heads, length, dim = states.shape
    return states[:, :, None].expand(batch, kv_heads, groups, length, dim).reshape(batch, kv_heads * groups, length, dim)


def attention_rows(
    attention: torch.nn.Module,
    normed_hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    keys: torch.Tensor,
    query_rows: torch.Tensor,
    apply_rotary,
) -> torch.Tensor:
    """Softmax attention of `query_rows` over all keys of one layer, per head.

    attention: the layer's self-attention module (q_proj, optional q_norm, head_dim, scaling).
    normed_hidden: (1, n, hidden) the layer's input after input_layernorm.
    position_embeddings: (cos, sin), each (1, n, head_dim), that layer's rotary tables.
    keys: (1, kv_heads, n, head_dim) post-RoPE keys (what the layer wrote to the KV cache).
    query_rows: (r,) long, rows of the sequence whose attention we want.
    Returns (heads, r, n) float32 probabilities, causal (row i sees keys 0..i).
    """
    head_dim = attention.head_dim
    query_rows = query_rows.to(normed_hidden.device)  # the layer's device, on a sharded model too
    rows = normed_hidden[:, query_rows]  # (1, r, hidden)
    queries = attention.q_proj(rows).view(1, rows.shape[1], -1, head_dim)  # (1, r, heads, d)
    if getattr(attention, "q_norm", None) is not None:
        queries = attention.q_norm(queries)
    queries = queries.transpose(1, 2)  # (1, heads, r, d)
    cos, sin = position_embeddings
    queries = apply_rotary(queries, cos[:, query_rows], sin[:, query_rows])
    keys = repeat_kv(keys, queries.shape[1] // keys.shape[1])  # (1, heads, n, d)
    scores = torch.matmul(queries.float(), keys.float().transpose(-1, -2)) * attention.scaling  # (1, heads, r, n)
    key_index = torch.arange(keys.shape[2], device=keys.device)
    future = key_index[None, :] > query_rows.to(keys.device)[:, None]  # (r, n)
    scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1)[0]


def project_keys(
    attention: torch.nn.Module, normed_hidden: torch.Tensor, position_embeddings, apply_rotary
) -> torch.Tensor:
    """Post-RoPE keys (1, kv_heads, n, d), for when no KV cache holds them (use_cache=False)."""
    head_dim = attention.head_dim
    keys = attention.k_proj(normed_hidden).view(1, normed_hidden.shape[1], -1, head_dim)
    if getattr(attention, "k_norm", None) is not None:
        keys = attention.k_norm(keys)
    cos, sin = position_embeddings
    return apply_rotary(keys.transpose(1, 2), cos, sin)
