"""Model families, keyed by `config.model_type`, and loading a checkpoint with its adapter."""

from __future__ import annotations

from pathlib import Path

from vidqa.errors import BadInput, RuntimeFailure
from vidqa.hub import DEFAULT_MODEL, config_error, resolve_model
from vidqa.models.base import GenerationInputs, ModelAdapter, Prompt
from vidqa.models.glm4v import Glm4vAdapter
from vidqa.models.llava_onevision import LlavaOnevisionAdapter
from vidqa.models.llava_onevision1_5 import LlavaOnevision15Adapter
from vidqa.models.placement import Placement, plan_placement
from vidqa.models.qwen2_5_vl import Qwen2_5_VLAdapter
from vidqa.models.qwen3_5 import Qwen3_5Adapter
from vidqa.models.qwen3_vl import Qwen3VLAdapter
from vidqa.models.smolvlm import SmolVLMAdapter
from vidqa.tensors.tokens import VisualTokens

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    LlavaOnevisionAdapter, Qwen2_5_VLAdapter, SmolVLMAdapter, Qwen3VLAdapter, Qwen3_5Adapter,
    LlavaOnevision15Adapter, Glm4vAdapter,
)

__all__ = [
    "ADAPTERS",
    "DEFAULT_MODEL",
    "GenerationInputs",
    "ModelAdapter",
    "Prompt",
    "VisualTokens",
    "Placement",
    "adapter_for",
    "frame_rule_for",
    "load_model",
    "plan_placement",
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
        raise config_error(model_id, error) from None
    except ValueError as error:
        # a family this transformers release does not know yet: say which release it needs
        _check_family_of(str(local) if looks_local else model_id)
        raise BadInput(f"cannot read the config of '{model_id}': {str(error).splitlines()[0]}") from None


def _check_family_of(source: str) -> None:
    """`check_transformers` of the family a config.json names, read raw (AutoConfig could not parse it)."""
    from transformers import PretrainedConfig

    try:
        model_type = PretrainedConfig.get_config_dict(source)[0].get("model_type", "")
        adapter_class = adapter_for(model_type)
    except (OSError, ValueError, BadInput):
        return
    adapter_class.check_transformers()


def frame_rule_for(model_id: str):
    """The family's reference frame rule for a checkpoint (reads its config only, no weights):
    what `--frames`/`--fps` replace. See `vidqa.video.frame_rules`."""
    model_id = resolve_model(model_id)  # fast, one-line failure without the hub (vidqa.hub)
    adapter_class = adapter_for(_read_config(model_id).model_type)
    adapter_class.check_transformers()
    return adapter_class.reference_frame_rule(_source(model_id))


def _source(model_id: str) -> str:
    """A local checkpoint's expanded path, else the hub id."""
    local = Path(model_id).expanduser()
    return str(local) if local.exists() else model_id


def load_model(
    model_id: str,
    device: str = "auto",
    dtype: str = "auto",
    attn: str = "sdpa",
    max_pixels: int | None = None,
    device_map: str | dict | None = None,
    system_prompt: str | None = None,
) -> ModelAdapter:
    """Load checkpoint + processor and wrap them in the family's adapter.

    max_pixels: per-frame pixel budget for families with dynamic resolution (Qwen2.5-VL);
    None keeps the family's reference budget.
    device_map: None = one device when the weights fit it, else "auto"; "auto" = accelerate
    shards the layers over the visible GPUs (CPU, then disk, as a last resort); "none" = one
    device whatever the size; a dict = accelerate's module -> device map, as given.
    system_prompt: None = the family's default, "" = no system turn, else that text.
    """
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    # Our own spinner and errors speak for loading; hub downloads keep their progress bars.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    model_id = resolve_model(model_id)  # bundled name, hub id or cached snapshot; fails fast offline
    config = _read_config(model_id)
    adapter_class = adapter_for(config.model_type)
    adapter_class.check_transformers()
    adapter_class.check_max_pixels(max_pixels)  # before the weights load
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source = _source(model_id)
    processor = _load_processor(source, model_id, adapter_class)
    placement = plan_placement(config, device, torch_dtype, device_map)
    # use_kernels=False: from 5.25 transformers kernelizes by default. On a model loaded onto a GPU
    # (the sharded path; the one-device path loads on the CPU, then moves) that swaps RMSNorm, the
    # activations and the decoder's RoPE for kernels fetched from the hub: on an offline machine the
    # load fails (an unreachable hub is not a missing kernel, so nothing falls back). The pruning hooks recompute attention rows with the adapter's torch
    # RoPE against the keys the layer rotated, so the layer must rotate the same way: vidqa runs
    # transformers' torch code on every version (False is 5.18-5.24's default; they accept it).
    # docs/models.md, "Hub kernels".
    options = {"dtype": torch_dtype, "attn_implementation": attn, "use_kernels": False}
    try:
        if placement.device_map is None:
            model = AutoModelForImageTextToText.from_pretrained(source, **options).to(device)
        else:
            model = AutoModelForImageTextToText.from_pretrained(
                source, **options, device_map=placement.device_map, offload_folder=placement.offload_folder,
            )
    except ImportError as error:  # e.g. flash_attention_2 without the flash-attn package
        raise BadInput(f"--attn {attn} is not available here: {str(error).splitlines()[0]}") from None
    except (OSError, ValueError) as error:
        raise RuntimeFailure(f"cannot load model '{model_id}': {str(error).splitlines()[0]}") from None
    model.eval()
    adapter = adapter_class(model, processor, max_pixels=max_pixels, system_prompt=system_prompt)
    adapter.placement_notes = placement.notes
    return adapter


def _load_processor(source: str, model_id: str, adapter_class: type[ModelAdapter]):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source)
    except ImportError as error:  # e.g. SmolVLM's processor without the num2words package
        raise RuntimeFailure(f"cannot load the processor of '{model_id}': {str(error).splitlines()[0]}") from None
    except (OSError, ValueError) as error:
        message = str(error).splitlines()[0]
        if "Unrecognized image processor" in message:  # a fork naming a class transformers renamed
            processor = adapter_class.assemble_processor(source)
            if processor is not None:
                return processor
        raise RuntimeFailure(f"cannot load model '{model_id}': {message}") from None
