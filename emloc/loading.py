"""Loading real checkpoints (a local folder, or a hub id where the machine can reach one)."""

from __future__ import annotations

import importlib.util

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

from .adapters import FAMILIES, ModelAdapter
from .errors import UnsupportedModelError


def attention_implementation(device: torch.device) -> str:
    """flash-attn when it is installed and the model runs on a GPU, else PyTorch's sdpa."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_adapter(path_or_id: str, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 **adapter_options) -> ModelAdapter:
    """Loads model, tokenizer and image processor of a supported checkpoint behind its adapter.

    device: defaults to CUDA when available; dtype: bfloat16 on GPU, float32 on CPU.
    """
    config = AutoConfig.from_pretrained(path_or_id)
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise UnsupportedModelError(f"{path_or_id}: model family {config.model_type!r} is not supported; "
                                    f"supported families: {sorted(FAMILIES)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = AutoModelForImageTextToText.from_pretrained(
        path_or_id, dtype=dtype, attn_implementation=attention_implementation(device)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    return family.from_pretrained(model, tokenizer, path_or_id, **adapter_options)
