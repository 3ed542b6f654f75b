"""microworld/light_attention.py: the auxiliary loss that points one layer's answer attention at
the light. Its attention mass is recomputed from the layer's inputs, so it is checked against the
probabilities an eager forward returns, on a tiny random Llama (no download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from microworld import dense, light_attention


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                         attn_implementation="eager")
    return LlamaModel(config).eval()


def test_the_recomputed_mass_is_the_layers_attention(tiny_llama):
    input_ids = torch.randint(0, 64, (2, 20))
    attention_mask = torch.ones(2, 20, dtype=torch.long)
    attention_mask[1, 16:] = 0  # right padding, as the SmolVLM processor pads
    queries = torch.tensor([[0, 7], [0, 19], [1, 15]])
    keys = torch.zeros(2, 20, dtype=torch.bool)
    keys[0, [1, 3, 5, 9]] = True  # 9 is after the first query: it must get no mass from it
    keys[1, [0, 2, 17]] = True  # 17 is padding
    supervised = light_attention.LightAttentionLoss(tiny_llama.layers, 1)
    with supervised, torch.no_grad():
        supervised.targets(queries, keys, attention_mask)
        out = tiny_llama(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
        probabilities = out.attentions[1]  # (B, H, S, S)
        expected = torch.stack([(probabilities[r, :, p] * keys[r].float()).sum(-1) for r, p in queries.tolist()])
        assert expected[0].sum() > 0 and torch.allclose(supervised.mass, expected, atol=1e-5)
        # the loss: KL(even spread over the row's keys || the most-mass head's attention)
        kl = []  # = -log |K| - mean of log p over K, K the keys the row can see
        for n, (r, p) in enumerate(queries.tolist()):
            seen = keys[r] & (torch.arange(20) <= p) & attention_mask[r].bool()
            log_p = probabilities[r, int(expected[n].argmax()), p][seen].log()
            kl.append(-torch.tensor(float(seen.sum())).log() - log_p.mean())
        assert torch.allclose(supervised.loss(), torch.stack(kl).mean(), atol=1e-4)
        log_p = supervised.log_p
        tiny_llama(input_ids=input_ids, attention_mask=attention_mask)  # not supervised: nothing recorded
        assert supervised.log_p is log_p
    assert supervised.batch is None and supervised.attention._forward_pre_hooks == {}


def test_the_targets_are_the_light_questions_answer_positions_and_the_lights_cells():
    clip = dense.heldout_clip(0, dense.REDUCED)
    grid, image = dense.REDUCED.grid, 99
    cells = light_attention.light_cells(clip.light_box, grid)
    x0, y0, x1, y1 = clip.light_box
    assert 1 <= len(cells) <= 4 and (y0 // 28 * grid + x0 // 28) in cells and ((y1 - 1) // 28 * grid + (x1 - 1) // 28) in cells
    # one row: two frames of grid^2 image tokens after 3 text tokens, then three replies
    frames = 2
    ids = [1, 2, 3] + [image] * (frames * grid * grid) + [4, 5, 6, 7, 8, 9, 10, 11, 12]
    input_ids = torch.tensor([ids])
    labels = torch.full_like(input_ids, -100)
    first = 3 + frames * grid * grid
    for start in (first + 1, first + 4, first + 7):  # three one-token replies
        labels[0, start] = input_ids[0, start]
    queries, keys = light_attention.light_targets(input_ids, labels, [["flash", "blinks", "light_where"]],
                                                  [clip.light_box], image, grid)
    assert queries.tolist() == [[0, first + 3], [0, first + 6]]
    expected = [3 + f * grid * grid + c for f in range(frames) for c in cells]
    assert np.flatnonzero(keys[0].numpy()).tolist() == sorted(expected)
    with pytest.raises(ValueError, match="3 replies labelled, 2 turns"):
        light_attention.light_targets(input_ids, labels, [["flash", "blinks"]], [clip.light_box], image, grid)


def test_the_spread_loss_is_zero_for_an_even_spread_over_the_light_and_grows_as_it_narrows():
    keys = torch.tensor([[True, True, False, True, True, False]])
    def log_p(weights):  # one query row, two heads: head 1 spreads `weights`, head 0 looks elsewhere
        other = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0, 0.0]]).clamp(min=1e-9)
        return torch.stack([other, torch.tensor([weights])], dim=1).log()
    even = light_attention.spread_loss(log_p([0.25, 0.25, 0.0, 0.25, 0.25, 0.0]), keys)
    narrow = light_attention.spread_loss(log_p([0.7, 0.1, 0.0, 0.1, 0.1, 0.0]), keys)
    outside = light_attention.spread_loss(log_p([0.2, 0.2, 0.2, 0.2, 0.2, 0.0]), keys)
    assert abs(float(even)) < 1e-6 and float(narrow) > 0.3 and abs(float(outside) - float(torch.tensor(1.25).log())) < 1e-5
