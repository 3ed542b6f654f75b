"""Qwen3-VL adapter: token grid, DeepStack alignment, timestamps, positions, decode, every preset, CLI.

A tiny random Qwen3-VL (real model and processor classes, word-level tokenizer; 3 DeepStack
layers feeding the first 3 of 4 LLM layers) is saved to a temp dir and loaded by path, offline.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_one_line_error
from helpers import identity_settings, recomputed_and_eager_rows
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from vidqa import flops
from vidqa.engine import request as engine
from vidqa.errors import BadInput
from vidqa.models import load_model
from vidqa.models.qwen3_vl import frame_pixel_budget
from vidqa.pruning.core.compat import cache_keyword, returned_cache
from vidqa.pruning.core.decoder import DecoderPruning, Selection
from vidqa.pruning.core.presets import available_presets, build_pruner, load_preset
from vidqa.pruning.core.runtime import NO_PRUNING, RequestState
from vidqa.testing.qwen3 import build_tiny_qwen3_vl
from vidqa.video.decode import load_clip

QUESTION = "what happens in this video ?"
FRAMES = 8  # 4 temporal patches x 4x4 tokens = 64 video tokens
MAX_PIXELS = 128 * 128  # one 128 px frame: 4x4 tokens per temporal patch
# Settings at which each preset must change nothing; a preset not listed runs at --keep 1
# (add it here if that is not its identity).
REFUSED = {"earlytom": "inside the vision encoder"}  # merges frames inside per-frame SigLIP towers only
LAST_DEEPSTACK = 2  # layers 0, 1, 2 receive DeepStack features


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3_vl"))


@pytest.fixture(scope="module")
def adapter(checkpoint):
    return load_model(str(checkpoint), device="cpu", dtype="float32", max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def clip(square_video):
    return load_clip(square_video, num_frames=FRAMES)


def ask(adapter, clip, pruner=NO_PRUNING, max_new_tokens=6):
    return engine.answer(adapter, clip, QUESTION, engine.GenerationOptions(max_new_tokens=max_new_tokens), pruner=pruner)


def prepare(adapter, clip, pruner=NO_PRUNING):
    """The engine's steps up to generate: (prompt, inputs, state)."""
    prompt = adapter.build_prompt(clip.frames, clip.timestamps, QUESTION)
    state = RequestState(adapter=adapter, prompt=prompt, clip=clip, question=QUESTION, device=adapter.model.device)
    tokens = adapter.encode_video(prompt)
    state.record_stage("vision encoder", len(tokens))
    tokens = pruner.before_llm(tokens, state)
    state.llm_tokens = tokens
    return prompt, adapter.generation_inputs(prompt, tokens, positions=pruner.positions), state


def unpruned_positions(adapter, prompt) -> torch.Tensor:
    inputs = prompt.inputs
    positions, _ = adapter.model.model.get_rope_index(
        input_ids=inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        video_grid_thw=inputs["video_grid_thw"], attention_mask=inputs["attention_mask"],
    )
    return positions  # (3, 1, N)


# --- tokens, timestamps ---------------------------------------------------------------------


def test_visual_tokens_grid_and_deepstack_rows(adapter, clip):
    prompt = adapter.build_prompt(clip.frames, clip.timestamps, QUESTION)
    tokens = adapter.encode_video(prompt)
    assert tokens.grid == (4, 4, 4) and len(tokens) == 64
    assert tokens.frame.tolist() == [f for f in range(4) for _ in range(16)]
    assert tokens.row.tolist()[:16] == [r for r in range(4) for _ in range(4)]
    assert tokens.col.tolist()[:16] == list(range(4)) * 4
    assert torch.equal(tokens.seq_index, prompt.visual_index)
    assert adapter.deepstack_layers == 3
    assert tokens.deepstack.shape == (3, 64, adapter.text_config.hidden_size)
    # the DeepStack rows are the model's own, in token order
    output = adapter.model.get_video_features(pixel_values_videos=prompt.inputs["pixel_values_videos"],
                                              video_grid_thw=prompt.inputs["video_grid_thw"], return_dict=True)
    for layer, feature in enumerate(output.deepstack_features):
        assert torch.equal(tokens.deepstack[layer], feature[0])


def test_timestamps_are_the_sampled_times(adapter, clip):
    """One `<t seconds>` per temporal patch, t = mean time of its two sampled frames."""
    prompt = adapter.build_prompt(clip.frames, clip.timestamps, QUESTION)
    text = adapter.processor.tokenizer.decode(prompt.input_ids[0]).replace(" ", "")
    times = [(clip.timestamps[i] + clip.timestamps[i + 1]) / 2 for i in range(0, FRAMES, 2)]
    assert all(f"<{t:.1f}seconds>" in text for t in times), text
    assert text.count("seconds>") == 4


