"""Streams longer than the model's temporal range: the video's temporal positions are halved
(committed keys re-rotated) whenever the next chunk would reach past it. Checked against the
model's own rotary at the new positions and against a stream folded at the final spacing from
its first frame; a stream within the range is bit-identical to one with the policy off."""

import pytest
import torch
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

import emloc.fold
from emloc import EMLoCSettings, SettingsError, StreamContext
from emloc.adapters import adapter_for
from stream.state import load_state, save_state

from .reference import random_frames

# keep everything: layer 0's keys then depend only on the frames and their positions
WHOLE = dict(layer_group_size=2, ratios=(1.0,), chunk_frames=8)
PRUNED = dict(layer_group_size=2, delta=0.05, ratios=(0.1, 0.5, 1.0), chunk_frames=8)


def fold_all(context, chunks):
    for k, (height, width) in enumerate(chunks):
        context.fold(random_frames(8, height, width, seed=k))
    return context


def committed_keys(context):
    return [layer.keys.clone() for layer in context.cache.layers]


def test_shift_keys_equals_rotating_at_the_new_position(model, tokenizer):
    """A key rotated at (t, h, w) and shifted by d equals the same key rotated at (t + d, h, w) by the
    model's own rotary: only the temporal M-RoPE section turns, whatever the head and token."""
    adapter = adapter_for(model, tokenizer)
    torch.manual_seed(0)
    heads, n = adapter.num_kv_heads, 12
    keys = torch.randn(1, heads, n, adapter.head_dim)
    old = torch.stack([torch.randint(0, 300, (heads * n,)).float(), torch.randint(0, 9, (heads * n,)).float(),
                       torch.randint(0, 9, (heads * n,)).float()])
    shift = -torch.rand(heads * n) * old[0]  # compressing moves keys back, by fractions of a position
    new = old.clone()
    new[0] += shift

    def rotated(positions):
        cos, sin = adapter.rotary(keys, positions)  # (1, heads * n, dim), one position per (head, token)
        flat = keys.permute(0, 2, 1, 3).reshape(1, 1, heads * n, -1)
        return apply_rotary_pos_emb(flat, flat, cos, sin)[0].reshape(1, n, heads, -1).permute(0, 2, 1, 3)

    moved = adapter.shift_keys(rotated(old), shift.view(n, heads).T.unsqueeze(0))
    assert torch.allclose(moved, rotated(new), atol=2e-5)
    assert not torch.allclose(rotated(old), rotated(new), atol=1e-2)


@pytest.mark.parametrize("resize", [False, True])
def test_compressed_stream_equals_one_folded_at_that_spacing(model, tokenizer, resize):
    """Past the range, layer 0's committed keys (all chunks, moved) equal those of a stream folded at
    the final spacing from the start, the sinks' keys are untouched, and the next text goes where
    that stream's would. With a frame size change mid-stream, each size's tokens move by their own step."""
    chunks = [(56, 84), (56, 84), (112, 84) if resize else (56, 84), (56, 84)]
    plain = StreamContext(model, tokenizer, EMLoCSettings(**WHOLE, temporal_range=0))
    offsets = plain.adapter.temporal_offsets(torch.arange(16))  # 4 chunks of 4 temporal steps
    # the second chunk reaches past the range (one halving), the fourth past it again (two)
    limit = int(offsets[11]) // 2 + 1
    assert int(offsets[15]) / 4 < limit <= int(offsets[15]) / 2
    compressed = fold_all(StreamContext(model, tokenizer, EMLoCSettings(**WHOLE, temporal_range=limit)), chunks)
    assert compressed.temporal.halvings == 2
    assert [r.temporal_scale for r in compressed.records] == [1, 0.5, 0.5, 0.25]
    assert compressed.records[-1].summary().endswith("temporal positions x0.25")
    assert len(compressed.temporal.layout) == (3 if resize else 1)  # tokens per step change with the frame size
    at_quarter = StreamContext(model, tokenizer, EMLoCSettings(**WHOLE, temporal_range=0))
    at_quarter.temporal.halvings = 2
    fold_all(at_quarter, chunks)
    ours, theirs = compressed.cache.layers[0], at_quarter.cache.layers[0]
    assert torch.equal(ours.committed_origins(), theirs.committed_origins())
    assert torch.allclose(ours.keys, theirs.keys, atol=1e-5)
    sinks = compressed.sink_tokens
    assert torch.equal(ours.keys[:, :, :sinks], fold_all(plain, chunks[:1]).cache.layers[0].keys[:, :, :sinks])
    assert compressed.max_position == at_quarter.max_position
    assert compressed.records[-1].positions == at_quarter.records[-1].positions
    assert compressed.records[-1].max_position < plain.records[0].max_position + 16


def test_a_first_chunk_longer_than_the_range_starts_compressed(qwen2_vl, tokenizer):
    """Nothing committed but the sinks yet: they stay bit-identical, and the chunk is folded at the
    spacing that fits it (8 frames: temporal steps 0-3 into a range of 2, halved once)."""
    first = fold_all(StreamContext(qwen2_vl, tokenizer, EMLoCSettings(**WHOLE, temporal_range=2)), [(56, 84)])
    at_half = StreamContext(qwen2_vl, tokenizer, EMLoCSettings(**WHOLE, temporal_range=0))
    at_half.temporal.halvings = 1
    fold_all(at_half, [(56, 84)])
    assert first.temporal.halvings == 1 and first.max_position == at_half.max_position
    assert all(torch.equal(a, b) for a, b in zip(committed_keys(first), committed_keys(at_half)))


