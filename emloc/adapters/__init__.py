"""Model families behind one interface; `adapter_for` picks the one a model needs."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import ModelAdapter, VideoPixels
from .llava_onevision import LlavaOnevisionAdapter
from .qwen3_5 import Qwen3_5Adapter
from .qwen3_vl import Qwen3VLAdapter
from .qwen_vl import QwenVLAdapter

# model_type (from the checkpoint's config.json) -> adapter class
FAMILIES: dict[str, type[ModelAdapter]] = {
    "qwen2_vl": QwenVLAdapter,
    "qwen2_5_vl": QwenVLAdapter,
    "qwen3_vl": Qwen3VLAdapter,  # timestamps as text, DeepStack
    "qwen3_vl_moe": Qwen3VLAdapter,
    "llava_onevision": LlavaOnevisionAdapter,  # SigLIP, pooled frames, Qwen2 with 1D RoPE
    "qwen3_5": Qwen3_5Adapter,  # hybrid: Gated DeltaNet + full attention (emloc.recurrent)
    "qwen3_5_moe": Qwen3_5Adapter,
}


def adapter_for(model: nn.Module, tokenizer, **options) -> ModelAdapter:
    """The adapter for `model`'s family; options go to the adapter (e.g. fps)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model family {model_type!r} ({type(model).__name__}) is not supported; "
            f"supported families: {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type](model, tokenizer, **options)


__all__ = ["FAMILIES", "ModelAdapter", "VideoPixels", "adapter_for"]