def test_video_markers_follow_the_processor_of_each_release(adapter, clip):
    """Every temporal patch is `<t seconds><|vision_start|>` + its 16 video tokens + `<|vision_end|>`.
    Before 5.25 the processor also keeps the chat template's own `<|vision_start|>`...`<|vision_end|>`
    around the whole expansion; 5.25 drops that outer pair (2 rows fewer). Either way only the
    `<|video_pad|>` rows are visual, and the question starts right after the last span."""
    from packaging.version import Version

    from vidqa.pruning.core.compat import transformers_version

    outer = 1 if Version(transformers_version()) < Version("5.25") else 0
    prompt = adapter.build_prompt(clip.frames, clip.timestamps, QUESTION)
    ids = prompt.input_ids[0]
    tokenizer = adapter.processor.tokenizer
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>"))
    video = adapter.video_token_id
    assert int((ids == start).sum()) == int((ids == end).sum()) == 4 + outer
    assert torch.equal(prompt.visual_index, (ids == video).nonzero().flatten()) and len(prompt.visual_index) == 64
    spans = prompt.visual_index.view(4, 16)
    assert torch.equal(spans, spans[:, :1] + torch.arange(16))  # 4 runs of 16 consecutive rows
    assert (ids[spans[:, 0] - 1] == start).all() and (ids[spans[:, -1] + 1] == end).all()
    assert int((ids[:spans[0, 0]] == start).sum()) == 1 + outer  # the outer marker, if any, opens the video
    assert int((ids[spans[-1, -1] + 1:] == end).sum()) == 1 + outer  # ... and closes it, before the question
    inputs = adapter.generation_inputs(prompt, adapter.encode_video(prompt), positions="original")
    assert inputs.text_start == int(spans[-1, -1]) + 1


def test_pixel_budget_follows_qwen_vl_utils():
    factor = 32
    assert frame_pixel_budget(32, factor) == (128 * 1024, 768 * 1024)
    # a long clip shares the 128k-token context: 0.9 * 128000 * 1024 * 2 / 600 pixels per frame
    assert frame_pixel_budget(600, factor)[1] == int(0.9 * 128000 * 1024 * 2 / 600)
    assert frame_pixel_budget(8, factor, max_pixels=MAX_PIXELS) == (MAX_PIXELS, MAX_PIXELS)


def test_none_matches_the_models_own_generate(adapter, clip):
    """Our path (encoder output and DeepStack rows fed back, explicit positions) = transformers' own."""
    ours = ask(adapter, clip, max_new_tokens=8)
    prompt = adapter.build_prompt(clip.frames, clip.timestamps, QUESTION)
    adapter.model.model.rope_deltas = None
    output = adapter.model.generate(**prompt.inputs, max_new_tokens=8, do_sample=False)
    theirs = adapter.processor.tokenizer.decode(output[0, prompt.length:], skip_special_tokens=True)
    assert ours.text == theirs.strip()
    adapter.model.model.rope_deltas = torch.tensor([[12345]])  # a stale delta from another request changes nothing
    assert ask(adapter, clip, max_new_tokens=8).text == ours.text


@pytest.mark.parametrize("preset", sorted(available_presets()))
def test_identity_settings_match_none(adapter, clip, preset):
    """Every preset file (including ones added later) changes nothing at its identity settings."""
    if preset in REFUSED:  # presets for other families refuse in one line
        with pytest.raises(BadInput, match=REFUSED[preset]):
            build_pruner(load_preset(preset), adapter)
        return
    reference = ask(adapter, clip)
    params, keep = identity_settings(preset)
    pruned = ask(adapter, clip, build_pruner(load_preset(preset, params), adapter, keep=keep))
    assert pruned.stats.tokens.layer_avg_retention == 1.0
    assert pruned.text == reference.text, f"'{preset}' at {params}, keep {keep}: list it in IDENTITY_SETTINGS"
    assert pruned.stats.tokens.generated_tokens == reference.stats.tokens.generated_tokens


# --- DeepStack alignment ----------------------------------------------------------------------


