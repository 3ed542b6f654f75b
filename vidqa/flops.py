"""Analytic compute (MAC/FLOP) counts for video-LLM inference.

Conventions
-----------
* Everything here counts **multiply-accumulates (MACs)** of the matrix
  multiplications; ``macs_to_flops`` converts with 1 MAC = 2 FLOPs (the same
  convention as ``torch.utils.flop_counter.FlopCounterMode``).
* Norms, rotary embeddings, softmax, activations, residual adds and other
  elementwise ops are ignored: they are well under 1% of the total, and
  ``FlopCounterMode`` ignores them as well.
* The **paper convention** for visual-token pruning (``visual_prefill_macs``)
  counts the LLM prefill over the visual tokens only: no vision encoder, no
  text tokens, no decode. For a decoder layer (GQA attention + SwiGLU MLP) with
  ``n`` visual tokens, hidden size ``D``, FFN width ``D'``, ``h_q`` query heads,
  ``h_kv`` KV heads of size ``d_h``::

      f(n) = 2 n D (h_q d_h)        # q and o projections  (= 2 n D^2 when h_q d_h = D)
           + 2 n D (h_kv d_h)       # k and v projections
           + 2 n^2 (h_q d_h)        # Q K^T and A V        (= 2 n^2 D)
           + 3 n D D'               # SwiGLU MLP (gate, up, down)

  and the total is ``sum_l f(n_l)``, where ``n_l`` is the number of visual
  tokens entering layer ``l`` (pruning inside the LLM, e.g. FastV, makes
  ``n_l`` change with depth). Results are usually reported as % of vanilla.
* **Hybrid LLMs** (Qwen3.5: ``layer_types``). A full-attention layer is ``f(n)``
  above; with an output gate (Qwen3.5's ``q_proj`` also yields one gate per
  query channel) the q projection is twice as wide: ``3 n D (h_q d_h)`` for q
  and o. A linear-attention layer (Gated DeltaNet: ``h_k`` key heads of ``d_k``,
  ``h_v`` value heads of ``d_v``, conv kernel ``K``) costs, LINEAR in ``n``::

      g(n) = n D (2 h_k d_k + 2 h_v d_v + 2 h_v)    # in_proj_qkv, in_proj_z (gate), in_proj_a/b
           + n (2 h_k d_k + h_v d_v) K              # depthwise causal conv over q, k, v
           + n h_v (2 C d_k + C d_v + 3 d_k d_v)    # chunked delta rule, chunk C = 64
           + n (h_v d_v) D                          # out_proj
           + 3 n D D'                               # SwiGLU MLP

  The delta-rule term is the chunked form that runs at prefill (transformers'
  torch code and FLA's kernel, chunk 64): per chunk of C tokens and value head,
  the C x C products ``K_beta K^T`` and ``Q K^T`` (``2 C^2 d_k``), the
  intra-chunk attention times the new values (``C^2 d_v``), and the state read
  twice and written once (``3 C d_k d_v``). Not counted: the two unit-triangular
  solves per chunk (about ``C (d_k + d_v) / 2`` per token and head, ~0.1% of a
  Qwen3.5-9B-sized layer; FlopCounterMode does not count them either), the padding of
  ``n`` to a multiple of C, the decay and gate arithmetic. A single decoded token
  (``n_q = 1``) uses the recurrent form instead: ``3 d_k d_v`` per value head.

Reference (LLaVA-OneVision-7B, 32 frames x 196 tokens = 6272 visual tokens):
vanilla 48.82 TMACs; keep 25% before the LLM 10.73 T (22.0%); FastV K=2 keep
25% 13.45 T.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LLMShape",
    "LinearAttentionShape",
    "linear_attention_macs",
    "VisionShape",
    "shapes_from_model_config",
    "layer_macs",
    "visual_prefill_macs",
    "prompt_prefill_macs",
    "vision_encoder_macs",
    "macs_to_flops",
    "format_flops",
]


@dataclass(frozen=True)
class LLMShape:
    """Dimensions of a decoder-only LLM that determine its compute."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int = 0
    # FFN width per layer when layers differ (a MoE with some dense layers); None: `intermediate` in all
    layer_intermediate: tuple[int, ...] | None = None
    # q_proj also yields a gate on the attention output (Qwen3.5): q is 2 h_q d_h wide
    attention_gate: bool = False
    # per layer "linear_attention" (costed with `linear`) or another kind (softmax attention); None: all softmax
    layer_types: tuple[str, ...] | None = None
    linear: LinearAttentionShape | None = None

    def is_linear(self, layer: int | None) -> bool:
        """Whether `layer` is a linear-attention (Gated DeltaNet) layer."""
        return layer is not None and self.layer_types is not None and self.layer_types[layer] == "linear_attention"

    def intermediate_at(self, layer: int | None) -> int:
        """FFN width of `layer` (None: the model-wide `intermediate`)."""
        if layer is None or self.layer_intermediate is None:
            return self.intermediate
        return self.layer_intermediate[layer]

    @property
    def q_width(self) -> int:
        """Width of the query (and attention output) projection: h_q * d_h."""
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Width of the key (and value) projection: h_kv * d_h."""
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_config(cls, text_config: Any) -> LLMShape:
        """Read a transformers text config (Qwen2Config, LlamaConfig, ...).

        ``head_dim`` may be missing or None (then hidden // num_heads);
        ``num_key_value_heads`` may be missing or None (then no GQA).
        Mixture-of-experts configs (``num_experts``, ``num_experts_per_tok``,
        ``moe_intermediate_size``; Qwen3-VL-MoE) count ACTIVE parameters: a sparse layer's
        FFN width is ``num_experts_per_tok * moe_intermediate_size``; dense layers
        (``mlp_only_layers``, or off ``decoder_sparse_step``) keep ``intermediate_size``.
        The router (``D * num_experts`` per token, ~0.5% of a Qwen3-VL-30B-A3B layer) is
        not counted, like the norms. A shared expert (Qwen3.5-MoE:
        ``shared_expert_intermediate_size``) runs for every token and adds its width; its
        one-output gate is not counted either. DeepSeek-style fields (GLM-4.5V) read the same
        way: ``n_routed_experts``, ``n_shared_experts`` always-active experts of
        ``moe_intermediate_size``, and the first ``first_k_dense_replace`` layers dense.
        Hybrid configs (``layer_types`` with "linear_attention": Qwen3.5) also give the
        linear-attention dimensions (``linear_*``); Qwen3.5's and Qwen3-Next's softmax
        attention has an output gate (``attention_gate``).
        """
        hidden = int(text_config.hidden_size)
        num_heads = int(text_config.num_attention_heads)
        num_kv_heads = getattr(text_config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(text_config, "head_dim", None) or hidden // num_heads
        widths = _active_ffn_widths(text_config)
        uniform = len(set(widths)) == 1
        return cls(
            num_layers=int(text_config.num_hidden_layers),
            hidden=hidden,
            intermediate=widths[0] if uniform else int(text_config.intermediate_size),
            layer_intermediate=None if uniform else tuple(widths),
            num_heads=num_heads,
            num_kv_heads=int(num_kv_heads),
            head_dim=int(head_dim),
            vocab_size=int(getattr(text_config, "vocab_size", 0) or 0),
            attention_gate=getattr(text_config, "model_type", "") in GATED_ATTENTION_MODEL_TYPES,
            **_hybrid_layers(text_config),
        )


# text configs whose softmax attention gates its output with half of q_proj (Qwen3NextAttention)
GATED_ATTENTION_MODEL_TYPES = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")


@dataclass(frozen=True)
class LinearAttentionShape:
    """Dimensions of a Gated DeltaNet (linear-attention) layer: key and value heads, the
    depthwise conv kernel, and the chunk of the chunked delta rule run at prefill."""

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int
    chunk_size: int = 64  # transformers' torch_chunk_gated_delta_rule and FLA's chunk kernel

    @property
    def key_width(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def value_width(self) -> int:
        return self.num_value_heads * self.value_head_dim


def _hybrid_layers(text_config: Any) -> dict:
    """`layer_types` and the `LinearAttentionShape` of a config with linear-attention layers; {} otherwise."""
    layer_types = getattr(text_config, "layer_types", None)
    if not layer_types or "linear_attention" not in layer_types:
        return {}
    linear = LinearAttentionShape(
        num_key_heads=int(text_config.linear_num_key_heads),
        num_value_heads=int(text_config.linear_num_value_heads),
        key_head_dim=int(text_config.linear_key_head_dim),
        value_head_dim=int(text_config.linear_value_head_dim),
        conv_kernel=int(text_config.linear_conv_kernel_dim),
    )
    return {"layer_types": tuple(str(kind) for kind in layer_types), "linear": linear}


def _active_ffn_widths(text_config: Any) -> list[int]:
    """Per-layer FFN width a token passes through (MoE: its active experts only)."""
    num_layers = int(text_config.num_hidden_layers)
    # Qwen-style `num_experts`, DeepSeek-style `n_routed_experts` (GLM-4.5V)
    experts = int(getattr(text_config, "num_experts", 0) or getattr(text_config, "n_routed_experts", 0) or 0)
    if experts <= 0 or getattr(text_config, "moe_intermediate_size", None) is None:
        return [int(text_config.intermediate_size)] * num_layers
    expert_width = int(text_config.moe_intermediate_size)
    shared = int(getattr(text_config, "shared_expert_intermediate_size", 0) or 0)  # Qwen3.5-MoE: always active
    shared += int(getattr(text_config, "n_shared_experts", 0) or 0) * expert_width  # GLM-4.5V: always active
    sparse = int(text_config.num_experts_per_tok) * expert_width + shared
    step = int(getattr(text_config, "decoder_sparse_step", 1) or 1)  # Qwen3.5-MoE has neither: every layer sparse
    dense_layers = set(getattr(text_config, "mlp_only_layers", None) or [])
    dense_layers |= set(range(int(getattr(text_config, "first_k_dense_replace", 0) or 0)))  # GLM-4.5V: the first k
    widths = [sparse if layer not in dense_layers and (layer + 1) % step == 0 else None for layer in range(num_layers)]
    if None in widths:
        dense = int(text_config.intermediate_size)
        widths = [dense if width is None else width for width in widths]
    return widths


@dataclass(frozen=True)
class VisionShape:
    """Dimensions of a ViT-style vision encoder (SigLIP, CLIP)."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    tokens_per_image: int
    patch_size: int
    num_channels: int = 3
    has_class_token: bool = False
    # "mlp2": LLaVA's 2-layer MLP H -> D -> D on every token; "linear": a pixel shuffle that folds
    # s x s tokens into one of width H s^2, then one Linear to D (SmolVLM/Idefics3): t H D in all
    projector: str = "mlp2"

    @property
    def patches_per_image(self) -> int:
        """Tokens produced by the patch-embedding conv (class token excluded)."""
        return self.tokens_per_image - int(self.has_class_token)

    @classmethod
    def from_config(cls, vision_config: Any, has_class_token: bool | None = None) -> VisionShape:
        """Read a transformers vision config (SiglipVisionConfig, CLIPVisionConfig).

        ``tokens_per_image = (image_size // patch_size) ** 2`` (+1 with a class
        token). SigLIP has no class token; when ``has_class_token`` is None it
        is guessed from the config class name (CLIP has one).
        """
        if has_class_token is None:
            has_class_token = "clip" in type(vision_config).__name__.lower()
        image_size = int(vision_config.image_size)
        patch_size = int(vision_config.patch_size)
        tokens = (image_size // patch_size) ** 2 + int(has_class_token)
        return cls(
            num_layers=int(vision_config.num_hidden_layers),
            hidden=int(vision_config.hidden_size),
            intermediate=int(vision_config.intermediate_size),
            num_heads=int(vision_config.num_attention_heads),
            tokens_per_image=tokens,
            patch_size=patch_size,
            num_channels=int(getattr(vision_config, "num_channels", 3) or 3),
            has_class_token=has_class_token,
        )


def shapes_from_model_config(config: Any) -> tuple[LLMShape, VisionShape | None]:
    """(LLMShape, VisionShape | None) from a top-level model config.

    Uses ``config.text_config`` / ``config.vision_config`` when present (e.g.
    LlavaOnevisionConfig); otherwise the config itself is the text config and
    there is no vision part.
    """
    text_config = getattr(config, "text_config", None) or config
    vision_config = getattr(config, "vision_config", None)
    vision = None
    # Only fixed-resolution ViTs (an `image_size`) are modelled: Qwen2.5-VL's dynamic-resolution,
    # windowed-attention encoder is not, and gets None (its vision FLOPs are reported as 0); nor are
    # other towers that merge patches at any resolution (`spatial_merge_size`: GLM-4.1V's `image_size`
    # only sizes its position-embedding table).
    dynamic = getattr(vision_config, "spatial_merge_size", None) is not None
    if vision_config is not None and getattr(vision_config, "image_size", None) is not None and not dynamic:
        vision = VisionShape.from_config(vision_config)
        if getattr(config, "model_type", "") in ("smolvlm", "idefics3"):
            from dataclasses import replace

            vision = replace(vision, projector="linear")
    return LLMShape.from_config(text_config), vision


def _check_count(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def layer_macs(shape: LLMShape, n_query: int, n_kv: int | None = None, layer: int | None = None) -> int:
    """MACs of one decoder layer: ``n_query`` new tokens attending to ``n_kv`` keys.

    q/o projections ``2 n_q D (h_q d_h)`` (``3 n_q D (h_q d_h)`` with an output gate),
    k/v projections ``2 n_q D (h_kv d_h)`` (only the new tokens are projected), attention
    ``2 n_q n_kv (h_q d_h)`` (QK^T and AV) and SwiGLU MLP ``3 n_q D D'``. ``n_kv`` defaults
    to ``n_query``; ``layer`` picks that layer's FFN width when layers differ
    (``LLMShape.layer_intermediate``) and its kind: a linear-attention layer costs
    ``linear_attention_macs`` (linear in ``n_q``; its state replaces the ``n_kv`` keys).
    """
    if n_kv is None:
        n_kv = n_query
    _check_count("n_query", n_query)
    _check_count("n_kv", n_kv)
    D = shape.hidden
    mlp = 3 * n_query * D * shape.intermediate_at(layer)
    if shape.is_linear(layer):
        return linear_attention_macs(shape, n_query) + mlp
    qo_proj = (3 if shape.attention_gate else 2) * n_query * D * shape.q_width
    kv_proj = 2 * n_query * D * shape.kv_width
    attention = 2 * n_query * n_kv * shape.q_width
    return qo_proj + kv_proj + attention + mlp


def linear_attention_macs(shape: LLMShape, n_query: int) -> int:
    """MACs of one Gated DeltaNet token mixer (no MLP) over ``n_query`` new tokens: the module
    docstring's ``g(n)`` without the MLP. Linear in ``n_query``: the recurrent state it reads
    and writes has a fixed size, whatever came before. One token (a decode step) uses the
    recurrent form (no chunk terms)."""
    _check_count("n_query", n_query)
    linear, D = shape.linear, shape.hidden
    if linear is None:
        raise ValueError("this LLMShape has no linear-attention dimensions (LLMShape.linear)")
    conv_width = 2 * linear.key_width + linear.value_width  # q, k, v
    projections = n_query * D * (conv_width + linear.value_width + 2 * linear.num_value_heads)
    conv = n_query * conv_width * linear.conv_kernel
    chunk = linear.chunk_size if n_query > 1 else 0
    d_k, d_v = linear.key_head_dim, linear.value_head_dim
    delta_rule = n_query * linear.num_value_heads * (2 * chunk * d_k + chunk * d_v + 3 * d_k * d_v)
    out_proj = n_query * linear.value_width * D
    return projections + conv + delta_rule + out_proj


def _per_layer(shape: LLMShape, counts: Sequence[int], what: str) -> list[int]:
    counts = [int(c) for c in counts]
    if len(counts) != shape.num_layers:
        raise ValueError(
            f"{what} has {len(counts)} entries but the model has {shape.num_layers} layers"
        )
    return counts


def visual_prefill_macs(shape: LLMShape, tokens_per_layer: Sequence[int]) -> int:
    """Paper-convention cost: LLM prefill over visual tokens only.

    ``tokens_per_layer[l]`` is the number of visual tokens entering layer ``l``
    (length must equal ``shape.num_layers``). Each layer's visual tokens attend
    only among themselves; text tokens, the vision encoder and decoding are not
    counted. Returns ``sum_l f(n_l)`` in MACs.
    """
    counts = _per_layer(shape, tokens_per_layer, "tokens_per_layer")
    return sum(layer_macs(shape, n, layer=layer) for layer, n in enumerate(counts))


def prompt_prefill_macs(
    shape: LLMShape, seq_len_per_layer: Sequence[int], include_lm_head: bool = True
) -> int:
    """Whole-prompt prefill cost (text + visual tokens), in MACs.

    ``seq_len_per_layer[l]`` is the actual sequence length entering layer ``l``
    (length must equal ``shape.num_layers``); every token attends to the full
    sequence of that layer (causal masking is not discounted, matching what
    dense SDPA kernels compute). With ``include_lm_head`` the LM head is added
    for the last position only (``generate`` computes logits for it alone):
    ``D * vocab_size``. Norms, rotary embeddings, softmax and other elementwise
    ops are ignored (< 1%; FlopCounterMode ignores them too), as is the
    embedding lookup.
    """
    counts = _per_layer(shape, seq_len_per_layer, "seq_len_per_layer")
    total = sum(layer_macs(shape, n, layer=layer) for layer, n in enumerate(counts))
    if include_lm_head:
        total += shape.hidden * shape.vocab_size
    return total


def vision_encoder_macs(
    vshape: VisionShape, num_images: int, projector_hidden: int | None = None,
    images_per_layer: Sequence[int] | None = None,
) -> int:
    """Vision encoder (+ optional LLaVA projector) cost for ``num_images`` images, in MACs.

    Per image, with ``t = tokens_per_image``, ``H = hidden``, ``I = intermediate``
    and ``p = patch_size``:

    * patch-embedding conv: ``patches * C * p^2 * H`` (C input channels);
    * per encoder layer: ``4 t H^2`` (q, k, v, o) + ``2 t^2 H`` (QK^T, AV)
      + ``2 t H I`` (GELU MLP, two matrices), times ``num_layers``;
    * if ``projector_hidden`` (the LLM hidden size ``D``) is given, the LLaVA
      2-layer MLP projector ``H -> D -> D`` on all ``t`` tokens:
      ``t (H D + D D)``; with ``vshape.projector == "linear"`` (SmolVLM's pixel
      shuffle + one Linear ``H s^2 -> D`` on ``t / s^2`` tokens): ``t H D``.

    ``images_per_layer``: when a stage inside the encoder merges or drops whole
    images (EarlyTom's frames), the images entering each layer, then the images
    leaving the encoder (``num_layers + 1`` entries): layer ``l`` is counted for
    ``images_per_layer[l]`` images and the projector for the last entry; the
    patch embedding always sees ``num_images``. None: ``num_images`` everywhere.

    Not counted: norms, position embeddings, activations, any attention-pooling
    head (LLaVA uses the patch features, not the pooled output), post-projector
    spatial pooling, the in-encoder stage's own similarities, and all
    ``vision_feature_layer`` truncation (every ``num_layers`` layer is counted;
    pass a shape with fewer layers if the model stops early).
    """
    _check_count("num_images", num_images)
    if images_per_layer is None:
        images_per_layer = [num_images] * (vshape.num_layers + 1)
    images_per_layer = [int(n) for n in images_per_layer]
    if len(images_per_layer) != vshape.num_layers + 1:
        raise ValueError(
            f"images_per_layer has {len(images_per_layer)} entries, expected {vshape.num_layers + 1} "
            f"(one per encoder layer, then the images leaving it)"
        )
    for count in images_per_layer:
        _check_count("images_per_layer", count)
    t, H, ffn = vshape.tokens_per_image, vshape.hidden, vshape.intermediate
    patch_embed = vshape.patches_per_image * vshape.num_channels * vshape.patch_size**2 * H
    per_layer = 4 * t * H * H + 2 * t * t * H + 2 * t * H * ffn
    total = num_images * patch_embed + sum(images_per_layer[:-1]) * per_layer
    if projector_hidden is not None:
        D = int(projector_hidden)
        total += images_per_layer[-1] * (t * H * D if vshape.projector == "linear" else t * (H * D + D * D))
    return total


def macs_to_flops(macs: int | float) -> int | float:
    """FLOPs from MACs (1 multiply-accumulate = 2 floating-point operations)."""
    return 2 * macs


_SI_PREFIXES = ["", "K", "M", "G", "T", "P", "E"]


def format_flops(x: int | float) -> str:
    """Human-readable SI form with at most 4 significant figures.

    ``format_flops(48.8219e12) == "48.82 T"``, ``format_flops(10.7e9) == "10.7 G"``,
    ``format_flops(512) == "512"``. Unit-agnostic: works for MACs or FLOPs.
    """
    value = float(x)
    sign = "-" if value < 0 else ""
    value = abs(value)
    index = 0
    while value >= 1000 and index < len(_SI_PREFIXES) - 1:
        value /= 1000
        index += 1
    # Rounding to 4 significant figures can reach 1000 (e.g. 999.96 -> 1000).
    if float(f"{value:.4g}") >= 1000 and index < len(_SI_PREFIXES) - 1:
        value /= 1000
        index += 1
    return f"{sign}{value:.4g} {_SI_PREFIXES[index]}".rstrip()
