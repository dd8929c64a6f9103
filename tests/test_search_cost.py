"""The cheap search makes the choices of the expensive one: a group's whole ratio ladder in one pass
against one pass per ratio, the first observer in the prefill's pass against a pass of its own, and
every observer with its copies unseen by the others. And it costs what it claims, in sequential
decoder-layer calls (what a GPU pays for)."""

import pytest
import torch

from emloc import EMLoCSettings, StreamContext
from emloc.forward import counting_layers
from emloc.observer import Observer, observe
from emloc.policies import JSBoundedSearch
from emloc.settings import videomme_online

from .reference import random_frames

SETTINGS = {
    "default": EMLoCSettings(layer_group_size=2, ratios=(0.05, 0.1, 0.2, 0.3, 0.5, 1.0), chunk_frames=8),
    "paper": videomme_online(layer_group_size=2, delta=0.05, ratios=(0.1, 0.3, 0.5, 1.0), chunk_frames=8),
    "layer_wise": videomme_online(layer_group_size=1, delta=0.02, ratios=(0.1, 0.3, 0.5, 1.0), chunk_frames=8),
}


def fold_all(model, tokenizer, settings, one_pass, questions=()):
    policy = JSBoundedSearch.from_settings(settings)
    policy = JSBoundedSearch(policy.layer_group_size, policy.delta, policy.ratios, one_pass=one_pass)
    context = StreamContext(model, tokenizer, settings, policy=policy)
    records = [context.fold(random_frames(8, seed=seed), questions=list(questions)) for seed in range(4)]
    return context, records


@pytest.mark.parametrize("name", sorted(SETTINGS))
@pytest.mark.parametrize("questions", [(), pytest.param(("what colour was the square ?", "is anyone at the door ?"),
                                                           marks=pytest.mark.slow)])