def entering_layer(adapter, inputs, layer, manager=None):
    """(hidden (n, C) entering `layer`, row_source (n,) their LLM-input rows) for one prefill
    forward, captured before any stage at that layer acts."""
    seen = {}

    def capture(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        rows = manager._prefill.row_source.clone() if manager is not None else torch.arange(hidden.shape[1])
        seen.setdefault("out", (hidden[0].clone(), rows.cpu()))

    handle = adapter.decoder_layers[layer].register_forward_pre_hook(capture, with_kwargs=True, prepend=True)
    try:
        with torch.no_grad():
            if manager is None:
                adapter.model(**inputs.kwargs)
            else:
                with manager:
                    adapter.model(**inputs.kwargs)
    finally:
        handle.remove()
    return seen["out"]


def planted(tokens, token: int, vector: torch.Tensor, layers=(LAST_DEEPSTACK,)):
    """A copy of tokens whose DeepStack feature of `token` is `vector` in the given layers."""
    deepstack = tokens.deepstack.clone()
    for layer in layers:
        deepstack[layer, token] = vector
    return tokens.replace(deepstack=deepstack)


class KeepRows:
    """An in-LLM stage at `layer` that keeps the given visual tokens (by their LLM-input row)."""

    def __init__(self, layer, keep_sources, insert_from_sources=()):
        self.layer, self.keep_sources, self.insert_from = layer, keep_sources, insert_from_sources

    def select(self, context):
        sources = context.row_source[context.visual_rows].cpu()
        keep = torch.isin(sources, torch.tensor(self.keep_sources)).nonzero().flatten()
        if not self.insert_from:
            return Selection(keep=keep)
        inserted_from = torch.isin(sources, torch.tensor(self.insert_from)).nonzero().flatten()
        hidden = context.hidden[0, context.visual_rows[inserted_from]]
        return Selection(keep=keep, inserted=hidden, inserted_from=inserted_from)


def deepstack_change(adapter, prompt, tokens, token, vector, stage=None, before_llm=lambda t: t):
    """Hidden states entering the layer after the last DeepStack layer, planted run minus plain
    run: (n, C), with their LLM-input rows (n,) and the planted run's GenerationInputs.
    before_llm: what a pre-LLM stage does to the tokens (the same in both runs)."""
    results = []
    for candidate in (before_llm(planted(tokens, token, vector)), before_llm(tokens)):
        inputs = adapter.generation_inputs(prompt, candidate, positions="original")
        manager = None
        if stage is not None:
            state = RequestState(adapter=adapter, prompt=prompt, clip=None, question=QUESTION, device=torch.device("cpu"))
            manager = DecoderPruning(adapter, [stage], {stage.layer: 0}, inputs, {"frame": candidate.frame}, state)
        results.append((entering_layer(adapter, inputs, LAST_DEEPSTACK + 1, manager), inputs))
    ((with_feature, rows), inputs), ((without, _), _) = results
    return with_feature - without, rows, inputs


@pytest.fixture(scope="module")
def encoded(adapter, clip):
    prompt = adapter.build_prompt(clip.frames, clip.timestamps, QUESTION)
    return prompt, adapter.encode_video(prompt)


TOKEN = 21  # temporal patch 1, row 1, col 1


def distinctive(adapter):
    generator = torch.Generator().manual_seed(1)
    return 50.0 * torch.randn(adapter.text_config.hidden_size, generator=generator)


def assert_only_at(change, row, expected):
    """The planted feature shows at `row` (as `expected`) and nowhere else (or nowhere: row None)."""
    others = torch.ones(change.shape[0], dtype=torch.bool)
    if row is not None:
        others[row] = False
        assert torch.allclose(change[row], expected, atol=1e-4)
    assert change[others].abs().max() < 1e-4


def test_deepstack_unpruned_adds_the_feature_at_its_token(adapter, encoded):
    prompt, tokens = encoded
    vector = distinctive(adapter)
    change, _, inputs = deepstack_change(adapter, prompt, tokens, TOKEN, vector)
    assert_only_at(change, int(inputs.visual_rows[TOKEN]), vector - tokens.deepstack[LAST_DEEPSTACK, TOKEN])


def test_deepstack_rows_follow_a_pre_llm_selection(adapter, encoded):
    """Tokens kept in scrambled order: the feature lands on the token's own row; dropped, nowhere."""
    prompt, tokens = encoded
    vector = distinctive(adapter)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(tokens), generator=generator)
    kept = order[:40] if TOKEN in order[:40] else torch.cat([order[:39], torch.tensor([TOKEN])])
    change, _, inputs = deepstack_change(adapter, prompt, tokens, TOKEN, vector, before_llm=lambda t: t.select(kept))
    at = int((kept == TOKEN).nonzero())
    assert_only_at(change, int(inputs.visual_rows[at]), vector - tokens.deepstack[LAST_DEEPSTACK, TOKEN])
    without = kept[kept != TOKEN]
    change, _, _ = deepstack_change(adapter, prompt, tokens, TOKEN, vector, before_llm=lambda t: t.select(without))
    assert_only_at(change, None, None)


def test_deepstack_rows_follow_a_pre_llm_merge(adapter, encoded):
    """A merged row gets its members' DeepStack features with the merge's weights."""
    prompt, tokens = encoded
    vector = distinctive(adapter)
    rows = torch.arange(len(tokens))
    rows[TOKEN + 16] = TOKEN  # the same location one temporal patch later merges into TOKEN's row
    rows = torch.unique(rows, return_inverse=True)[1]
    weights = torch.ones(len(tokens))
    weights[TOKEN] = 3.0
    merged = planted(tokens, TOKEN, vector).merge(rows, int(rows.max()) + 1, weights=weights)
    plain = tokens.merge(rows, int(rows.max()) + 1, weights=weights)
    expected = 0.75 * vector + 0.25 * tokens.deepstack[LAST_DEEPSTACK, TOKEN + 16]
    assert torch.allclose(merged.deepstack[LAST_DEEPSTACK, TOKEN], expected, atol=1e-5)
    assert torch.equal(merged.seq_index[TOKEN], tokens.seq_index[TOKEN])  # the earliest member's position
    change = []
    for candidate in (merged, plain):
        inputs = adapter.generation_inputs(prompt, candidate, positions="original")
        change.append(entering_layer(adapter, inputs, LAST_DEEPSTACK + 1)[0])
    difference = expected - 0.75 * tokens.deepstack[LAST_DEEPSTACK, TOKEN] - 0.25 * tokens.deepstack[LAST_DEEPSTACK, TOKEN + 16]
    assert_only_at(change[0] - change[1], int(inputs.visual_rows[TOKEN]), difference)


