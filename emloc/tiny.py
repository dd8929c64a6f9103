"""Tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL (dense, MoE) / LLaVA-OneVision models and a word-level
tokenizer, built in code.

They use the same classes as real checkpoints, so every code path (vision tower,
M-RoPE, GQA attention, chat format) runs offline in seconds. Weights are random
unless trained (see research/), so their answers carry no meaning.
"""

from __future__ import annotations

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "[UNK]"]
WORDS = (
    "system user assistant You are a helpful . ? , : ! Describe what happens in the video "
    "What colour was triangle square circle star digit how many times did appear which came first "
    "is on screen now at end red green blue yellow white purple orange black grey zero one two three "
    "four five six seven eight nine ten yes no before after shape anyone door or"
).split()


def tiny_tokenizer(words: list[str] | None = None, *, extra_special: tuple[str, ...] = (),
                   digits: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Qwen's chat and vision special tokens (ids 0-7), then `extra_special`
    (LLaVA's `<image>`, `<video>`). digits: numbers split into single digits (as Qwen's tokenizer does),
    the digits and the timestamp words (`<`, `>`, `seconds`) in the vocabulary: Qwen3-VL's `<3.5 seconds>`."""
    special = SPECIAL_TOKENS + list(extra_special)
    vocab_words = list(words or WORDS) + (TIMESTAMP_WORDS if digits else [])
    vocab = {token: i for i, token in enumerate(special + list(dict.fromkeys(vocab_words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    splits = [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits + ([pre_tokenizers.Digits(individual_digits=True)]
                                                          if digits else []))
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="[UNK]")


TIMESTAMP_WORDS = list("0123456789<>") + ["seconds"]


def _ids(tokenizer) -> dict:
    get = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=get("<|image_pad|>"), video_token_id=get("<|video_pad|>"),
                vision_start_token_id=get("<|vision_start|>"), vision_end_token_id=get("<|vision_end|>"),
                bos_token_id=get("<|endoftext|>"), eos_token_id=get("<|im_end|>"), pad_token_id=get("<|endoftext|>"))


def tiny_qwen2_vl(tokenizer=None, *, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                  seed: int = 0, dtype: torch.dtype = torch.float32,
                  init_std: float | None = None) -> Qwen2VLForConditionalGeneration:
    """A randomly initialised Qwen2-VL small enough for CPU tests (about 0.23M parameters)."""
    tokenizer = tokenizer or tiny_tokenizer()
    config = Qwen2VLConfig(
        text_config=_text_config(tokenizer, layers, hidden, heads, kv_heads),
        vision_config=dict(depth=1, embed_dim=32, num_heads=2, hidden_size=hidden, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, mlp_ratio=2),
        **_ids(tokenizer))
    return build_random(Qwen2VLForConditionalGeneration, config, seed, dtype, init_std)


def tiny_qwen2_5_vl(tokenizer=None, *, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                    seed: int = 0, dtype: torch.dtype = torch.float32,
                    init_std: float | None = None) -> Qwen2_5_VLForConditionalGeneration:
    """A randomly initialised Qwen2.5-VL (window attention in the vision tower, time-spaced M-RoPE)."""
    tokenizer = tokenizer or tiny_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config=_text_config(tokenizer, layers, hidden, heads, kv_heads),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1], tokens_per_second=2),
        **_ids(tokenizer))
    return build_random(Qwen2_5_VLForConditionalGeneration, config, seed, dtype, init_std)


def tiny_qwen3_vl(tokenizer=None, *, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                  seed: int = 0, dtype: torch.dtype = torch.float32, init_std: float | None = None,
                  moe: bool = False, deepstack: tuple[int, ...] = (0, 1)):
    """A randomly initialised Qwen3-VL (moe: Qwen3-VL-MoE, 4 experts, 2 a token): q/k norms, interleaved
    M-RoPE, a vision tower with learned position embeddings whose blocks `deepstack` feed the first
    decoder layers. Needs `tiny_tokenizer(digits=True)` for the frames' timestamps."""
    from transformers import (
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
    )

    tokenizer = tokenizer or tiny_tokenizer(digits=True)
    text = _text_config(tokenizer, layers, hidden, heads, kv_heads)
    half = hidden // heads // 2
    text.update(head_dim=hidden // heads, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                           "mrope_section": [half - 2 * (half // 4), half // 4,
                                                                             half // 4], "mrope_interleaved": True})
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden, decoder_sparse_step=1)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=list(deepstack))
    ids = {k: v for k, v in _ids(tokenizer).items() if k.startswith(("image", "video", "vision"))}
    cls, config_cls = ((Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeConfig) if moe
                       else (Qwen3VLForConditionalGeneration, Qwen3VLConfig))
    config = config_cls(text_config=text, vision_config=vision, **ids)
    return build_random(cls, config, seed, dtype, init_std)


def tiny_llava_onevision(tokenizer=None, *, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                         seed: int = 0, dtype: torch.dtype = torch.float32, init_std: float | None = None):
    """A randomly initialised LLaVA-OneVision: a SigLIP tower on 64 x 64 frames (16 patches, pooled to 4
    tokens a frame), a projector, a Qwen2 decoder with 1D RoPE. Needs `tiny_tokenizer(extra_special=
    ("<image>", "<video>"))`."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    tokenizer = tokenizer or tiny_tokenizer(extra_special=("<image>", "<video>"))
    get = tokenizer.convert_tokens_to_ids
    text = _text_config(tokenizer, layers, hidden, heads, kv_heads)
    text.update(model_type="qwen2", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        text.pop(key)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=64, patch_size=16)
    config = LlavaOnevisionConfig(text_config=text, vision_config=vision, image_token_index=get("<image>"),
                                  video_token_index=get("<video>"), vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", image_grid_pinpoints=[[64, 64]])
    return build_random(LlavaOnevisionForConditionalGeneration, config, seed, dtype, init_std)


def _text_config(tokenizer, layers: int, hidden: int, heads: int, kv_heads: int) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=32768, rope_parameters=_rope(hidden // heads), **_ids(tokenizer))


def _rope(head_dim: int) -> dict:
    # M-RoPE splits head_dim / 2 frequencies over (temporal, height, width)
    half = head_dim // 2
    spatial = half * 3 // 8
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half - 2 * spatial, spatial, spatial]}


def build_random(cls, config, seed: int, dtype: torch.dtype = torch.float32, init_std: float | None = None,
                 *, keep_init: tuple[str, ...] = ()):
    """init_std: redraw matrix weights with this std. The default init (0.02) gives a random
    model near-uniform outputs; a larger one makes its attention and predictions peaky, so
    pruning visibly moves them (what tests of the JS bound need). keep_init: weights whose
    name contains one of these keep the default init (a hybrid's conv1d, say)."""
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(config)
        if init_std is not None:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if param.dim() >= 2 and not any(part in name for part in keep_init):
                        param.normal_(0.0, init_std)
    return model.to(dtype).eval()
