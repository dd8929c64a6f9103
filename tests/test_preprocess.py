"""Frames -> patches: the library's PIL image processor does resize/rescale/normalize and the
spatial layout; ours only interleaves frames along the temporal patch. Proven equal to the
library on identical frame pairs, and to its video processor's layout on distinct frames."""

import numpy as np
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from emloc.adapters.qwen_vl import QwenVLAdapter

from .reference import random_frames

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def video_processor_layout(frames: np.ndarray, patch: int = 14, merge: int = 2, tp: int = 2) -> np.ndarray:
    """Qwen2VLVideoProcessor.patchify (transformers 5.x), transcribed to numpy, on frames already
    at a valid size: rescale + normalize, then (t, tp, C, h/m, m, p, w/m, m, p) -> token-major."""
    x = ((frames.astype(np.float32) / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2)  # (T, C, H, W)
    t, c, h, w = x.shape
    x = x.reshape(t // tp, tp, c, h // patch // merge, merge, patch, w // patch // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t // tp * (h // patch) * (w // patch), c * tp * patch * patch)


def test_identical_pairs_equal_the_image_processor(qwen2_vl, tokenizer):
    adapter = QwenVLAdapter(qwen2_vl, tokenizer)
    a, b = random_frames(2, 100, 150, seed=4)  # needs a resize
    ours = adapter.preprocess(np.stack([a, a, b, b]))
    library = Qwen2VLImageProcessorPil()(images=[a, b], return_tensors="np",
                                         size={"shortest_edge": adapter.min_frame_pixels,
                                               "longest_edge": adapter.max_frame_pixels})
    assert np.array_equal(ours.pixel_values.numpy(), library["pixel_values"])
    h, w = smart_resize(100, 150, 28, adapter.min_frame_pixels, adapter.max_frame_pixels)
    assert ours.grid_thw == (2, h // 14, w // 14)


def test_distinct_frames_follow_the_video_processor_layout(qwen2_vl, tokenizer):
    adapter = QwenVLAdapter(qwen2_vl, tokenizer)
    frames = random_frames(6, 56, 84, seed=5)
    ours = adapter.preprocess(torch.from_numpy(frames))
    assert ours.grid_thw == (3, 4, 6) and ours.padded_frames == 0
    np.testing.assert_allclose(ours.pixel_values.numpy(), video_processor_layout(frames), atol=1e-5, rtol=0)


def test_odd_chunk_repeats_the_last_frame(qwen2_vl, tokenizer):
    adapter = QwenVLAdapter(qwen2_vl, tokenizer)
    frames = random_frames(3, 56, 56, seed=6)
    padded = adapter.preprocess(frames)
    assert padded.padded_frames == 1
    assert torch.equal(padded.pixel_values, adapter.preprocess(np.concatenate([frames, frames[-1:]])).pixel_values)


def test_large_frames_are_capped_at_the_token_budget_per_pair(qwen2_vl, tokenizer):
    adapter = QwenVLAdapter(qwen2_vl, tokenizer)
    pixels = adapter.preprocess(random_frames(2, 720, 1280, seed=7))
    _, h, w = pixels.grid_thw
    assert (h // 2) * (w // 2) <= 144  # the paper's 144 tokens per frame pair
