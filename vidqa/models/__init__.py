"""Model families, keyed by `config.model_type`, and loading a checkpoint with its adapter."""

from __future__ import annotations

from pathlib import Path

from ..errors import BadInput, RuntimeFailure
from .base import GenerationInputs, ModelAdapter, Prompt, VisualTokens
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen3_vl import Qwen3VLAdapter
from .smolvlm import SmolVLMAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (LlavaOnevisionAdapter, Qwen2_5_VLAdapter, SmolVLMAdapter, Qwen3VLAdapter)
DEFAULT_MODEL = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"

__all__ = [
    "ADAPTERS",
    "DEFAULT_MODEL",
    "GenerationInputs",
    "ModelAdapter",
    "Prompt",
    "VisualTokens",
    "adapter_for",
    "load_model",
    "resolve_device",
    "resolve_dtype",
]


def adapter_for(model_type: str) -> type[ModelAdapter]:
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = ", ".join(f"{a.family} ({', '.join(a.model_types)})" for a in ADAPTERS)
    raise BadInput(f"model type '{model_type}' is not supported; supported families: {supported}")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]


def _read_config(model_id: str):
    from transformers import AutoConfig

    local = Path(model_id).expanduser()
    looks_local = local.exists() or model_id.startswith((".", "/", "~")) or model_id.count("/") > 1
    if looks_local and not (local / "config.json").is_file():
        if not local.exists():
            raise BadInput(f"model directory not found: {model_id}")
        raise BadInput(f"{model_id} is not a model checkpoint (no config.json); pass a checkpoint directory or a hub id")
    try:
        return AutoConfig.from_pretrained(str(local) if looks_local else model_id)
    except OSError as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BadInput(
            f"cannot load model '{model_id}': {message}. Check the hub id, or, offline, "
            "download it where the hub is reachable and pass --model /path/to/checkpoint"
        ) from None
    except ValueError as error:
        raise BadInput(f"cannot read the config of '{model_id}': {str(error).splitlines()[0]}") from None


def load_model(
    model_id: str, device: str = "auto", dtype: str = "auto", attn: str = "sdpa", max_pixels: int | None = None
) -> ModelAdapter:
    """Load checkpoint + processor and wrap them in the family's adapter.

    max_pixels: per-frame pixel budget for families with dynamic resolution (Qwen2.5-VL);
    None keeps the processor's own.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    # Our own spinner and errors speak for loading; hub downloads keep their progress bars.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    config = _read_config(model_id)
    adapter_class = adapter_for(config.model_type)
    adapter_class.check_max_pixels(max_pixels)  # before the weights load
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source = str(Path(model_id).expanduser()) if Path(model_id).expanduser().exists() else model_id
    try:
        processor = AutoProcessor.from_pretrained(source)
    except ImportError as error:  # e.g. SmolVLM's processor without the num2words package
        raise RuntimeFailure(f"cannot load the processor of '{model_id}': {str(error).splitlines()[0]}") from None
    except (OSError, ValueError) as error:
        raise RuntimeFailure(f"cannot load model '{model_id}': {str(error).splitlines()[0]}") from None
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            source, dtype=torch_dtype, attn_implementation=attn
        ).to(device)
    except ImportError as error:  # e.g. flash_attention_2 without the flash-attn package
        raise BadInput(f"--attn {attn} is not available here: {str(error).splitlines()[0]}") from None
    except (OSError, ValueError) as error:
        raise RuntimeFailure(f"cannot load model '{model_id}': {str(error).splitlines()[0]}") from None
    model.eval()
    return adapter_class(model, processor, max_pixels=max_pixels)
