"""Qwen3-VL (dense and MoE) and LLaVA-OneVision behind the adapter (issue 26).

Every check is against an independent computation: the plain transformers model on the whole sequence
as the library's processor lays it out (Qwen3-VL: `<t seconds>` text before each frame, positions from
the library's own `get_rope_index`, DeepStack added by the library's text model; LLaVA-OneVision: pooled
frames and one newline closing the video), or transformers' decoder layers over a DynamicCache.
"""

from __future__ import annotations

import math
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from transformers import DynamicCache
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from emloc import EMLoCSettings, InputError, SettingsError, StreamContext, TaskExample, TaskPack, many_shot
from emloc.adapters import adapter_for
from emloc.tiny import tiny_llava_onevision, tiny_qwen3_vl, tiny_tokenizer
from stream.state import load_state, save_state

from .reference import additive_causal_mask, random_frames
from .test_cli import cli_env, console_script
from .test_oracle import with_attention

SYSTEM = "You are a helpful assistant."
QUESTION = "what colour was the triangle ?"
WHOLE = dict(layer_group_size=2, ratios=(1.0,), chunk_frames=4, system_prompt=SYSTEM)
PRUNED = dict(layer_group_size=2, delta=0.05, ratios=(0.1, 0.5, 1.0), chunk_frames=4, system_prompt=SYSTEM)


@dataclass(frozen=True)
class Family:
    """A family's tiny model and the library's layout of a chat around videos (the reference)."""

    build: Callable
    tokenizer: Callable
    preamble: str  # up to the first video
    question: str  # after the last video, "{q}"
    example: str  # after an example's video: its question and answer, up to the next video

    def text(self, tok, text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)


QWEN3_CHAT = dict(preamble=f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n",
                  question="{q}<|im_end|>\n<|im_start|>assistant\n",
                  example="{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n<|im_start|>user\n")
FAMILIES = {
    "qwen3_vl": Family(lambda tok, **kw: tiny_qwen3_vl(tok, **kw), lambda: tiny_tokenizer(digits=True), **QWEN3_CHAT),
    "qwen3_vl_moe": Family(lambda tok, **kw: tiny_qwen3_vl(tok, moe=True, **kw), lambda: tiny_tokenizer(digits=True),
                           **QWEN3_CHAT),
    "llava_onevision": Family(lambda tok, **kw: tiny_llava_onevision(tok, **kw),
                              lambda: tiny_tokenizer(extra_special=("<image>", "<video>")),
                              preamble=f"<|im_start|>system \n{SYSTEM}<|im_end|>\n<|im_start|>user ",
                              question="\n{q}<|im_end|>\n<|im_start|>assistant\n",
                              example="\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n<|im_start|>user "),
}
_BUILT: dict = {}


def family_model(name: str):
    """(family, tokenizer, model) built once per session: sharp random weights, so pruning moves outputs."""
    if name not in _BUILT:
        family = FAMILIES[name]
        tok = family.tokenizer()
        _BUILT[name] = family, tok, family.build(tok, init_std=0.15, seed=1)
    return _BUILT[name]


# --- the reference: the plain model on the library's sequence --------------------------------------
def video_text(model, adapter, frames: np.ndarray, fps: float = 2.0) -> tuple[str, torch.Tensor, list[int]]:
    """The processor's text for one video, its pixels and grid. Qwen3-VL: per temporal step
    `<t seconds><|vision_start|>pads<|vision_end|>` with the processor's own timestamps; LLaVA-OneVision:
    a <video> per pooled token of every frame, and one for the newline that closes the video."""
    pixels = adapter.preprocess(frames)
    t, h, w = pixels.grid_thw
    if model.config.model_type == "llava_onevision":
        return "<video>" * (t * h * w + 1), pixels.pixel_values, list(pixels.grid_thw)
    stamps = Qwen3VLProcessor._calculate_timestamps(None, list(range(len(frames))), fps, 2)
    per = (h // 2) * (w // 2)
    text = "".join(f"<{s:.1f} seconds><|vision_start|>" + "<|video_pad|>" * per + "<|vision_end|>" for s in stamps)
    return text, pixels.pixel_values, list(pixels.grid_thw)


def plain_inputs(model, tok, text: str, videos: list) -> dict:
    """Keyword arguments of one plain forward: the library builds positions (Qwen3-VL's get_rope_index
    from mm_token_type_ids) and DeepStack itself."""
    ids = tok.encode(text, add_special_tokens=False)
    if model.config.model_type == "llava_onevision":
        return dict(input_ids=torch.tensor([ids]), pixel_values_videos=torch.stack([v[1] for v in videos]))
    video = model.config.video_token_id
    return dict(input_ids=torch.tensor([ids]), pixel_values_videos=torch.cat([v[1] for v in videos]),
                video_grid_thw=torch.tensor([v[2] for v in videos]),
                mm_token_type_ids=torch.tensor([[2 if i == video else 0 for i in ids]]))


@torch.no_grad()
def plain_logits(model, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits[0].float()


@torch.no_grad()
def plain_greedy(model, inputs: dict, steps: int, stop: set[int]) -> list[int]:
    """Greedy decoding by re-running the plain model on the whole sequence every step (no cache)."""
    inputs, out = dict(inputs), []
    for _ in range(steps):
        token = int(plain_logits(model, inputs)[-1].argmax())
        if token in stop:
            break
        out.append(token)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[token]])], dim=1)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, 1, dtype=torch.long)],
                                                    dim=1)
    return out


