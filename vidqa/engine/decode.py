"""The static decode path: fixed-shape decode steps over a pre-allocated, per-layer padded KV
cache, replayed as one CUDA graph per step on a GPU (`--decode graphs`) or run as they are
(`--decode static`, any device). `--decode eager` is transformers' `generate` loop.

Why: at batch 1 the eager loop is launch-bound (hundreds of small kernels per token, each
launched from Python); a CUDA graph launches a whole step at once. A graph replays fixed
shapes and fixed addresses, so everything a step touches is allocated once per request:

- Prefill is unchanged: `generate(max_new_tokens=1)` runs it with the pruning hooks and the
  prefill check (engine/request.py), so the first token and the cache are the eager path's.
- KV cache: each layer's prefill entries are copied into a buffer of (that layer's prefill
  length + the decode steps) slots (`PaddedLayer`); a step writes its entry at slot `length`
  (a 0-d device tensor) and advances it in place. Layers hold different lengths under in-LLM
  pruning (FastV, SparseVLM, HoliTom from layer K; PruneVid's sliced early layers): each layer
  keeps its own, no layer pays for another's.
- Attention mask: a forward pre-hook on every decoder layer hands it its own 4-D mask over its
  buffer (slots <= length: the entries written plus the new one), as a bool mask for SDPA or
  an additive one for eager attention; the model's own mask building is skipped (a 4-D mask is
  taken as it is).
- DyCoke's per-step KV selection runs in fixed shape (`DecodeKVSelection.attended_entries`):
  the visual entries not chosen at layer L-1 are masked out in layers >= L instead of gathered
  away (the same attention, computed over the padded buffer).
- Positions continue as `generate` continues them: the last prompt position + 1 per step, in
  every row of the position ids (1-D families; Qwen's (text, t, h, w) M-RoPE rows alike).
- Token choice, outside the graph: the logits processors `generate` would build for the
  settings in effect (repetition penalty; temperature, top-k, top-p, min-p when sampling), then
  argmax or a multinomial draw, eos ids, streaming one token at a time. A setting this path does
  not apply (beam search, n-gram blocking, bad words...) falls back to eager with a note.

Batch 1. Not for models split over several devices, sliding-window or linear-attention layers
(Qwen3.5) or attention kernels that take no padded mask (flash_attention_2): those decode
eagerly, with a note when the fast path was asked for.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import Cache, CacheLayerMixin

from vidqa.engine.generation import check_decode, generation_overrides, generation_settings
from vidqa.errors import BadInput
from vidqa.pruning.core.compat import DecoderMismatch, cache_keyword
from vidqa.tensors.device import synchronize

# `auto` on a GPU: CUDA graphs when an answer may be this long. Capturing costs about one eager
# step; a graph step saves most of one (launch-bound) eager step, so short answers (a letter, a
# word) gain nothing. Provisional until measured on a GPU (benchmarks/decode.py, docs/benchmarks.md).
AUTO_GRAPHS_MIN_NEW_TOKENS = 32
# `auto` on a CPU: the path measured fastest there (docs/benchmarks.md, "Decode paths").
AUTO_CPU_PATH = "static"

# generation_config settings whose logits processors or stopping rules this path does not apply:
# (name, value that means "off"); any other value sends the request to the eager path
UNSUPPORTED_SETTINGS = (
    ("num_beams", 1), ("no_repeat_ngram_size", 0), ("bad_words_ids", None), ("sequence_bias", None),
    ("suppress_tokens", None), ("begin_suppress_tokens", None),
    ("forced_bos_token_id", None), ("forced_eos_token_id", None), ("exponential_decay_length_penalty", None),
    ("guidance_scale", 1.0), ("watermarking_config", None), ("stop_strings", None), ("max_time", None),
    ("remove_invalid_values", False), ("renormalize_logits", False), ("typical_p", 1.0), ("epsilon_cutoff", 0.0),
    ("eta_cutoff", 0.0), ("top_h", None),
)


@dataclass
class DecodePlan:
    """How one request decodes. path: "eager" | "static" | "graphs"; note: why a fast path
    that was asked for (or that auto chose) does not apply, else None."""

    path: str
    note: str | None = None
    settings: dict = field(default_factory=dict)  # what `logits_processors` reads
    eos: tuple[int, ...] = ()

    @property
    def do_sample(self) -> bool:
        return bool(self.settings.get("do_sample"))


def auto_path(device: torch.device, max_new_tokens: int) -> str:
    """What `--decode auto` runs on `device` for answers of at most `max_new_tokens`."""
    if device.type == "cuda":
        return "graphs" if max_new_tokens >= AUTO_GRAPHS_MIN_NEW_TOKENS else "eager"
    return AUTO_CPU_PATH


def plan_decode(adapter, options) -> DecodePlan:
    """The decode path for a request with GenerationOptions `options` (its `decode`: auto |
    eager | static | graphs). `graphs` off a CUDA device is an error; a fast path that cannot
    run this request falls back to eager, with a note unless it was auto's choice on a CPU
    (where the paths differ by a few percent; `stats.decode_path` says eager all the same)."""
    asked = getattr(options, "decode", "auto")
    check_decode(asked)
    device = adapter.model.device
    if asked == "graphs" and device.type != "cuda":
        raise BadInput(f"--decode graphs needs a CUDA GPU; this model is on {device.type} "
                       "(use --decode static or eager)")
    wanted = auto_path(device, options.max_new_tokens) if asked == "auto" else asked
    if wanted == "eager":
        return DecodePlan("eager")
    config = copy.deepcopy(adapter.model.generation_config)
    config.update(**generation_overrides(adapter, options))
    settings = generation_settings(adapter, options)
    settings.update(min_length=config.min_length or 0, min_new_tokens=config.min_new_tokens or 0)
    reason = unsupported_model(adapter) or unsupported_settings(config, settings)
    if reason:  # a note where the fast path was asked for or would matter: not for auto on a CPU
        note = f"the {wanted} decode path does not apply: {reason}; decoded with transformers' generate"
        return DecodePlan("eager", note=note if asked != "auto" or wanted == "graphs" else None)
    eos = settings.get("eos_token_id")
    settings["eos_token_id"] = [] if eos is None else [int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos])]
    return DecodePlan(wanted, settings=settings, eos=tuple(settings["eos_token_id"]))


def prefill_overrides(plan: DecodePlan, prompt_length: int) -> dict:
    """`generate` keywords for the static paths' prefill: one token, the cache returned. A
    minimum length is cut to what the first token sees (the same eos blocking, no warning that
    it cannot be met in one token); the static steps apply the rest."""
    overrides = {"max_new_tokens": 1, "return_dict_in_generate": True}
    if plan.settings.get("min_new_tokens", 0) > 0:
        overrides["min_new_tokens"] = 1
    if plan.settings.get("min_length", 0) > prompt_length + 1:
        overrides["min_length"] = prompt_length + 1
    return overrides


def unsupported_model(adapter) -> str | None:
    """Why the fast path cannot run on this model (None: it can)."""
    model, text = adapter.model, adapter.text_config
    mapping = getattr(model, "hf_device_map", None)
    if mapping and len({str(where) for where in mapping.values()}) > 1:
        return "the model is split over several devices"
    kernel = getattr(text, "_attn_implementation", None) or "sdpa"
    if kernel not in ("sdpa", "eager"):
        return f"the {kernel} attention kernel takes no padded attention mask (use --attn sdpa)"
    names = {"sliding_attention": "sliding-window", "linear_attention": "linear-attention"}  # Qwen3.5: a recurrent state
    kinds = sorted({names.get(kind, kind) for kind in getattr(text, "layer_types", None) or () if kind != "full_attention"})
    if kinds:
        return f"the model has {' and '.join(kinds)} layers"
    return None


def unsupported_settings(config, settings: dict) -> str | None:
    """A generation setting in effect whose processor this path does not apply, named (None: none).
    config: the GenerationConfig in effect; settings: its `generation_settings` record."""
    for name, off in UNSUPPORTED_SETTINGS:
        value = settings.get(name, getattr(config, name, None))
        if value is not None and value != off and not (isinstance(value, (list, tuple, dict)) and not value):
            return f"the generation setting {name}={value!r}"
    return None


def logits_processors(settings: dict, prompt_length: int, device) -> LogitsProcessorList:
    """The processors `generate` builds for `settings` (DecodePlan.settings), in its order.
    prompt_length: the input ids `generate` received (min_new_tokens counts after them)."""
    processors = LogitsProcessorList()
    penalty = settings.get("repetition_penalty")
    if penalty is not None and penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(penalty)))
    eos = settings.get("eos_token_id") or []
    if eos and settings.get("min_length", 0) > 0:
        processors.append(MinLengthLogitsProcessor(settings["min_length"], eos, device=device))
    if eos and settings.get("min_new_tokens", 0) > 0:
        minimum = settings["min_new_tokens"]
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, minimum, eos, device=device))
    if settings.get("do_sample"):
        temperature, top_k, top_p, min_p = (settings.get(k) for k in ("temperature", "top_k", "top_p", "min_p"))
        if temperature is not None and temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k is not None and top_k != 0:
            processors.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
        if top_p is not None and top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
        if min_p is not None:
            processors.append(MinPLogitsWarper(min_p=min_p, min_tokens_to_keep=1))
    return processors


# --- the padded cache -------------------------------------------------------------------------


class PaddedLayer(CacheLayerMixin):
    """One layer's KV cache in a buffer of fixed size: its first `length` slots hold entries;
    `update` writes the new entry at slot `length` and advances it, in place (a CUDA graph
    replays the same addresses).

    keys, values: (1, kv_heads, n, head_dim) the layer's prefill entries; slots: decode steps.
    """

    is_compileable = True
    is_sliding = False
    is_croppable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slots: int):
        super().__init__()
        rows, device = keys.shape[2], keys.device
        self.keys = keys.new_zeros(*keys.shape[:2], rows + slots, keys.shape[3])
        self.values = values.new_zeros(*values.shape[:2], rows + slots, values.shape[3])
        self.keys[:, :, :rows].copy_(keys)
        self.values[:, :, :rows].copy_(values)
        self.prefill_rows = rows
        self.length = torch.tensor(rows, dtype=torch.long, device=device)  # (0-d) entries held
        self.columns = torch.arange(rows + slots, device=device)  # (slots,) for the masks
        self.device, self.is_initialized = device, True

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated in __init__
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        slot = self.length.view(1)  # one new row per decode step
        self.keys.index_copy_(2, slot, key_states)
        self.values.index_copy_(2, slot, value_states)
        self.length.add_(1)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> torch.Tensor:
        return self.length  # a tensor, as transformers' StaticLayer: reading it must not sync

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class PaddedCache(Cache):
    """One `PaddedLayer` per decoder layer, each sized to its own prefill length."""

    def __init__(self, layers: list[PaddedLayer]):
        super().__init__(layers=layers)


# --- the step -----------------------------------------------------------------------------------


class StaticDecoder:
    """Context manager: fixed-shape decode steps of `adapter.model` from a prefilled cache.

    cache: the DynamicCache-like cache the prefill left (per-layer `keys`/`values`); steps:
    the decode steps to hold room for; selection: a DecodeKVSelection (DyCoke) or None;
    release: drop the prefill cache's tensors once copied (the caller does not keep them).
    `step(token, position)` -> (1, vocab) logits; `capture()` records the step as a CUDA graph
    that later steps replay (call it after one step has run).
    """

    def __init__(self, adapter, cache, steps: int, selection=None, release: bool = False):
        self.adapter, self.model, self.selection = adapter, adapter.model, selection
        layers = []
        for layer in cache.layers:
            layers.append(PaddedLayer(layer.keys, layer.values, steps))
            if release:
                layer.keys = layer.values = None
        self.cache = PaddedCache(layers)
        self.cache_key = cache_keyword(self.model)
        device = layers[0].keys.device
        self.device = device
        self.additive = getattr(adapter.text_config, "_attn_implementation", "sdpa") == "eager"
        dtype = layers[0].keys.dtype
        self._zero = torch.zeros((), dtype=dtype, device=device)
        self._blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device)
        if selection is not None:  # DyCoke: layers L-1.. share one row layout (no in-LLM stage)
            sizes = {layer.keys.shape[2] for layer in layers[selection.layer - 1:]}
            if len(sizes) != 1:
                raise DecoderMismatch("the decode-time KV selection needs layers of equal cache length")
        self._placeholder = torch.ones(1, 1, 1, layers[0].keys.shape[2], dtype=torch.bool, device=device)
        self._handles: list = []
        self._attend: torch.Tensor | None = None
        self._scorer_input = None
        self._masked = 0  # decoder layers whose mask the hooks set in the last eager step
        self._graph = None
        self._graph_logits = None
        self.token = self.position = None
        self.checked = self.captured = False

    # -- hooks ---------------------------------------------------------------------------------
    def __enter__(self):
        layers = self.adapter.decoder_layers
        for index, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._mask_hook(index), with_kwargs=True))
        if self.selection is not None:
            scorer = layers[self.selection.layer - 1].self_attn
            self._handles.append(scorer.register_forward_pre_hook(self._capture_scorer, with_kwargs=True))
            self._handles.append(scorer.register_forward_hook(self._select, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._graph = self._graph_logits = None  # frees the graph's memory pool with the last reference
        return False

    def _mask_hook(self, index: int):
        layer = self.cache.layers[index]
        restricted = self.selection is not None and index >= self.selection.layer

        def hook(module, args, kwargs):
            if "attention_mask" not in kwargs:
                raise DecoderMismatch(f"decoder layer {index} was called without the 'attention_mask' keyword "
                                      "the static decode path sets")
            allowed = layer.columns <= layer.length  # the entries held, and slot `length` the new one goes to
            if restricted:
                allowed = allowed & self._attend
            mask = torch.where(allowed, self._zero, self._blocked) if self.additive else allowed
            kwargs["attention_mask"] = mask.view(1, 1, 1, -1)
            self._masked += 1
            return args, kwargs

        return hook

    def _capture_scorer(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self._scorer_input = (hidden, kwargs["position_embeddings"])

    def _select(self, module, args, kwargs, output):
        hidden, position_embeddings = self._scorer_input
        self._scorer_input = None
        layer = self.cache.layers[self.selection.layer - 1]
        valid = layer.columns < layer.length  # written by now: the new entry included
        self._attend = self.selection.attended_entries(module, hidden, position_embeddings, layer.keys, valid)

    # -- one step ------------------------------------------------------------------------------
    def _forward(self) -> torch.Tensor:
        output = self.model(input_ids=self.token, position_ids=self.position, attention_mask=self._placeholder,
                            use_cache=True, **{self.cache_key: self.cache})
        return output.logits[:, -1]

    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """(1, vocab) logits after feeding `token` (1, 1) at `position` (position ids' shape, one column)."""
        if self.token is None:
            self.token, self.position = token.clone(), position.clone()
        else:
            self.token.copy_(token)
            self.position.copy_(position)
        if self._graph is not None:
            self._graph.replay()
            return self._graph_logits
        self._masked = 0
        logits = self._forward()
        if not self.checked:
            self._check_first_step()
        return logits

    def _check_first_step(self) -> None:
        """Once: every layer got its mask and wrote its entry into the padded cache (else the
        model did not run the way this path drives it: a mismatch, not a wrong answer)."""
        layers = self.cache.layers
        if self._masked != len(layers):
            raise DecoderMismatch(f"{self._masked} of {len(layers)} decoder layers received the static path's masks")
        lengths = torch.stack([layer.length for layer in layers]).cpu()
        expected = torch.tensor([layer.prefill_rows + 1 for layer in layers])
        if not torch.equal(lengths, expected):
            raise DecoderMismatch("the model did not write its keys and values into the static decode cache")
        self.checked = True

    def capture(self) -> None:
        """Record the step as a CUDA graph (after one eager step: lazy initialisation is done)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._forward()
        self._graph, self._graph_logits = graph, logits
        self.captured = True


# --- the loop -----------------------------------------------------------------------------------


@dataclass
class Decoded:
    """What the static path generated after the prefill's first token."""

    sequence: torch.Tensor  # (1, prompt + generated) token ids
    steps: int = 0  # decode forwards (tokens after the first)
    warmup_s: float = 0.0  # one-time: the padded cache (allocation, copy) and the graph capture
    end: float = 0.0  # perf_counter() when the last step's token was read
    path: str = "static"
    notes: list[str] = field(default_factory=list)


def decode_rest(adapter, plan: DecodePlan, sequence: torch.Tensor, cache, positions: torch.Tensor,
                max_new_tokens: int, streamer=None, selection=None, release: bool = False) -> Decoded:
    """Generate the tokens after the first on the static path.

    sequence: (1, n + 1) the prompt ids and the prefill's first token; cache: the prefill's KV
    cache; positions: the prompt's position ids (..., n) as `generate` received them (the last
    column is continued); streamer: receives the prompt, then each new token, as `generate` hands
    them over; the first token only once the first step has shown the model runs as this path
    drives it (a mismatch stops the request before any text is streamed).
    """
    device = adapter.model.device
    result = Decoded(sequence=sequence, path=plan.path, end=time.perf_counter())
    first = int(sequence[0, -1])
    steps = max_new_tokens - 1

    def stream_first() -> None:
        if streamer is not None:
            streamer.put(sequence[:, :-1].cpu())
            streamer.put(sequence[0, -1:].cpu())

    processors = logits_processors(plan.settings, sequence.shape[1] - 1, sequence.device)
    if steps <= 0 or first in plan.eos:
        stream_first()
        if plan.path == "graphs":
            result.path = "static"  # no step ran, none was recorded
        return result
    synchronize(device)
    started = time.perf_counter()
    decoder = StaticDecoder(adapter, cache, steps, selection=selection, release=release)
    synchronize(device)
    result.warmup_s = time.perf_counter() - started
    last = positions[..., -1:].to(device)
    token = sequence[:, -1:].to(device)
    side = torch.cuda.Stream(device) if plan.path == "graphs" else None
    with decoder:
        for step in range(1, steps + 1):
            if step == 2 and side is not None:  # the first step ran eagerly: now record it
                started = time.perf_counter()
                try:
                    decoder.capture()
                except RuntimeError as error:  # run on without graphs rather than fail the request
                    result.path, side = "static", None
                    why = str(error).splitlines()[0] if str(error) else type(error).__name__
                    result.notes.append(f"CUDA graph capture failed ({why}); decoded on the static path without graphs")
                synchronize(device)
                result.warmup_s += time.perf_counter() - started
            if step == 1 and side is not None:  # warm-up before a capture runs on a side stream
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    logits = decoder.step(token, last + step)
                torch.cuda.current_stream(device).wait_stream(side)
            else:
                logits = decoder.step(token, last + step)
            if step == 1:
                stream_first()
            scores = logits.to(dtype=torch.float32, copy=True)
            if processors:
                scores = processors(result.sequence, scores)
            if plan.do_sample:
                chosen = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                chosen = torch.argmax(scores, dim=-1)
            result.sequence = torch.cat([result.sequence, chosen[:, None].to(result.sequence.device)], dim=-1)
            host = chosen.cpu()  # the host needs each token: eos, streaming
            result.steps += 1
            if selection is not None:
                selection.count_step()
            if streamer is not None:
                streamer.put(host)
            token = chosen.view(1, 1)
            if int(host[0]) in plan.eos:
                break
    if result.path == "graphs" and not decoder.captured:
        result.path = "static"  # the answer ended before a step was recorded: none was replayed
    result.end = time.perf_counter()
    return result
