"""The Jensen-Shannon bound holds: for every accepted group, the observer's output over the
committed cache (that group and those above pruned, those below whole) is within delta of
its output over the unpruned chunk, recomputed independently of the search."""

import pytest
import torch

from emloc import EMLoCSettings, SettingsError, StreamContext
from emloc.settings import videomme_online

from .reference import chat_question, js, observer_log_probs, prefill_kv, random_frames


def test_accepted_groups_are_within_delta(model, tokenizer):
    settings = videomme_online(layer_group_size=2, delta=0.05, ratios=(0.1, 0.3, 0.5, 1.0), chunk_frames=8)
    context = StreamContext(model, tokenizer, settings)
    adapter, steps, checked, rejected = context.adapter, 0, 0, 0
    for seed in range(4):
        frames = random_frames(8, seed=seed)
        before = [(layer.keys.clone(), layer.values.clone()) for layer in context.cache.layers]
        record = context.fold(frames)

        pixels = adapter.preprocess(frames)
        with torch.no_grad():
            embeds = model.model.visual(pixels.pixel_values, grid_thw=torch.tensor([pixels.grid_thw])).pooler_output
        whole = prefill_kv(model, before, embeds[None], adapter.video_positions(context.video_start, steps, pixels))
        steps += pixels.grid_thw[0]
        ids = chat_question(tokenizer, record.observers[0].text)
        positions = adapter.text_positions(record.max_position + 1, len(ids))
        observed = min(settings.observed_positions, len(ids))
        reference = observer_log_probs(model, whole, ids, positions, observed)

        for group in record.groups:
            passed = [ratio for ratio, value in group.tried if value <= settings.delta]
            assert group.ratio == (passed[0] if passed else 1.0), "the smallest ratio within the bound wins"
            rejected += sum(ratio < group.ratio for ratio, _ in group.tried)
            if group.ratio >= 1.0:
                continue
            kv = [whole[i] if i < group.first else (layer.keys, layer.values)
                  for i, layer in enumerate(context.cache.layers)]
            divergence = js(reference, observer_log_probs(model, kv, ids, positions, observed))
            assert divergence <= settings.delta + 1e-5
            assert abs(divergence - group.js) < 1e-4, "the search must report the divergence it accepted"
            checked += 1
    assert checked >= 3, "the test must see pruned groups"
    assert rejected >= 1, "the test must see rejected candidates"


def test_probe_answer_is_carried_checked_and_extended(qwen2_vl, tokenizer):
    """probe_answer_refresh 'carry': the answer carried into a chunk is the one left by the chunk before;
    the bound covers the part of it that a fresh greedy answer over the unpruned chunk (`answer` with the
    chunk as partial frames, computed apart) confirms, and what is carried on is that part plus the fresh
    answer's next token."""
    limit = 6
    settings = EMLoCSettings(layer_group_size=2, delta=0.05, ratios=(0.1, 0.5, 1.0), chunk_frames=8,
                             probe_answer_tokens=limit)
    context = StreamContext(qwen2_vl, tokenizer, settings)
    carried, grew, cut = (), 0, 0
    for seed in range(6):
        chunk = random_frames(8, seed=seed % 2)  # a scene that comes back: the answer can grow
        fresh = context.answer(settings.probe_prompt, max_new_tokens=limit, partial_frames=chunk).token_ids
        record = context.fold(chunk)
        [observer] = record.observers
        shared = next((j for j, (a, b) in enumerate(zip(carried, fresh)) if a != b), min(len(carried), len(fresh)))
        assert observer.kind == "probe" and observer.answer_ids == carried[:shared] == tuple(fresh[:shared])
        assert list(context.probe_answer) == fresh[:shared + 1], (carried, fresh)
        grew += len(context.probe_answer) > len(carried)
        cut += shared < len(carried)
        carried = context.probe_answer
    assert grew >= 2 and cut >= 1, f"the test must see the answer grow and be cut ({grew}, {cut})"


def test_probe_observer_can_decode_the_models_own_answer(qwen2_vl, tokenizer):
    """probe_answer_refresh 'decode': the probe observer is the prompt plus the model's greedy answer over
    the unpruned chunk: the same tokens `answer` gives with the chunk as partial frames."""
    settings = EMLoCSettings(layer_group_size=2, delta=0.05, ratios=(0.1, 0.5, 1.0), chunk_frames=8,
                             probe_answer_tokens=4, probe_answer_refresh="decode")
    context = StreamContext(qwen2_vl, tokenizer, settings)
    context.fold(random_frames(8, seed=0))
    chunk = random_frames(8, seed=1)
    expected = context.answer(settings.probe_prompt, max_new_tokens=4, partial_frames=chunk).token_ids
    before = context.cache.lengths()
    record = context.fold(chunk)
    [observer] = record.observers
    assert observer.kind == "probe" and list(observer.answer_ids) == expected and len(expected) > 0
    assert [b + k for b, k in zip(before, record.kept)] == context.cache.lengths()
    for group in record.groups:
        assert group.js <= settings.delta + 1e-5 or group.ratio == 1.0
    with pytest.raises(SettingsError, match="probe_answer_tokens"):
        EMLoCSettings(probe_answer_tokens=-1)
    with pytest.raises(SettingsError, match="probe_answer_refresh"):
        EMLoCSettings(probe_answer_refresh="sometimes")


def test_a_saved_carried_answer_is_checked(qwen2_vl, tokenizer):
    """The carried answer goes with a snapshot (a resumed stream observes what the straight one does);
    a saved one that is not token ids of this model, or too long, is refused."""
    settings = EMLoCSettings(layer_group_size=2, chunk_frames=8, probe_answer_tokens=4)
    context = StreamContext(qwen2_vl, tokenizer, settings)
    context.fold(random_frames(8, seed=0))
    tensors, meta = context.snapshot()
    assert meta["probe_answer"] == list(context.probe_answer) and context.probe_answer
    resumed = StreamContext(qwen2_vl, tokenizer, settings)
    resumed.restore(tensors, meta)
    assert resumed.probe_answer == context.probe_answer
    for bad in ([10 ** 9], [1, 2, 3, 4, 5], "12", [True], [1.0]):
        with pytest.raises(ValueError, match="probe_answer"):
            StreamContext(qwen2_vl, tokenizer, settings).restore(tensors, {**meta, "probe_answer": bad})


def test_carry_start_decodes_the_first_answer_then_carries_it(qwen2_vl, tokenizer):
    """probe_answer_refresh 'carry_start': the first chunk's observer is the full greedy answer over it (as a
    fresh decode gives it, computed apart); the next chunk's is the part of it the model still says."""
    settings = EMLoCSettings(layer_group_size=2, chunk_frames=8, probe_answer_tokens=6,
                             probe_answer_refresh="carry_start")
    context = StreamContext(qwen2_vl, tokenizer, settings)
    first, second = random_frames(8, seed=0), random_frames(8, seed=1)
    fresh = context.answer(settings.probe_prompt, max_new_tokens=6, partial_frames=first).token_ids
    record = context.fold(first)
    assert list(record.observers[0].answer_ids) == fresh and len(fresh) > 1
    again = context.answer(settings.probe_prompt, max_new_tokens=6, partial_frames=second).token_ids
    record = context.fold(second)
    shared = next((j for j, (a, b) in enumerate(zip(fresh, again)) if a != b), min(len(fresh), len(again)))
    assert list(record.observers[0].answer_ids) == fresh[:shared]
