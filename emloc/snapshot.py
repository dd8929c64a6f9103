"""A stream's context as tensors and plain data, and back: what a saved state holds.

`snapshot_of` gives the committed cache and everything needed to go on folding exactly where the
stream stopped (counters, positions' layout, settings, model identity, standing questions, the
probe's carried answer). `restore_into` refuses a snapshot made by another model, from another
task pack or with other settings. Checking files on disk is `stream/state.py`'s and
`emloc/integrity.py`'s work; this module trusts the tensors it is given, not the carried answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .settings import EMLoCSettings, SettingsError

if TYPE_CHECKING:
    from .context import StreamContext

COUNTERS = ("chunks_folded", "steps", "sink_tokens", "video_start", "max_position", "tokens_seen",
            "temporal_halvings")


def snapshot_of(context: StreamContext) -> tuple[dict[str, torch.Tensor], dict]:
    """The context as tensors (the committed cache) and plain data (positions, settings,
    model identity): everything needed to go on folding exactly where it stopped."""
    temporal = context.temporal
    meta = dict(chunks_folded=context.chunks_folded, steps=temporal.steps, sink_tokens=context.sink_tokens,
                video_start=context.video_start, max_position=context.max_position,
                tokens_seen=context.tokens_seen, temporal_halvings=temporal.halvings)
    meta.update(video_layout=[list(entry) for entry in temporal.layout],
                time_span=list(context.time_span) if context.time_span else None,
                settings=context.settings.to_dict(), model=context.adapter.identity(),
                standing_questions=list(context.standing_questions), probe_answer=list(context.probe_answer),
                task=context.task.digest if context.task is not None else None)
    return context.cache.export(), meta


def restore_into(context: StreamContext, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Loads a snapshot; refuses one made by another model or with other settings."""
    mine = context.adapter.identity()
    if meta.get("model") != mine:
        theirs = meta.get("model") or {}
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise SettingsError(f"the saved state was made by another model (differs in {differ}); "
                            f"it cannot be resumed with this one")
    mine_task = context.task.digest if context.task is not None else None
    if meta.get("task") != mine_task:
        raise SettingsError(f"the saved state was made with task pack {meta.get('task')!r}, this stream "
                            f"starts from {mine_task!r}; resume with the same --task")
    settings = EMLoCSettings.from_dict(meta.get("settings", {}))
    if settings != context.settings:
        ours, saved = context.settings.to_dict(), settings.to_dict()
        differ = {k: (saved[k], ours[k]) for k in ours if ours[k] != saved[k]}
        raise SettingsError(f"the saved state was made with other settings (saved vs now: {differ})")
    device = context.adapter.device
    context.cache.restore({k: v.to(device) for k, v in tensors.items()})
    counters = {name: int(meta[name]) for name in COUNTERS}
    context.chunks_folded, context.sink_tokens = counters["chunks_folded"], counters["sink_tokens"]
    context.video_start, context.max_position = counters["video_start"], counters["max_position"]
    context.tokens_seen = counters["tokens_seen"]
    temporal = context.temporal
    temporal.steps, temporal.halvings = counters["steps"], counters["temporal_halvings"]
    temporal.layout = [tuple(int(x) for x in entry) for entry in meta["video_layout"]]
    context.time_span = tuple(meta["time_span"]) if meta.get("time_span") else None
    context.standing_questions = list(meta.get("standing_questions", []))
    context.probe_answer = checked_probe_answer(context, meta.get("probe_answer", []))


def checked_probe_answer(context: StreamContext, answer) -> tuple[int, ...]:
    """A saved carried answer (untrusted): token ids the model has, no longer than the setting allows
    (a state saved before answers were carried has none: the next chunk starts a new one)."""
    limit = context.settings.probe_answer_tokens
    vocab = context.adapter.model.get_input_embeddings().num_embeddings
    if (not isinstance(answer, list) or len(answer) > limit
            or not all(type(t) is int and 0 <= t < vocab for t in answer)):
        raise ValueError(f"probe_answer must be a list of at most {limit} token ids below {vocab}")
    return tuple(answer)