def test_coefficient_merge_sums_members_and_their_deepstack_rows(encoded):
    """merge(coefficients=): row = sum of c_i x_i (no normalisation), the same for every DeepStack
    layer; entry form (members=) lets one token feed two rows; representatives pick each row's place."""
    _, tokens = encoded
    rows = torch.full((len(tokens),), -1)
    rows[[3, 5, 9]] = torch.tensor([0, 0, 1])
    coefficients = torch.zeros(len(tokens))
    coefficients[[3, 5, 9]] = torch.tensor([1.0, 0.5, 1.0])
    merged = tokens.merge(rows, 2, coefficients=coefficients, representatives=torch.tensor([5, 9]))
    for x, out in [(tokens.features, merged.features), *zip(tokens.deepstack, merged.deepstack)]:
        torch.testing.assert_close(out[0], x[3] + 0.5 * x[5])
        assert torch.equal(out[1], x[9])  # a lone member with coefficient 1 is bit-identical
    assert merged.seq_index.tolist() == tokens.seq_index[[5, 9]].tolist()  # the representatives' places

    # entry form: token 4 feeds both rows
    members, entry_rows = torch.tensor([4, 6, 4, 8]), torch.tensor([0, 0, 1, 1])
    entry = tokens.merge(entry_rows, 2, coefficients=torch.tensor([0.7, 0.3, 0.2, 0.8]), members=members,
                         representatives=torch.tensor([6, 8]))
    for x, out in [(tokens.features, entry.features), *zip(tokens.deepstack, entry.deepstack)]:
        torch.testing.assert_close(out, torch.stack([0.7 * x[4] + 0.3 * x[6], 0.2 * x[4] + 0.8 * x[8]]))
    assert entry.seq_index.tolist() == tokens.seq_index[[6, 8]].tolist()
    default = tokens.merge(entry_rows, 2, coefficients=torch.ones(4), members=members)
    assert default.seq_index.tolist() == tokens.seq_index[[4, 4]].tolist()  # earliest member by default

    with pytest.raises(ValueError, match="not both"):
        tokens.merge(rows, 2, weights=coefficients, coefficients=coefficients)
    with pytest.raises(ValueError, match="representative"):
        tokens.merge(rows, 2, coefficients=coefficients, representatives=torch.tensor([5, 3]))
    with pytest.raises(ValueError, match="coefficients"):
        tokens.merge(entry_rows, 2, members=members)


def test_affine_row_sums_in_bounded_chunks_equal_one_pass(monkeypatch):
    from vidqa.tensors import tokens as base

    generator = torch.Generator().manual_seed(2)
    x = torch.randn(50, 8, generator=generator)
    rows = torch.randint(-1, 6, (120,), generator=generator)
    members = torch.randint(0, 50, (120,), generator=generator)
    coefficients = torch.rand(120, generator=generator)
    whole = base.affine_row_sums(x, rows, 6, coefficients, members)
    expected = torch.zeros(6, 8)
    for entry in range(120):
        if rows[entry] >= 0:
            expected[rows[entry]] += coefficients[entry] * x[members[entry]]
    torch.testing.assert_close(whole, expected)
    monkeypatch.setattr(base, "AFFINE_CHUNK_ELEMENTS", 3 * 8)  # 3 entries at a time
    assert torch.equal(base.affine_row_sums(x, rows, 6, coefficients, members), whole)


def test_replacing_features_without_deepstack_is_refused(encoded):
    _, tokens = encoded
    with pytest.raises(ValueError, match="merge"):
        tokens.select(torch.arange(4)).replace(features=tokens.features[:4] * 2)


@pytest.mark.parametrize("layer", [1, LAST_DEEPSTACK])
def test_deepstack_rows_follow_an_in_llm_selection(adapter, encoded, layer):
    """A stage before the last DeepStack layer: the kept token still gets its own feature, a dropped
    one's feature goes nowhere, and an inserted row takes the feature of the token it stands for."""
    prompt, tokens = encoded
    vector = distinctive(adapter)
    delta = vector - tokens.deepstack[LAST_DEEPSTACK, TOKEN]
    inputs = adapter.generation_inputs(prompt, tokens, positions="original")
    visual_sources = inputs.visual_rows.tolist()
    source = visual_sources[TOKEN]
    keep = visual_sources[::3] + ([source] if source not in visual_sources[::3] else [])
    change, rows, _ = deepstack_change(adapter, prompt, tokens, TOKEN, vector, KeepRows(layer, keep))
    assert len(rows) < inputs.kwargs["input_ids"].shape[1]
    assert_only_at(change, int((rows == source).nonzero()), delta)

    keep = [row for row in keep if row != source]
    change, rows, _ = deepstack_change(adapter, prompt, tokens, TOKEN, vector, KeepRows(layer, keep))
    assert source not in rows.tolist()
    assert_only_at(change, None, None)

    change, rows, _ = deepstack_change(adapter, prompt, tokens, TOKEN, vector, KeepRows(layer, keep, [source]))
    inserted = int((rows == source).nonzero())  # the inserted row sits at its source's position
    assert_only_at(change, inserted, delta)


def test_pruning_later_tokens_leaves_a_token_exactly_as_unpruned(adapter, encoded):
    """Causal attention: dropping only tokens after TOKEN (before or inside the LLM, before the last
    DeepStack layer) leaves its hidden state after the DeepStack layers exactly as in the unpruned run."""
    prompt, tokens = encoded
    vector = distinctive(adapter)
    tokens = planted(tokens, TOKEN, vector, layers=range(3))
    full_inputs = adapter.generation_inputs(prompt, tokens, positions="original")
    reference, _ = entering_layer(adapter, full_inputs, LAST_DEEPSTACK + 1)
    row = int(full_inputs.visual_rows[TOKEN])

    kept = torch.cat([torch.arange(TOKEN + 1), torch.arange(TOKEN + 1, len(tokens), 2)])
    inputs = adapter.generation_inputs(prompt, tokens.select(kept), positions="original")
    hidden, _ = entering_layer(adapter, inputs, LAST_DEEPSTACK + 1)
    assert torch.allclose(hidden[row], reference[row], atol=1e-5)

    sources = full_inputs.visual_rows[kept].tolist()
    state = RequestState(adapter=adapter, prompt=prompt, clip=None, question=QUESTION, device=torch.device("cpu"))
    manager = DecoderPruning(adapter, [KeepRows(1, sources)], {1: 0}, full_inputs, {"frame": tokens.frame}, state)
    hidden, rows = entering_layer(adapter, full_inputs, LAST_DEEPSTACK + 1, manager)
    assert len(rows) < len(reference)
    assert torch.allclose(hidden[int((rows == row).nonzero())], reference[row], atol=1e-5)