def test_the_boundary_is_the_range(model, tokenizer):
    """A stream whose last temporal offset is range - 1 is bit-identical to one with the policy off; one
    position more and it halves."""
    plain = fold_all(StreamContext(model, tokenizer, EMLoCSettings(**PRUNED, temporal_range=0)), [(56, 84)] * 3)
    last = int(plain.adapter.temporal_offsets(torch.tensor([11])))
    within = fold_all(StreamContext(model, tokenizer, EMLoCSettings(**PRUNED, temporal_range=last + 1)),
                      [(56, 84)] * 3)
    assert within.temporal.halvings == 0
    assert all(torch.equal(a, b) for a, b in zip(committed_keys(within), committed_keys(plain)))
    assert [r.positions for r in within.records] == [r.positions for r in plain.records]
    assert within.answer("what colour was the triangle ?").token_ids == plain.answer(
        "what colour was the triangle ?").token_ids
    past = fold_all(StreamContext(model, tokenizer, EMLoCSettings(**PRUNED, temporal_range=last)), [(56, 84)] * 3)
    assert past.temporal.halvings == 1
    assert not torch.equal(committed_keys(past)[0], committed_keys(plain)[0])


def test_the_checkpoint_declares_the_range_and_settings_override_it(qwen2_vl, tokenizer):
    identity = adapter_for(qwen2_vl, tokenizer).identity()
    qwen2_vl.config.emloc_temporal_range = 5
    try:
        assert adapter_for(qwen2_vl, tokenizer).identity() == identity  # a reading policy, not the weights
        assert StreamContext(qwen2_vl, tokenizer, EMLoCSettings(**WHOLE)).temporal.range == 5
        assert StreamContext(qwen2_vl, tokenizer, EMLoCSettings(**WHOLE, temporal_range=0)).temporal.range is None
        assert StreamContext(qwen2_vl, tokenizer, EMLoCSettings(**WHOLE, temporal_range=9)).temporal.range == 9
        context = fold_all(StreamContext(qwen2_vl, tokenizer, EMLoCSettings(**WHOLE)), [(56, 84)] * 2)
        assert context.temporal.halvings == 1  # 8 temporal steps, range 5: the second chunk halves
    finally:
        del qwen2_vl.config.emloc_temporal_range
    assert StreamContext(qwen2_vl, tokenizer, EMLoCSettings(**WHOLE)).temporal.range is None
    for bad in (1, -3, True, 2.5, "128"):
        with pytest.raises(SettingsError, match="temporal_range"):
            EMLoCSettings(temporal_range=bad)


def test_a_failed_fold_puts_the_positions_back(qwen2_vl, tokenizer, monkeypatch):
    context = fold_all(StreamContext(qwen2_vl, tokenizer, EMLoCSettings(**PRUNED, temporal_range=6)), [(56, 84)])
    before = (committed_keys(context), context.temporal.halvings, context.max_position)

    def broken(*args):
        raise RuntimeError("search failed")

    monkeypatch.setattr(emloc.fold, "commit", broken)  # after the keys moved and the chunk ran
    with pytest.raises(RuntimeError, match="search failed"):
        context.fold(random_frames(8, seed=5))
    assert (context.temporal.halvings, context.max_position) == before[1:]
    assert all(torch.equal(a, b) for a, b in zip(committed_keys(context), before[0]))
    monkeypatch.undo()
    context.fold(random_frames(8, seed=5))
    assert context.temporal.halvings == 1


@pytest.mark.slow
def test_a_saved_compressed_stream_resumes_as_if_never_stopped(qwen2_vl, tokenizer, tmp_path):
    settings = EMLoCSettings(**PRUNED, temporal_range=6)
    chunks = [(56, 84), (112, 84), (56, 84), (56, 84)]
    straight = fold_all(StreamContext(qwen2_vl, tokenizer, settings), chunks)
    first = fold_all(StreamContext(qwen2_vl, tokenizer, settings), chunks[:2])
    assert first.temporal.halvings == 1
    save_state(tmp_path, first, {"last_time": None})
    resumed = StreamContext(qwen2_vl, tokenizer, settings)
    load_state(tmp_path, resumed)
    assert (resumed.temporal.halvings, resumed.max_position) == (1, first.max_position)
    for k, (height, width) in enumerate(chunks[2:], start=2):
        resumed.fold(random_frames(8, height, width, seed=k))
    assert resumed.temporal.halvings == straight.temporal.halvings == 2
    assert all(torch.equal(a, b) for a, b in zip(committed_keys(resumed), committed_keys(straight)))
    question = "what colour was the triangle ?"
    assert resumed.answer(question).token_ids == straight.answer(question).token_ids


def test_a_saved_state_whose_halvings_contradict_its_steps_is_refused(qwen2_vl, tokenizer, tmp_path):
    """A forger who edits temporal_halvings in both places and recomputes every checksum is still
    caught: the number of halvings follows from the steps folded and the range."""
    import json

    from safetensors.torch import load_file, save_file

    from emloc.integrity import seal
    from stream.state import StateError

    settings = EMLoCSettings(**PRUNED, temporal_range=6)
    save_state(tmp_path, fold_all(StreamContext(qwen2_vl, tokenizer, settings), [(56, 84)] * 2), {"last_time": None})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["context"]["temporal_halvings"] == 1
    manifest["context"]["temporal_halvings"] = 0
    cache = tmp_path / manifest["cache"]
    tensors = load_file(str(cache))
    tensors["state.counters"][-1] = 0
    save_file(tensors, str(cache))
    (tmp_path / "manifest.json").write_text(json.dumps(seal(manifest, tensors)))
    with pytest.raises(StateError, match="temporal_halvings = 0, but a stream of 8 temporal steps"):
        load_state(tmp_path, StreamContext(qwen2_vl, tokenizer, settings))
