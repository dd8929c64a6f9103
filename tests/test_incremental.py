"""Folding is incremental: pruned tokens never come back, lengths add up, positions are
never renumbered, and the search restarts each group from its recorded hidden state."""

from emloc import EMLoCSettings, StreamContext

from .reference import random_frames

SETTINGS = EMLoCSettings(layer_group_size=2, delta=0.05, ratios=(0.1, 0.3, 0.5, 1.0), chunk_frames=8)


def test_pruned_tokens_never_reappear_and_lengths_add_up(model, tokenizer):
    context = StreamContext(model, tokenizer, SETTINGS)
    layers = context.cache.layers
    totals = [context.sink_tokens] * len(layers)
    present = [[set(head.tolist()) for head in layer.committed_origins()[0]] for layer in layers]
    pruned_somewhere = False
    for k in range(5):
        first_origin = context.tokens_seen
        record = context.fold(random_frames(8, seed=k))
        for i, layer in enumerate(layers):
            totals[i] += record.kept[i]
            assert layer.length == totals[i] == record.tokens_after[i]
            origins = layer.committed_origins()[0]
            for h in range(origins.shape[0]):
                now = set(origins[h].tolist())
                older = {o for o in now if o < first_origin}
                assert older == present[i][h], "an earlier token was lost or came back"
                new = now - older
                assert len(new) == record.kept[i]
                assert all(first_origin <= o < first_origin + record.chunk_tokens for o in new)
                present[i][h] = now
            pruned_somewhere |= record.kept[i] < record.chunk_tokens
    assert pruned_somewhere


def test_positions_continue_and_are_not_renumbered(model, tokenizer):
    pruned = StreamContext(model, tokenizer, SETTINGS)
    whole = StreamContext(model, tokenizer, EMLoCSettings(layer_group_size=2, ratios=(1.0,), chunk_frames=8))
    last = None
    for k in range(4):
        frames = random_frames(8, seed=k)
        a, b = pruned.fold(frames), whole.fold(frames)
        assert (a.positions, a.max_position) == (b.positions, b.max_position)
        if last is not None:
            assert a.positions[0] > last, "a later chunk must start after the highest temporal position seen"
        last = a.positions[1]
        assert sum(a.kept) < sum(b.kept)


def test_search_restarts_from_recorded_hidden_state(model, tokenizer):
    """Layer l runs once for the prefill and the first observer, once for the other observers
    together, and once for every group at or below it (all its candidates in one pass): the layers
    under a group are never recomputed for it, and no candidate costs a pass of its own."""
    context = StreamContext(model, tokenizer, SETTINGS)
    context.standing_questions = ["is anyone at the door ?"]
    calls = [0] * context.adapter.num_layers
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(model.model.language_model.layers)]
    try:
        record = context.fold(random_frames(8, seed=3), questions=["what colour was the square ?"])
    finally:
        for hook in hooks:
            hook.remove()
    observers = len(record.observers)
    assert observers == 2
    expected = [1 + 1 + sum(1 for g in record.groups if g.first <= i and g.tried)
                for i in range(context.adapter.num_layers)]
    assert calls == expected
    assert record.evaluations == sum(len(g.tried) for g in record.groups) > 0
