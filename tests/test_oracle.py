"""Lossless oracle: with every ratio forced to 1.0, folding chunks then answering must
reproduce the plain transformers model run once over the whole multimodal sequence."""

import copy

import numpy as np
import pytest
import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from emloc import EMLoCSettings, StreamContext, UnsupportedModelError

from .reference import (
    chat_preamble,
    chat_question,
    plain_greedy,
    plain_logits,
    published_rope_index,
    random_frames,
    video_rope_kwargs,
)

SYSTEM = "You are a helpful assistant."
QUESTION = "what colour was the triangle ?"


# Every attention implementation transformers knows how to mask; those it cannot run here
# (flash-attn not installed, flex attention not offered for these architectures) are skipped.
IMPLEMENTATIONS = sorted(ALL_MASK_ATTENTION_FUNCTIONS.valid_keys())


def with_attention(model, implementation: str):
    """A copy of `model` running `implementation`, or a skip if transformers refuses it here."""
    model = copy.deepcopy(model)
    try:
        model.set_attn_implementation(implementation)
    except (ValueError, ImportError) as error:
        pytest.skip(f"transformers cannot run {implementation} here: {str(error)[:120]}")
    return model


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_lossless_fold_matches_full_context(model, tokenizer, implementation):
    """Catches a mask the implementation does not honour (eager adds a boolean mask to the
    scores instead of masking: the logits then differ by about 1.5)."""
    model = with_attention(model, implementation)
    settings = EMLoCSettings(layer_group_size=2, ratios=(1.0,), chunk_frames=4, system_prompt=SYSTEM)
    context = StreamContext(model, tokenizer, settings)
    chunks = [random_frames(4, seed=s) for s in range(3)]
    for chunk in chunks:
        record = context.fold(chunk)
        assert record.kept == [record.chunk_tokens] * context.adapter.num_layers

    answer = context.answer(QUESTION, max_new_tokens=6, return_logits=True)

    full = context.adapter.preprocess(np.concatenate(chunks))
    n_video = full.pixel_values.shape[0] // 4
    preamble, question = chat_preamble(tokenizer, SYSTEM), chat_question(tokenizer, QUESTION)
    ids = preamble + [model.config.video_token_id] * n_video + question
    positions = published_rope_index(ids, video_grids=[full.grid_thw], **video_rope_kwargs(model))
    logits = plain_logits(model, ids, full.pixel_values, full.grid_thw, positions)

    expected = logits[-len(question):]
    assert answer.prompt_logits.shape == expected.shape
    torch.testing.assert_close(answer.prompt_logits, expected, atol=1e-4, rtol=0)

    greedy = plain_greedy(model, ids, full.pixel_values, full.grid_thw, positions, 6,
                          stop={model.config.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")})
    assert answer.token_ids == greedy
    assert len(greedy) > 0


def test_paged_attention_is_refused(model, tokenizer):
    """Paged attention expects the library's paged cache: named, not silently run on ours."""
    model = with_attention(model, "paged|eager")
    with pytest.raises(UnsupportedModelError, match="'paged\\|eager' is not supported.*attn_implementation"):
        StreamContext(model, tokenizer)
