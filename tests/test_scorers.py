"""Every importance scorer checked against an independent computation on a tiny model: the plain
transformers model (eager attention, hidden states) over the whole multimodal sequence, and
explicit loops. Nothing here uses emloc's observer, cache or scorer code to build the expected
values, so a wrong GQA head mapping, lost smoothing, a last-row-only attention, a missing
carry-over across folds or a floor in the kept count each fail a test."""

import copy
import math

import numpy as np
import pytest
import torch

from emloc import EMLoCSettings, SettingsError, StreamContext
from emloc.policies import JSBoundedSearch, ObserverTopK
from emloc.scorers import (
    ChunkView,
    Combined,
    CoverageFloor,
    KeyDiversity,
    Scorer,
    TemplateAttention,
    TemporalNovelty,
    ValueNorm,
    build_scorer,
)

from .reference import chat_preamble, published_rope_index, random_frames, video_rope_kwargs

SYSTEM = "You are a helpful assistant."
QUESTIONS = ["what colour was the triangle ?", "how many times did a star appear ?"]
KEEP_ALL = EMLoCSettings(layer_group_size=2, ratios=(1.0,), chunk_frames=8, system_prompt=SYSTEM, scorer="observer")


class Spy(JSBoundedSearch):
    """EMLoC's search that also records the importance each fold ranked by."""

    def __init__(self, settings):
        super().__init__(settings.layer_group_size, settings.delta, settings.ratios)
        object.__setattr__(self, "seen", [])

    def retain(self, state):
        self.seen.append([x.clone() for x in state.importance])
        return super().retain(state)


@pytest.fixture(scope="module")
def eager(qwen2_vl):
    model = copy.deepcopy(qwen2_vl)
    model.set_attn_implementation("eager")
    return model


@torch.no_grad()
def plain(model, tokenizer, frames, tail: str):
    """The plain model over preamble + video + `tail` text: per layer, attentions (H, S, S) and the
    un-rotated keys and values (S, Hkv, D) of every token, and where the video and tail start."""
    from emloc.adapters import adapter_for

    pixels = adapter_for(model, tokenizer).preprocess(frames)
    n_video = pixels.pixel_values.shape[0] // 4
    preamble = chat_preamble(tokenizer, SYSTEM)
    tail_ids = tokenizer.encode(tail, add_special_tokens=False)
    ids = preamble + [model.config.video_token_id] * n_video + tail_ids
    positions = published_rope_index(ids, video_grids=[pixels.grid_thw], **video_rope_kwargs(model))
    out = model(input_ids=torch.tensor([ids]), pixel_values_videos=pixels.pixel_values,
                video_grid_thw=torch.tensor([list(pixels.grid_thw)]), position_ids=positions.unsqueeze(1),
                output_attentions=True, output_hidden_states=True)
    layers = model.model.language_model.layers
    keys, values = [], []
    for layer, hidden in zip(layers, out.hidden_states):
        normed = layer.input_layernorm(hidden[0])
        kv = layer.self_attn.k_proj.out_features // layer.self_attn.head_dim
        keys.append(layer.self_attn.k_proj(normed).view(len(ids), kv, -1).double())
        values.append(layer.self_attn.v_proj(normed).view(len(ids), kv, -1).double())
    return dict(attentions=[a[0].double() for a in out.attentions], keys=keys, values=values,
                video=(len(preamble), len(preamble) + n_video), tail=len(tail_ids), steps=pixels.grid_thw[0])


