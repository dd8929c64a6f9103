"""Qwen3-VL (dense and MoE): the video path as transformers lays it out.

Each temporal step (a pair of frames) is its own block after a timestamp written as text:

    <0.8 seconds><|vision_start|> pads <|vision_end|><1.8 seconds><|vision_start|> pads <|vision_end|> ...

Time is carried by those timestamp tokens, not by an M-RoPE axis: text advances all three position
axes, and a frame's tokens sit at (p, p + h, p + w) from the position p where its block starts (the
library's `get_rope_index` with every step split into a grid of one). So a chunk's positions chain
from the last position used, and the temporal-position policy (halving the temporal axis) is refused:
it would not bound positions that every token advances.

DeepStack: the vision tower's intermediate blocks give one feature per visual token for each of the
first K decoder layers, added to the hidden state at the visual positions after that layer. The
features are found again in a layer's input by the exact bits of its visual rows (`_Deepstack`), so
they reach the right tokens at the right layers through every concatenation and slice the fold, the
observers and the search make, without any of them knowing about DeepStack.

Pruning keeps a frame's timestamp with the frame: its text tokens (timestamp and vision markers) rank
just below the frame's best visual token in every layer and head (`frame_text`, `rank_with_frames`),
so a frame that keeps any token keeps its time, right after that token in the ranking, and a frame that
keeps none drops its time too (a timestamp alone would name a moment nothing is left of). They cost a
frame ~9 tokens; the budget later evicts them like any token.
"""

from __future__ import annotations

import threading

import torch
from torch import nn
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

from ..errors import InputError, UnsupportedModelError
from .base import VideoPixels
from .qwen_vl import DEFAULT_MAX_FRAME_PIXELS, DEFAULT_MIN_FRAME_PIXELS, QwenVLAdapter

TIMESTAMP = "<{:.1f} seconds>"  # Qwen3VLProcessor.replace_video_token


