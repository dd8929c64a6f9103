"""The compressed context of one stream: fold chunks of frames in, ask questions any time.

    context = StreamContext(model, tokenizer, videomme_online())
    record = context.fold(frames)            # (T, H, W, 3) uint8
    answer = context.answer("What colour was the triangle?")

One chunk, from frames to committed cache (method.md, section 2): encode the frames,
prefill them into every layer's tail, run the observers after them, let the
retention policy choose what each layer keeps, commit, and enforce the budget.

Where each part lives:
    emloc/fold.py            one segment from embeddings to committed cache (all or nothing)
    emloc/fold_observers.py  the observers run after a chunk, and the probe's carried answer
    emloc/example_fold.py    labelled examples folded before the video (task packs)
    emloc/temporal.py        temporal steps, and their compression past the model's range
    emloc/snapshot.py        the context as tensors and plain data, and back (saved states)
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections import deque

import torch

from .adapters import ModelAdapter, adapter_for
from .cache import PrunedCache
from .errors import InputError
from .example_fold import fold_examples
from .fold import fold_segment
from .fold_observers import observers_for, question_runs
from .forward import generate, run_layers
from .policies import JSBoundedSearch, RetentionPolicy
from .records import Answer, FoldRecord
from .scorers import Scorer, scorer_from_settings
from .settings import MAX_NEW_TOKENS, EMLoCSettings, SettingsError
from .snapshot import restore_into, snapshot_of
from .temporal import TemporalPositions


def _one_at_a_time(method):
    """Runs `method` holding the context's lock: calls from several threads take turns."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


