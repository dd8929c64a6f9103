"""Impossible settings and unusable inputs fail at once with a message naming the problem,
and a failed fold leaves the cache exactly as it was."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from emloc import EMLoCSettings, InputError, RetentionPolicy, SettingsError, StreamContext, UnsupportedModelError
from emloc.settings import preset

from .reference import random_frames


@pytest.mark.parametrize("kwargs, message", [
    (dict(ratios=()), "ratios must not be empty"),
    (dict(ratios=(0.1, 1.5)), "(0, 1]"),
    (dict(ratios=(0.0, 1.0)), "(0, 1]"),
    (dict(ratios=(0.5, 0.1)), "ascending"),
    (dict(delta=-0.01), "delta"),
    (dict(delta=float("nan")), "delta"),
    (dict(layer_group_size=0), "layer_group_size"),
    (dict(chunk_frames=0), "chunk_frames"),
    (dict(smoothing_kernel=4), "odd"),
    (dict(token_budget=0), "token_budget"),
    (dict(observed_positions=0), "observed_positions"),
])
def test_impossible_settings_are_refused(kwargs, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace("]", r"\]")):
        EMLoCSettings(**kwargs)


def test_settings_that_do_not_fit_the_model(qwen2_vl, tokenizer):
    with pytest.raises(SettingsError, match=r"does not divide the model's 4 decoder layers.*\[1, 2, 4\]"):
        StreamContext(qwen2_vl, tokenizer, EMLoCSettings(layer_group_size=3))
    with pytest.raises(SettingsError, match="multiple of the model's temporal patch size 2"):
        StreamContext(qwen2_vl, tokenizer, EMLoCSettings(layer_group_size=2, chunk_frames=7))
    with pytest.raises(SettingsError, match="preamble alone holds"):
        StreamContext(qwen2_vl, tokenizer, EMLoCSettings(layer_group_size=2, token_budget=5))


def test_unknown_keys_and_presets():
    with pytest.raises(SettingsError, match=r"unknown EMLoC setting\(s\) \['group_size'\]"):
        EMLoCSettings.from_dict({"group_size": 14})
    with pytest.raises(SettingsError, match="unknown preset"):
        preset("videomme")
    online = preset("videomme_online")
    assert (online.layer_group_size, online.delta, online.ratios, online.chunk_frames) == (
        14, 0.04, (0.02, 0.1, 0.5, 1.0), 64)
    code = preset("reference_code")
    assert (code.layer_group_size, code.delta, code.ratios) == (7, 0.05, (0.02, 0.05, 0.1, 1.0))
    assert preset("layer_wise").layer_group_size == 1
    assert EMLoCSettings.from_dict(online.to_dict()) == online


@pytest.mark.parametrize("frames, message", [
    (np.zeros((4, 3, 56, 56), np.uint8), r"shape \(T, H, W, 3\)"),
    (np.zeros((56, 56, 3), np.uint8), r"shape \(T, H, W, 3\)"),
    (np.zeros((0, 56, 56, 3), np.uint8), "empty chunk"),
    (np.zeros((4, 56, 56, 3), np.float32), "uint8"),
    ([[1, 2, 3]], "torch tensor or numpy array"),
])
def test_unusable_frames_are_refused(qwen2_vl, tokenizer, frames, message):
    context = StreamContext(qwen2_vl, tokenizer, EMLoCSettings(layer_group_size=2, chunk_frames=4))
    with pytest.raises(InputError, match=message):
        context.fold(frames)
    assert context.chunks_folded == 0 and context.cache.lengths() == [context.sink_tokens] * 4


def test_bad_questions_and_arguments(qwen2_vl, tokenizer):
    context = StreamContext(qwen2_vl, tokenizer, EMLoCSettings(layer_group_size=2, chunk_frames=4))
    with pytest.raises(InputError, match="non-empty string"):
        context.answer("   ")
    with pytest.raises(InputError, match="non-empty string"):
        context.fold(random_frames(4), questions=[""])
    with pytest.raises(InputError, match="max_new_tokens"):
        context.answer("what ?", max_new_tokens=0)
    with pytest.raises(InputError, match="3 timestamps for 4 frames"):
        context.fold(random_frames(4), timestamps=[0.0, 0.5, 1.0])


def test_unsupported_model_family_is_named(tokenizer):
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(UnsupportedModelError, match=r"model family 'llama' \(LlamaForCausalLM\) is not supported"):
        StreamContext(llama, tokenizer)


class FailingPolicy(RetentionPolicy):
    def retain(self, state):
        state.apply({0: torch.zeros(1, state.cache.layers[0].origins.shape[1], 1, dtype=torch.long)})
        raise RuntimeError("policy broke mid-search")


def test_failed_fold_leaves_cache_unchanged(qwen2_vl, tokenizer):
    settings = EMLoCSettings(layer_group_size=2, chunk_frames=4)
    context = StreamContext(qwen2_vl, tokenizer, settings)
    context.fold(random_frames(4, seed=0))
    before = [(layer.length, layer.keys.clone()) for layer in context.cache.layers]
    context.policy = FailingPolicy()
    with pytest.raises(RuntimeError, match="policy broke"):
        context.fold(random_frames(4, seed=1))
    after = [(layer.length, layer.keys) for layer in context.cache.layers]
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(before, after))
    assert all(layer.tail == 0 for layer in context.cache.layers) and context.chunks_folded == 1


def test_checkpoint_round_trip_loads_offline(tmp_path, tokenizer):
    """A saved checkpoint (model, tokenizer, image processor) loads back behind its adapter and
    answers exactly as the model it was saved from; nothing is fetched from a hub."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from emloc import load_adapter
    from emloc.tiny import tiny_qwen2_5_vl

    model = tiny_qwen2_5_vl(tokenizer, init_std=0.15, seed=3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    Qwen2VLImageProcessorPil(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(tmp_path)

    adapter = load_adapter(str(tmp_path), device="cpu")
    assert list(adapter.image_processor.image_mean) == [0.5, 0.5, 0.5] and not adapter.uses_flash_attention
    settings = EMLoCSettings(layer_group_size=2, chunk_frames=4)
    loaded, original = StreamContext(adapter, settings=settings), StreamContext(model, tokenizer, settings)
    original.adapter.image_processor = adapter.image_processor
    for context in (loaded, original):
        context.fold(random_frames(4, seed=9))
    question = "what colour was the triangle ?"
    assert loaded.answer(question).token_ids == original.answer(question).token_ids
    with pytest.raises(UnsupportedModelError, match="'llama' is not supported"):
        LlamaConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(
            tmp_path / "llama")
        load_adapter(str(tmp_path / "llama"))
