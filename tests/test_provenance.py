"""In-LLM merges followed through layers (pruning/core/provenance.py): the vectorised chase
equals the member-by-member definition."""

from types import SimpleNamespace

import pytest
import torch

from vidqa.pruning.core.provenance import merged_in_llm


def member_by_member(layer_merges, visual_rows):
    """The definition: per layer, in the order recorded, whatever had gone into a member goes
    where its target's content is."""
    stand_in = torch.arange(len(visual_rows))
    token_of_row = {int(r): i for i, r in enumerate(visual_rows.tolist())}
    for layer in sorted(layer_merges):
        members, into = layer_merges[layer]
        for member, target in zip(members.tolist(), into.tolist()):
            if member in token_of_row and target in token_of_row:
                stand_in[stand_in == token_of_row[member]] = stand_in[token_of_row[target]]
    return stand_in


@pytest.mark.parametrize("seed", range(20))
def test_vectorised_merges_match_the_definition(seed):
    generator = torch.Generator().manual_seed(seed)
    count = 40
    visual_rows = torch.randperm(200, generator=generator)[:count].sort().values + 5
    present = visual_rows.clone()
    merges = {}
    for layer in (2, 5, 7):  # each layer merges some of the tokens still present into others present
        order = present[torch.randperm(len(present), generator=generator)]
        members, targets = order[: len(order) // 3], order[len(order) // 3:]
        into = targets[torch.randint(len(targets), (len(members),), generator=generator)]
        if layer == 5 and len(members) > 2:  # a chain inside one layer: the second member merges into the first
            into[1] = members[0]
        stray = torch.tensor([1, 999])  # rows that are not visual tokens are ignored
        merges[layer] = (torch.cat([members, stray[:1]]), torch.cat([into, stray[1:]]))
        present = present[~torch.isin(present, members)]
    state = SimpleNamespace(layer_merges=merges)
    assert torch.equal(merged_in_llm(state, visual_rows), member_by_member(merges, visual_rows))


def test_no_merges_leave_every_token_itself():
    assert merged_in_llm(SimpleNamespace(layer_merges={}), torch.tensor([3, 4, 9])).tolist() == [0, 1, 2]