# --- the lossless oracle ----------------------------------------------------------------------------
# MoE shares every line of the adapter with the dense model: its experts, through sdpa, are what it adds
@pytest.mark.parametrize("name, implementation, chunks", [
    (name, implementation, chunks) for name in sorted(FAMILIES)
    for implementation, chunks in [("sdpa", 1), ("sdpa", 3), ("eager", 3)]
    if name != "qwen3_vl_moe" or (implementation, chunks) == ("sdpa", 3)])
def test_lossless_fold_matches_the_plain_model(name, implementation, chunks):
    """Every ratio 1.0: folding chunks then answering gives the plain model's logits and greedy tokens over
    preamble + the whole video + question (for Qwen3-VL: every chunk's timestamps, positions chained
    across chunks, DeepStack at every chunk's visual tokens)."""
    family, tok, model = family_model(name)
    model = with_attention(model, implementation)
    context = StreamContext(model, tok, EMLoCSettings(**WHOLE))
    frames = [random_frames(4, seed=s) for s in range(chunks)]
    for chunk in frames:
        record = context.fold(chunk)
        assert record.kept == [record.chunk_tokens] * context.adapter.num_layers
    answer = context.answer(QUESTION, max_new_tokens=5, return_logits=True)

    video = video_text(model, context.adapter, np.concatenate(frames))
    inputs = plain_inputs(model, tok, family.preamble + video[0] + family.question.format(q=QUESTION), [video])
    expected = plain_logits(model, inputs)[-answer.prompt_logits.shape[0]:]
    torch.testing.assert_close(answer.prompt_logits, expected, atol=1e-4, rtol=0)
    greedy = plain_greedy(model, inputs, 5, context.adapter.stop_ids())
    assert answer.token_ids == greedy and greedy



@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_frames_not_yet_folded_are_answered_over_losslessly(name):
    """Frames that have not filled a chunk, prefilled for one answer: they continue the folded video
    (Qwen3-VL: their timestamps and positions follow the folded steps) and leave the cache as it was."""
    family, tok, model = family_model(name)
    context = StreamContext(model, tok, EMLoCSettings(**WHOLE))
    folded, partial = random_frames(4, seed=0), random_frames(2, seed=1)
    context.fold(folded)
    lengths = context.cache.lengths()
    answer = context.answer(QUESTION, max_new_tokens=1, partial_frames=partial, return_logits=True)
    assert context.cache.lengths() == lengths
    video = video_text(model, context.adapter, np.concatenate([folded, partial]))
    expected = plain_logits(model, plain_inputs(model, tok, family.preamble + video[0]
                                                + family.question.format(q=QUESTION), [video]))
    torch.testing.assert_close(answer.prompt_logits, expected[-answer.prompt_logits.shape[0]:], atol=1e-4, rtol=0)

