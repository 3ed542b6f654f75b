"""Training chats shared by the two benchmark models' trainers (train.py, train_smol.py): the
multi-turn messages of one clip and the labels that put the loss on the assistant replies only."""

from __future__ import annotations

import torch


def conversation(turns: list[tuple[str, str | None]], video: bool = True) -> list[dict]:
    """Chat messages for (question, answer) turns; the video rides on the first question, and an
    answer of None leaves that turn open (a prompt for generation)."""
    messages = []
    for i, (question, answer) in enumerate(turns):
        content = ([{"type": "video"}] if video and i == 0 else []) + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


def reply_labels(input_ids: torch.Tensor, marker: list[int], end: int) -> torch.Tensor:
    """Labels = input_ids on every reply (the tokens right after each occurrence of the `marker`
    id sequence, up to and including the next `end` id), -100 everywhere else."""
    labels = torch.full_like(input_ids, -100)
    m = len(marker)
    for row in range(input_ids.shape[0]):
        ids = input_ids[row].tolist()
        inside = False
        for j, token in enumerate(ids):
            if inside or (j >= m and ids[j - m : j] == marker):
                labels[row, j] = token
                inside = token != end
    return labels
