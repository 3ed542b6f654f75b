"""The generation settings a request runs with: the checkpoint's generation_config, with only
what vidqa's flags mean changed, and a record of the result for `ask --json`.

`options` is an `engine.GenerationOptions` (max_new_tokens, temperature; 0 = greedy).
"""

from __future__ import annotations

import copy

from vidqa.errors import BadInput

# how the tokens after the first are decoded (vidqa/engine/decode.py); auto picks per device
DECODE_PATHS = ("auto", "eager", "static", "graphs")

RECORDED = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "no_repeat_ngram_size",
            "length_penalty", "num_beams", "max_new_tokens", "eos_token_id", "pad_token_id")
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p")


def check_decode(value: str) -> None:
    """`--decode` must name a decode path (no torch needed: the CLI checks it before loading)."""
    if value not in DECODE_PATHS:
        raise BadInput(f"--decode must be one of {', '.join(DECODE_PATHS)}, got '{value}'")


def generation_overrides(adapter, options) -> dict:
    """What vidqa's flags change in the checkpoint's generation_config; the rest (repetition
    penalty, top-k/top-p when sampling, pad id...) applies as `generate` applies it.

    Greedy (temperature 0) sets do_sample=False only; --temperature T sets do_sample and the
    temperature. The eos ids are the generation_config's plus the family's chat end markers
    (Qwen-family: both <|im_end|> and <|endoftext|>), so a fork that lists one still stops.
    """
    overrides: dict = {"max_new_tokens": options.max_new_tokens}
    if options.temperature > 0:
        overrides.update(do_sample=True, temperature=options.temperature)
    else:
        overrides["do_sample"] = False
    eos = _id_list(adapter.model.generation_config.eos_token_id)
    eos += [token for token in adapter.stop_token_ids() if token not in eos]
    if eos:
        overrides["eos_token_id"] = eos
    return overrides


def generation_settings(adapter, options) -> dict:
    """The settings `generate` runs with: the checkpoint's generation_config updated by
    `generation_overrides`, with transformers' own defaults where both leave a value unset.
    Sampling-only knobs are left out when decoding is greedy (they do nothing then)."""
    from transformers import GenerationConfig

    config = copy.deepcopy(adapter.model.generation_config)
    config.update(**generation_overrides(adapter, options))
    defaults_of = getattr(GenerationConfig, "_get_default_generation_params", None)  # transformers >= 5
    defaults = defaults_of() if defaults_of is not None else {}
    settings = {}
    for key in RECORDED:
        value = getattr(config, key, None)
        if value is None:
            value = defaults.get(key)
        if value is None or (key in SAMPLING_ONLY and not config.do_sample):
            continue
        settings[key] = list(value) if isinstance(value, (list, tuple)) else value
    return settings


def sampling_note(adapter, options) -> str | None:
    """A note when the checkpoint's top_k=1 turns --temperature sampling into greedy decoding."""
    if options.temperature > 0 and getattr(adapter.model.generation_config, "top_k", None) == 1:
        return (f"the checkpoint's generation_config sets top_k=1, so sampling at --temperature "
                f"{options.temperature:g} always picks the most likely token")
    return None


def _id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