@pytest.mark.parametrize("preset, keep", [("fastv", 0.5), ("prunevid", None), ("sparsevlm", 0.5), ("adatp", 0.5)])
def test_presets_keep_a_planted_feature_on_its_tokens_row(adapter, clip, preset, keep):
    """Whatever a preset drops or merges, one token's DeepStack feature ends up on at most one
    token entering the LLM, as a positive multiple of itself (a merge weight), and inside the LLM
    on that token's row only (or nowhere once it is dropped)."""
    vector = distinctive(adapter)
    pruner = build_pruner(load_preset(preset), adapter, keep=keep)
    runs = []
    for plant in (True, False):
        prompt = adapter.build_prompt(clip.frames, clip.timestamps, QUESTION)
        tokens = adapter.encode_video(prompt)
        if plant:
            delta = vector - tokens.deepstack[LAST_DEEPSTACK, TOKEN]
            tokens = planted(tokens, TOKEN, vector)
        state = RequestState(adapter=adapter, prompt=prompt, clip=clip, question=QUESTION, device=torch.device("cpu"))
        state.record_stage("vision encoder", len(tokens))
        tokens = pruner.before_llm(tokens, state)
        state.llm_tokens = tokens
        inputs = adapter.generation_inputs(prompt, tokens, positions=pruner.positions)
        manager = pruner.inside_llm(inputs, state)
        runs.append((tokens, inputs, *entering_layer(adapter, inputs, LAST_DEEPSTACK + 1, manager)))
    (tokens, inputs, hidden, rows), (plain_tokens, _, plain_hidden, _) = runs
    carried = tokens.deepstack[LAST_DEEPSTACK] - plain_tokens.deepstack[LAST_DEEPSTACK]  # (n, C)
    carriers = (carried.abs().amax(dim=1) > 1e-4).nonzero().flatten()
    assert len(carriers) <= 1
    change = hidden - plain_hidden
    if not len(carriers):
        assert_only_at(change, None, None)
        return
    scale = (carried[carriers[0]] @ delta) / (delta @ delta)
    assert 0 < scale <= 1 + 1e-5 and torch.allclose(carried[carriers[0]], scale * delta, atol=1e-3)
    at = (rows == inputs.visual_rows[carriers[0]]).nonzero().flatten()  # its row, if it survived the LLM stages
    assert_only_at(change, int(at) if len(at) else None, carried[carriers[0]])


# VisionZip and FastVID merge tokens with per-member coefficients (not a weighted mean). FastVID with
# one segment and an anchor every 2 temporal patches offers every non-salient token to both anchors'
# density peaks, so a token feeds two rows.
MERGING = {
    "visionzip": (["ratio=0.5"], None),  # 6 dominant + 2 contextual of 16 per temporal patch
    "fastvid": (["min_segments=1", "tau=0", "anchor_every=2"], 0.5),  # 5 salient + 3 peaks per patch, 2 anchors
}


def before_llm_with_attention(adapter, clip, pruner, change=lambda tokens: tokens):
    """(prompt, tokens as encoded (with vision attention), tokens after the pre-LLM stages, state);
    `change` edits the encoded tokens first (e.g. plants DeepStack rows)."""
    prompt = adapter.build_prompt(clip.frames, clip.timestamps, QUESTION)
    state = RequestState(adapter=adapter, prompt=prompt, clip=clip, question=QUESTION, device=torch.device("cpu"))
    with torch.no_grad():
        tokens = adapter.encode_video_for(prompt, pruner.vision_layer)
        state.record_stage("vision encoder", len(tokens))
        out = pruner.before_llm(change(tokens), state)
    state.llm_tokens = out
    return prompt, tokens, out, state


def with_deepstack_layer(tokens, values, layer=LAST_DEEPSTACK):
    deepstack = tokens.deepstack.clone()
    deepstack[layer] = values
    return tokens.replace(deepstack=deepstack)


