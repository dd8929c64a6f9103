"""M-RoPE positions agree with the published Qwen2-VL / Qwen2.5-VL rule: vision tokens get
(t, h, w) grids, text after a vision block starts at the block's max position + 1."""

import numpy as np
import pytest
import torch

from emloc import EMLoCSettings, StreamContext
from emloc.tiny import tiny_qwen2_5_vl

from .reference import chat_preamble, chat_question, published_rope_index, random_frames, video_rope_kwargs


@pytest.mark.parametrize("fps", [2.0, 1.0])
def test_stream_positions_follow_published_rule(model, tokenizer, fps):
    settings = EMLoCSettings(layer_group_size=1, ratios=(1.0,), chunk_frames=4)
    context = StreamContext(model, tokenizer, settings, fps=fps)
    adapter = context.adapter
    chunks = [random_frames(4, 56, 112, seed=s) for s in range(3)]  # grid h=4, w=8: w > steps per chunk
    pixels = [adapter.preprocess(c) for c in chunks]
    records = [context.fold(c) for c in chunks]

    preamble = chat_preamble(tokenizer, settings.system_prompt)
    question = chat_question(tokenizer, "what colour was the triangle ?")
    n_video = sum(p.pixel_values.shape[0] for p in pixels) // 4
    ids = preamble + [model.config.video_token_id] * n_video + question
    full = adapter.preprocess(np.concatenate(chunks))
    published = published_rope_index(ids, video_grids=[full.grid_thw], **video_rope_kwargs(model, fps))

    assert context.video_start == len(preamble)
    ours = [adapter.text_positions(0, len(preamble))]
    steps = 0
    for p, record in zip(pixels, records):
        chunk = adapter.video_positions(context.video_start, steps, p)
        assert record.positions == (int(chunk[0].min()), int(chunk[0].max()))
        ours.append(chunk)
        steps += p.grid_thw[0]
    ours.append(adapter.text_positions(context.max_position + 1, len(question)))
    assert torch.equal(torch.cat(ours, dim=1), published)


def test_image_block_and_text_follow_published_rule(tokenizer):
    """An image is a one-step grid; text before, between and after blocks chains at max + 1."""
    model = tiny_qwen2_5_vl(tokenizer)
    context = StreamContext(model, tokenizer, EMLoCSettings(layer_group_size=1, chunk_frames=2))
    adapter = context.adapter
    image = adapter.preprocess(random_frames(1, 84, 56))   # padded to one step: grid (1, 6, 4)
    video = adapter.preprocess(random_frames(6, 56, 56))   # grid (3, 4, 4)
    cfg = model.config
    n_img, n_vid = image.pixel_values.shape[0] // 4, video.pixel_values.shape[0] // 4
    text = lambda n: [9] * n  # noqa: E731
    ids = (text(3) + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + text(2)
           + [cfg.vision_start_token_id] + [cfg.video_token_id] * n_vid + text(4))
    published = published_rope_index(ids, image_grids=[image.grid_thw], video_grids=[video.grid_thw],
                                     **video_rope_kwargs(model))

    pieces = [adapter.text_positions(0, 4)]
    image_pos = adapter.video_positions(4, 0, image)  # one temporal step: t stays at the block start
    pieces.append(image_pos)
    pieces.append(adapter.text_positions(int(image_pos.max()) + 1, 3))
    pieces.append(adapter.video_positions(int(pieces[-1].max()) + 1, 0, video))
    pieces.append(adapter.text_positions(int(pieces[-1].max()) + 1, 4))
    assert torch.equal(torch.cat(pieces, dim=1), published)