@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_lossless_task_pack_matches_the_plain_model(name):
    """A pack of every ratio 1.0, then a video: the plain model over preamble + (picture, question, answer)*
    + video + question. For Qwen3-VL each picture is its own video (timestamps from 0, its own DeepStack)."""
    family, tok, model = family_model(name)
    examples = [TaskExample(random_frames(2, seed=10 + k), QUESTION, answer)
                for k, answer in enumerate(["red", "blue", "green", "red"])]
    pack = TaskPack.build(model, examples, many_shot(ratios=(1.0,), max_observers=1, system_prompt=SYSTEM),
                          tokenizer=tok, examples_per_chunk=2)
    context = StreamContext(model, tok, EMLoCSettings(**WHOLE, merge_dropped=False), task=pack)
    clip = random_frames(4, seed=3)
    context.fold(clip)
    answer = context.answer(QUESTION, max_new_tokens=3, return_logits=True)

    text, videos = family.preamble, []
    for example in examples:
        videos.append(video_text(model, context.adapter, example.frames))
        text += videos[-1][0] + family.example.format(q=example.question, a=example.answer)
    videos.append(video_text(model, context.adapter, clip))
    text += videos[-1][0] + family.question.format(q=QUESTION)
    if name == "llava_onevision":  # one batch of videos: the clip's frames and each picture's differ in count
        expected = _llava_many_videos(model, tok, text, videos)
    else:
        expected = plain_logits(model, plain_inputs(model, tok, text, videos))
    torch.testing.assert_close(answer.prompt_logits, expected[-answer.prompt_logits.shape[0]:], atol=1e-4, rtol=0)


@torch.no_grad()
def _llava_many_videos(model, tok, text: str, videos: list) -> torch.Tensor:
    """The library's forward over videos of different lengths: each video's features from the library's
    get_video_features (newline included), scattered over its <video> tokens in order."""
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    config = model.config
    features = torch.cat([model.model.get_video_features(
        v[1].unsqueeze(0), vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy).pooler_output[0] for v in videos])
    embeds = model.get_input_embeddings()(ids)
    embeds[ids == config.video_token_index] = features
    return model(inputs_embeds=embeds).logits[0].float()


# --- pruned folds against an independent prefill ---------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_pruned_fold_keeps_the_keys_of_its_tokens(name):
    """A pruned chunk's committed keys, in every layer and head, are those transformers' own decoder layers
    give its kept tokens when the chunk is prefilled after the cache as it stood: positions from the
    library's rule over the whole stream, and (Qwen3-VL) the chunk's DeepStack features added by hand
    after the first layers. Without them the keys of layer 1 on differ: the features reached the fold."""
    family, tok, model = family_model(name)
    # merged tokens add their log-mass to the attention logits, which the plain layers do not: keep them apart
    context = StreamContext(model, tok, EMLoCSettings(**PRUNED, merge_dropped=False))
    frames = [random_frames(4, seed=s) for s in range(2)]
    context.fold(frames[0])
    before = [(layer.keys.clone(), layer.values.clone()) for layer in context.cache.layers]
    seen = context.tokens_seen
    record = context.fold(frames[1])
    assert any(k < record.chunk_tokens for k in record.kept), "nothing was pruned: the test would check nothing"

    adapter = context.adapter
    video = video_text(model, adapter, np.concatenate(frames))
    inputs = plain_inputs(model, tok, family.preamble + video[0], [video])
    ids = inputs["input_ids"][0]
    chunk = slice(seen, seen + record.chunk_tokens)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids[chunk]).unsqueeze(0)
        last = adapter.preprocess(frames[1])
        if name == "llava_onevision":
            positions = torch.arange(len(ids))[chunk].view(1, -1)
            embeds = _llava_frames(model, last.pixel_values)
            deepstack, visual = [], None
        else:
            positions = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                   video_grid_thw=inputs["video_grid_thw"])[0][..., chunk]
            out = model.model.get_video_features(last.pixel_values, torch.tensor([list(last.grid_thw)]))
            visual = ids[chunk] == model.config.video_token_id
            embeds[0, visual] = torch.cat(out.pooler_output)
            deepstack = [torch.cat(f) for f in out.deepstack_features]
        for with_deepstack in ([True, False] if deepstack else [True]):
            keys = _prefill_keys(model, before, embeds, positions, deepstack if with_deepstack else [], visual)
            for i, layer in enumerate(context.cache.layers):
                kept = layer.committed_origins()[..., before[i][0].shape[2]:] - seen  # (1, kv_heads, kept)
                ours = layer.keys[:, :, before[i][0].shape[2]:]
                theirs = torch.gather(keys[i], 2, kept.unsqueeze(-1).expand(-1, -1, -1, keys[i].shape[-1]))
                same = torch.allclose(ours, theirs, atol=1e-5)
                assert same == (with_deepstack or i == 0), (name, i, with_deepstack)


