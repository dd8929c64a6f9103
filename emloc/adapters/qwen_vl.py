"""Qwen2-VL and Qwen2.5-VL: the two families share the decoder, the chat format and
the patch layout; they differ in how far apart video frames sit on the temporal
M-RoPE axis (Qwen2.5-VL spaces them by real time)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb, rotate_half

from ..errors import InputError
from .base import ChatMLText, ModelAdapter, TransformersDecoder, VideoPixels, check_attention

# The paper's video setting: 144 tokens per frame pair (336 x 336 frames).
DEFAULT_MAX_FRAME_PIXELS = 144 * 28 * 28
DEFAULT_MIN_FRAME_PIXELS = 28 * 28


class QwenVLAdapter(TransformersDecoder, ChatMLText, ModelAdapter):
    """Adapter for `Qwen2VLForConditionalGeneration` and `Qwen2_5_VLForConditionalGeneration`.

    fps: the rate frames are sampled at; Qwen2.5-VL places temporal steps
        `tokens_per_second * temporal_patch / fps` positions apart.
    image_processor: the checkpoint's PIL image processor (resize, rescale,
        normalize, spatial patch layout); built from the config when omitted.
    """

    VISION_PATCHES_PER_CALL = 4096

    def __init__(self, model: nn.Module, tokenizer, *, fps: float = 2.0,
                 image_processor: Qwen2VLImageProcessorPil | None = None,
                 min_frame_pixels: int = DEFAULT_MIN_FRAME_PIXELS,
                 max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> None:
        if not hasattr(model, "lm_head"):
            raise InputError(f"{type(model).__name__} has no LM head; load the *ForConditionalGeneration class")
        if fps <= 0:
            raise InputError(f"fps must be > 0, got {fps}")
        self.model = model
        self.tokenizer = tokenizer
        text, vision = model.config.text_config, model.config.vision_config
        self.num_layers = text.num_hidden_layers
        self.num_heads = text.num_attention_heads
        self.num_kv_heads = text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.temporal_patch = vision.temporal_patch_size
        self.merge = vision.spatial_merge_size
        tokens_per_second = getattr(vision, "tokens_per_second", None)
        # Qwen2-VL: one position per temporal step; Qwen2.5-VL: positions follow seconds.
        self.time_interval = 1.0 if tokens_per_second is None else tokens_per_second * self.temporal_patch / fps
        self.image_processor = image_processor or Qwen2VLImageProcessorPil(
            patch_size=vision.patch_size, temporal_patch_size=self.temporal_patch, merge_size=self.merge)
        self.min_frame_pixels, self.max_frame_pixels = min_frame_pixels, max_frame_pixels
        self._decoder = model.model.language_model
        # a checkpoint may declare it (`emloc_temporal_range` in config.json; the shipped tiny models do)
        self.temporal_range = getattr(model.config, "emloc_temporal_range", None)
        check_attention(self.attention_implementation)
        self._special = {name: tokenizer.convert_tokens_to_ids(name) for name in (
            "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>")}

    @classmethod
    def from_pretrained(cls, model: nn.Module, tokenizer, path_or_id: str, **options) -> QwenVLAdapter:
        """Takes the checkpoint's own image processor settings (mean, std, patch sizes) when it has them."""
        try:
            options.setdefault("image_processor", Qwen2VLImageProcessorPil.from_pretrained(path_or_id))
        except OSError:  # no preprocessor_config.json: the config's patch sizes and CLIP statistics
            pass
        return cls(model, tokenizer, **options)

    # --- inputs ------------------------------------------------------------------
    def preprocess(self, frames) -> VideoPixels:
        """Frame by frame through the image processor (resize, rescale, normalize), each written
        straight into its slot of the output, so memory holds the output and one frame's copies
        rather than every frame's intermediates at once."""
        frames = _as_uint8_frames(frames)
        n, tp = len(frames), self.temporal_patch
        padded = (-n) % tp  # as the library's processors do: repeat the last frame
        size = {"shortest_edge": self.min_frame_pixels, "longest_edge": self.max_frame_pixels}
        out = None
        for i in range(n + padded):
            one = self.image_processor(images=[frames[min(i, n - 1)]], return_tensors="np", size=size)
            if out is None:
                _, gh, gw = (int(x) for x in one["image_grid_thw"][0])
                # a video patch takes slot s of its temporal group from frame s of the group
                out = torch.empty((n + padded) // tp, gh * gw, 3, tp, self.image_processor.patch_size ** 2)
            # the image processor lays a frame out as (patches, C, tp, ph * pw), repeated over tp
            patches = one["pixel_values"].reshape(gh * gw, 3, tp, -1)[:, :, 0]
            out[i // tp, :, :, i % tp] = torch.from_numpy(patches)
        return VideoPixels(out.view(out.shape[0] * gh * gw, -1), (out.shape[0], gh, gw), padded)

    @torch.no_grad()
    def encode_video(self, pixels: VideoPixels) -> torch.Tensor:
        """The vision tower a few temporal steps at a time (about `VISION_PATCHES_PER_CALL`
        patches): its attention never crosses a temporal step (Qwen2-VL attends within a frame
        pair, Qwen2.5-VL's windows and full-attention blocks too), so the pieces give the whole
        chunk's embeddings while holding a fraction of its activations."""
        visual = self.model.model.visual
        t, h, w = pixels.grid_thw
        steps = max(1, self.VISION_PATCHES_PER_CALL // (h * w))
        pieces = []
        for first in range(0, t, steps):
            k = min(steps, t - first)
            patches = pixels.pixel_values[first * h * w:(first + k) * h * w].to(self.device, self.dtype)
            pieces.append(visual(patches, grid_thw=torch.tensor([[k, h, w]], device=self.device)).pooler_output)
        return torch.cat(pieces).unsqueeze(0)

    def embed_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(token_ids.to(self.device)).unsqueeze(0)

    # --- positions ---------------------------------------------------------------
    def video_positions(self, video_start: int, first_step: int, pixels: VideoPixels,
                        scale: float = 1.0) -> torch.Tensor:
        t, h, w = pixels.grid_thw[0], pixels.grid_thw[1] // self.merge, pixels.grid_thw[2] // self.merge
        steps = self.temporal_offsets(torch.arange(first_step, first_step + t))
        if scale != 1:
            steps = steps * float(scale)
        tt, hh, ww = torch.meshgrid(steps, torch.arange(h, dtype=steps.dtype), torch.arange(w, dtype=steps.dtype),
                                    indexing="ij")
        return torch.stack([tt, hh, ww]).reshape(3, -1) + video_start

    def temporal_offsets(self, steps: torch.Tensor) -> torch.Tensor:
        return (steps * self.time_interval).long()

    def shift_keys(self, keys: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """RoPE rotations add: a key rotated at t and rotated again by t' - t is the key at t'. The
        model's own rotary at positions (shift, 0, 0) turns only the temporal M-RoPE section (the
        height and width sections get angle 0). In float32, whatever the cache's dtype."""
        _, heads, n, dim = keys.shape
        zero = torch.zeros_like(shift.reshape(-1), dtype=torch.float32)
        positions = torch.stack([shift.reshape(-1).float(), zero, zero]).to(keys.device)
        cos, sin = self.rotary(keys.new_zeros(1, dtype=torch.float32), positions)
        scaling = getattr(self._decoder.rotary_emb, "attention_scaling", 1.0)
        cos, sin = (t.reshape(1, heads, n, dim) / scaling for t in (cos, sin))
        flat = keys.float()
        return (flat * cos + rotate_half(flat) * sin).to(keys.dtype)

    # --- the decoder --------------------------------------------------------------
    apply_rotary = staticmethod(apply_rotary_pos_emb)

    def rotary(self, hidden, positions):
        return self._decoder.rotary_emb(hidden, positions.to(hidden.device).unsqueeze(1))

    # --- the chat format ----------------------------------------------------------
    def preamble_ids(self, system_prompt: str) -> torch.Tensor:
        return self._encode(f"<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n<|vision_start|>")

    def question_ids(self, question: str) -> torch.Tensor:
        """The question is text: control tokens in it (`<|im_end|>`, `<|im_start|>`, ...) are tokenized
        as the plain characters they are written with, so a question cannot open or close a turn."""
        if not isinstance(question, str) or not question.strip():
            raise InputError(f"a question must be a non-empty string, got {question!r}")
        text = torch.tensor(self.tokenizer.encode(question, add_special_tokens=False, split_special_tokens=True),
                            dtype=torch.long)
        return torch.cat([self._encode("<|vision_end|>"), text, self._encode("<|im_end|>\n<|im_start|>assistant\n")])

    def template_ids(self) -> torch.Tensor:
        return self._encode("<|vision_end|><|im_end|>\n<|im_start|>assistant\n")

    def example_ids(self, question: str, answer: str) -> torch.Tensor:
        """The question, the assistant's answer and a new user turn up to the next picture."""
        return torch.cat([self.question_ids(question), self.answer_ids(answer),
                          self._encode("<|im_end|>\n<|im_start|>user\n<|vision_start|>")])


def _as_uint8_frames(frames) -> np.ndarray:
    """Checks a chunk of frames: (T, H, W, 3) uint8 RGB, T >= 1."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray):
        raise InputError(f"frames must be a torch tensor or numpy array, got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError(f"frames must have shape (T, H, W, 3) (RGB, channels last), got {tuple(frames.shape)}")
    if frames.shape[0] == 0:
        raise InputError("empty chunk: a chunk needs at least one frame")
    if frames.dtype != np.uint8:
        raise InputError(f"frames must be uint8 RGB values 0-255, got dtype {frames.dtype}")
    if min(frames.shape[1:3]) < 1:
        raise InputError(f"frames have no pixels: shape {tuple(frames.shape)}")
    return frames
