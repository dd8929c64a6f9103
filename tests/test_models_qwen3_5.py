"""Qwen3.5 (issue 26): a hybrid model, three Gated DeltaNet layers for each full-attention layer.

The linear-attention layers carry a recurrent state (conv + delta-rule state) beside the pruned cache:
folds carry it unpruned, answers, observers and the search's re-runs fork it. Checked against the plain
transformers model over the whole sequence as its processor lays it out (timestamps before each frame,
positions from its own get_rope_index) and against its own hybrid cache, never against emloc's code.
"""

import numpy as np
import pytest
import torch
from transformers import DynamicCache, Qwen3_5Config, Qwen3_5ForConditionalGeneration

from emloc import EMLoCSettings, SettingsError, StreamContext
from emloc.adapters import Qwen3_5Adapter, adapter_for
from emloc.tiny import _ids, build_random, tiny_tokenizer

from .reference import random_frames
from .test_model_families import QWEN3_CHAT, plain_greedy, plain_inputs, plain_logits, video_text
from .test_oracle import with_attention

SYSTEM = "You are a helpful assistant."
QUESTION = "what colour was the triangle ?"
PREAMBLE, ASK = QWEN3_CHAT["preamble"], QWEN3_CHAT["question"]


def tiny_qwen3_5(tokenizer, *, layers: int = 4, seed: int = 1, init_std: float | None = 0.15,
                 moe: bool = False) -> Qwen3_5ForConditionalGeneration:
    """A random Qwen3.5 small enough for CPU: `layers` decoder layers, every fourth full attention
    (3 linear + 1 full for 4), hidden 64, head_dim 16 of which half is rotated (interleaved M-RoPE)."""
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_conv_kernel_dim=4,
                linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                max_position_embeddings=32768, **_ids(tokenizer),
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                 "mrope_interleaved": True, "partial_rotary_factor": 0.5})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)
    if moe:
        from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

        text.update(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
        config, cls = Qwen3_5MoeConfig(text_config=text, vision_config=vision, **_ids(tokenizer)), \
            Qwen3_5MoeForConditionalGeneration
    else:
        config, cls = Qwen3_5Config(text_config=text, vision_config=vision, **_ids(tokenizer)), \
            Qwen3_5ForConditionalGeneration
    return build_random(cls, config, seed, init_std=init_std, keep_init=("conv1d",))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(digits=True)  # Qwen's digit split: the frames' `<1.5 seconds>`


@pytest.fixture(scope="module")
def qwen3_5(tokenizer):
    return tiny_qwen3_5(tokenizer)


def full_inputs(context, model, tokenizer, chunks, question: bool = True) -> dict:
    """The plain model's inputs for preamble + every chunk as one video (+ the question)."""
    video = video_text(model, context.adapter, np.concatenate(chunks))
    text = PREAMBLE + video[0] + (ASK.format(q=QUESTION) if question else "")
    return plain_inputs(model, tokenizer, text, [video])


@torch.no_grad()
def plain_states(model, inputs) -> DynamicCache:
    """The plain model's own hybrid cache after the whole sequence (transformers' LinearAttention layers)."""
    cache = DynamicCache(config=model.config)
    model(**inputs, cache=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("implementation, chunks", [("sdpa", 1), ("sdpa", 3), ("eager", 3)])
def test_lossless_fold_matches_the_plain_model(qwen3_5, tokenizer, implementation, chunks):
    """Every ratio 1.0: the plain model's logits (<= 1e-4) and greedy tokens over preamble + the whole video
    (every chunk's timestamps, positions chained) + question; the recurrence carried across chunks exactly."""
    qwen3_5 = with_attention(qwen3_5, implementation)
    settings = EMLoCSettings(layer_group_size=1, ratios=(1.0,), chunk_frames=4, system_prompt=SYSTEM)
    context = StreamContext(qwen3_5, tokenizer, settings)
    assert isinstance(context.adapter, Qwen3_5Adapter) and context.adapter.num_layers == 1
    frames = [random_frames(4, seed=s) for s in range(chunks)]
    for chunk in frames:
        record = context.fold(chunk)
        assert record.kept == [record.chunk_tokens]
    answer = context.answer(QUESTION, max_new_tokens=6, return_logits=True)

    inputs = full_inputs(context, qwen3_5, tokenizer, frames)
    expected = plain_logits(qwen3_5, inputs)[-answer.prompt_logits.shape[0]:]
    error = float((answer.prompt_logits - expected).abs().max())
    assert error <= 1e-4, error
    greedy = plain_greedy(qwen3_5, inputs, 6, context.adapter.stop_ids())
    assert answer.token_ids == greedy and len(greedy) > 0


# --- pruned folds: the recurrent state is the state after the whole unpruned chunk ---------------------------
PRUNING = EMLoCSettings(layer_group_size=1, delta=10.0, ratios=(0.25, 1.0), chunk_frames=4, system_prompt=SYSTEM)


@pytest.fixture(scope="module")
def qwen3_5_deep(tokenizer):
    """8 decoder layers: two blocks of 3 linear + 1 full attention, so pruning one block moves the next."""
    return tiny_qwen3_5(tokenizer, layers=8, seed=2)


@torch.no_grad()
def replay(model, tokenizer, chunks, kept, chunk_tokens):
    """The plain model's decoder layers over the preamble then each chunk, on transformers' own hybrid
    cache (its LinearAttentionLayer keeps the recurrent states), with each full-attention layer's keys and
    values replaced after every chunk by what emloc kept (`kept[k][layer]`: (keys, values, log-mass or None)
    after chunk k; a merged key's log-mass is added to its attention logits). The sequence, its embeddings
    and positions (the library's get_rope_index) as the processor lays them out; `chunk_tokens`: where the
    chunks end in it. Returns the cache."""
    from transformers.cache_utils import DynamicLayer

    from .reference import additive_causal_mask

    lm, text = model.model.language_model, model.config.text_config
    adapter = Qwen3_5Adapter(model, tokenizer)
    video = video_text(model, adapter, np.concatenate(chunks))
    inputs = plain_inputs(model, tokenizer, PREAMBLE + video[0], [video])
    ids = inputs["input_ids"]
    positions = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"])[0]
    embeds = model.get_input_embeddings()(ids)
    visual = model.model.visual(inputs["pixel_values_videos"], grid_thw=inputs["video_grid_thw"]).pooler_output
    embeds[0, ids[0] == model.config.video_token_id] = visual
    ends = np.cumsum([len(tokenizer.encode(PREAMBLE, add_special_tokens=False))] + list(chunk_tokens)).tolist()
    assert ends[-1] == ids.shape[1]
    segments = [(embeds[:, a:b], a, b) for a, b in zip([0] + ends[:-1], ends)]
    cache, bias = DynamicCache(config=model.config), {}
    for k, (hidden, a, b) in enumerate(segments):
        rotary = lm.rotary_emb(hidden, positions[:, :, a:b])
        for d, layer in enumerate(lm.layers):
            mask = None  # linear attention takes none
            if text.layer_types[d] == "full_attention":
                prefix = cache.layers[d].get_seq_length()
                mask = additive_causal_mask(prefix, b - a, hidden.dtype).repeat(1, text.num_attention_heads, 1, 1)
                if bias.get(d) is not None:
                    groups = text.num_attention_heads // text.num_key_value_heads
                    mask[..., :prefix] += bias[d].repeat_interleave(groups, dim=1).unsqueeze(2)
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, cache=cache)
        if k >= 1:  # the chunk's keys as emloc kept them
            for i, d in enumerate(adapter.attention_layers):
                keys, values, bias[d] = kept[k - 1][i]
                fresh = DynamicLayer()
                fresh.update(keys.clone(), values.clone())
                cache.layers[d] = fresh
    return cache


def linear_states(context) -> dict[str, torch.Tensor]:
    """Every linear-attention layer's committed (conv, recurrent) states, by decoder index."""
    out = {}
    for layer in context.cache.layers:
        out.update(layer.recurrent.export())
    return out


def test_pruned_folds_carry_the_unpruned_recurrent_state(qwen3_5_deep, tokenizer):
    context = StreamContext(qwen3_5_deep, tokenizer, PRUNING)
    assert context.adapter.num_layers == 2 and context.adapter.blocks == [[0, 1, 2, 3], [4, 5, 6, 7]]
    chunks = [random_frames(4, seed=10 + k) for k in range(3)]
    kept, chunk_tokens = [], []
    for chunk in chunks:
        record = context.fold(chunk, questions=[QUESTION])
        chunk_tokens.append(record.chunk_tokens)
        assert all(k < record.chunk_tokens for k in record.kept), record.kept  # both blocks were pruned
        kept.append([(layer.keys.clone(), layer.values.clone(), layer.attention_bias())
                     for layer in context.cache.layers])
    reference = replay(qwen3_5_deep, tokenizer, chunks, kept, chunk_tokens)
    ours = linear_states(context)
    assert set(ours) == {f"{kind}.{d}" for d in (0, 1, 2, 4, 5, 6) for kind in ("conv", "recurrent")}
    for d in (0, 1, 2, 4, 5, 6):
        library = reference.layers[d]
        torch.testing.assert_close(ours[f"conv.{d}"], library.conv_states[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(ours[f"recurrent.{d}"], library.recurrent_states[0].float(), atol=1e-5, rtol=0)
    # the first block's linear layers never see an attention layer: the plain model over the whole unpruned
    # sequence gives their state directly
    whole = plain_states(qwen3_5_deep, full_inputs(context, qwen3_5_deep, tokenizer, chunks, question=False))
    for d in (0, 1, 2):
        torch.testing.assert_close(ours[f"recurrent.{d}"], whole.layers[d].recurrent_states[0].float(), atol=1e-5,
                                   rtol=0)
        torch.testing.assert_close(ours[f"conv.{d}"], whole.layers[d].conv_states[0], atol=1e-5, rtol=0)


def test_answers_fork_the_state(qwen3_5_deep, tokenizer):
    """Answering (with frames not yet in a chunk, and sampling) leaves every state bit-identical, so a
    second answer equals the first."""
    context = StreamContext(qwen3_5_deep, tokenizer, PRUNING)
    context.fold(random_frames(4, seed=20))
    before = linear_states(context)
    keys = [layer.keys.clone() for layer in context.cache.layers]
    first = context.answer(QUESTION, max_new_tokens=5, return_logits=True, partial_frames=random_frames(2, seed=7))
    second = context.answer(QUESTION, max_new_tokens=5, return_logits=True, partial_frames=random_frames(2, seed=7))
    assert first.token_ids == second.token_ids and torch.equal(first.prompt_logits, second.prompt_logits)
    context.answer("what digit is on screen now ?", max_new_tokens=4, temperature=1.0, seed=3)
    after = linear_states(context)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(torch.equal(a, layer.keys) for a, layer in zip(keys, context.cache.layers))
    assert all(layer.tail == 0 and layer.recurrent.at == 0 for layer in context.cache.layers)


@pytest.mark.slow
def test_snapshot_restore_includes_the_recurrent_states(qwen3_5_deep, tokenizer):
    straight = StreamContext(qwen3_5_deep, tokenizer, PRUNING)
    for k in range(2):
        straight.fold(random_frames(4, seed=30 + k))
    first = StreamContext(qwen3_5_deep, tokenizer, PRUNING)
    first.fold(random_frames(4, seed=30))
    tensors, meta = first.snapshot()
    assert {name for name in tensors if ".recurrent." in name or ".conv." in name}
    resumed = StreamContext(qwen3_5_deep, tokenizer, PRUNING)
    resumed.restore(tensors, meta)
    resumed.fold(random_frames(4, seed=31))
    a = straight.answer(QUESTION, max_new_tokens=4, return_logits=True)
    b = resumed.answer(QUESTION, max_new_tokens=4, return_logits=True)
    assert a.token_ids == b.token_ids and torch.equal(a.prompt_logits, b.prompt_logits)
    ours, theirs = linear_states(straight), linear_states(resumed)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_saved_state_round_trip_and_tampered_recurrent_states(qwen3_5_deep, tokenizer, tmp_path):
    import json

    from safetensors.torch import load_file

    from stream.state import StateError, load_state, save_state

    from .test_state import rewrite

    context = StreamContext(qwen3_5_deep, tokenizer, PRUNING)
    for k in range(2):
        context.fold(random_frames(4, seed=40 + k), timestamps=[2.0 * k + 0.5 * i for i in range(4)])
    save_state(tmp_path / "s", context, {"last_time": 3.5})
    resumed = StreamContext(qwen3_5_deep, tokenizer, PRUNING)
    assert load_state(tmp_path / "s", resumed) == {"last_time": 3.5}
    ours, theirs = linear_states(context), linear_states(resumed)
    assert set(ours) == set(theirs) and all(torch.equal(ours[n], theirs[n]) for n in ours)
    a, b = (c.answer(QUESTION, max_new_tokens=4, return_logits=True) for c in (context, resumed))
    assert a.token_ids == b.token_ids and torch.equal(a.prompt_logits, b.prompt_logits)

    cases = [
        (lambda t: t["layers.1.recurrent.5"].view(-1)[0].fill_(float("nan")), "recurrent.5 is not finite"),
        (lambda t: t["layers.0.conv.2"].view(-1)[3].fill_(float("inf")), "conv.2 is not finite"),
        (lambda t: t.update({"layers.0.recurrent.1": t["layers.0.recurrent.1"][..., :4].contiguous()}),
         r"recurrent.1 is \(1, 4, 8, 4\)"),
        (lambda t: t.update({"layers.0.conv.0": t["layers.0.conv.0"].double()}), "conv.0 is .* torch.float64"),
        (lambda t: t.pop("layers.1.conv.6"), "layer 1 holds linear-attention states"),
        (lambda t: t.update({"layers.0.recurrent.3": t["layers.0.recurrent.2"].clone()}), "layer 0 holds linear"),
    ]
    for k, (edit, match) in enumerate(cases):
        folder = tmp_path / f"t{k}"
        save_state(folder, context, {"last_time": 3.5})
        manifest = json.loads((folder / "manifest.json").read_text())
        tensors = load_file(str(folder / manifest["cache"]))
        edit(tensors)
        rewrite(folder, manifest, tensors)  # a forger who recomputes every checksum
        with pytest.raises(StateError, match=match):
            load_state(folder, StreamContext(qwen3_5_deep, tokenizer, PRUNING))
    # and one damaged byte of a recurrent state, checksums untouched
    folder = tmp_path / "damaged"
    save_state(folder, context, {"last_time": 3.5})
    manifest = json.loads((folder / "manifest.json").read_text())
    cache = folder / manifest["cache"]
    data = bytearray(cache.read_bytes())
    data[-7] ^= 0x40
    cache.write_bytes(bytes(data))
    with pytest.raises(StateError, match="truncated or modified"):
        load_state(folder, StreamContext(qwen3_5_deep, tokenizer, PRUNING))


# --- positions: time is in the timestamps ------------------------------------------------------------------
def test_the_temporal_position_policy_is_refused_with_its_reason(qwen3_5, tokenizer):
    with pytest.raises(SettingsError, match="temporal_range=64 is not supported for .*timestamp text.*recurrent state"):
        StreamContext(qwen3_5, tokenizer, EMLoCSettings(layer_group_size=1, chunk_frames=4, temporal_range=64))
    assert StreamContext(qwen3_5, tokenizer, EMLoCSettings(layer_group_size=1, chunk_frames=4,
                                                           temporal_range=0)).temporal.range is None


# --- the MoE variant, the registry and the CLI ------------------------------------------------------------------
def test_moe_variant_is_lossless(tokenizer):
    model = tiny_qwen3_5(tokenizer, moe=True, seed=3)
    settings = EMLoCSettings(layer_group_size=1, ratios=(1.0,), chunk_frames=4, system_prompt=SYSTEM)
    context = StreamContext(model, tokenizer, settings)
    assert type(context.adapter) is Qwen3_5Adapter and adapter_for(model, tokenizer).num_layers == 1
    frames = [random_frames(4, seed=s) for s in range(2)]
    for chunk in frames:
        context.fold(chunk)
    answer = context.answer(QUESTION, max_new_tokens=4, return_logits=True)
    inputs = full_inputs(context, model, tokenizer, frames)
    expected = plain_logits(model, inputs)[-answer.prompt_logits.shape[0]:]
    torch.testing.assert_close(answer.prompt_logits, expected, atol=1e-4, rtol=0)
    assert answer.token_ids == plain_greedy(model, inputs, 4, context.adapter.stop_ids())


@pytest.mark.slow
def test_cli_runs_a_saved_checkpoint(tokenizer, tmp_path):
    import subprocess

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from stream.sources import write_video
    from stream.suites.synthetic import make_video

    from .test_cli import cli_env, console_script

    model = tiny_qwen3_5(tokenizer, layers=8, seed=4)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    Qwen2VLImageProcessorPil(patch_size=14, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        tmp_path / "model")
    video = make_video(3_326_001, frames=16)
    path = write_video(tmp_path / "clip.mp4", video.frames, video.fps)
    config = tmp_path / "c.yaml"
    config.write_text("emloc:\n  layer_group_size: 1\n  chunk_frames: 8\n")
    result = subprocess.run([console_script(), "run", str(path), "--model", str(tmp_path / "model"), "--config",
                             str(config), "--ask", QUESTION, "--max-new-tokens", "3", "--state", str(tmp_path / "st")],
                            capture_output=True, text=True, env=cli_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("chunk ") >= 2 and "  A: " in result.stdout
    manifest = (tmp_path / "st" / "manifest.json").read_text()
    assert "Qwen3_5Adapter" in manifest


def test_a_lossless_task_pack_reproduces_the_plain_model(qwen3_5, tokenizer, tmp_path):
    """Examples folded into a pack (recurrent states included), saved and loaded back, then a video and a
    question: with every ratio 1.0 the plain model's logits over preamble + examples + video + question."""
    from emloc import TaskExample, TaskPack, many_shot

    rng = np.random.default_rng(5)
    examples = [TaskExample(rng.integers(0, 256, (2, 56, 56, 3), dtype=np.uint8), "what colour was the square ?",
                            answer) for answer in ("red", "blue", "green")]
    pack = TaskPack.build(qwen3_5, examples, many_shot(ratios=(1.0,), system_prompt=SYSTEM), tokenizer=tokenizer,
                          examples_per_chunk=2)
    assert any(".recurrent." in name for name in pack.tensors)
    pack.save(tmp_path / "p.pack")
    pack = TaskPack.load(tmp_path / "p.pack")
    settings = EMLoCSettings(layer_group_size=1, ratios=(1.0,), merge_dropped=False, chunk_frames=4,
                             system_prompt=SYSTEM)
    context = StreamContext(qwen3_5, tokenizer, settings, task=pack)
    video = random_frames(4, seed=3)
    context.fold(video)
    answer = context.answer(QUESTION, max_new_tokens=3, return_logits=True)

    text, videos = PREAMBLE, []
    for example in examples:
        videos.append(video_text(qwen3_5, context.adapter, example.frames))
        text += videos[-1][0] + QWEN3_CHAT["example"].format(q=example.question, a=example.answer)
    videos.append(video_text(qwen3_5, context.adapter, video))
    text += videos[-1][0] + ASK.format(q=QUESTION)
    expected = plain_logits(qwen3_5, plain_inputs(qwen3_5, tokenizer, text, videos))
    torch.testing.assert_close(answer.prompt_logits, expected[-answer.prompt_logits.shape[0]:], atol=1e-4, rtol=0)


def test_stacked_runs_fork_the_recurrence_per_copy(qwen3_5, tokenizer):
    """Observer copies stacked along one pass (`separate_runs`: a lead that stays, then copies that must not
    see each other) give each copy what it gives alone: the linear layers run each copy from the state
    after the lead, and only the lead advances the state."""
    from emloc.recurrent import separate_runs

    context = StreamContext(qwen3_5, tokenizer, EMLoCSettings(layer_group_size=1, ratios=(1.0,), chunk_frames=4))
    context.fold(random_frames(4, seed=60))
    adapter, cache, layer = context.adapter, context.cache, context.cache.layers[0]
    start = context.max_position + 1
    torch.manual_seed(0)
    lead, copy_a, copy_b = (torch.randn(1, n, 64) for n in (6, 5, 4))

    def alone(hidden, first):
        positions = adapter.text_positions(first, hidden.shape[1])
        mask = additive_mask(layer.get_seq_length(), [(0, hidden.shape[1])], 0)
        return adapter.run_layer(0, hidden, mask, adapter.rotary(hidden, positions), cache)

    def additive_mask(cached, spans, n_lead):
        rows = spans[-1][1]
        owner = torch.full((rows,), -1)
        for c, (a, b) in enumerate(spans):
            owner[a:b] = c
        owner[:n_lead] = -1
        r = torch.arange(rows)
        ok = (r.view(1, -1) <= r.view(-1, 1)) & ((owner.view(1, -1) == owner.view(-1, 1)) | (owner.view(1, -1) == -1))
        mask = torch.zeros(1, adapter.num_heads, rows, cached + rows)
        mask[..., cached:] = mask[..., cached:].masked_fill(~ok, float("-inf"))
        return mask

    with torch.no_grad():
        out_lead = alone(lead, start)
        after_lead = {k: v.clone() for k, v in linear_now(layer).items()}
        out_a = alone(copy_a, start + 6)
        layer.drop_tail(6)
        out_b = alone(copy_b, start + 6)
        layer.drop_tail(0)
        committed = linear_now(layer)

        stacked = torch.cat([lead, copy_a, copy_b], dim=1)
        positions = torch.cat([adapter.text_positions(start, 6), adapter.text_positions(start + 6, 5),
                               adapter.text_positions(start + 6, 4)], dim=1)
        spans = [(6, 11), (11, 15)]
        with separate_runs(6, spans):
            out = adapter.run_layer(0, stacked, additive_mask(layer.get_seq_length(), spans, 6),
                                    adapter.rotary(stacked, positions), cache)
        layer.drop_tail(6)  # the lead stays, as a chunk prefilled with its first observer
        for ours, theirs in zip((out[:, :6], out[:, 6:11], out[:, 11:]), (out_lead, out_a, out_b)):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        assert all(torch.equal(t, after_lead[k]) for k, t in linear_now(layer).items())
        layer.drop_tail(0)
        assert all(torch.equal(t, committed[k]) for k, t in linear_now(layer).items())


def linear_now(layer) -> dict[str, torch.Tensor]:
    """The layer's current (not committed) linear-attention states."""
    states = layer.recurrent
    return {**{f"conv.{d}": t for d, t in states.conv.items()},
            **{f"recurrent.{d}": t for d, t in states.recurrent.items()}}
