"""A fold is all or nothing, and a context used from several threads takes turns."""

import threading

import pytest
import torch

from emloc import EMLoCSettings, StreamContext
from emloc.cache import PrunedLayer

from .reference import random_frames

QUESTION = "what colour was the triangle ?"


def settings() -> EMLoCSettings:
    # 12 sink tokens, 12 tokens a chunk of which each layer keeps 6: from the third fold on,
    # every fold evicts 6 tokens in every layer
    return EMLoCSettings(layer_group_size=2, ratios=(0.5,), chunk_frames=4, token_budget=24)


def chunk(seed: int):
    return random_frames(4, seed=seed)


def cache_state(context: StreamContext) -> dict:
    """Everything a later fold or answer reads: committed tensors, lengths, tails, counters."""
    state = {name: t.clone() for name, t in context.cache.export().items()}
    state["lengths"] = context.cache.lengths()
    state["tails"] = [layer.tail for layer in context.cache.layers]
    state["meta"] = context.snapshot()[1]
    return state


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], torch.Tensor):
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
        else:
            assert a[name] == b[name], name


@pytest.mark.parametrize("step", ["commit_tail", "keep_committed"])
def test_failure_at_one_layer_leaves_every_layer_as_it_was(qwen2_vl, tokenizer, monkeypatch, step):
    """A failure while layer 2 of 4 commits (or evicts) must undo layers 0-1 too: their
    committed tokens, the importance the commit decayed in place, the buffers evicted from.
    Catches a commit or eviction applied layer by layer with no rollback."""
    context = StreamContext(qwen2_vl, tokenizer, settings())
    twin = StreamContext(qwen2_vl, tokenizer, settings())
    for seed in range(3):
        context.fold(chunk(seed))
        twin.fold(chunk(seed))
    before = cache_state(context)
    assert all(n == 24 for n in before["lengths"])  # full: the next fold evicts in every layer

    calls = []
    original = getattr(PrunedLayer, step)

    def failing(self, *args, **kwargs):
        calls.append(self)
        if self is context.cache.layers[2]:
            raise RuntimeError("injected failure at layer 2")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PrunedLayer, step, failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        context.fold(chunk(3))
    monkeypatch.setattr(PrunedLayer, step, original)
    assert calls[:3] == context.cache.layers[:3]  # layers 0 and 1 had done it before 2 failed
    assert_same(cache_state(context), before)
    assert len(context.records) == 3

    # and nothing hidden is off: the next folds match a context that never failed
    for seed in (3, 4):
        record, expected = context.fold(chunk(seed)), twin.fold(chunk(seed))
        assert record.kept == expected.kept and record.evicted == expected.evicted
    assert_same(cache_state(context), cache_state(twin))
    assert context.answer(QUESTION).token_ids == twin.answer(QUESTION).token_ids


class SlowPolicy:
    """Delegates to the context's policy; while choosing, lets another thread try to answer."""

    def __init__(self, inner, during):
        self.inner, self.during = inner, during

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def retain(self, state):
        self.during()
        return self.inner.retain(state)


def test_answer_during_fold_waits_for_it(qwen2_vl, tokenizer):
    """A question from another thread while a fold is choosing what to keep must neither drop
    the fold's tail (the fold would commit garbage or fail) nor see a half-folded cache: it
    waits and is answered over the folded chunk. Catches an unguarded context."""
    context = StreamContext(qwen2_vl, tokenizer, settings())
    alone = StreamContext(qwen2_vl, tokenizer, settings())
    for seed in range(2):
        context.fold(chunk(seed))
        alone.fold(chunk(seed))
    expected_record = alone.fold(chunk(2))
    expected_answer = alone.answer(QUESTION, max_new_tokens=4, return_logits=True)

    answers, waited = [], []
    asker = threading.Thread(target=lambda: answers.append(
        context.answer(QUESTION, max_new_tokens=4, return_logits=True)))

    def during():
        asker.start()
        asker.join(timeout=0.5)  # unguarded, the answer runs (and drops the tails) right now
        waited.append(asker.is_alive())

    context.policy = SlowPolicy(context.policy, during)
    record = context.fold(chunk(2))
    asker.join(timeout=60)
    assert waited == [True]
    assert record.kept == expected_record.kept and record.tokens_after == expected_record.tokens_after
    assert_same(cache_state(context), cache_state(alone))
    assert answers[0].chunks_folded == 3 and answers[0].token_ids == expected_answer.token_ids
    torch.testing.assert_close(answers[0].prompt_logits, expected_answer.prompt_logits, rtol=0, atol=1e-5)


def test_threads_folding_and_answering_take_turns(qwen2_vl, tokenizer):
    """Several threads asking while one folds: every answer equals the one given over some
    whole number of folded chunks (never a torn state), and the folds equal a lone run."""
    context = StreamContext(qwen2_vl, tokenizer, settings())
    alone = StreamContext(qwen2_vl, tokenizer, settings())
    over = {0: alone.answer(QUESTION, max_new_tokens=3).token_ids}
    for seed in range(4):
        alone.fold(chunk(seed))
        over[seed + 1] = alone.answer(QUESTION, max_new_tokens=3).token_ids

    answers, errors = [], []

    def ask():
        try:
            for _ in range(6):
                answers.append(context.answer(QUESTION, max_new_tokens=3))
        except BaseException as error:  # surfaced below
            errors.append(error)

    askers = [threading.Thread(target=ask) for _ in range(3)]
    for thread in askers:
        thread.start()
    for seed in range(4):
        context.fold(chunk(seed))
    for thread in askers:
        thread.join(timeout=120)
    assert not errors and len(answers) == 18
    assert all(a.token_ids == over[a.chunks_folded] for a in answers)
    assert_same(cache_state(context), cache_state(alone))