@torch.no_grad()
def _llava_frames(model, pixel_values):
    config = model.config
    return model.model.get_video_features(pixel_values.unsqueeze(0), vision_feature_layer=config.vision_feature_layer,
                                          vision_feature_select_strategy=config.vision_feature_select_strategy
                                          ).pooler_output[:, :-1]


@torch.no_grad()
def _prefill_keys(model, before, embeds, positions, deepstack, visual) -> list[torch.Tensor]:
    """Keys (1, kv_heads, n, head_dim) of every layer for `embeds` (1, n, d) prefilled after per-layer cached
    keys/values, by transformers' layers on a DynamicCache; deepstack[l] added at `visual` after layer l."""
    lm = model.model.language_model
    cache = DynamicCache(config=model.config.text_config)
    for i, (k, v) in enumerate(before):
        cache.update(k.clone(), v.clone(), i)
    hidden, n = embeds, embeds.shape[1]
    rotary = lm.rotary_emb(hidden, positions)
    for i, layer in enumerate(lm.layers):
        prefix = cache.layers[i].get_seq_length()
        hidden = layer(hidden, attention_mask=additive_causal_mask(prefix, n, hidden.dtype), position_embeddings=rotary,
                       cache=cache)
        if i < len(deepstack):
            hidden = hidden.clone()
            hidden[0, visual] += deepstack[i]
    return [layer.keys[:, :, before[i][0].shape[2]:] for i, layer in enumerate(cache.layers)]