@pytest.mark.parametrize("preset", sorted(MERGING))
def test_merging_presets_merge_deepstack_rows_with_the_features_coefficients(adapter, clip, preset):
    """A DeepStack layer made equal to the features comes out equal to the merged features, bit
    for bit; one made the identity (64 tokens, hidden 64) reveals each row's coefficients: the
    shapes of the methods' arithmetic (VisionZip: target + mean of joiners; FastVID: peak weight
    max(1/(n+1), beta), members (1 - w)/n, summing to 1; a token may feed two anchors' rows)."""
    params, keep = MERGING[preset]
    pruner = build_pruner(load_preset(preset, params), adapter, keep=keep)
    _, tokens, mirrored, _ = before_llm_with_attention(
        adapter, clip, pruner, lambda t: with_deepstack_layer(t, t.features))
    assert len(mirrored) < len(tokens)
    assert torch.equal(mirrored.deepstack[LAST_DEEPSTACK], mirrored.features)

    count, hidden = len(tokens), tokens.features.shape[1]
    assert hidden >= count
    identity = torch.eye(count, hidden)
    _, _, out, _ = before_llm_with_attention(adapter, clip, pruner, lambda t: with_deepstack_layer(t, identity))
    coefficients = out.deepstack[LAST_DEEPSTACK][:, :count]  # (rows, tokens)
    members = coefficients != 0
    alone = members.sum(dim=1) == 1
    own = tokens.seq_index.tolist()
    for row in range(len(out)):  # every row holds its own token (the one whose place it takes)
        assert coefficients[row, own.index(int(out.seq_index[row]))] > 0
    assert torch.equal(coefficients[alone].sum(dim=1), torch.ones(int(alone.sum())))  # kept unchanged
    merged = coefficients[~alone]
    assert len(merged) > 0
    for row in merged:
        values = row[row != 0].sort().values  # the row's own token last (largest)
        if preset == "visionzip":  # target 1 + the mean of its n joiners (1/n each)
            assert float(values[-1]) == 1.0
            torch.testing.assert_close(values[:-1], torch.full((len(values) - 1,), 1 / (len(values) - 1)))
        else:  # w * peak + (1 - w) * mean of members, w >= beta; members share (1 - w) equally
            assert float(values[-1]) >= 0.6 - 1e-6 and torch.allclose(values[:-1], values[0].expand(len(values) - 1))
            torch.testing.assert_close(values.sum(), torch.tensor(1.0))
    assert int(members.sum(dim=0).max()) == (1 if preset == "visionzip" else 2)  # FastVID: offered to both anchors


@pytest.mark.parametrize("preset", sorted(MERGING))
def test_merging_presets_carry_a_planted_deepstack_feature_by_their_coefficients(adapter, clip, preset):
    """A token distinctive in DeepStack only: merged, its feature reaches exactly the rows it is a
    member of, scaled by its coefficient there, before and inside the LLM; dropped, it reaches nothing."""
    params, keep = MERGING[preset]
    pruner = build_pruner(load_preset(preset, params), adapter, keep=keep)
    _, tokens, _, _ = before_llm_with_attention(adapter, clip, pruner)
    count, hidden = len(tokens), tokens.features.shape[1]
    identity = torch.eye(count, hidden)
    _, _, probe, _ = before_llm_with_attention(adapter, clip, pruner, lambda t: with_deepstack_layer(t, identity))
    coefficients = probe.deepstack[LAST_DEEPSTACK][:, :count]  # (rows, tokens)
    shares = (coefficients != 0).sum(dim=0)
    fraction = (coefficients > 0) & (coefficients < 1)
    # a token merged into another's row with a fractional coefficient (FastVID: into two rows)
    token = int(((shares == shares.max()) & fraction.any(dim=0)).nonzero()[0])
    vector = distinctive(adapter)
    delta = vector - tokens.deepstack[LAST_DEEPSTACK, token]

    runs = []
    for plant in (True, False):
        change = (lambda t: planted(t, token, vector)) if plant else (lambda t: t)
        prompt, _, out, state = before_llm_with_attention(adapter, clip, pruner, change)
        inputs = adapter.generation_inputs(prompt, out, positions=pruner.positions)
        runs.append((out, inputs, entering_layer(adapter, inputs, LAST_DEEPSTACK + 1)[0]))
    (out, inputs, hidden_planted), (plain, _, hidden_plain) = runs
    carried = out.deepstack[LAST_DEEPSTACK] - plain.deepstack[LAST_DEEPSTACK]  # (rows, C)
    expected = coefficients[:, token, None] * delta  # (rows, C)
    assert int((coefficients[:, token] != 0).sum()) == (2 if preset == "fastvid" else 1)
    torch.testing.assert_close(carried, expected, atol=1e-4, rtol=1e-5)
    change = hidden_planted - hidden_plain
    at = inputs.visual_rows[(coefficients[:, token] != 0).nonzero().flatten()]
    others = torch.ones(change.shape[0], dtype=torch.bool)
    others[at] = False
    torch.testing.assert_close(change[at], expected[coefficients[:, token] != 0], atol=1e-4, rtol=1e-5)
    assert change[others].abs().max() < 1e-4


@pytest.mark.parametrize("preset, params", [("visionzip", ["ratio=0.25", "dominant_share=1"]),
                                             ("fastvid", ["ratio=0.25", "context_share=0"])])
