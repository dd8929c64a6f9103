"""The compressed context of one stream: fold chunks of frames in, ask questions any time.

    context = StreamContext(model, tokenizer, videomme_online())
    record = context.fold(frames)            # (T, H, W, 3) uint8
    answer = context.answer("What colour was the triangle?")

One chunk, from frames to committed cache (method.md, section 2): encode the frames,
prefill them into every layer's tail, run the observers after them, let the
retention policy choose what each layer keeps, commit, and enforce the budget.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections import deque

import torch
import torch.nn.functional as F

from .adapters import InputError, ModelAdapter, adapter_for
from .adapters.base import rank_with_frames
from .budget import enforce_budget
from .cache import PrunedCache
from .forward import LayerWork, counting_layers, generate, run_layers
from .observer import Observer, ObserverPass, ObserverRun, observe, observe_together
from .policies import FoldState, JSBoundedSearch, RetentionPolicy
from .records import Answer, FoldRecord
from .scorers import ChunkView, Scorer, attention_share, scorer_from_settings
from .settings import MAX_NEW_TOKENS, EMLoCSettings, SettingsError


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
        self._steps = 0  # temporal steps (frame pairs) folded so far
        self.temporal_halvings = 0  # the video's temporal positions are spaced 2 ** -halvings apart
        # (first origin, first step, tokens per step) of the video, one entry per change of frame size:
        # a committed token's temporal step, to move its key when the positions are compressed
        self._video_layout: list[tuple[int, int, int]] = []
        declared = self.settings.temporal_range
        self.temporal_range = (self.adapter.temporal_range if declared is None else declared) or None  # 0: never
        if self.temporal_range is not None and self.adapter.temporal_policy_refusal:
            raise SettingsError(f"temporal_range={self.temporal_range} is not supported for "
                                f"{type(self.adapter).__name__}: {self.adapter.temporal_policy_refusal}")
        self._time_span: tuple[float, float] | None = None
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
        adapter = self.adapter
        clock = time.perf_counter()
        pixels = adapter.preprocess(frames)
        pixels.first_step = self._steps
        embeds = adapter.encode_video(pixels)
        vision_s = time.perf_counter() - clock

        n, t = embeds.shape[1], pixels.grid_thw[0]
        observers = self._observers(questions) if self.policy.needs_observers else []
        steps = adapter.token_steps(pixels, n)
        counters = (self.temporal_halvings, self.max_position, list(self._video_layout))
        halving = self.halvings_for(self._steps + t - 1) > self.temporal_halvings
        try:  # a halving moves committed keys: undone with the fold it was for (the fold saves its own work)
            with self.cache.saved() if halving else contextlib.nullcontext():
                self._fit_positions(self._steps + t - 1)
                positions = adapter.video_positions(self._chunk_start(), self._steps, pixels, self.temporal_scale)
                if not self._video_layout or self._video_layout[-1][2] != n // t:
                    self._video_layout.append((self.tokens_seen, self._steps, n // t))
                fold = self._fold_segment(embeds, positions, steps,
                                          lambda start: self._question_runs(observers, start, n),
                                          frame_text=adapter.frame_text(pixels, n))
        except BaseException:
            self.temporal_halvings, self.max_position, self._video_layout = counters
            raise
        carried = fold.pop("probe_answer")
        if carried is not None:
            self.probe_answer = carried
        first = int(positions[0].min())
        self._steps += t
        if timestamps:
            start = self._time_span[0] if self._time_span else float(timestamps[0])
            self._time_span = (start, float(timestamps[-1]))
        return self._record(fold, frames=len(frames), padded_frames=pixels.padded_frames, vision_s=vision_s,
                            positions=(first, int(positions[0].max())), temporal_scale=self.temporal_scale)

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
        if self._steps:
            raise InputError("examples go before the video: this stream has already folded frames")
        adapter = self.adapter
        clock = time.perf_counter()
        pieces, positions, steps = [], [], []
        start = self.video_start
        for k, example in enumerate(examples):
            video, video_positions = self._example_video(example.frames, start)
            tail = adapter.example_ids(example.question, example.answer)
            first = int(video_positions.max()) + 1
            pieces += [video, adapter.embed_text(tail)]
            positions += [video_positions, adapter.text_positions(first, len(tail))]
            steps.append(torch.full((video.shape[1] + len(tail),), k))
            start = first + len(tail)
        if not pieces:
            raise InputError("a chunk of examples needs at least one example")
        embeds, positions = torch.cat(pieces, dim=1), torch.cat(positions, dim=1)
        prepared = [self._example_observer(o) for o in observers]
        vision_s = time.perf_counter() - clock
        fold = self._fold_segment(embeds, positions, torch.cat(steps),
                                  lambda at: [self._example_run(o, at) for o in prepared])
        fold.pop("probe_answer")
        self.video_start = start  # the next picture (or the stream's video) starts here
        self.max_position = max(self.max_position, start - 1)
        self.sink_tokens = self.tokens_seen  # examples are never evicted
        return self._record(fold, frames=sum(len(e.frames) for e in examples), padded_frames=0, vision_s=vision_s,
                            positions=(int(positions[0].min()), int(positions[0].max())))

    def _chunk_start(self) -> int:
        """Where the next chunk's positions start: the video's start (the adapter adds the chunk's own
        temporal offset), or right after the last position for families that chain their frames."""
        return self.max_position + 1 if self.adapter.chains_positions else self.video_start

    # --- positions past the model's range ---------------------------------------------------
    @property
    def steps_folded(self) -> int:
        """Temporal steps (frame pairs) of video folded so far."""
        return self._steps

    @property
    def temporal_scale(self) -> float:
        return 2.0 ** -self.temporal_halvings

    def _fit_positions(self, last_step: int) -> None:
        """Halves the video's temporal spacing until temporal step `last_step` falls within the
        model's range: every committed video key is turned back by the difference between its old
        and new position, and the next text goes right after the compressed video. A stream that
        stays in range is never touched (its positions are the model processor's integers)."""
        halvings = max(self.temporal_halvings, self.halvings_for(last_step))
        if halvings == self.temporal_halvings:
            return
        change = 2.0 ** -halvings - self.temporal_scale
        for layer in self.cache.layers:
            if not layer.length:
                continue
            origins = layer.committed_origins()
            video = origins >= self.sink_tokens
            if not bool(video.any()):  # only the sinks: nothing moves
                continue
            offsets = self.adapter.temporal_offsets(self._step_of(origins.clamp(min=self.sink_tokens)))
            layer.replace_keys(self.adapter.shift_keys(layer.keys, torch.where(video, offsets * change, 0.0)))
        self.temporal_halvings = halvings
        if self._steps:
            last_folded = float(self.adapter.temporal_offsets(torch.tensor([self._steps - 1]))[0])
            self.max_position = max(self.video_start - 1, self.video_start + int(last_folded * self.temporal_scale))

    def halvings_for(self, last_step: int) -> int:
        """How often the temporal spacing must be halved for temporal step `last_step` to fall
        within the range: what a stream folded up to that step has done (0 with no range)."""
        if self.temporal_range is None or last_step < 0:
            return 0
        last = float(self.adapter.temporal_offsets(torch.tensor([last_step]))[0])
        halvings = 0
        while last * 2.0 ** -halvings >= self.temporal_range:
            halvings += 1
        return halvings

    def _step_of(self, origins: torch.Tensor) -> torch.Tensor:
        """The temporal step of video tokens, from their origins (index in the stream)."""
        steps = torch.zeros_like(origins)
        for first_origin, first_step, per_step in self._video_layout:
            part = origins >= first_origin
            steps[part] = first_step + (origins[part] - first_origin) // per_step
        return steps

    def _example_video(self, frames, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = self.adapter.preprocess(frames)
        return self.adapter.encode_video(pixels), self.adapter.video_positions(start, 0, pixels)

    def _example_observer(self, example) -> tuple[Observer, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(observer, picture embeddings, picture positions from 0, question + answer ids)."""
        video, positions = self._example_video(example.frames, 0)
        answer = self.adapter.answer_ids(example.answer)
        ids = torch.cat([self.adapter.question_ids(example.question), answer])
        return Observer("example", example.question, tuple(answer.tolist())), video, positions, ids

    def _example_run(self, prepared, start: int) -> ObserverRun:
        observer, video, video_positions, ids = prepared
        video_positions = video_positions + start
        first = int(video_positions.max()) + 1
        embeds = torch.cat([video, self.adapter.embed_text(ids)], dim=1)
        positions = torch.cat([video_positions, self.adapter.text_positions(first, len(ids))], dim=1)
        return ObserverRun(observer, embeds, positions, len(observer.answer_ids) + 1)

    def _question_runs(self, observers: list[Observer], start: int, chunk_len: int) -> list[ObserverRun]:
        """The observers as runs after the chunk. The probe carries the model's answer to it: the one it
        gave over the previous chunk (checked and extended in this chunk's own pass), or, with
        `probe_answer_refresh: decode`, a fresh greedy answer over this chunk (one pass per token)."""
        runs = []
        for observer in observers:
            ids = self.adapter.question_ids(observer.text)
            if observer.kind == "probe" and self.settings.probe_answer_tokens:
                if self._decodes_probe_answer():
                    observer = self._with_own_answer(observer, ids, start, chunk_len)
                else:
                    observer = Observer(observer.kind, observer.text, self.probe_answer)
                ids = torch.cat([ids, torch.tensor(observer.answer_ids, dtype=ids.dtype)])
            embeds, positions = self.adapter.embed_text(ids), self.adapter.text_positions(start, len(ids))
            runs.append(ObserverRun(observer, embeds, positions, self.settings.observed_positions))
        return runs

    def _decodes_probe_answer(self) -> bool:
        """Whether this fold decodes the probe's answer afresh: always with 'decode'; with 'carry_start' when
        there is none to carry (the stream's first chunk, or the answer's first token was a stop)."""
        refresh, tokens = self.settings.probe_answer_refresh, self.settings.probe_answer_tokens
        return tokens > 0 and (refresh == "decode" or (refresh == "carry_start" and not self.probe_answer))

    def _confirm_probe_answer(self, passes: list[ObserverPass], log_probs: list[torch.Tensor]):
        """The carried answer, checked in the probe's own pass: the tokens the model's greedy choice still
        confirms after this chunk stay, and the bound covers the probe and those tokens only (the pass is
        cut after them: what follows is text the model would not say now), which is the observer a fresh
        decode would give, as long as the video has let it grow; the token the model would say next is
        added for the next chunk. The answer follows the video a token a chunk at no pass of its own.
        Returns the passes and the answer to carry (None: nothing carried)."""
        if self.settings.probe_answer_refresh == "decode" or not self.settings.probe_answer_tokens:
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
            m = min(self.settings.observed_positions, end)
            cos, sin = run.rotary
            passes[k] = ObserverPass(Observer(run.observer.kind, run.observer.text, tuple(answer[:kept])),
                                     [None if x is None else x[:, :end] for x in run.layer_inputs],
                                     (cos[..., :end, :], sin[..., :end, :]), run.positions[:, :end],
                                     rows[end - m:end], run.attention)
            following = said[end - 1]
            carried = answer[:kept] + ([following] if following not in self.adapter.stop_ids()
                                       and kept < self.settings.probe_answer_tokens else [])
        return passes, None if carried is None else tuple(carried)

    def _fold_segment(self, embeds: torch.Tensor, positions: torch.Tensor, steps: torch.Tensor, make_runs,
                      frame_text: torch.Tensor | None = None) -> dict:
        """Prefills a segment (1, n, d) at `positions` (3, n), runs the observers after it
        (`make_runs(first free position)`: the first in the prefill's own pass, the others together in
        one more), ranks its tokens, lets the policy choose what each
        layer keeps, commits, and enforces the budget. All or nothing."""
        adapter, cache, settings = self.adapter, self.cache, self.settings
        n = embeds.shape[1]
        before = cache.lengths()
        with cache.saved(), counting_layers() as work:  # all or nothing: a failure puts every layer back
            max_position = max(self.max_position, int(positions.max()))
            # a fresh decode of the probe's answer needs the chunk in the cache before the runs exist
            decode_first = self._decodes_probe_answer()
            clock = time.perf_counter()
            runs = make_runs(max_position + 1) if self.policy.needs_observers and not decode_first else []
            if runs:  # the first observer rides in the chunk's prefill pass: it comes right after the chunk
                passes, rows = observe_together(adapter, cache, runs[:1], lead=(embeds, positions))
                runs = runs[1:]
            else:
                run_layers(adapter, cache, embeds, positions)
                passes, rows = [], []
            prefill_s = time.perf_counter() - clock

            clock = time.perf_counter()
            if decode_first and self.policy.needs_observers:
                runs = make_runs(max_position + 1)
            together = adapter.attention_implementation in FoldState.BATCHED_ATTENTION
            for batch in ([runs] if together else [[run] for run in runs]) if runs else []:
                more, more_rows = observe_together(adapter, cache, batch)
                passes, rows = passes + more, rows + more_rows
            passes, probe_answer = self._confirm_probe_answer(passes, rows)
            observe_s = time.perf_counter() - clock

            clock = time.perf_counter()
            chunk_keys = [layer.tail_keys().clone() for layer in cache.layers]
            chunk_values = [layer.tail_values().clone() for layer in cache.layers]
            template = self._template_attention(max_position + 1, before) if self.scorer.needs_template else None
            view = ChunkView(chunk_keys, chunk_values, adapter.rotary(embeds, positions), steps,
                             [[p.attention[i][..., before[i]:] for p in passes] for i in range(adapter.num_layers)],
                             template)
            importance = [self.scorer.score(view, i) for i in range(adapter.num_layers)]
            if frame_text is not None:  # a frame's own text (Qwen3-VL's timestamp) is kept with the frame
                importance = [rank_with_frames(scores, steps, frame_text) for scores in importance]
            prefix_attention = [[p.attention[i][..., :before[i]] for p in passes] for i in range(adapter.num_layers)]
            score_s = time.perf_counter() - clock

            clock = time.perf_counter()
            merge = ([F.normalize(view.unrotated_keys(i), dim=-1) for i in range(adapter.num_layers)]
                     if settings.merge_dropped else None)
            state = FoldState(adapter, cache, chunk_keys, chunk_values, importance, steps, passes, merge)
            retention = self.policy.retain(state)
            search_s = time.perf_counter() - clock
            kept = self._commit(state, retention.keep, prefix_attention)
            evicted = self.policy.evict(cache, self.sink_tokens)
            if settings.token_budget is not None:
                budget = enforce_budget(cache, settings.token_budget, self.sink_tokens)
                evicted = [a + b for a, b in zip(evicted, budget)]
        self.tokens_seen += n
        self.max_position = max_position
        return dict(chunk_tokens=n, groups=retention.groups, kept=kept, evicted=evicted, tokens_before=before,
                    observers=[p.observer for p in passes], max_position=max_position, prefill_s=prefill_s,
                    observe_s=observe_s, search_s=search_s, evaluations=state.evaluations, score_s=score_s,
                    probe_answer=probe_answer, work=LayerWork(work.calls, work.token_layers))

    def _record(self, fold: dict, **fields) -> FoldRecord:
        record = FoldRecord(index=self.chunks_folded, tokens_after=self.cache.lengths(), time_span=self._time_span,
                            cache_bytes=self.cache.nbytes(), **fold, **fields)
        self.chunks_folded += 1
        self.records.append(record)
        return record

    def _with_own_answer(self, observer: Observer, ids: torch.Tensor, start: int, chunk_len: int) -> Observer:
        """The probe followed by the model's greedy answer to it over the unpruned chunk (then forgotten)."""
        tokens, _ = generate(self.adapter, self.cache, ids, self.adapter.text_positions(start, len(ids)),
                             self.settings.probe_answer_tokens)
        for layer in self.cache.layers:
            layer.drop_tail(keep=chunk_len)
        return Observer(observer.kind, observer.text, tuple(tokens))

    def _observers(self, questions) -> list[Observer]:
        found = ([Observer("question", q) for q in questions]
                 + [Observer("standing", q) for q in self.standing_questions])
        for observer in found:
            self.adapter.question_ids(observer.text)  # a bad question fails before any work
        return found[: self.settings.max_observers] or [Observer("probe", self.settings.probe_prompt)]

    def _template_attention(self, start: int, before: list[int]) -> list[torch.Tensor]:
        """Attention of the assistant-turn template (no question) onto the chunk, per layer."""
        ids = self.adapter.template_ids()
        run: ObserverPass = observe(self.adapter, self.cache, Observer("template", ""), ids,
                                    self.adapter.text_positions(start, len(ids)), 1)
        return [a[..., b:] for a, b in zip(run.attention, before)]

    def _commit(self, state: FoldState, keep: list, prefix_attention: list[list[torch.Tensor]]) -> list[int]:
        """Puts each layer's retained chunk tokens after its committed ones. With an attention
        scorer, the committed tokens' importance also moves towards what this fold's observers
        looked at: each observer's attention share among the committed video tokens (mean 1,
        like a chunk's scores), weighted 1 - importance_decay."""
        decay = self.settings.importance_decay
        chunk_origins = torch.arange(self.tokens_seen, self.tokens_seen + state.chunk_len, device=self.adapter.device)
        chunk_origins = chunk_origins.view(1, 1, -1).expand(1, self.adapter.num_kv_heads, -1)
        kept = []
        for i, layer in enumerate(self.cache.layers):
            state.apply({i: keep[i]})
            origins, importance = chunk_origins, state.importance[i]
            if keep[i] is not None:
                origins, importance = torch.gather(origins, 2, keep[i]), torch.gather(importance, 2, keep[i])
            if self.scorer.needs_attention and prefix_attention[i]:
                old = layer.committed_importance()
                old.mul_(decay).add_((1 - decay) * attention_share(prefix_attention[i], skip=self.sink_tokens))
            layer.commit_tail(origins, importance)
            kept.append(origins.shape[-1])
        return kept

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
    STATE_FIELDS = ("chunks_folded", "_steps", "sink_tokens", "video_start", "max_position", "tokens_seen",
                    "temporal_halvings")

    @_one_at_a_time
    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The context as tensors (the committed cache) and plain data (positions, settings,
        model identity): everything needed to go on folding exactly where it stopped."""
        meta = {name.lstrip("_"): getattr(self, name) for name in self.STATE_FIELDS}
        meta.update(video_layout=[list(entry) for entry in self._video_layout],
                    time_span=list(self._time_span) if self._time_span else None, settings=self.settings.to_dict(),
                    model=self.adapter.identity(), standing_questions=list(self.standing_questions),
                    probe_answer=list(self.probe_answer),
                    task=self.task.digest if self.task is not None else None)
        return self.cache.export(), meta

    @_one_at_a_time
    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Loads a snapshot; refuses one made by another model or with other settings."""
        mine = self.adapter.identity()
        if meta.get("model") != mine:
            theirs = meta.get("model") or {}
            differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise SettingsError(f"the saved state was made by another model (differs in {differ}); "
                                f"it cannot be resumed with this one")
        mine_task = self.task.digest if self.task is not None else None
        if meta.get("task") != mine_task:
            raise SettingsError(f"the saved state was made with task pack {meta.get('task')!r}, this stream "
                                f"starts from {mine_task!r}; resume with the same --task")
        settings = EMLoCSettings.from_dict(meta.get("settings", {}))
        if settings != self.settings:
            ours, saved = self.settings.to_dict(), settings.to_dict()
            differ = {k: (saved[k], ours[k]) for k in ours if ours[k] != saved[k]}
            raise SettingsError(f"the saved state was made with other settings (saved vs now: {differ})")
        device = self.adapter.device
        self.cache.restore({k: v.to(device) for k, v in tensors.items()})
        for name in self.STATE_FIELDS:
            setattr(self, name, int(meta[name.lstrip("_")]))
        self._video_layout = [tuple(int(x) for x in entry) for entry in meta["video_layout"]]
        self._time_span = tuple(meta["time_span"]) if meta.get("time_span") else None
        self.standing_questions = list(meta.get("standing_questions", []))
        self.probe_answer = self._checked_probe_answer(meta.get("probe_answer", []))

    def _checked_probe_answer(self, answer) -> tuple[int, ...]:
        """A saved carried answer (untrusted): token ids the model has, no longer than the setting allows
        (a state saved before answers were carried has none: the next chunk starts a new one)."""
        vocab = self.adapter.model.get_input_embeddings().num_embeddings
        if (not isinstance(answer, list) or len(answer) > self.settings.probe_answer_tokens
                or not all(type(t) is int and 0 <= t < vocab for t in answer)):
            raise ValueError(f"probe_answer must be a list of at most {self.settings.probe_answer_tokens} token ids "
                             f"below {vocab}")
        return tuple(answer)

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
                pixels.first_step = self._steps
                positions = adapter.video_positions(self._chunk_start(), self._steps, pixels, self.temporal_scale)
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
                      time_span=self._time_span, latency_s=time.perf_counter() - clock,
                      prompt_logits=logits if return_logits else None,
                      first_token_s=partial_s + timing["first_token_s"], decode_s=timing["decode_s"])
