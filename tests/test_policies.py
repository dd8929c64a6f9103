"""Every retention policy through the same pipeline: the cache stays consistent whichever
policy runs, and each policy keeps what it promises."""

import pytest
import torch

from emloc import EMLoCSettings, StreamContext
from emloc.policies import JSBoundedSearch, KeepAll, ObserverTopK, RandomTokens, StreamingWindow, UniformFrames

from .reference import random_frames

SETTINGS = EMLoCSettings(layer_group_size=2, delta=0.05, ratios=(0.1, 0.3, 0.5, 1.0), chunk_frames=8)

POLICIES = {
    "emloc": lambda: JSBoundedSearch.from_settings(SETTINGS),
    "keep_all": KeepAll,
    "observer_topk": lambda: ObserverTopK(0.25),
    "uniform_frames": lambda: UniformFrames(0.25),
    "random_tokens": lambda: RandomTokens(0.25, seed=1),
    "streaming_window": lambda: StreamingWindow(window=30),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_keeps_the_cache_consistent(name, qwen2_vl, tokenizer):
    context = StreamContext(qwen2_vl, tokenizer, SETTINGS, policy=POLICIES[name]())
    for k in range(4):
        first = context.tokens_seen
        record = context.fold(random_frames(8, seed=k))
        assert record.observers if context.policy.needs_observers else not record.observers
        for i, layer in enumerate(context.cache.layers):
            assert record.tokens_after[i] == record.tokens_before[i] + record.kept[i] - record.evicted[i]
            assert layer.length == record.tokens_after[i]
            origins = layer.committed_origins()[0]
            assert bool((origins[:, 1:] > origins[:, :-1]).all()), "kept tokens stay in stream order"
            assert int(origins.max()) < first + record.chunk_tokens
        lengths = context.cache.lengths()
        answer = context.answer("what colour was the triangle ?", max_new_tokens=2)
        assert context.cache.lengths() == lengths and answer.cache_tokens > 0


@pytest.mark.parametrize("policy", [ObserverTopK(0.25), RandomTokens(0.25)])
def test_fixed_ratio_policies_keep_their_share(policy, qwen2_vl, tokenizer):
    context = StreamContext(qwen2_vl, tokenizer, SETTINGS, policy=policy)
    record = context.fold(random_frames(8))
    assert record.kept == [6] * 4  # ceil(0.25 * 24)


def test_observer_topk_keeps_the_most_attended_tokens(qwen2_vl, tokenizer):
    captured = {}

    class Spy(ObserverTopK):
        def retain(self, state):
            captured["importance"] = [x.clone() for x in state.importance]
            return super().retain(state)

    context = StreamContext(qwen2_vl, tokenizer, SETTINGS, policy=Spy(0.25))
    first = context.tokens_seen
    context.fold(random_frames(8))
    for layer, scores in zip(context.cache.layers, captured["importance"]):
        kept = layer.committed_origins()[0, :, context.sink_tokens:] - first  # (heads, 6)
        for head in range(kept.shape[0]):
            threshold = scores[0, head].topk(6).values.min()
            assert bool((scores[0, head, kept[head]] >= threshold).all())


def test_uniform_frames_keeps_whole_evenly_spaced_frame_pairs(qwen2_vl, tokenizer):
    context = StreamContext(qwen2_vl, tokenizer, SETTINGS, policy=UniformFrames(0.5))
    first = context.tokens_seen
    record = context.fold(random_frames(8))  # 4 steps of 6 tokens
    kept = context.cache.layers[0].committed_origins()[0, 0, context.sink_tokens:] - first
    steps = sorted(set((kept // 6).tolist()))
    assert steps == [0, 3] and record.kept == [12] * 4


def test_streaming_window_keeps_sinks_and_the_most_recent(qwen2_vl, tokenizer):
    context = StreamContext(qwen2_vl, tokenizer, SETTINGS, policy=StreamingWindow(window=30))
    for k in range(3):
        context.fold(random_frames(8, seed=k))
    for layer in context.cache.layers:
        origins = layer.committed_origins()[0]
        expected = list(range(context.sink_tokens)) + list(range(context.tokens_seen - 30, context.tokens_seen))
        assert all(row == expected for row in origins.tolist())


def test_random_tokens_is_reproducible(qwen2_vl, tokenizer):
    caches = []
    for _ in range(2):
        context = StreamContext(qwen2_vl, tokenizer, SETTINGS, policy=RandomTokens(0.3, seed=5))
        context.fold(random_frames(8))
        caches.append(context.cache.layers[1].committed_origins().clone())
    assert torch.equal(*caches)


@pytest.mark.parametrize("make", [lambda: ObserverTopK(0), lambda: UniformFrames(1.5), lambda: RandomTokens(-1),
                                  lambda: StreamingWindow(0)])
def test_policy_settings_are_checked(make):
    with pytest.raises(ValueError):
        make()


def test_keep_all_keeps_every_token(qwen2_vl, tokenizer):
    context = StreamContext(qwen2_vl, tokenizer, SETTINGS, policy=KeepAll())
    for k in range(3):
        context.fold(random_frames(8, seed=k))
    assert context.cache.lengths() == [context.tokens_seen] * context.adapter.num_layers
