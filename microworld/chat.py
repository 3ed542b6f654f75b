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


def reply_weights(labels: torch.Tensor, weights: list[list[float]]) -> torch.Tensor:
    """A float weight per label position: the k-th reply of row r (a run of labelled positions)
    gets weights[r][k], every unlabelled position 0."""
    out = torch.zeros(labels.shape, dtype=torch.float32)
    for row in range(labels.shape[0]):
        labelled = (labels[row] != -100).tolist()
        reply = -1
        for j, inside in enumerate(labelled):
            if inside and (j == 0 or not labelled[j - 1]):
                reply += 1
            if inside:
                out[row, j] = weights[row][reply]
        if reply + 1 != len(weights[row]):
            raise ValueError(f"row {row}: {reply + 1} replies labelled, {len(weights[row])} weights given")
    return out