def test_merging_presets_never_add_a_dropped_tokens_deepstack_feature(adapter, clip, preset, params):
    """Without contextual / density-peak rows both presets drop the tokens they do not keep: a dropped
    token's DeepStack feature reaches no row, before or inside the LLM."""
    pruner = build_pruner(load_preset(preset, params), adapter)
    _, tokens, out, _ = before_llm_with_attention(adapter, clip, pruner)
    dropped = sorted(set(tokens.seq_index.tolist()) - set(out.seq_index.tolist()))
    token = tokens.seq_index.tolist().index(dropped[len(dropped) // 2])
    vector = distinctive(adapter)
    runs = []
    for change in (lambda t: planted(t, token, vector), lambda t: t):
        prompt, _, out, _ = before_llm_with_attention(adapter, clip, pruner, change)
        inputs = adapter.generation_inputs(prompt, out, positions=pruner.positions)
        runs.append((out, entering_layer(adapter, inputs, LAST_DEEPSTACK + 1)[0]))
    (out, hidden_planted), (plain, hidden_plain) = runs
    assert torch.equal(out.deepstack, plain.deepstack) and len(out) == 4 * 4
    assert_only_at(hidden_planted - hidden_plain, None, None)


# --- positions and decode ----------------------------------------------------------------------


def test_pre_llm_positions_are_the_unpruned_ones_and_timestamps_survive(adapter, clip):
    pruner = build_pruner(load_preset("adatp", ["tau_l=0.5"]), adapter)  # dedup drops tokens before the LLM
    prompt, inputs, state = prepare(adapter, clip, pruner)
    tokens = state.llm_tokens
    assert len(tokens) < len(prompt.visual_index)
    ids, mm_types = inputs.kwargs["input_ids"][0], inputs.kwargs["mm_token_type_ids"][0]
    video = adapter.video_token_id
    assert int((ids == video).sum()) == int((mm_types == 2).sum()) == len(tokens)
    before = prompt.input_ids[0]
    assert torch.equal(ids[ids != video], before[before != video])  # every timestamp and marker survives
    position_ids = inputs.kwargs["position_ids"]  # (4, 1, n)
    full = unpruned_positions(adapter, prompt)
    assert torch.equal(position_ids[1:], full[:, :, inputs.seq_index])
    assert torch.equal(position_ids[0, 0], torch.arange(len(ids)))
    # independently of get_rope_index: a token of temporal patch t at (row r, col c) sits at
    # (s, s + r, s + c), s = one after the position of the text row just before its span
    span_start = prompt.visual_index[tokens.frame * 16]  # first row of each token's span
    s = full[0, 0, span_start - 1] + 1
    expected = torch.stack([s, s + tokens.row, s + tokens.col])
    assert torch.equal(position_ids[1:, 0, inputs.visual_rows], expected)
    # each token sits inside its own temporal patch's span, between the timestamps around it
    rows = torch.arange(len(ids))
    for token, row in enumerate(inputs.visual_rows):
        assert int(inputs.seq_index[row]) == int(tokens.seq_index[token])
        text_before = rows[(ids != video) & (rows < row)].max()
        text_after = rows[(ids != video) & (rows > row)].min()
        assert inputs.seq_index[text_before] < tokens.seq_index[token] < inputs.seq_index[text_after]
    assert adapter.model.model.rope_deltas.item() == int(full.max()) + 1 - len(ids)


def test_decode_continues_the_unpruned_positions(adapter, encoded):
    """First decoded logits of a pruned run = a reference with explicit positions continuing the
    UNPRUNED sequence (and differ from positions continuing the pruned length)."""
    prompt, tokens = encoded
    model = adapter.model
    kept = tokens.select(torch.arange(0, len(tokens), 2))  # half the video before the LLM
    inputs = adapter.generation_inputs(prompt, kept, positions="original")
    steps = 3
    with torch.no_grad():
        output = model.generate(**inputs.kwargs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                output_logits=True, return_dict_in_generate=True)
    ids = inputs.kwargs["input_ids"]
    length = ids.shape[1]
    full = unpruned_positions(adapter, prompt)
    next_position = int(full.max()) + 1

    def reference(first_decode_position):
        features = {"video": BaseModelOutputWithDeepstackFeatures(
            pooler_output=(kept.features,), deepstack_features=[(layer,) for layer in kept.deepstack])}
        logits = []
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=full[:, :, inputs.seq_index],
                        mm_encoder_outputs=features, use_cache=True)
            logits.append(out.logits[0, -1])
            cache = returned_cache(out)
            for step in range(steps - 1):
                token = output.sequences[:, length + step : length + step + 1]
                position = torch.full((3, 1, 1), first_decode_position + step)
                out = model(input_ids=token, attention_mask=torch.ones(1, length + step + 1, dtype=torch.long),
                            position_ids=position, **{cache_keyword(model): cache}, use_cache=True)
                logits.append(out.logits[0, -1])
                cache = returned_cache(out)
        return torch.stack(logits)

    generated = torch.stack([step[0] for step in output.logits])
    assert torch.allclose(generated, reference(next_position), atol=1e-4)
    assert next_position != length
    assert not torch.allclose(generated[1:], reference(length)[1:], atol=1e-4)


@pytest.mark.parametrize("preset,keep", [("none", None), ("evs", 0.5)])
def test_reused_prefix_answers_are_token_identical(adapter, clip, preset, keep):
    """A VideoSession prefills the rows up to the last video span once (before 5.25 that prefix
    holds the processor's outer `<|vision_start|>`, and its outer `<|vision_end|>` goes with the
    question) and answers every question as a full prefill does, with the same token counts."""
    from vidqa.engine.session import VideoSession

    pruner = NO_PRUNING if preset == "none" else build_pruner(load_preset(preset), adapter, keep=keep)
    questions = [QUESTION, "which colour is the square ?"]
    options = engine.GenerationOptions(max_new_tokens=6)
    expected = [engine.answer(adapter, clip, q, options, pruner=pruner) for q in questions]
    session = VideoSession(adapter, clip, pruner, options)
    got = [session.ask(q) for q in questions]
    assert [a.text for a in got] == [a.text for a in expected]
    assert [a.stats.prefix_reused for a in got] == [False, True]
    assert [a.stats.tokens.llm_prompt_tokens for a in got] == [a.stats.tokens.llm_prompt_tokens for a in expected]
    _, inputs, _ = prepare(adapter, clip, pruner)
    ids = inputs.kwargs["input_ids"][0]
    assert session.prefix.ids.shape[1] == inputs.text_start
    assert torch.equal(session.prefix.ids[0], ids[:inputs.text_start])


def test_recomputed_attention_rows_equal_eager(checkpoint, adapter, clip):
    """The in-LLM scorers' attention rows (q_norm, interleaved M-RoPE) = eager attention's."""
    eager = load_model(str(checkpoint), device="cpu", dtype="float32", attn="eager", max_pixels=MAX_PIXELS)
    _, inputs, state = prepare(adapter, clip)
    recomputed, reference = recomputed_and_eager_rows(adapter, eager, inputs, state, {"frame": state.llm_tokens.frame}, 64)
    assert torch.allclose(recomputed, reference, atol=1e-5)


# --- MoE, FLOPs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3_vl_moe"), moe=True)


def test_moe_variant_runs_and_prunes(moe_checkpoint, clip):
    adapter = load_model(str(moe_checkpoint), device="cpu", dtype="float32", max_pixels=MAX_PIXELS)
    assert type(adapter.model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    reference = ask(adapter, clip)
    prompt = adapter.build_prompt(clip.frames, clip.timestamps, QUESTION)
    adapter.model.model.rope_deltas = None
    output = adapter.model.generate(**prompt.inputs, max_new_tokens=6, do_sample=False)
    assert reference.text == adapter.processor.tokenizer.decode(output[0, prompt.length:], skip_special_tokens=True).strip()
    assert ask(adapter, clip, build_pruner(load_preset("fastv"), adapter, keep=1.0)).text == reference.text
    pruned = ask(adapter, clip, build_pruner(load_preset("sparsevlm"), adapter, keep=0.4))
    assert pruned.stats.tokens.layer_avg_retention < 0.5


def test_flops_from_the_configs(adapter, moe_checkpoint):
    llm, vision = flops.shapes_from_model_config(adapter.model.config)
    assert (llm.num_layers, llm.hidden, llm.num_heads, llm.num_kv_heads, llm.head_dim, llm.intermediate) == (4, 64, 4, 2, 16, 128)
    assert vision is None  # dynamic-resolution ViT: not modelled, reported as 0
    from transformers import AutoConfig

    moe, _ = flops.shapes_from_model_config(AutoConfig.from_pretrained(moe_checkpoint))
    assert moe.intermediate == 2 * 32  # active experts per token x expert width, not 4 experts' worth


def test_flops_of_a_mixed_moe_config_count_each_layer():
    from transformers import Qwen3VLMoeConfig

    config = Qwen3VLMoeConfig(text_config={
        "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "intermediate_size": 256, "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
        "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    llm, _ = flops.shapes_from_model_config(config)
    # layers 0 and 2 dense (sparse step 2), layer 1 sparse, layer 3 dense (mlp_only)
    assert llm.layer_intermediate == (256, 64, 256, 256)
    dense = flops.LLMShape(4, 64, 256, 4, 2, 16)
    sparse = flops.LLMShape(4, 64, 64, 4, 2, 16)
    counts = [10, 10, 5, 5]
    expected = (flops.layer_macs(dense, 10) + flops.layer_macs(sparse, 10) + 2 * flops.layer_macs(dense, 5))
    assert flops.visual_prefill_macs(llm, counts) == expected


# --- CLI ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["none", "fastv", "prunevid", "visionzip", "fastvid", "flashvid", "holitom"])
def test_end_to_end_cli(run_cli, checkpoint, square_video, preset):
    args = ["ask", square_video, QUESTION, "--model", checkpoint, "--frames", FRAMES, "--max-pixels", MAX_PIXELS,
            "--max-new-tokens", "2", "--prune", preset, "--json"]
    if preset == "fastv":
        args += ["--keep", "0.5"]
    result = run_cli(args)
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    tokens = record["stats"]["tokens"]
    assert record["preset"] == preset and tokens["visual_tokens_before"] == 64
    if preset == "none":
        assert tokens["layer_avg_retention"] == 1.0
    else:
        assert tokens["layer_avg_retention"] < 1 and record["stats"]["flops"]["paper_fraction"] < 1


def test_cli_max_pixels(run_cli, checkpoint, square_video):
    base = ["ask", square_video, QUESTION, "--model", checkpoint, "--frames", FRAMES, "--max-new-tokens", "1"]
    result = run_cli(base + ["--max-pixels", "4096", "--json"])  # 64 x 64: 2x2 tokens per temporal patch
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["stats"]["tokens"]["visual_tokens_before"] == 4 * 2 * 2
    assert_one_line_error(run_cli(base + ["--max-pixels", "100"]), "--max-pixels", "1024")


def test_models_command_lists_qwen3_vl(run_cli):
    rows = {row["family"]: row for row in json.loads(run_cli(["models", "--json"]).stdout)}
    assert rows["Qwen3-VL"]["model_types"] == ["qwen3_vl", "qwen3_vl_moe"]
    assert "Qwen/Qwen3-VL-2B-Instruct" in rows["Qwen3-VL"]["checkpoints"]
    assert rows["Qwen3-VL"]["max_pixels"] is True