class StreamContext:
    """One stream's model context under EMLoC pruning.

    Thread-safe by taking turns: `fold`, `answer`, `snapshot` and `restore` hold one lock
    per context, so a question asked from another thread during a fold waits for the fold
    to finish (and is answered over it) instead of changing the cache under it.

    model: a supported *ForConditionalGeneration model, or a ready `ModelAdapter`.
    policy: how chunks are pruned; EMLoC's JS-bounded search by default.
    scorer: how a chunk's tokens are ranked; by default what `settings.scorer` names.
    task: a `TaskPack` the stream starts from (its examples, compressed) instead of an empty
        preamble; the video folds after it and the budget never evicts it.
    adapter_options: passed to the family adapter (fps, frame pixel limits).
    """

    KEEP_RECORDS = 1024

    def __init__(self, model, tokenizer=None, settings: EMLoCSettings | None = None, *,
                 policy: RetentionPolicy | None = None, scorer: Scorer | None = None, task=None,
                 **adapter_options) -> None:
        self._lock = threading.RLock()
        self.adapter: ModelAdapter = model if isinstance(model, ModelAdapter) else adapter_for(
            model, tokenizer, **adapter_options)
        self.settings = (settings or EMLoCSettings()).for_model(self.adapter.num_layers, self.adapter.temporal_patch)
        if self.settings.merge_dropped and self.adapter.uses_flash_attention:
            raise SettingsError("merge_dropped adds each merged token's log-mass to the attention logits, which "
                                "flash-attn cannot take: load the model with sdpa or eager attention, or set "
                                "merge_dropped: false")
        self.policy = policy or JSBoundedSearch.from_settings(self.settings)
        self.scorer = scorer or scorer_from_settings(self.settings)
        self.cache = PrunedCache(self.adapter.num_layers)
        self.standing_questions: list[str] = []
        self.chunks_folded = 0
        self.records: deque[FoldRecord] = deque(maxlen=self.KEEP_RECORDS)  # an endless stream keeps the newest
        self.temporal = TemporalPositions(self.adapter, self.settings.temporal_range)
        self.time_span: tuple[float, float] | None = None  # of the frames folded, when they had timestamps
        # the probe's answer as the model last gave it, carried to the next chunk (probe_answer_refresh: carry)
        self.probe_answer: tuple[int, ...] = ()
        self.task = task
        if task is None:
            self._start_stream()
        else:
            self._start_from(task)

    def _start_from(self, task) -> None:
        """Starts from a task pack: its cache (preamble and compressed examples) becomes the sinks."""
        task.check_model(self.adapter.identity())
        if task.settings.system_prompt != self.settings.system_prompt:
            raise SettingsError(f"the task pack was built with the system prompt {task.settings.system_prompt!r}, "
                                f"this stream uses {self.settings.system_prompt!r}; use the same one")
        device = self.adapter.device
        self.cache.restore({k: v.to(device) for k, v in task.tensors.items()})
        for name, value in task.counters.items():
            setattr(self, name, value)
        longest = max(self.cache.lengths())
        budget = self.settings.token_budget
        if budget is not None and budget <= longest:
            raise SettingsError(f"token_budget={budget} leaves no room: the task pack alone holds up to {longest} "
                                f"tokens per layer, which are never evicted")

    def _start_stream(self) -> None:
        """Commits the preamble (system and user turn up to the video): the attention sinks."""
        ids = self.adapter.preamble_ids(self.settings.system_prompt)
        n = len(ids)
        budget = self.settings.token_budget
        if budget is not None and budget <= n:
            raise SettingsError(f"token_budget={budget} leaves no room: the stream's preamble alone holds {n} tokens")
        with torch.no_grad():
            run_layers(self.adapter, self.cache, self.adapter.embed_text(ids), self.adapter.text_positions(0, n))
        origins = torch.arange(n, device=self.adapter.device).view(1, 1, -1).expand(1, self.adapter.num_kv_heads, -1)
        for layer in self.cache.layers:
            layer.commit_tail(origins, torch.zeros(origins.shape))
        self.sink_tokens = n
        self.video_start = n  # video positions start right after <|vision_start|>
        self.max_position = n - 1
        self.tokens_seen = n

    # --- fold ------------------------------------------------------------------------
    @_one_at_a_time
    @torch.no_grad()
    def fold(self, frames, *, questions: list[str] | tuple[str, ...] = (),
             timestamps: list[float] | None = None) -> FoldRecord:
        """Folds a chunk of frames, (T, H, W, 3) uint8 RGB, into the cache.

        questions: questions waiting to be answered; with the standing questions they
            are the observers, else the probe prompt is.
        timestamps: presentation time (s) of each frame, for the record's time span.
        If anything fails the cache is left exactly as it was: commits and evictions of
        every layer are undone together.
        """
        if timestamps is not None and len(timestamps) != len(frames):
            raise InputError(f"{len(timestamps)} timestamps for {len(frames)} frames")
        adapter, temporal = self.adapter, self.temporal
        clock = time.perf_counter()
        pixels = adapter.preprocess(frames)
        pixels.first_step = temporal.steps
        embeds = adapter.encode_video(pixels)
        vision_s = time.perf_counter() - clock

        n, t = embeds.shape[1], pixels.grid_thw[0]
        observers = observers_for(self, questions) if self.policy.needs_observers else []
        steps = adapter.token_steps(pixels, n)
        counters = (temporal.halvings, self.max_position, list(temporal.layout))
        halving = temporal.halvings_for(temporal.steps + t - 1) > temporal.halvings
        try:  # a halving moves committed keys: undone with the fold it was for (the fold saves its own work)
            with self.cache.saved() if halving else contextlib.nullcontext():
                self._fit_positions(temporal.steps + t - 1)
                positions = adapter.video_positions(self._chunk_start(), temporal.steps, pixels, temporal.scale)
                temporal.note_chunk(self.tokens_seen, n // t)
                fold = fold_segment(self, embeds, positions, steps,
                                    lambda start: question_runs(self, observers, start, n),
                                    frame_text=adapter.frame_text(pixels, n))
        except BaseException:
            temporal.halvings, self.max_position, temporal.layout = counters
            raise
        carried = fold.pop("probe_answer")
        if carried is not None:
            self.probe_answer = carried
        first = int(positions[0].min())
        temporal.steps += t
        if timestamps:
            start = self.time_span[0] if self.time_span else float(timestamps[0])
            self.time_span = (start, float(timestamps[-1]))
        return self._record(dict(fold, frames=len(frames), padded_frames=pixels.padded_frames, vision_s=vision_s,
                                 positions=(first, int(positions[0].max())), temporal_scale=temporal.scale))

    @_one_at_a_time
    @torch.no_grad()
    def fold_examples(self, examples, observers=()) -> FoldRecord:
        """Folds labelled examples (a task pack's chunk) into the cache: each example's picture or
        clip, then its question and answer and the next user turn (`adapter.example_ids`).

        examples, observers: objects with `frames` (T, H, W, 3) uint8, `question` and `answer`.
        The observers are held-out examples (their picture, question and answer, run after the
        chunk); the positions they must keep are their answer's tokens and the stop after it
        (EMLoC's many-shot setting). Only before any video: examples come first in a stream.
        """
        return self._record(fold_examples(self, examples, observers))

    def _chunk_start(self) -> int:
        """Where the next chunk's positions start: the video's start (the adapter adds the chunk's own
        temporal offset), or right after the last position for families that chain their frames."""
        return self.max_position + 1 if self.adapter.chains_positions else self.video_start

    def _fit_positions(self, last_step: int) -> None:
        """Compresses the video's temporal positions so that step `last_step` falls within the model's
        range (`TemporalPositions.fit`); the next text then goes right after the compressed video."""
        if self.temporal.fit(self.cache, last_step, self.sink_tokens) and self.temporal.steps:
            last_folded = self.temporal.last_offset()
            self.max_position = max(self.video_start - 1,
                                    self.video_start + int(last_folded * self.temporal.scale))

    def _record(self, fields: dict) -> FoldRecord:
        record = FoldRecord(index=self.chunks_folded, tokens_after=self.cache.lengths(), time_span=self.time_span,
                            cache_bytes=self.cache.nbytes(), **fields)
        self.chunks_folded += 1
        self.records.append(record)
        return record

    def sink_lengths(self) -> list[int]:
        """Per layer, the committed tokens that are never evicted (origin < sink_tokens): the
        preamble, and a task pack's examples as that layer kept them (pruned layer by layer)."""
        return [int((layer.committed_origins() < self.sink_tokens).sum(-1).max()) if layer.length else 0
                for layer in self.cache.layers]

    def video_tokens_seen(self) -> int:
        """Tokens folded after the sinks (the preamble and a task pack's examples): the video's."""
        return self.tokens_seen - self.sink_tokens

    def video_tokens_kept(self) -> float:
        """The video's tokens still in the cache, averaged over layers (the sinks left out)."""
        return (sum(self.cache.lengths()) - sum(self.sink_lengths())) / self.adapter.num_layers

    # --- snapshots ---------------------------------------------------------------------
    @_one_at_a_time
    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The context as tensors and plain data (`emloc/snapshot.py`): enough to go on folding exactly
        where it stopped."""
        return snapshot_of(self)

    @_one_at_a_time
    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Loads a snapshot; refuses one made by another model, from another task pack or with other settings."""
        restore_into(self, tensors, meta)

    # --- answer ----------------------------------------------------------------------
    @_one_at_a_time
    @torch.no_grad()
    def answer(self, question: str, *, max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, partial_frames=None, return_logits: bool = False) -> Answer:
        """Answers over the cache without changing it, so any number of questions can share it.

        partial_frames: frames not yet in a full chunk; they are prefilled for this answer
            only (unpruned) and forgotten afterwards.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        clock = time.perf_counter()
        adapter = self.adapter
        ids = adapter.question_ids(question)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        start = self.max_position + 1
        try:
            if partial_frames is not None and len(partial_frames):
                pixels = adapter.preprocess(partial_frames)
                pixels.first_step = self.temporal.steps
                positions = adapter.video_positions(self._chunk_start(), self.temporal.steps, pixels,
                                                   self.temporal.scale)
                run_layers(adapter, self.cache, adapter.encode_video(pixels), positions)
                start = max(start, int(positions.max()) + 1)
            timing: dict = {}
            partial_s = time.perf_counter() - clock
            tokens, logits = generate(adapter, self.cache, ids, adapter.text_positions(start, len(ids)),
                                      max_new_tokens, temperature=temperature, top_p=top_p, generator=generator,
                                      timing=timing)
        finally:
            self.cache.drop_tails()
        lengths = self.cache.lengths()
        return Answer(question=question, text=adapter.decode(tokens), token_ids=tokens,
                      cache_tokens=round(sum(lengths) / len(lengths)), chunks_folded=self.chunks_folded,
                      time_span=self.time_span, latency_s=time.perf_counter() - clock,
                      prompt_logits=logits if return_logits else None,
                      first_token_s=partial_s + timing["first_token_s"], decode_s=timing["decode_s"])