def observer_share(attention, kv_heads, rows, cols):
    """(Hkv, n): the observer rows' attention onto the columns, summed over rows and over the
    query heads of each KV head (head h reads KV head h // (H / Hkv)), as a share summing to 1."""
    heads = attention.shape[0]
    out = torch.zeros(kv_heads, cols.stop - cols.start, dtype=torch.float64)
    for h in range(heads):
        out[h // (heads // kv_heads)] += attention[h, rows, cols].sum(dim=0)
    return out / out.sum(dim=-1, keepdim=True)


def smoothed(x, kernel=5):
    """Zero-padded moving average, by an explicit loop."""
    n, half = x.shape[-1], kernel // 2
    out = torch.zeros_like(x)
    for i in range(n):
        for j in range(i - half, i + half + 1):
            if 0 <= j < n:
                out[..., i] += x[..., j] / kernel
    return out


def relative(x):
    return x / x.mean(dim=-1, keepdim=True)


def question_text(q):
    return f"<|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n"


def test_observer_importance_matches_plain_attention(qwen2_vl, eager, tokenizer):
    """Two question observers: each one's attention share (all its rows, GQA-summed), averaged,
    smoothed with width 5, mean 1 over the chunk."""
    frames = random_frames(8, seed=3)
    policy = Spy(KEEP_ALL)
    context = StreamContext(qwen2_vl, tokenizer, KEEP_ALL, policy=policy)
    context.fold(frames, questions=QUESTIONS)
    kv = context.adapter.num_kv_heads
    shares = []
    for q in QUESTIONS:
        ref = plain(eager, tokenizer, frames, question_text(q))
        rows, cols = slice(-ref["tail"], None), slice(*ref["video"])
        shares.append([observer_share(a, kv, rows, cols) for a in ref["attentions"]])
    for layer, got in enumerate(policy.seen[0]):
        expected = relative(smoothed((shares[0][layer] + shares[1][layer]) / 2))
        torch.testing.assert_close(got[0].double(), expected, atol=2e-4, rtol=1e-3)


def test_importance_carries_over_across_folds(qwen2_vl, eager, tokenizer):
    """After the second fold, the first chunk's committed importance is decay * its own score +
    (1 - decay) * the new observer's attention share among the committed video tokens."""
    chunks = [random_frames(8, seed=5), random_frames(8, seed=6)]
    policy = Spy(KEEP_ALL)
    context = StreamContext(qwen2_vl, tokenizer, KEEP_ALL, policy=policy)
    for chunk in chunks:
        context.fold(chunk, questions=QUESTIONS[:1])
    ref = plain(eager, tokenizer, np.concatenate(chunks), question_text(QUESTIONS[0]))
    start, end = ref["video"]
    first_chunk = slice(start, start + (end - start) // 2)
    decay = KEEP_ALL.importance_decay
    for layer, attention in enumerate(ref["attentions"]):
        share = observer_share(attention, context.adapter.num_kv_heads, slice(-ref["tail"], None), first_chunk)
        n = first_chunk.stop - first_chunk.start
        expected = decay * policy.seen[0][layer][0].double() + (1 - decay) * share * n
        got = context.cache.layers[layer].committed_importance()[0, :, context.sink_tokens:][:, :n]
        torch.testing.assert_close(got.double(), expected, atol=2e-4, rtol=1e-3)


def test_importance_does_not_depend_on_who_watched(qwen2_vl, tokenizer):
    """A chunk seen by four questions and one seen by the probe commit scores on one scale
    (mean 1 per layer and head), so the budget cannot evict by the number of observers."""
    settings = EMLoCSettings(layer_group_size=2, ratios=(1.0,), chunk_frames=8, max_observers=4, scorer="observer")
    context = StreamContext(qwen2_vl, tokenizer, settings)
    context.fold(random_frames(8, seed=1), questions=QUESTIONS + ["which came first ?", "what digit is on screen ?"])
    context.fold(random_frames(8, seed=2))
    n = 24
    for layer in context.cache.layers:
        scores = layer.committed_importance()[0, :, context.sink_tokens:]
        first, second = scores[:, :n].mean(dim=-1), scores[:, n:].mean(dim=-1)
        torch.testing.assert_close(first, torch.ones_like(first), atol=1e-4, rtol=0)
        torch.testing.assert_close(second, torch.ones_like(second), atol=1e-4, rtol=0)


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def novelty_reference(keys, steps, window=2, recent=1):
    """TaR by loops: 1 - cos(key, mean unit key of the same patch in the steps around it)."""
    n, kv, _ = keys.shape
    patches = n // steps
    out = torch.zeros(kv, n, dtype=torch.float64)
    for h in range(kv):
        for t in range(steps):
            for p in range(patches):
                around = [unit(keys[s * patches + p, h]) for s in range(t - window, t + window + 1)
                          if 0 <= s < steps and s != t]
                mean = torch.stack(around).mean(dim=0)
                out[h, t * patches + p] = max(0.0, 1 - float(torch.dot(unit(keys[t * patches + p, h]), unit(mean))))
        if recent:
            out[h, (steps - recent) * patches:] = out[h].max()
    return out


def keydiff_reference(keys):
    units = unit(keys)  # (n, kv, D)
    anchor = units.mean(dim=0)
    return torch.stack([1 - (units[:, h] @ unit(anchor[h])) for h in range(keys.shape[1])])


SCORERS = {
    "tar": (TemporalNovelty(), lambda ref, cols, layer: novelty_reference(ref["keys"][layer][cols], ref["steps"])),
    "tar_window1_no_recent": (TemporalNovelty(window=1, recent=0),
                              lambda ref, cols, layer: novelty_reference(ref["keys"][layer][cols], ref["steps"], 1, 0)),
    "van": (ValueNorm(), lambda ref, cols, layer: ref["values"][layer][cols].norm(dim=-1).T),
    "keydiff": (KeyDiversity(), lambda ref, cols, layer: keydiff_reference(ref["keys"][layer][cols])),
}


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_query_agnostic_scorer_matches_independent_computation(name, qwen2_vl, eager, tokenizer):
    scorer, reference = SCORERS[name]
    frames = random_frames(16, seed=7)  # 8 temporal steps of 6 patches
    settings = EMLoCSettings(layer_group_size=2, ratios=(1.0,), chunk_frames=16, system_prompt=SYSTEM)
    policy = Spy(settings)
    context = StreamContext(qwen2_vl, tokenizer, settings, policy=policy, scorer=scorer)
    context.fold(frames)
    ref = plain(eager, tokenizer, frames, "")
    cols = slice(*ref["video"])
    for layer, got in enumerate(policy.seen[0]):
        expected = relative(reference(ref, cols, layer))
        torch.testing.assert_close(got[0].double(), expected, atol=2e-4, rtol=1e-3)


def test_template_scorer_is_the_template_attention(qwen2_vl, eager, tokenizer):
    frames = random_frames(8, seed=9)
    policy = Spy(KEEP_ALL)
    context = StreamContext(qwen2_vl, tokenizer, KEEP_ALL, policy=policy, scorer=TemplateAttention())
    context.fold(frames)
    ref = plain(eager, tokenizer, frames, "<|vision_end|><|im_end|>\n<|im_start|>assistant\n")
    for layer, got in enumerate(policy.seen[0]):
        share = observer_share(ref["attentions"][layer], context.adapter.num_kv_heads, slice(-ref["tail"], None),
                               slice(*ref["video"]))
        torch.testing.assert_close(got[0].double(), relative(smoothed(share)), atol=2e-4, rtol=1e-3)


class Fixed(Scorer):
    def __init__(self, values):
        self.values = values

    def raw(self, chunk, layer):
        return self.values


def view(steps, patches):
    n = steps * patches
    return ChunkView([torch.zeros(1, 1, n, 4)], [torch.zeros(1, 1, n, 4)], (torch.ones(1, n, 4), torch.zeros(1, n, 4)),
                     torch.arange(steps).repeat_interleave(patches), [[]])


def test_coverage_floor_ranks_each_stretch_first():
    values = torch.tensor([[[9.0, 8, 7, 6, 1, 2, 0.5, 0.1]]])  # 4 steps of 2 patches; 2 stretches of 2 steps
    scores = CoverageFloor(Fixed(values), buckets=2).score(view(4, 2), 0)[0, 0]
    top2 = set(scores.topk(2).indices.tolist())
    assert top2 == {0, 5}, "the best token of each stretch of time comes first"
    others = [1, 2, 3, 4, 6, 7]
    ratio = scores[others] / relative(values)[0, 0, others]
    torch.testing.assert_close(ratio, ratio[:1].expand(6)), "the other tokens keep their scores (up to scale)"
    assert torch.isclose(scores.mean(), torch.tensor(1.0))


def test_combination_is_the_mean_of_relative_scores():
    a, b = torch.tensor([[[1.0, 3.0, 0.0, 4.0]]]), torch.tensor([[[10.0, 10.0, 20.0, 0.0]]])
    got = Combined(((Fixed(a), 1.0), (Fixed(b), 1.0))).score(view(2, 2), 0)
    torch.testing.assert_close(got, relative(relative(a) + relative(b)))


def test_kept_count_is_the_ceiling(qwen2_vl, tokenizer):
    """0.3 of 24 tokens is 7.2: EMLoC and observer top-k keep 8 (a floor would keep 7)."""
    settings = EMLoCSettings(layer_group_size=2, delta=100.0, ratios=(0.3, 1.0), chunk_frames=8)
    for policy in (None, ObserverTopK(0.3)):
        context = StreamContext(qwen2_vl, tokenizer, settings, policy=policy)
        record = context.fold(random_frames(8))
        assert record.chunk_tokens == 24 and record.kept == [math.ceil(0.3 * 24)] * 4
        assert context.cache.lengths() == [context.sink_tokens + 8] * 4


def test_scorer_setting_is_checked_and_saved():
    settings = EMLoCSettings(scorer="tar+observer", coverage_buckets=4)
    assert EMLoCSettings.from_dict(settings.to_dict()) == settings
    assert isinstance(build_scorer("tar+observer", coverage_buckets=4), CoverageFloor)
    with pytest.raises(SettingsError, match="unknown scorer"):
        EMLoCSettings(scorer="tar+magic")
    with pytest.raises(SettingsError, match="twice"):
        EMLoCSettings(scorer="tar+tar")
    with pytest.raises(SettingsError, match="coverage_buckets"):
        EMLoCSettings(coverage_buckets=-1)


def test_merged_tokens_attend_like_their_duplicates(tokenizer):
    """Proportional attention: a kept token standing for m tokens (log-mass log m) must give the
    answer the plain model gives when that token's key and value are simply repeated m times.
    One KV head, so the repeated cache stays rectangular."""
    from emloc.tiny import tiny_qwen2_vl

    from .reference import chat_question, observer_log_probs

    model = tiny_qwen2_vl(tokenizer, heads=4, kv_heads=1, init_std=0.15, seed=2)
    settings = EMLoCSettings(layer_group_size=2, delta=100.0, ratios=(0.3, 1.0), chunk_frames=8,
                             merge_dropped=True, scorer="tar", probe_answer_tokens=0)
    context = StreamContext(model, tokenizer, settings)
    for k in range(2):
        context.fold(random_frames(8, seed=20 + k))
    answer = context.answer(QUESTIONS[0], max_new_tokens=1, return_logits=True)
    repeated = []
    for layer in context.cache.layers:
        mass = layer.log_mass[0, 0, :layer.length].exp().round().long()
        assert int(mass.sum()) == context.tokens_seen, "every folded token is stood for exactly once"
        assert int(mass.max()) > 1, "the test must see merged tokens"
        repeated.append((layer.keys.repeat_interleave(mass, dim=2), layer.values.repeat_interleave(mass, dim=2)))
    ids = chat_question(tokenizer, QUESTIONS[0])
    expected = observer_log_probs(model, repeated, ids, context.adapter.text_positions(context.max_position + 1,
                                                                                       len(ids)), len(ids))
    torch.testing.assert_close(torch.log_softmax(answer.prompt_logits.double(), -1), expected, atol=1e-4, rtol=0)
