"""More architectures for `gpu_scale.py --arch`: published shapes, random weights, nothing downloaded.

Each entry builds (adapter, settings, label) for the full shapes or, `reduced`, the same depth with
narrow layers (any machine). Layer groups are half the decoder, as the paper's 14 of Qwen2-VL-7B's 28.
"""

from __future__ import annotations

import torch

from emloc.adapters import adapter_for
from emloc.loading import attention_implementation
from emloc.settings import videomme_online
from emloc.tiny import tiny_tokenizer

# Qwen2.5-VL-7B-Instruct: Qwen2-VL-7B's decoder, a windowed vision tower, temporal positions in seconds
QWEN2_5_VL_7B = dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                               num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6, section=[16, 24, 24]),
                     vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16))
# Qwen3-VL-8B-Instruct: q/k norms, interleaved M-RoPE, DeepStack from vision blocks 8/16/24 into layers 0-2
QWEN3_VL_8B = dict(text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                             num_key_value_heads=8, head_dim=128, rope_theta=5e6, section=[24, 20, 20]),
                   vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                               deepstack_visual_indexes=[8, 16, 24]))
# llava-onevision-qwen2-7b-ov: SigLIP-so400m (26 layers used) at 384 x 384, Qwen2-7B
LLAVA_OV_7B = dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                             num_key_value_heads=4, rope_theta=1e6),
                   vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                               image_size=384, patch_size=14))


def _reduced(shape: dict) -> dict:
    """The same depth (layer groups and deepstack unchanged), narrow layers."""
    text = dict(shape["text"], hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4)
    if "head_dim" in text:
        text["head_dim"] = 32
    if "section" in text:
        text["section"] = [8, 4, 4] if "head_dim" in shape["text"] else [4, 6, 6]
    vision = dict(shape["vision"], hidden_size=128, intermediate_size=256)
    for key in ("num_heads", "num_attention_heads"):
        if key in vision:
            vision[key] = 4
    if "depth" in vision and "deepstack_visual_indexes" not in vision:
        vision["depth"] = 2
    return dict(text=text, vision=vision)


def _ids(tokenizer) -> dict:
    get = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=get("<|image_pad|>"), video_token_id=get("<|video_pad|>"),
                vision_start_token_id=get("<|vision_start|>"), vision_end_token_id=get("<|vision_end|>"))


def _turns(tokenizer) -> dict:
    get = tokenizer.convert_tokens_to_ids
    return dict(eos_token_id=get("<|im_end|>"), bos_token_id=get("<|endoftext|>"), pad_token_id=get("<|endoftext|>"))


def _model(cls, config, device: torch.device, dtype: torch.dtype):
    config._attn_implementation = attention_implementation(device)
    torch.manual_seed(0)
    with torch.device(device):
        return cls(config).to(dtype).eval()


def qwen2_5_vl(reduced: bool, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    shape = _reduced(QWEN2_5_VL_7B) if reduced else QWEN2_5_VL_7B
    tokenizer = tiny_tokenizer()
    text = dict(shape["text"])
    theta, section = text.pop("rope_theta"), text.pop("section")
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer) if reduced else 152064, max_position_embeddings=128000, **text,
                         **_turns(tokenizer),
                         rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": section}),
        vision_config=dict(**shape["vision"], out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31][
                               :1 if reduced else 4], tokens_per_second=2),
        **_ids(tokenizer))
    model = _model(Qwen2_5_VLForConditionalGeneration, config, device, dtype)
    label = "Qwen2.5-VL-7B architecture" if not reduced else "Qwen2.5-VL-7B shapes, narrow (reduced) layers"
    return adapter_for(model, tokenizer, fps=2.0, max_frame_pixels=336 * 336), videomme_online(), label


def qwen3_vl(reduced: bool, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    shape = _reduced(QWEN3_VL_8B) if reduced else QWEN3_VL_8B
    tokenizer = tiny_tokenizer(digits=True)  # the frames' <t seconds> text
    text = dict(shape["text"])
    theta, section = text.pop("rope_theta"), text.pop("section")
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer) if reduced else 151936, max_position_embeddings=262144, **text,
                         **_turns(tokenizer),
                         rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": section,
                                          "mrope_interleaved": True}),
        vision_config=dict(**shape["vision"], out_hidden_size=text["hidden_size"], patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304),
        **_ids(tokenizer))
    model = _model(Qwen3VLForConditionalGeneration, config, device, dtype)
    label = "Qwen3-VL-8B architecture" if not reduced else "Qwen3-VL-8B shapes, narrow (reduced) layers"
    return adapter_for(model, tokenizer, fps=2.0, max_frame_pixels=336 * 336), videomme_online(
        layer_group_size=18), label


def llava_onevision(reduced: bool, device: torch.device, dtype: torch.dtype):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    shape = _reduced(LLAVA_OV_7B) if reduced else LLAVA_OV_7B
    tokenizer = tiny_tokenizer(extra_special=("<image>", "<video>"))
    text = dict(shape["text"])
    theta = text.pop("rope_theta")
    get = tokenizer.convert_tokens_to_ids
    config = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer) if reduced else 152128,
                         max_position_embeddings=131072, rope_parameters={"rope_type": "default", "rope_theta": theta},
                         **text, **_turns(tokenizer)),
        vision_config=dict(model_type="siglip_vision_model", **shape["vision"]),
        image_token_index=get("<image>"), video_token_index=get("<video>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full")
    model = _model(LlavaOnevisionForConditionalGeneration, config, device, dtype)
    label = "LLaVA-OneVision-7B architecture" if not reduced else "LLaVA-OneVision-7B shapes, narrow (reduced) layers"
    return adapter_for(model, tokenizer, fps=2.0), videomme_online(), label


ARCHS = {"qwen2_5_vl": qwen2_5_vl, "qwen3_vl": qwen3_vl, "llava_onevision": llava_onevision}
