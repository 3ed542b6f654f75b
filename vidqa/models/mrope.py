"""M-RoPE positions of a pruned prompt, shared by the Qwen2.5-VL and Qwen3-VL adapters.

Never compute positions on pruned ids: every kept row keeps the exact (time, row, col) position
`get_rope_index` gave it in the UNPRUNED prompt, and the text after the video keeps its own.
"""

from __future__ import annotations

import torch


def gathered_positions(model, full: torch.Tensor, seq_index: torch.Tensor) -> torch.Tensor:
    """(4, 1, n) position ids for the kept rows `seq_index` (n,) of a prompt whose unpruned M-RoPE
    positions are `full` (3, N); row 0 is generate's own 1-D row (used to build the mask).

    Also resets the model's cached `rope_deltas` to what they are for this pruned cache, so decode
    positions continue from the largest coordinate (a stale value from an earlier request would
    shift them)."""
    length = seq_index.shape[0]
    text_row = torch.arange(length)[None]
    position_ids = torch.cat([text_row, full[:, seq_index]])[:, None, :]
    model.model.rope_deltas = (full.max() + 1 - length).view(1, 1).to(model.device)
    return position_ids
