"""LLaVA-OneVision: a SigLIP tower, a projector, 2x2 bilinear pooling of each video frame, a Qwen2
decoder with 1D RoPE.

Layout (the library's processor and `get_video_features`): a video is `<video>` expanded to every
frame's pooled tokens, frame after frame, then one learned `image_newline` embedding that closes the
video. A stream never closes its video, so the newline opens each question instead (`question_ids`
starts with the `<video>` id, which `embed_text` turns into the newline): over the whole stream this is
the library's sequence exactly. Positions are 1D, one per token, so a chunk chains from the last
position used.

The temporal-position policy is refused: with one position axis a frame's place in time and its
tokens' place within the frame are the same coordinate, so compressing time would also squeeze the
frame and move the video against the text around it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from ..errors import InputError, UnsupportedModelError
from .base import ChatMLText, ModelAdapter, TransformersDecoder, VideoPixels, check_attention
from .qwen_vl import _as_uint8_frames

# the SigLIP statistics LLaVA-OneVision checkpoints ship (preprocessor_config.json)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


class LlavaOnevisionAdapter(TransformersDecoder, ChatMLText, ModelAdapter):
    """Adapter for `LlavaOnevisionForConditionalGeneration`.

    image_mean, image_std: the checkpoint's normalisation (read from its preprocessor config by
        `from_pretrained`); frames are resized to the tower's square input whatever their size, so the
        frame-pixel options other families take are accepted and have no effect here.
    """

    FRAMES_PER_CALL = 16
    chains_positions = True
    temporal_policy_refusal = (
        "LLaVA-OneVision has one (1D) position axis: a frame's place in time and its tokens' place within the "
        "frame are the same coordinate, so compressing time would squeeze frames and move the video against "
        "the text. Set temporal_range: 0; a stream then runs to the model's max_position_embeddings")

    def __init__(self, model: nn.Module, tokenizer, *, fps: float = 2.0,
                 image_mean: tuple[float, ...] = SIGLIP_MEAN, image_std: tuple[float, ...] = SIGLIP_STD,
                 min_frame_pixels: int | None = None, max_frame_pixels: int | None = None) -> None:
        if not hasattr(model, "lm_head"):
            raise InputError(f"{type(model).__name__} has no LM head; load the *ForConditionalGeneration class")
        if fps <= 0:
            raise InputError(f"fps must be > 0, got {fps}")
        self.model, self.tokenizer = model, tokenizer
        config = model.config
        text, vision = config.text_config, config.vision_config
        self._decoder = model.model.language_model
        sliding = [i for i, kind in enumerate(getattr(text, "layer_types", None) or []) if kind != "full_attention"]
        if sliding:
            raise UnsupportedModelError(f"{type(model).__name__}: decoder layers {sliding} use sliding-window "
                                        f"attention, which the pruned cache does not mask; only full attention is "
                                        f"supported")
        self.num_layers = text.num_hidden_layers
        self.num_heads = text.num_attention_heads
        self.num_kv_heads = text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.temporal_patch = 1  # every frame is its own temporal step
        self.size, self.patch = vision.image_size, vision.patch_size
        self.pooled = math.ceil(self.size // self.patch / 2)  # apply_pooling: ceil(side / 2) per side
        self.mean = torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1)
        self.max_positions = text.max_position_embeddings
        self._newline_id = config.video_token_index
        check_attention(self.attention_implementation)
        self._special = {name: tokenizer.convert_tokens_to_ids(name) for name in ("<|im_end|>", "<|endoftext|>")}

    @classmethod
    def from_pretrained(cls, model: nn.Module, tokenizer, path_or_id: str, **options) -> LlavaOnevisionAdapter:
        """Takes the checkpoint's normalisation from its (video) preprocessor config when it has one."""
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            found = Path(path_or_id) / name
            if found.is_file():
                stats = json.loads(found.read_text())
                options.setdefault("image_mean", tuple(stats.get("image_mean", SIGLIP_MEAN)))
                options.setdefault("image_std", tuple(stats.get("image_std", SIGLIP_STD)))
                break
        return cls(model, tokenizer, **options)

    # --- inputs ------------------------------------------------------------------
    def preprocess(self, frames) -> VideoPixels:
        """Each frame resized (bicubic) to the tower's square input, rescaled and normalised:
        pixel_values (T, 3, size, size); grid (T, pooled, pooled) in tokens."""
        frames = _as_uint8_frames(frames)
        out = torch.empty(len(frames), 3, self.size, self.size)
        for i, frame in enumerate(frames):
            resized = Image.fromarray(frame).resize((self.size, self.size), Image.Resampling.BICUBIC)
            pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
            out[i] = (pixels - self.mean) / self.std
        return VideoPixels(out, (len(frames), self.pooled, self.pooled), 0)

    @torch.no_grad()
    def encode_video(self, pixels: VideoPixels) -> torch.Tensor:
        """(1, T * pooled ** 2, hidden): the library's video features, a few frames at a time (the tower
        and the pooling see one frame at a time), without the newline that closes a whole video."""
        config, pieces = self.model.config, []
        for first in range(0, pixels.grid_thw[0], self.FRAMES_PER_CALL):
            frames = pixels.pixel_values[first:first + self.FRAMES_PER_CALL].to(self.device, self.dtype)
            out = self.model.model.get_video_features(
                frames.unsqueeze(0), vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy)
            pieces.append(out.pooler_output[:, :-1])
        return torch.cat(pieces, dim=1)

    def embed_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(1, n, hidden); a `<video>` id stands for the newline embedding that closes the video."""
        token_ids = token_ids.to(self.device)
        embeds = self.model.get_input_embeddings()(token_ids).unsqueeze(0)
        newline = token_ids == self._newline_id
        if bool(newline.any()):
            embeds[0, newline] = self.model.model.image_newline.to(embeds.dtype)
        return embeds

    # --- positions ---------------------------------------------------------------
    def video_positions(self, video_start: int, first_step: int, pixels: VideoPixels,
                        scale: float = 1.0) -> torch.Tensor:
        """(3, n): one position a token from `video_start` (the three rows equal: 1D RoPE reads row 0)."""
        if scale != 1:
            raise UnsupportedModelError(self.temporal_policy_refusal)
        n = pixels.grid_thw[0] * pixels.grid_thw[1] * pixels.grid_thw[2]
        if video_start + n > self.max_positions:
            raise InputError(f"this chunk would reach position {video_start + n - 1}, past the model's "
                             f"max_position_embeddings ({self.max_positions}); LLaVA-OneVision's 1D positions "
                             f"cannot be compressed: start a new stream")
        return self.text_positions(video_start, n)

    def temporal_offsets(self, steps: torch.Tensor) -> torch.Tensor:
        raise UnsupportedModelError(self.temporal_policy_refusal)

    def shift_keys(self, keys: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        raise UnsupportedModelError(self.temporal_policy_refusal)

    # --- the decoder --------------------------------------------------------------
    apply_rotary = staticmethod(apply_rotary_pos_emb)

    def rotary(self, hidden, positions):
        return self._decoder.rotary_emb(hidden, positions[:1].to(hidden.device))

    # --- the chat format ----------------------------------------------------------
    # The checkpoints' template: `<|im_start|>{role} ` then the role's videos, then '\n' + each text.
    def preamble_ids(self, system_prompt: str) -> torch.Tensor:
        return self._encode(f"<|im_start|>system \n{system_prompt}<|im_end|>\n<|im_start|>user ")

    def question_ids(self, question: str) -> torch.Tensor:
        """The newline that closes the video, then the question as text (control tokens in it are read
        as the characters they are written with)."""
        if not isinstance(question, str) or not question.strip():
            raise InputError(f"a question must be a non-empty string, got {question!r}")
        text = self.tokenizer.encode("\n" + question, add_special_tokens=False, split_special_tokens=True)
        return torch.cat([torch.tensor([self._newline_id] + text, dtype=torch.long),
                          self._encode("<|im_end|>\n<|im_start|>assistant\n")])

    def template_ids(self) -> torch.Tensor:
        return torch.cat([torch.tensor([self._newline_id]), self._encode("<|im_end|>\n<|im_start|>assistant\n")])

    def example_ids(self, question: str, answer: str) -> torch.Tensor:
        return torch.cat([self.question_ids(question), self.answer_ids(answer),
                          self._encode("<|im_end|>\n<|im_start|>user ")])