def test_one_pass_search_chooses_what_the_sequential_search_chooses(qwen2_vl, tokenizer, name, questions):
    settings = SETTINGS[name]
    batched, fast = fold_all(qwen2_vl, tokenizer, settings, True, questions)
    sequential, slow = fold_all(qwen2_vl, tokenizer, settings, False, questions)
    pruned = 0
    for a, b in zip(fast, slow):
        assert [(g.first, g.ratio, g.kept) for g in a.groups] == [(g.first, g.ratio, g.kept) for g in b.groups]
        for ga, gb in zip(a.groups, b.groups):
            assert abs(ga.js - gb.js) < 1e-5
            # the sequential search stopped where the batched one chose; what both tried agrees
            for (ra, ja), (rb, jb) in zip(ga.tried, gb.tried):
                assert ra == rb and abs(ja - jb) < 1e-5
            pruned += ga.ratio < 1
        assert a.kept == b.kept and a.observers == b.observers
    for la, lb in zip(batched.cache.layers, sequential.cache.layers):
        assert torch.equal(la.committed_origins(), lb.committed_origins())
        torch.testing.assert_close(la.keys, lb.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(la.values, lb.values, rtol=0, atol=1e-5)
    assert pruned >= 2, "the test must see pruned groups"
    question = "what colour was the square ?"
    assert batched.answer(question).token_ids == sequential.answer(question).token_ids


def test_observers_run_together_see_only_themselves(model, tokenizer):
    """Two observers in one pass (copies) give each the pass it would get alone: attention onto the
    cache and reference distribution, recomputed one observer at a time."""
    context = StreamContext(model, tokenizer, SETTINGS["paper"])
    context.fold(random_frames(8, seed=0))
    adapter, cache = context.adapter, context.cache
    with torch.no_grad():
        run_layers_chunk = random_frames(8, seed=1)
        pixels = adapter.preprocess(run_layers_chunk)
        embeds = adapter.encode_video(pixels)
        positions = adapter.video_positions(context.video_start, context.temporal.steps, pixels)
        from emloc.forward import run_layers
        run_layers(adapter, cache, embeds, positions)
        start = int(positions.max()) + 1
        texts = ["what colour was the square ?", "is anyone at the door ?"]
        alone = [observe(adapter, cache, Observer("question", t), adapter.question_ids(t),
                         adapter.text_positions(start, len(adapter.question_ids(t))), 16) for t in texts]
        from emloc.observer import ObserverRun, observe_together
        runs = [ObserverRun(Observer("question", t), adapter.embed_text(adapter.question_ids(t)),
                            adapter.text_positions(start, len(adapter.question_ids(t))), 16) for t in texts]
        together, _ = observe_together(adapter, cache, runs)
    for a, b in zip(alone, together):
        torch.testing.assert_close(a.reference, b.reference, rtol=0, atol=1e-5)
        for x, y in zip(a.attention, b.attention):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
        for x, y in zip(a.layer_inputs, b.layer_inputs):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


def test_default_fold_costs_at_most_three_prefills_in_sequential_layer_calls(qwen2_vl, tokenizer):
    """Hardware-independent cost per chunk: the default (probe with its carried answer, two layer groups)
    makes at most 3x the decoder-layer calls of keeping everything (one prefill pass), and the old way
    (a fresh decode of the answer, one pass per ratio) makes far more."""
    from emloc.policies import KeepAll

    layers = 4
    settings = EMLoCSettings(layer_group_size=2, chunk_frames=8)
    full = StreamContext(qwen2_vl, tokenizer, settings, policy=KeepAll())
    fast = StreamContext(qwen2_vl, tokenizer, settings)
    slow_settings = EMLoCSettings(layer_group_size=2, chunk_frames=8, probe_answer_refresh="decode")
    slow = StreamContext(qwen2_vl, tokenizer, slow_settings, policy=JSBoundedSearch(2, 0.04, settings.ratios,
                                                                                      one_pass=False))
    for seed in range(3):
        frames = random_frames(8, seed=seed)
        a, b, c = full.fold(frames), fast.fold(frames), slow.fold(frames)
        assert a.work.calls == layers and a.work.token_layers == layers * a.chunk_tokens
        # prefill + first observer (4) and one pass per group: the top group (2 layers), then all 4
        assert b.work.calls == layers + sum(layers - g.first for g in b.groups if g.tried) <= 3 * a.work.calls
        assert c.work.calls > 2 * b.work.calls
    with counting_layers() as work:
        fast.answer("what colour was the square ?", max_new_tokens=4)
    assert work.calls >= layers  # the answer's prompt pass, then a pass per new token


def test_a_prefill_over_merged_tokens_in_query_blocks_is_the_whole_pass(qwen2_vl, tokenizer, monkeypatch):
    """Where a layer holds merged tokens a long prefill runs its rows in blocks (its per-head mask would be
    (heads, rows, cached + rows) at once): the same choices, cache, observer attention and answers as one
    block, for a block smaller than a chunk and an observer longer than a block."""
    from emloc import forward

    settings = SETTINGS["default"]
    whole, whole_records = fold_all(qwen2_vl, tokenizer, settings, True, ("what colour was the square ?",))
    calls = []
    run_layer = type(whole.adapter).run_layer
    monkeypatch.setattr(type(whole.adapter), "run_layer",
                        lambda self, i, hidden, *a: calls.append(hidden.shape[1]) or run_layer(self, i, hidden, *a))
    monkeypatch.setattr(forward, "QUERY_BLOCK", 5)
    blocked, blocked_records = fold_all(qwen2_vl, tokenizer, settings, True, ("what colour was the square ?",))
    assert 5 in calls, "the test must see blocks"
    for a, b in zip(whole_records, blocked_records):
        assert [(g.ratio, g.kept) for g in a.groups] == [(g.ratio, g.kept) for g in b.groups] and a.kept == b.kept
        assert a.work.calls == b.work.calls
    for la, lb in zip(whole.cache.layers, blocked.cache.layers):
        assert torch.equal(la.committed_origins(), lb.committed_origins())
        torch.testing.assert_close(la.keys, lb.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(la.committed_importance(), lb.committed_importance(), rtol=0, atol=1e-5)
    question = "what colour was the square ?"
    assert whole.answer(question).token_ids == blocked.answer(question).token_ids