@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_observer_queries_give_the_models_own_attention(name):
    """What ranks a chunk's tokens: the adapter's queries (Qwen3-VL: q_norm before the rotation) and
    softmax scale give, over the cache, the attention probabilities eager attention itself computes."""
    _, tok, model = family_model(name)
    context = StreamContext(with_attention(model, "eager"), tok, EMLoCSettings(**WHOLE))
    context.fold(random_frames(4, seed=0))
    adapter, captured = context.adapter, {}

    def hook(index):
        def record(module, args, kwargs, output):
            queries = adapter.queries(index, kwargs["hidden_states"], kwargs["position_embeddings"])
            captured[index] = queries, context.cache.layers[index].all_keys(), output[1]
        return record

    handles = [adapter.attention_module(i).register_forward_hook(hook(i), with_kwargs=True)
               for i in range(adapter.num_layers)]
    try:
        context.answer(QUESTION, max_new_tokens=1)  # the question's prefill only
    finally:
        for handle in handles:
            handle.remove()
    for index, (queries, keys, probs) in captured.items():
        keys = keys.repeat_interleave(adapter.num_heads // adapter.num_kv_heads, dim=1)
        n, total = queries.shape[2], keys.shape[2]
        scores = queries @ keys.transpose(-1, -2) * adapter.attention_scale(index)
        future = torch.arange(total).view(1, -1) > torch.arange(n).view(-1, 1) + total - n
        ours = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        torch.testing.assert_close(ours, probs, atol=1e-5, rtol=0)

@pytest.mark.parametrize("name", ["qwen3_vl", "qwen3_vl_moe"])
def test_a_frames_timestamp_is_kept_with_the_frame(name):
    """Pruned to 30% (a JS bound every candidate passes): in every layer and head a frame's timestamp and
    markers are kept only if one of its visual tokens is, and with every frame that keeps a visual token
    but the last one the selection reached; some frames lose everything, time included."""
    _, tok, model = family_model(name)
    settings = EMLoCSettings(layer_group_size=2, delta=1.0, ratios=(0.3, 1.0), chunk_frames=8,
                             system_prompt=SYSTEM)
    context = StreamContext(model, tok, settings)
    seen = context.tokens_seen
    record = context.fold(random_frames(8, seed=0))
    pixels = context.adapter.preprocess(random_frames(8, seed=0))
    text, steps = context.adapter.frame_text(pixels, 0), context.adapter.token_steps(pixels, 0)
    assert record.kept == [math.ceil(0.3 * record.chunk_tokens)] * 4
    dropped_frames = 0
    for layer in context.cache.layers:
        for head in layer.committed_origins()[0] - seen:
            kept = torch.zeros(record.chunk_tokens, dtype=torch.bool)
            kept[head[head >= 0]] = True
            partial = 0
            for step in range(4):
                mine = steps == step
                vision, words = kept[mine & ~text], kept[mine & text]
                assert vision.any() or not words.any()  # no time without its frame
                partial += bool(vision.any() and not words.all())
                dropped_frames += not vision.any()
            assert partial <= 1  # only where the selection ended
    assert dropped_frames > 0

# --- long streams: timestamps, positions, the temporal-position policy -------------------------------------
def test_timestamps_of_any_length_keep_the_stream_lossless():
    """12 temporal steps of one token each: the timestamps go from <0.2 seconds> to <11.2 seconds>, so the
    last chunk's steps hold different numbers of tokens; still the plain model's logits, and each token's
    step is its frame's."""
    family, tok, model = family_model("qwen3_vl")
    context = StreamContext(model, tok, EMLoCSettings(**dict(WHOLE, chunk_frames=8)), min_frame_pixels=32 * 32)
    frames = [random_frames(8, 32, 32, seed=s) for s in range(3)]
    for chunk in frames:
        context.fold(chunk)
    pixels = context.adapter.preprocess(frames[2])
    pixels.first_step = 8
    steps = context.adapter.token_steps(pixels, 0)
    # <8.2 seconds> and <9.2 seconds> are 6 tokens, <10.2 seconds> and <11.2 seconds> 7; +2 markers, 1 pad
    assert torch.bincount(steps).tolist() == [9, 9, 10, 10]
    answer = context.answer(QUESTION, max_new_tokens=3, return_logits=True)
    video = video_text(model, context.adapter, np.concatenate(frames))
    assert "<11.2 seconds>" in video[0]
    expected = plain_logits(model, plain_inputs(model, tok, family.preamble + video[0]
                                                + family.question.format(q=QUESTION), [video]))
    torch.testing.assert_close(answer.prompt_logits, expected[-answer.prompt_logits.shape[0]:], atol=1e-4, rtol=0)



def test_a_chunk_a_million_seconds_in_is_laid_out_as_the_library_does():
    """Steps 999,999 and 1,000,000 of a stream (<999999.2 seconds>, <1000000.2 seconds> at 2 fps): the
    chunk's tokens, their steps and positions are the processor's text and the library's get_rope_index."""
    _, tok, model = family_model("qwen3_vl")
    adapter = adapter_for(model, tok, fps=2.0)
    pixels = adapter.preprocess(random_frames(4, seed=0))
    pixels.first_step = 999_999
    stamps = Qwen3VLProcessor._calculate_timestamps(None, list(range(2 * 999_999, 2 * 999_999 + 4)), 2.0, 2)
    per = (pixels.grid_thw[1] // 2) * (pixels.grid_thw[2] // 2)
    text = "".join(f"<{s:.1f} seconds><|vision_start|>" + "<|video_pad|>" * per + "<|vision_end|>" for s in stamps)
    assert "<999999.2 seconds>" in text and "<1000000.2 seconds>" in text
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    types = (ids == model.config.video_token_id).long() * 2
    library = model.model.get_rope_index(ids, types, video_grid_thw=torch.tensor([list(pixels.grid_thw)]))[0][:, 0]
    assert torch.equal(torch.cat(adapter._step_ids(pixels.first_step, pixels)), ids[0])
    assert torch.equal(adapter.video_positions(0, pixels.first_step, pixels), library)
    assert torch.bincount(adapter.token_steps(pixels, 0)).tolist() == [11 + 2 + per, 12 + 2 + per]

@pytest.mark.parametrize("name", ["qwen3_vl", "llava_onevision"])
def test_positions_past_the_model_are_refused_and_the_cache_kept(name):
    _, tok, model = family_model(name)
    context = StreamContext(model, tok, EMLoCSettings(**PRUNED))
    context.fold(random_frames(4, seed=0))
    keys = [layer.keys.clone() for layer in context.cache.layers]
    context.adapter.max_positions = context.max_position + 8
    with pytest.raises(InputError, match="past the model's max_position_embeddings"):
        context.fold(random_frames(4, seed=1))
    assert all(torch.equal(a, layer.keys) for a, layer in zip(keys, context.cache.layers))
    assert context.temporal.steps == (2 if name != "llava_onevision" else 4)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_temporal_position_policy_is_refused_with_its_reason(name):
    _, tok, model = family_model(name)
    reason = "timestamp text" if name.startswith("qwen3") else "one \\(1D\\) position axis"
    with pytest.raises(SettingsError, match=f"temporal_range=64 is not supported for .*{reason}"):
        StreamContext(model, tok, EMLoCSettings(**WHOLE, temporal_range=64))
    assert StreamContext(model, tok, EMLoCSettings(**WHOLE, temporal_range=0)).temporal.range is None


# --- state ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_saved_stream_resumes_as_if_never_stopped(name, tmp_path):
    _, tok, model = family_model(name)
    settings = EMLoCSettings(**PRUNED)
    frames = [random_frames(4, seed=s) for s in range(3)]
    straight = StreamContext(model, tok, settings)
    for chunk in frames:
        straight.fold(chunk)
    first = StreamContext(model, tok, settings)
    for chunk in frames[:2]:
        first.fold(chunk)
    save_state(tmp_path, first, {"last_time": None})
    resumed = StreamContext(model, tok, settings)
    load_state(tmp_path, resumed)
    resumed.fold(frames[2])
    a = straight.answer(QUESTION, max_new_tokens=3, return_logits=True)
    b = resumed.answer(QUESTION, max_new_tokens=3, return_logits=True)
    assert a.token_ids == b.token_ids and torch.equal(a.prompt_logits, b.prompt_logits)
    assert straight.cache.lengths() == resumed.cache.lengths()


# --- loading and the CLI ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_cli_loads_a_saved_checkpoint_and_answers(name, tmp_path, capsys):
    """`emloc-stream run --model DIR` picks the family's adapter and model class from config.json's
    model_type. Qwen3-VL through the installed console script; the others through the same `main` in
    this process (a subprocess costs ~10 s of imports on these machines)."""
    from stream.cli import main
    from stream.sources import write_video

    _, tok, model = family_model(name)
    folder = tmp_path / name
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    clip = write_video(tmp_path / "clip.mp4", random_frames(8, 64, 64, seed=4), 2.0)
    args = ["run", str(clip), "--model", str(folder), "--ask", QUESTION]
    if name == "qwen3_vl":
        result = subprocess.run([console_script(), *args], capture_output=True, text=True, timeout=300,
                                env=cli_env())
        assert result.returncode == 0, result.stderr[-2000:]
        out = result.stdout
    else:
        assert main(args) == 0
        out = capsys.readouterr().out
    assert f"Q: {QUESTION}" in out and "chunk " in out

def test_temporal_novelty_reads_steps_of_different_lengths():
    """The default scorer's temporal novelty on Qwen3-VL chunks whose steps differ in length: on an even
    grid the ragged path gives the grid path's scores; with a longer timestamp at a step's front, each
    frame patch is still compared with the same patch of the frames around it."""
    from emloc.scorers import ChunkView
    from emloc.scorers.temporal_novelty import TemporalNovelty

    def view(keys, steps):
        n = keys.shape[2]
        return ChunkView([keys], [keys], (torch.ones(1, n, 8), torch.zeros(1, n, 8)), steps, [])

    torch.manual_seed(0)
    scorer = TemporalNovelty(window=1, recent=1)
    even = view(torch.randn(1, 2, 5 * 4, 8), torch.arange(5).repeat_interleave(4))
    torch.testing.assert_close(scorer._ragged(even, torch.nn.functional.normalize(even.keys[0], dim=-1)),
                               scorer.raw(even, 0))
    # one more timestamp token in front of the last two steps: their patches keep their scores
    keys = even.keys[0].view(1, 2, 5, 4, 8)
    extra = torch.randn(1, 2, 2, 1, 8)
    ragged = torch.cat([keys[:, :, :3].reshape(1, 2, 12, 8),
                        torch.cat([extra, keys[:, :, 3:]], dim=3).reshape(1, 2, 10, 8)], dim=2)
    scores = scorer.raw(view(ragged, torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [3] * 5 + [4] * 5)), 0)
    patches = torch.cat([torch.arange(12), torch.arange(13, 17), torch.arange(18, 22)])
    torch.testing.assert_close(scores[..., patches], scorer.raw(even, 0))
