"""The observers a fold runs after its chunk, and the probe's answer they carry from chunk to chunk.

The observers are the waiting and standing questions, or, when there are none, the probe prompt.
The probe is followed by the model's own answer to it, so the bound also keeps what the answer
needs: by default that answer is carried from the previous chunk and checked in the chunk's own
pass (`confirm_probe_answer`) instead of being decoded afresh every chunk (one pass per token).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .forward import generate
from .observer import Observer, ObserverPass, ObserverRun, observe
from .settings import EMLoCSettings

if TYPE_CHECKING:
    from .context import StreamContext


def observers_for(context: StreamContext, questions) -> list[Observer]:
    """The waiting questions, then the standing ones, at most `max_observers`; the probe if none."""
    found = ([Observer("question", q) for q in questions]
             + [Observer("standing", q) for q in context.standing_questions])
    for observer in found:
        context.adapter.question_ids(observer.text)  # a bad question fails before any work
    return found[: context.settings.max_observers] or [Observer("probe", context.settings.probe_prompt)]


def question_runs(context: StreamContext, observers: list[Observer], start: int, chunk_len: int) -> list[ObserverRun]:
    """The observers as runs after the chunk. The probe carries the model's answer to it: the one it
    gave over the previous chunk (checked and extended in this chunk's own pass), or, with
    `probe_answer_refresh: decode`, a fresh greedy answer over this chunk (one pass per token)."""
    adapter, settings = context.adapter, context.settings
    runs = []
    for observer in observers:
        ids = adapter.question_ids(observer.text)
        if observer.kind == "probe" and settings.probe_answer_tokens:
            if decodes_probe_answer(settings, context.probe_answer):
                observer = with_own_answer(context, observer, ids, start, chunk_len)
            else:
                observer = Observer(observer.kind, observer.text, context.probe_answer)
            ids = torch.cat([ids, torch.tensor(observer.answer_ids, dtype=ids.dtype)])
        embeds, positions = adapter.embed_text(ids), adapter.text_positions(start, len(ids))
        runs.append(ObserverRun(observer, embeds, positions, settings.observed_positions))
    return runs


def decodes_probe_answer(settings: EMLoCSettings, carried: tuple[int, ...]) -> bool:
    """Whether this fold decodes the probe's answer afresh: always with 'decode'; with 'carry_start' when
    there is none to carry (the stream's first chunk, or the answer's first token was a stop)."""
    refresh, tokens = settings.probe_answer_refresh, settings.probe_answer_tokens
    return tokens > 0 and (refresh == "decode" or (refresh == "carry_start" and not carried))


def with_own_answer(context: StreamContext, observer: Observer, ids: torch.Tensor, start: int,
                    chunk_len: int) -> Observer:
    """The probe followed by the model's greedy answer to it over the unpruned chunk (then forgotten)."""
    tokens, _ = generate(context.adapter, context.cache, ids, context.adapter.text_positions(start, len(ids)),
                         context.settings.probe_answer_tokens)
    for layer in context.cache.layers:
        layer.drop_tail(keep=chunk_len)
    return Observer(observer.kind, observer.text, tuple(tokens))


def confirm_probe_answer(context: StreamContext, passes: list[ObserverPass], log_probs: list[torch.Tensor]):
    """The carried answer, checked in the probe's own pass: the tokens the model's greedy choice still
    confirms after this chunk stay, and the bound covers the probe and those tokens only (the pass is
    cut after them: what follows is text the model would not say now), which is the observer a fresh
    decode would give, as long as the video has let it grow; the token the model would say next is
    added for the next chunk. The answer follows the video a token a chunk at no pass of its own.
    Returns the passes and the answer to carry (None: nothing carried)."""
    settings = context.settings
    if settings.probe_answer_refresh == "decode" or not settings.probe_answer_tokens:
        return passes, None
    carried = None
    for k, (run, rows) in enumerate(zip(passes, log_probs)):
        if run.observer.kind != "probe":
            continue
        answer = list(run.observer.answer_ids)
        asked = rows.shape[0] - len(answer)  # the probe's own tokens
        said = rows.argmax(dim=-1).tolist()
        kept = next((j for j, token in enumerate(answer) if said[asked - 1 + j] != token), len(answer))
        end = asked + kept  # rows the model's own text leads to; the last one says the next token
        m = min(settings.observed_positions, end)
        cos, sin = run.rotary
        passes[k] = ObserverPass(Observer(run.observer.kind, run.observer.text, tuple(answer[:kept])),
                                 [None if x is None else x[:, :end] for x in run.layer_inputs],
                                 (cos[..., :end, :], sin[..., :end, :]), run.positions[:, :end],
                                 rows[end - m:end], run.attention)
        following = said[end - 1]
        carried = answer[:kept] + ([following] if following not in context.adapter.stop_ids()
                                   and kept < settings.probe_answer_tokens else [])
    return passes, None if carried is None else tuple(carried)


def template_attention(context: StreamContext, start: int, before: list[int]) -> list[torch.Tensor]:
    """Attention of the assistant-turn template (no question) onto the chunk, per layer."""
    ids = context.adapter.template_ids()
    run: ObserverPass = observe(context.adapter, context.cache, Observer("template", ""), ids,
                                context.adapter.text_positions(start, len(ids)), 1)
    return [a[..., b:] for a, b in zip(run.attention, before)]