class Qwen3VLAdapter(QwenVLAdapter):
    """Adapter for `Qwen3VLForConditionalGeneration` and `Qwen3VLMoeForConditionalGeneration`.

    fps: the rate frames are sampled at; a temporal step's timestamp is the mean time of its frames
        (frame i of the stream at i / fps), as the library's processor writes it.
    """

    chains_positions = True
    temporal_policy_refusal = (
        "Qwen3-VL carries time in the timestamp text before each frame, not on an M-RoPE axis: every "
        "position axis advances with the text, so compressing the temporal axis cannot bound its positions. "
        "Set temporal_range: 0; a stream then runs to the model's max_position_embeddings")

    def __init__(self, model: nn.Module, tokenizer, *, fps: float = 2.0,
                 image_processor: Qwen2VLImageProcessorPil | None = None,
                 min_frame_pixels: int = DEFAULT_MIN_FRAME_PIXELS,
                 max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> None:
        vision = model.config.vision_config
        # Qwen3-VL normalises with mean = std = 0.5 (its processors' IMAGENET_STANDARD statistics)
        image_processor = image_processor or Qwen2VLImageProcessorPil(
            patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        super().__init__(model, tokenizer, fps=fps, image_processor=image_processor,
                         min_frame_pixels=min_frame_pixels, max_frame_pixels=max_frame_pixels)
        self.fps = fps
        self.temporal_range = None  # see temporal_policy_refusal
        self.max_positions = model.config.text_config.max_position_embeddings
        self._video_token = model.config.video_token_id
        # Qwen3.5 (a subclass) has the same video path without DeepStack
        self._deepstack = _Deepstack(len(getattr(vision, "deepstack_visual_indexes", ())))

    # --- inputs ------------------------------------------------------------------
    @torch.no_grad()
    def encode_video(self, pixels: VideoPixels) -> torch.Tensor:
        """The chunk as the model reads it: (1, n, hidden), each step's timestamp and vision markers
        embedded as text around its frame's visual tokens. The vision tower runs a few steps at a time
        (its attention stays within a step); the DeepStack features of the visual tokens are kept for
        the decoder layers that add them (`run_layer`)."""
        visual = self.model.model.visual
        t, h, w = pixels.grid_thw
        steps = max(1, self.VISION_PATCHES_PER_CALL // (h * w))
        pieces, stacks = [], []
        for first in range(0, t, steps):
            k = min(steps, t - first)
            patches = pixels.pixel_values[first * h * w:(first + k) * h * w].to(self.device, self.dtype)
            out = visual(patches, grid_thw=torch.tensor([[k, h, w]], device=self.device))
            pieces.append(out.pooler_output)
            features = getattr(out, "deepstack_features", None)
            stacks.append(torch.stack(list(features)) if features else None)
        ids = torch.cat(self._step_ids(pixels.first_step, pixels))
        embeds = self.embed_text(ids)
        visual_rows = (ids == self._video_token).to(self.device)
        embeds[0, visual_rows] = torch.cat(pieces).to(embeds.dtype)
        if stacks[0] is not None:
            self._deepstack.add_video(embeds[0, visual_rows], torch.cat(stacks, dim=1))
        return embeds

    def _step_ids(self, first_step: int, pixels: VideoPixels) -> list[torch.Tensor]:
        """Per temporal step: its timestamp, <|vision_start|>, a video pad per visual token, <|vision_end|>.
        A step's time is the mean of its first and last frame's (a padded step repeats its last real
        frame), frame i of the video at i / fps: `Qwen3VLProcessor._calculate_timestamps`."""
        t, h, w = pixels.grid_thw
        tp = self.temporal_patch
        real = t * tp - pixels.padded_frames
        per_step = (h // self.merge) * (w // self.merge)
        start, end = self._special["<|vision_start|>"], self._special["<|vision_end|>"]
        out = []
        for s in range(t):
            frames = [first_step * tp + min(s * tp + j, real - 1) for j in (0, tp - 1)]
            stamp = TIMESTAMP.format((frames[0] + frames[1]) / 2 / self.fps)
            out.append(torch.cat([self._encode(stamp), torch.tensor([start] + [self._video_token] * per_step + [end])]))
        return out

    def token_steps(self, pixels: VideoPixels, n: int) -> torch.Tensor:
        """Each token's temporal step: a timestamp's tokens and markers belong to their frame's step."""
        return torch.cat([torch.full((len(ids),), s) for s, ids in enumerate(self._step_ids(pixels.first_step,
                                                                                             pixels))])

    def frame_text(self, pixels: VideoPixels, n: int) -> torch.Tensor:
        """A step's timestamp and vision markers: pruning keeps them with their frame's best token."""
        return torch.cat(self._step_ids(pixels.first_step, pixels)) != self._video_token

    # --- positions ---------------------------------------------------------------
    def video_positions(self, video_start: int, first_step: int, pixels: VideoPixels,
                        scale: float = 1.0) -> torch.Tensor:
        """(3, n) positions of the chunk starting at position `video_start` (the one after the last used):
        text on all three axes, a frame's block at (p, p + h, p + w), then p + max(h, w)."""
        if scale != 1:
            raise UnsupportedModelError(self.temporal_policy_refusal)
        gh, gw = pixels.grid_thw[1] // self.merge, pixels.grid_thw[2] // self.merge
        hh, ww = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        grid = torch.stack([torch.zeros(gh * gw, dtype=torch.long), hh.flatten(), ww.flatten()])
        pieces, p = [], video_start
        for ids in self._step_ids(first_step, pixels):
            before = len(ids) - gh * gw - 1  # the timestamp and <|vision_start|>
            pieces += [self.text_positions(p, before), grid + p + before]
            p += before + max(gh, gw)
            pieces.append(self.text_positions(p, 1))  # <|vision_end|>
            p += 1
        positions = torch.cat(pieces, dim=1)
        if p > self.max_positions:
            raise InputError(f"this chunk would reach position {p - 1}, past the model's max_position_embeddings "
                             f"({self.max_positions}): Qwen3-VL's positions grow with every frame and its timestamps, "
                             f"and it has no temporal axis to compress; start a new stream (or save fewer frames a "
                             f"second)")
        return positions

    def temporal_offsets(self, steps: torch.Tensor) -> torch.Tensor:
        raise UnsupportedModelError(self.temporal_policy_refusal)

    def shift_keys(self, keys: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        raise UnsupportedModelError(self.temporal_policy_refusal)

    # --- the decoder --------------------------------------------------------------
    def run_layer(self, index, hidden, mask, rotary, cache):
        """One decoder layer; after the first K, the DeepStack features of the visual rows of `hidden`
        are added to the layer's output at those rows (Qwen3VLTextModel._deepstack_process)."""
        out = self._decoder.layers[index](hidden, attention_mask=mask, position_embeddings=rotary, cache=cache)
        return self._deepstack.apply(index, hidden, out)

    def queries(self, index, normed_hidden, rotary):
        """Qwen3's per-head RMS norm on the queries comes before the rotation."""
        attn = self._decoder.layers[index].self_attn
        n = normed_hidden.shape[1]
        q = attn.q_norm(attn.q_proj(normed_hidden).view(1, n, -1, self.head_dim)).transpose(1, 2)
        cos, sin = rotary
        return apply_rotary_pos_emb(q, q, cos, sin)[0]

    # --- the chat format ----------------------------------------------------------
    # The processor collapses the template's <|vision_start|><|video_pad|><|vision_end|> into the
    # frames' own blocks: the user turn opens straight onto the first timestamp, the question follows
    # the last <|vision_end|>.
    def preamble_ids(self, system_prompt: str) -> torch.Tensor:
        return self._encode(f"<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n")

    def question_ids(self, question: str) -> torch.Tensor:
        if not isinstance(question, str) or not question.strip():
            raise InputError(f"a question must be a non-empty string, got {question!r}")
        text = torch.tensor(self.tokenizer.encode(question, add_special_tokens=False, split_special_tokens=True),
                            dtype=torch.long)
        return torch.cat([text, self._encode("<|im_end|>\n<|im_start|>assistant\n")])

    def template_ids(self) -> torch.Tensor:
        return self._encode("<|im_end|>\n<|im_start|>assistant\n")

    def example_ids(self, question: str, answer: str) -> torch.Tensor:
        return torch.cat([self.question_ids(question), self.answer_ids(answer),
                          self._encode("<|im_end|>\n<|im_start|>user\n")])


class _Deepstack:
    """The DeepStack features of the visual tokens encoded since the decoder last ran after an encode,
    per layer: rows (m, hidden) of that layer's input that are visual, and their features for that layer
    and the ones after it (K - layer, m, hidden). A layer's input is matched by exact bits (an integer
    fingerprint, then the rows compared), so a row is found wherever the fold, an observer or a re-run
    from a recorded layer input puts it. Per thread: an adapter may serve streams in several threads."""

    def __init__(self, layers: int) -> None:
        self.layers = layers
        self._local = threading.local()

    def _state(self):
        state = self._local
        if not hasattr(state, "entries"):
            state.entries, state.ran = [[] for _ in range(self.layers)], False
        return state

    def add_video(self, rows: torch.Tensor, features: torch.Tensor) -> None:
        """A chunk's visual embeddings (m, hidden) and their features (K, m, hidden). The first encode
        after a decoder run starts afresh: everything before it has been folded, asked or observed."""
        state = self._state()
        if state.ran:
            state.entries, state.ran = [[] for _ in range(self.layers)], False
        self._add(0, rows, features)

    def _add(self, layer: int, rows: torch.Tensor, features: torch.Tensor) -> None:
        if layer < self.layers and rows.shape[0]:
            keys = _fingerprint(rows)
            order = keys.argsort()
            self._state().entries[layer].append((keys[order], order, rows, features))

    def apply(self, index: int, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` (1, n, hidden) of layer `index` with the features added at the visual rows of its input
        `hidden`; those rows of the result are registered as the next layer's visual input."""
        state = self._state()
        state.ran = True
        if index >= self.layers or not state.entries[index]:
            return out
        rows = hidden[0]
        keys = _fingerprint(rows)
        found = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        where, features = [], []
        for sorted_keys, order, known, known_features in state.entries[index]:
            at = torch.searchsorted(sorted_keys, keys).clamp(max=len(sorted_keys) - 1)
            candidate = order[at]
            hit = (sorted_keys[at] == keys) & ~found
            if not bool(hit.any()):
                continue
            hit[hit.clone()] = (rows[hit] == known[candidate[hit]]).all(-1)
            found |= hit
            where.append(hit.nonzero().squeeze(1))
            features.append(known_features[:, candidate[hit]])
        if not where:
            return out
        where, features = torch.cat(where), torch.cat(features, dim=1)
        out = out.clone()
        out[0, where] = out[0, where] + features[0].to(out.dtype)
        self._add(index + 1, out[0, where], features[1:])
        return out


_WEIGHTS: dict[tuple[int, str], torch.Tensor] = {}


def _fingerprint(rows: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """(m,) int64 of rows (m, hidden): a weighted sum of their bits, exact (integer arithmetic) so equal
    rows always agree, whatever their batch. Weights below 2**18 keep the sum clear of overflow; `block`
    rows at a time bound the int64 copy (a 9k-token chunk of a 4096-wide model would take 300 MB)."""
    bits = rows.contiguous().view(torch.int16 if rows.element_size() == 2 else torch.int32)
    key = (bits.shape[-1], str(rows.device))
    if key not in _WEIGHTS:
        generator = torch.Generator().manual_seed(bits.shape[-1])
        _WEIGHTS[key] = torch.randint(1, 2 ** 18, (bits.shape[-1],), generator=generator).to(rows.device)
    weights = _WEIGHTS[key]
    return torch.cat([(bits[i:i + block].long() * weights).sum(-1) for i in range(0, bits.shape[0], block)]
                     or [weights.new_zeros(0)])
