"""Pruning never switches off silently: after every prefill the engine checks what the LLM did
against the plan (pruning/core/verify.py). Normal runs of every preset pass on every family; simulated
transformers changes (a hook that never fires, edits that are ignored, a cache that is not sliced,
a cache argument under an unknown name, features or positions the model did not take) stop the
request with one line naming the transformers version and the preset, exit 1."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error

from vidqa.engine import request as engine
from vidqa.pruning.core import decoder, verify
from vidqa.pruning.core.compat import TESTED_TRANSFORMERS, PruningMismatch, transformers_version
from vidqa.pruning.core.presets import build_pruner, load_preset
from vidqa.pruning.core.verify import CHECKS, cache_lengths

QUESTION = "what happens in this video ?"
PRESETS = ["none", "fastv", "prunevid", "sparsevlm", "adatp"]


def ask(adapter, clip, preset="none", params=(), max_new_tokens=3):
    pruner = build_pruner(load_preset(preset, list(params)), adapter)
    return engine.answer(adapter, clip, QUESTION, engine.GenerationOptions(max_new_tokens=max_new_tokens), pruner=pruner)


def cli_ask(run_cli, model, video, preset, *extra):
    return run_cli(["ask", video, QUESTION, "--model", model, "--frames", "8", "--max-new-tokens", "3",
                    "--prune", preset, *extra])


def assert_mismatch(result, preset, *fragments):
    assert_one_line_error(result, f"transformers {transformers_version()}", f"preset '{preset}'", *fragments,
                          exit_code=1)
    assert result.stdout == ""  # no answer, labelled pruned or otherwise


class NoCheck(verify.PrefillCheck):
    """The engine without verification: attaches nothing."""

    def __enter__(self):
        return self

    def finish(self):
        return {}


def assert_silent_without_the_check(monkeypatch, rerun):
    """The simulated change is one that would otherwise go unnoticed: the same run answers, exit 0."""
    monkeypatch.setattr(engine, "PrefillCheck", NoCheck)
    result = rerun()
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip()


# --- normal runs pass, and say what was checked -------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen", "smol"])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_passes_verification_on_every_family(family_adapters, family_clips, family, preset):
    result = ask(family_adapters[family], family_clips[family], preset)
    verified = result.stats.verified
    assert verified["transformers"] == transformers_version()
    assert verified["layers"] == family_adapters[family].text_config.num_hidden_layers
    in_llm = preset != "none"  # every shipped pruning preset has an in-LLM stage
    expected = [c for c in CHECKS if c != "stages" or in_llm]
    assert verified["checks"] == expected
    if in_llm:  # the check really compared a pruned run
        assert result.stats.tokens.visual_tokens_per_layer[-1] < result.stats.tokens.visual_tokens_per_layer[0]


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_data_dependent_budget_and_prune_cache_variants_pass(family_adapters, family_clips, family):
    rank = ask(family_adapters[family], family_clips[family], "sparsevlm", ["budget=rank", "rank_lambda=0.5"])
    assert "stages" in rank.stats.verified["checks"]
    no_cache_slicing = ask(family_adapters[family], family_clips[family], "prunevid", ["prune_cache=false"])
    assert "kv_cache" in no_cache_slicing.stats.verified["checks"]


def test_json_records_what_was_verified(run_cli, tiny_llava, square_video):
    result = cli_ask(run_cli, tiny_llava, square_video, "fastv", "--json")
    assert result.exit_code == 0, result.stderr
    verified = json.loads(result.stdout)["stats"]["verified"]
    assert verified == {"transformers": transformers_version(), "checks": list(CHECKS), "layers": 4}


# --- simulated transformers changes, through the CLI ------------------------------------------


def test_a_stage_hook_that_never_fires_stops_the_request(run_cli, tiny_llava, square_video, monkeypatch):
    monkeypatch.setattr(decoder.DecoderPruning, "_before_layer", lambda self, index: lambda *args: None)
    result = cli_ask(run_cli, tiny_llava, square_video, "fastv")
    assert_mismatch(result, "fastv", "stage at decoder layer 1 never ran")
    assert_silent_without_the_check(monkeypatch, lambda: cli_ask(run_cli, tiny_llava, square_video, "fastv"))


def test_ignored_hidden_state_edits_stop_the_request(run_cli, tiny_llava, square_video, monkeypatch):
    """The stage runs, but the layer does not take the shortened hidden states (as if transformers
    stopped honouring a pre-hook's returned arguments)."""
    before_layer = decoder.DecoderPruning._before_layer

    def ignoring(self, index):
        hook = before_layer(self, index)
        return lambda module, args, kwargs: (hook(module, args, dict(kwargs)), None)[1]

    monkeypatch.setattr(decoder.DecoderPruning, "_before_layer", ignoring)
    result = cli_ask(run_cli, tiny_llava, square_video, "fastv", "--keep", "0.6")
    assert_mismatch(result, "fastv", "decoder layer 1 received", "rows, planned")
    assert_silent_without_the_check(
        monkeypatch, lambda: cli_ask(run_cli, tiny_llava, square_video, "fastv", "--keep", "0.6"))


def test_an_unsliced_cache_stops_the_request(run_cli, tiny_llava, square_video, monkeypatch):
    monkeypatch.setattr(decoder.DecoderPruning, "_slice_early_caches", lambda self, cache: None)
    result = cli_ask(run_cli, tiny_llava, square_video, "prunevid")
    assert_mismatch(result, "prunevid", "decoder layer 0's KV cache holds", "entries, planned")
    assert_silent_without_the_check(monkeypatch, lambda: cli_ask(run_cli, tiny_llava, square_video, "prunevid"))


def test_a_cache_argument_under_an_unknown_name_stops_the_request(run_cli, tiny_llava, square_video, monkeypatch):
    """transformers renames the decoder modules' cache kwarg again (past_key_values -> cache happened
    in 5.24): the hooks no longer find the cache, so PruneVid's cache slicing would silently not happen."""
    monkeypatch.setattr(decoder, "cache_argument", lambda kwargs: None)
    result = cli_ask(run_cli, tiny_llava, square_video, "prunevid")
    assert_mismatch(result, "prunevid", "KV cache holds")
    assert_silent_without_the_check(monkeypatch, lambda: cli_ask(run_cli, tiny_llava, square_video, "prunevid"))


def test_positions_that_are_not_the_kept_rows_stop_the_request(run_cli, tiny_llava, square_video, monkeypatch):
    """A slicing that hands the first n rotary rows instead of the kept rows' own (compacted
    positions): shapes still fit, the model runs, only the positions are wrong."""
    apply = decoder.DecoderPruning._apply

    def compacting(self, selection, hidden, visual_rows):
        new_hidden = apply(self, selection, hidden, visual_rows)
        cos, sin = self._prefill.full_position_embeddings
        count = new_hidden.shape[1]
        self._prefill.position_embeddings = (cos[:, :count], sin[:, :count])
        return new_hidden

    monkeypatch.setattr(decoder.DecoderPruning, "_apply", compacting)
    result = cli_ask(run_cli, tiny_llava, square_video, "fastv")
    assert_mismatch(result, "fastv", "decoder layer 1 received rotary tables")
    assert_silent_without_the_check(monkeypatch, lambda: cli_ask(run_cli, tiny_llava, square_video, "fastv"))


# --- the LLM input: features and positions the model did not take -------------------------------


class ReplaceLLMInput:
    """A pre-hook on the language model that rewrites its input, as a changed model class would."""

    def __init__(self, adapter, rewrite):
        self.adapter, self.rewrite = adapter, rewrite

    def __enter__(self):
        self.handle = self.adapter.language_model.register_forward_pre_hook(self.rewrite, with_kwargs=True)

    def __exit__(self, *exc):
        self.handle.remove()


def test_features_not_scattered_into_the_prompt_stop_the_request(family_adapters, family_clips):
    adapter = family_adapters["llava"]
    embed = adapter.language_model.get_input_embeddings()

    def placeholders_only(module, args, kwargs):  # the model embedded the ids and skipped the scatter
        if kwargs.get("inputs_embeds") is not None and kwargs["inputs_embeds"].shape[1] > 1:
            ids = torch.full(kwargs["inputs_embeds"].shape[:2], adapter.video_token_id)
            kwargs["inputs_embeds"] = embed(ids)
        return args, kwargs

    with ReplaceLLMInput(adapter, placeholders_only), pytest.raises(PruningMismatch, match="visual features were not inserted"):
        ask(adapter, family_clips["llava"], "prunevid")


def test_recomputed_qwen_positions_stop_the_request(family_adapters, family_clips):
    """Qwen2.5-VL given no position ids computes its own from the pruned prompt: 1-D or wrong 3-D."""
    adapter = family_adapters["qwen"]

    def drop_positions(module, args, kwargs):
        kwargs["position_ids"] = None
        return args, kwargs

    with ReplaceLLMInput(adapter, drop_positions), pytest.raises(PruningMismatch) as error:
        ask(adapter, family_clips["qwen"], "adatp")
    message = str(error.value)
    assert "did not receive the planned position ids" in message and "preset 'adatp'" in message
    assert "\n" not in message and re.search(r"transformers \d+\.\d+", message)


def test_an_unreadable_cache_fails_only_where_pruning_needs_it(family_adapters, family_clips, monkeypatch):
    monkeypatch.setattr(verify, "cache_lengths", lambda cache, num_layers: None)
    plain = ask(family_adapters["smol"], family_clips["smol"], "none")
    assert "kv_cache" not in plain.stats.verified["checks"]
    with pytest.raises(PruningMismatch, match="KV cache could not be read"):
        ask(family_adapters["smol"], family_clips["smol"], "fastv")


def test_cache_lengths_reads_layers_and_refuses_other_layouts():
    class Layer:
        def __init__(self, n):
            self.keys = torch.zeros(1, 2, n, 4)

    class Cache:
        layers = [Layer(5), Layer(3)]

    assert cache_lengths(Cache(), 2) == [5, 3]
    assert cache_lengths(Cache(), 3) is None
    assert cache_lengths(object(), 2) is None


def test_the_declared_range_matches_the_messages_and_ci_tests_both_ends():
    root = Path(__file__).resolve().parents[1]
    declared = re.search(r'"transformers([^"]+)"', (root / "pyproject.toml").read_text()).group(1)
    assert declared == TESTED_TRANSFORMERS
    low, high = re.fullmatch(r">=([\d.]+),<([\d.]+)", declared).groups()

    def pinned(name):
        text = (root / ".ci" / name).read_text()
        return tuple(int(part) for part in re.search(r"^transformers==([\d.]+)$", text, re.M).group(1).split("."))

    assert pinned("transformers-lowest.txt")[:2] == tuple(int(part) for part in low.split("."))
    assert pinned("transformers-newest.txt") < tuple(int(part) for part in high.split("."))


def test_a_renamed_rotary_argument_is_one_line_not_a_traceback(run_cli, tiny_llava, square_video, monkeypatch):
    """transformers passes (cos, sin) to the layers under another name than the hooks read."""
    read = decoder._position_embeddings
    renamed = {"position_embeddings": "rotary_embeddings"}
    monkeypatch.setattr(decoder, "_position_embeddings",
                        lambda kwargs, index: read({renamed.get(k, k): v for k, v in kwargs.items()}, index))
    result = cli_ask(run_cli, tiny_llava, square_video, "sparsevlm")
    assert_mismatch(result, "sparsevlm", "was called without the (cos, sin) 'position_embeddings'")


def test_hooks_on_modules_the_model_does_not_run_stop_the_request(run_cli, tiny_llava, square_video, monkeypatch):
    """transformers moves the decoder (e.g. renames `model.language_model`): the adapter's path now
    leads to a module the model never calls, so neither the pruning hooks nor the checks fire."""
    from vidqa.models.llava_onevision import LlavaOnevisionAdapter

    unused = {}

    def detached(adapter):
        if "module" not in unused:
            module = torch.nn.Module()
            module.layers = adapter.model.model.language_model.layers  # the layers, but not the stack that runs them
            unused["module"] = module
        return unused["module"]

    monkeypatch.setattr(LlavaOnevisionAdapter, "language_model", property(detached))
    result = cli_ask(run_cli, tiny_llava, square_video, "fastv")
    assert_mismatch(result, "fastv", "decoder modules vidqa hooks were not the ones the model ran")


def test_the_advice_depends_on_whether_the_version_was_tested(monkeypatch):
    from vidqa.pruning.core import compat

    monkeypatch.setattr(compat, "transformers_version", lambda: "5.24.0")
    assert "in the tested range, please report this" in str(PruningMismatch("x", "fastv"))
    monkeypatch.setattr(compat, "transformers_version", lambda: "5.31.0")
    message = str(PruningMismatch("x", "fastv"))
    assert "transformers 5.31.0 (preset 'fastv')" in message
    assert f"tested with transformers {TESTED_TRANSFORMERS}: install a version in that range" in message
